//! Output files: `.npy` (float32, `[N, hidden]`, C order) or JSON lines, and the merge of sharded
//! runs' outputs. A file is written under a temporary name in the same directory and renamed into
//! place only when complete, so a failed run never leaves an output that looks finished. The `.npy`
//! writer is a few lines of header plus raw little-endian floats, which is all the format needs.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The layout of an output file (`auto`, `npy` or `jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// By extension: `.npy` is NumPy, `.jsonl`/`.ndjson` JSON lines.
    Auto,
    Npy,
    Jsonl,
}

impl std::str::FromStr for OutputFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<OutputFormat> {
        match s {
            "auto" => Ok(OutputFormat::Auto),
            "npy" => Ok(OutputFormat::Npy),
            "jsonl" => Ok(OutputFormat::Jsonl),
            _ => Err(Error::input(
                "--output-format",
                format!("{s:?} is not one of auto, npy, jsonl"),
            )),
        }
    }
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

/// Joins the outputs of `--shard 0/N` ... `--shard N-1/N` runs (in that order) back into input
/// order in `out`, in the shards' format; returns the rows written.
pub fn merge(out: &Path, shards: &[PathBuf]) -> Result<usize> {
    let format = OutputFormat::Auto.resolve(out)?;
    for shard in shards {
        if format != OutputFormat::Auto.resolve(shard)? {
            return Err(Error::input(
                format!("shard {}", shard.display()),
                format!("not the format of {}", out.display()),
            ));
        }
    }
    match format {
        OutputFormat::Npy => merge_npy(out, shards),
        _ => merge_jsonl(out, shards),
    }
}

/// Shard K of N holds records K, K+N, ...: row i of the whole comes from shard i % N.
fn merge_npy(out: &Path, shards: &[PathBuf]) -> Result<usize> {
    let mut readers = Vec::new();
    let mut counts = Vec::new();
    let mut width = None;
    for path in shards {
        let what = format!("shard {}", path.display());
        let skipped = PathBuf::from(format!("{}.skipped.jsonl", path.display()));
        if skipped.exists() {
            return Err(Error::input(what, format!("lines were skipped ({}), so its rows no longer follow the input's; merge JSON-lines outputs instead", skipped.display())));
        }
        let mut r =
            BufReader::new(File::open(path).map_err(|e| Error::io(path, "cannot open", e))?);
        let (rows, cols, _) = read_npy_header(path, &mut r)?;
        if *width.get_or_insert(cols) != cols {
            return Err(Error::input(
                what,
                format!("{cols} columns, the first shard has {}", width.unwrap_or(0)),
            ));
        }
        counts.push(rows);
        readers.push(r);
    }
    let cols = width.unwrap_or(0);
    for (k, &c) in counts.iter().enumerate() {
        if c > counts[0] || c + 1 < counts[0] || (k > 0 && c > counts[k - 1]) {
            return Err(Error::input(
                format!("shard {}", shards[k].display()),
                format!("{c} rows does not fit shards of {counts:?} rows (are the shards complete and in order 0/N..N-1/N?)"),
            ));
        }
    }
    let total: usize = counts.iter().sum();
    let mut row = vec![0u8; cols * 4];
    atomic_write(out, |w| {
        w.write_all(&npy_header(total, cols))?;
        for i in 0..total {
            let n = readers.len();
            readers[i % n].read_exact(&mut row)?;
            w.write_all(&row)?;
        }
        Ok(())
    })?;
    Ok(total)
}

/// JSON-lines shards carry each record's input index: a merge by index, checking that no index
/// appears twice.
fn merge_jsonl(out: &Path, shards: &[PathBuf]) -> Result<usize> {
    let mut lines = Vec::new();
    for path in shards {
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
        lines.push(BufReader::new(file).lines().enumerate().peekable());
    }
    let index_of = |path: &Path, n: usize, line: &str| -> std::io::Result<u64> {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            std::io::Error::other(format!("{}, line {}: {e}", path.display(), n + 1))
        })?;
        v["index"].as_u64().ok_or_else(|| {
            std::io::Error::other(format!("{}, line {}: no \"index\"", path.display(), n + 1))
        })
    };
    let mut merged = 0;
    atomic_write(out, |w| {
        let mut last: Option<u64> = None;
        loop {
            let mut best: Option<(u64, usize)> = None;
            for (k, it) in lines.iter_mut().enumerate() {
                if let Some((n, line)) = it.peek() {
                    let line = line
                        .as_ref()
                        .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
                    let index = index_of(&shards[k], *n, line)?;
                    if best.is_none_or(|(b, _)| index < b) {
                        best = Some((index, k));
                    }
                }
            }
            let Some((index, k)) = best else { break };
            if last.is_some_and(|l| l >= index) {
                return Err(std::io::Error::other(format!(
                    "index {index} appears twice or out of order (shard {})",
                    shards[k].display()
                )));
            }
            last = Some(index);
            let (_, line) = lines[k].next().expect("peeked");
            w.write_all(line?.as_bytes())?;
            w.write_all(b"\n")?;
            merged += 1;
        }
        Ok(())
    })?;
    Ok(merged)
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
