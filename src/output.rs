//! Writing embeddings: `.npy` (float32, `[N, hidden]`, C order) or JSON lines. A file is written
//! under a temporary name in the same directory and renamed into place only when complete, so a
//! failed run never leaves an output that looks finished. The `.npy` writer is a few lines of
//! header plus raw little-endian floats, which is all the format needs.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The layout of an output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// By extension: `.npy` is NumPy, `.jsonl`/`.ndjson` JSON lines.
    Auto,
    Npy,
    Jsonl,
}

impl OutputFormat {
    /// The concrete format for `path`, or an error naming the extensions understood.
    pub fn resolve(self, path: &Path) -> Result<OutputFormat> {
        if self != OutputFormat::Auto {
            return Ok(self);
        }
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("npy") => Ok(OutputFormat::Npy),
            Some("jsonl" | "ndjson") => Ok(OutputFormat::Jsonl),
            _ => Err(Error::input(
                format!("output {}", path.display()),
                "unknown format: name it .npy or .jsonl, or pass --output-format",
            )),
        }
    }
}

/// Length of every `.npy` header this crate writes: fixed, so that a streamed file's header can be
/// rewritten with the final row count in place.
pub const NPY_HEADER_LEN: usize = 128;

/// The `.npy` header for a float32 `[rows, cols]` array, padded to [`NPY_HEADER_LEN`] bytes.
pub fn npy_header(rows: usize, cols: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = 10 + dict.len() + 1;
    let pad = NPY_HEADER_LEN.saturating_sub(unpadded);
    let mut header = Vec::with_capacity(unpadded + pad);
    header.extend_from_slice(b"\x93NUMPY\x01\x00");
    header.extend_from_slice(&((dict.len() + pad + 1) as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header.extend(std::iter::repeat_n(b' ', pad));
    header.push(b'\n');
    header
}

/// Writes `rows` (all of length `cols`) to `path` atomically.
pub fn write(path: &Path, format: OutputFormat, rows: &[Vec<f32>], cols: usize) -> Result<()> {
    let format = format.resolve(path)?;
    atomic_write(path, |w| match format {
        OutputFormat::Npy => {
            w.write_all(&npy_header(rows.len(), cols))?;
            for row in rows {
                for x in row {
                    w.write_all(&x.to_le_bytes())?;
                }
            }
            Ok(())
        }
        _ => {
            for (i, row) in rows.iter().enumerate() {
                serde_json::to_writer(&mut *w, &serde_json::json!({"index": i, "embedding": row}))?;
                w.write_all(b"\n")?;
            }
            Ok(())
        }
    })
}

/// Runs `fill` on a buffered temporary file beside `path`, syncs it and renames it to `path`; on
/// any error the temporary file is removed and `path` is untouched.
pub fn atomic_write(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        drop(w);
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, "cannot write the output", e)
    })
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_describes_the_array() {
        let h = npy_header(3, 4096);
        assert_eq!(h.len(), NPY_HEADER_LEN);
        assert_eq!(npy_header(usize::MAX, usize::MAX).len(), NPY_HEADER_LEN);
        assert!(h.starts_with(b"\x93NUMPY\x01\x00"));
        let text = String::from_utf8_lossy(&h[10..]);
        assert!(text.contains("'shape': (3, 4096)") && text.ends_with('\n'));
        assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, h.len() - 10);
    }

    #[test]
    fn failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.npy");
        let err = atomic_write(&path, |_| Err(std::io::Error::other("boom")));
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unknown_extension_is_refused() {
        assert!(OutputFormat::Auto.resolve(Path::new("x.csv")).is_err());
        assert_eq!(
            OutputFormat::Auto.resolve(Path::new("x.npy")).unwrap(),
            OutputFormat::Npy
        );
    }
}

/// Reads the header of a float32 2-D `.npy` file: (rows, cols, offset of the data).
pub fn read_npy_header(path: &Path, r: &mut impl std::io::Read) -> Result<(usize, usize, usize)> {
    let bad = |why: &str| {
        Error::input(
            path.display().to_string(),
            format!("not a float32 [rows, cols] .npy file ({why})"),
        )
    };
    let mut head = [0u8; 10];
    r.read_exact(&mut head).map_err(|_| bad("too short"))?;
    if &head[..6] != b"\x93NUMPY" || head[6] != 1 {
        return Err(bad("bad magic or version"));
    }
    let len = u16::from_le_bytes([head[8], head[9]]) as usize;
    let mut dict = vec![0u8; len];
    r.read_exact(&mut dict)
        .map_err(|_| bad("truncated header"))?;
    let dict = String::from_utf8_lossy(&dict);
    if !dict.contains("'descr': '<f4'") || !dict.contains("'fortran_order': False") {
        return Err(bad("not little-endian float32 in C order"));
    }
    let shape = dict
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("bad shape"))?;
    match dims[..] {
        [rows, cols] => Ok((rows, cols, 10 + len)),
        _ => Err(bad("not 2-D")),
    }
}
