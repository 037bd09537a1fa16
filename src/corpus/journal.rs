//! What a corpus run keeps beside its output so that it can be resumed: the run's files
//! ([`Paths`]), its state (what is committed, the fingerprints of the input and the settings),
//! the batches of the current chunk finished so far, and the commit of a chunk. Every write goes
//! to the end of a file whose committed length the state records, so a resumed run truncates what
//! a killed one left half written.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView1};
use serde::{Deserialize, Serialize};

use crate::corpus::output::{npy_header, OutputFormat};
use crate::corpus::reader::{Chunk, Record};
use crate::corpus::run::Summary;
use crate::engine::Finished;
use crate::error::{Error, Result};

/// What the finished chunks wrote.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Committed {
    /// Records consumed (valid, skipped, or in other shards).
    pub(super) records: usize,
    pub(super) rows: usize,
    output_bytes: u64,
    skipped: usize,
    skipped_bytes: u64,
    pub(super) tokens: usize,
    chunks: usize,
}

/// The run state file's contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct State {
    version: u32,
    settings: String,
    input_size: u64,
    input_sha256: String,
    /// Components per row: the model's hidden size, or the shortened length (`--dimensions`).
    hidden: usize,
    committed: Committed,
    /// Batches of the current chunk already in the pending file, and its length.
    pending_batches: Vec<usize>,
    pending_bytes: u64,
}

/// The files of one run.
pub(super) struct Paths {
    out: PathBuf,
    partial: PathBuf,
    pending: PathBuf,
    skipped: PathBuf,
    pub(super) state: PathBuf,
    state_tmp: PathBuf,
    skipped_final: PathBuf,
}

impl Paths {
    pub(super) fn new(out: &Path) -> Paths {
        let with = |suffix: &str| {
            let mut name = out
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_default();
            name.push(suffix);
            out.with_file_name(name)
        };
        Paths {
            out: out.to_path_buf(),
            partial: with(".partial"),
            pending: with(".partial.pending"),
            skipped: with(".partial.skipped"),
            state: with(".partial.state.json"),
            state_tmp: with(".partial.state.json.tmp"),
            skipped_final: with(".skipped.jsonl"),
        }
    }

    /// Whether none of the run's side files exists (nothing to resume, nothing of the user's).
    pub(super) fn none_exist(&self) -> bool {
        [
            &self.partial,
            &self.pending,
            &self.skipped,
            &self.state,
            &self.state_tmp,
        ]
        .iter()
        .all(|p| std::fs::symlink_metadata(p).is_err())
    }
}

impl State {
    /// The state of a run that has committed nothing yet.
    pub(super) fn new(
        settings: String,
        input_size: u64,
        input_sha256: String,
        hidden: usize,
    ) -> State {
        State {
            version: 1,
            settings,
            input_size,
            input_sha256,
            hidden,
            committed: Committed::default(),
            pending_batches: Vec::new(),
            pending_bytes: 0,
        }
    }
}

/// The state to run under: an unfinished run's of the same command, or `fresh`. An unfinished run
/// is not resumed from a stream (stdin, a named pipe: `resumable` is false), with other settings,
/// or on a changed input (`name`).
pub(super) fn resume_or_start(
    paths: &Paths,
    fresh: State,
    name: &str,
    resumable: bool,
) -> Result<State> {
    let Some(old) = load_state(paths)? else {
        return Ok(fresh);
    };
    if !resumable {
        return Err(Error::input(
            paths.state.display().to_string(),
            format!(
                "an unfinished run exists, but its input {name} is a stream (stdin or a pipe), which cannot be resumed: remove {}* to start over",
                paths.partial.display()
            ),
        ));
    }
    if old.settings != fresh.settings {
        return Err(Error::input(
            format!("output {}", paths.out.display()),
            format!(
                "an unfinished run with different settings exists ({}); run the same command to resume it, or remove {}* to start over",
                paths.state.display(),
                paths.partial.display()
            ),
        ));
    }
    if old.input_size != fresh.input_size || old.input_sha256 != fresh.input_sha256 {
        return Err(Error::input(
            name,
            format!(
                "the input changed since the unfinished run in {} started; restore it, or remove {}* to start over",
                paths.state.display(),
                paths.partial.display()
            ),
        ));
    }
    Ok(old)
}

/// The summary of a run that was killed between renaming its finished output into place and
/// removing its state (the output is this very run's, complete), after tidying its side files;
/// `None` for any other state.
pub(super) fn finished_earlier(paths: &Paths, state: &State) -> Result<Option<Summary>> {
    if state.committed.rows > 0 && !paths.partial.exists() && paths.out.exists() {
        finish_side_files(paths, state.committed.skipped)?;
        return Ok(Some(summary(&state.committed, state.committed.rows)));
    }
    Ok(None)
}

/// After a failed run that started without side files ([`Paths::none_exist`]) and committed
/// nothing: its side files go, so that nothing is left to resume. That includes a run that failed
/// before its first state write (a full disk): no state, a `.partial` and a torn
/// `.state.json.tmp`. A run that committed work keeps them.
pub(super) fn discard_if_empty(paths: &Paths) {
    let empty = match std::fs::read(&paths.state) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(bytes) => serde_json::from_slice::<State>(&bytes).is_ok_and(|state| {
            state.committed.rows == 0
                && state.committed.skipped == 0
                && state.pending_batches.is_empty()
        }),
    };
    if empty {
        for p in [
            &paths.partial,
            &paths.pending,
            &paths.skipped,
            &paths.state,
            &paths.state_tmp,
        ] {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn summary(c: &Committed, resumed_from: usize) -> Summary {
    Summary {
        items: c.rows,
        tokens: c.tokens,
        skipped: c.skipped,
        resumed_from,
    }
}

/// A run under way: its state and its files, each open at the length the state records.
pub(super) struct Journal<'p> {
    paths: &'p Paths,
    state: State,
    out: File,
    skipped: File,
    pending: File,
}

impl<'p> Journal<'p> {
    /// Opens the run's files truncated to what `state` committed (an `.npy` output starts with a
    /// placeholder header) and saves the state. Returns the journal and the batches of the current
    /// chunk an earlier run finished, by batch index.
    pub(super) fn open(
        paths: &'p Paths,
        mut state: State,
        format: OutputFormat,
        hidden: usize,
    ) -> Result<(Journal<'p>, HashMap<usize, Array2<f32>>)> {
        let mut out = open_truncated(&paths.partial, state.committed.output_bytes)?;
        if state.committed.output_bytes == 0 && format == OutputFormat::Npy {
            let header = npy_header(0, hidden);
            write_at_end(&mut out, &paths.partial, &header)?;
            state.committed.output_bytes = header.len() as u64;
        }
        let skipped = open_truncated(&paths.skipped, state.committed.skipped_bytes)?;
        let pending_file = open_truncated(&paths.pending, state.pending_bytes)?;
        let mut pending = read_pending(&paths.pending, hidden)?;
        pending.retain(|b, _| state.pending_batches.contains(b));
        save_state(paths, &state)?;
        let journal = Journal {
            paths,
            state,
            out,
            skipped,
            pending: pending_file,
        };
        Ok((journal, pending))
    }

    /// What the finished chunks wrote.
    pub(super) fn committed(&self) -> &Committed {
        &self.state.committed
    }

    /// Keeps a finished batch of the current chunk, so that a resumed run need not compute it.
    pub(super) fn record_batch(&mut self, f: &Finished) -> Result<()> {
        let bytes = encode_pending(f.index, &f.vectors);
        write_at_end(&mut self.pending, &self.paths.pending, &bytes)?;
        self.state.pending_batches.push(f.index);
        self.state.pending_bytes += bytes.len() as u64;
        save_state(self.paths, &self.state)
    }

    /// Commits a chunk: its rows in input order (`rows[i]` is `chunk.records[i]`'s), its skipped
    /// lines, then the state; `tokens` is the chunk's ids' total length.
    pub(super) fn commit_chunk(
        &mut self,
        chunk: &Chunk,
        rows: &Array2<f32>,
        tokens: usize,
        format: OutputFormat,
    ) -> Result<()> {
        let mut bytes = Vec::new();
        for (record, v) in chunk.records.iter().zip(rows.rows()) {
            encode_row(&mut bytes, format, record, v)?;
        }
        write_at_end(&mut self.out, &self.paths.partial, &bytes)?;
        let skipped_bytes = encode_skipped(chunk)?;
        write_at_end(&mut self.skipped, &self.paths.skipped, &skipped_bytes)?;
        let c = &mut self.state.committed;
        c.records = chunk.records_after;
        c.rows += chunk.records.len();
        c.output_bytes += bytes.len() as u64;
        c.skipped += chunk.skipped.len();
        c.skipped_bytes += skipped_bytes.len() as u64;
        c.tokens += tokens;
        c.chunks += 1;
        self.state.pending_batches.clear();
        self.state.pending_bytes = 0;
        // State first: a kill between the two leaves a pending file longer than the state says,
        // which a resume truncates; the other order could leave it shorter, which is unrecoverable.
        save_state(self.paths, &self.state)?;
        self.pending
            .set_len(0)
            .map_err(|e| Error::io(&self.paths.pending, "cannot truncate", e))
    }

    /// Completes the run: the real `.npy` header, sync, the output renamed into place, the side
    /// files removed.
    pub(super) fn finish(
        mut self,
        format: OutputFormat,
        hidden: usize,
        resumed_from: usize,
    ) -> Result<Summary> {
        let paths = self.paths;
        let rows = self.state.committed.rows;
        if format == OutputFormat::Npy {
            self.out
                .seek(SeekFrom::Start(0))
                .map_err(|e| Error::io(&paths.partial, "cannot seek", e))?;
            self.out
                .write_all(&npy_header(rows, hidden))
                .map_err(|e| Error::io(&paths.partial, "cannot write", e))?;
        }
        self.out
            .sync_all()
            .map_err(|e| Error::io(&paths.partial, "cannot sync", e))?;
        drop(self.out);
        self.skipped
            .sync_all()
            .map_err(|e| Error::io(&paths.skipped, "cannot sync", e))?;
        std::fs::rename(&paths.partial, &paths.out)
            .map_err(|e| Error::io(&paths.out, "cannot write the output", e))?;
        finish_side_files(paths, self.state.committed.skipped)?;
        Ok(summary(&self.state.committed, resumed_from))
    }
}

/// The skipped lines of a chunk as JSON lines of {line, reason}.
fn encode_skipped(chunk: &Chunk) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for inv in &chunk.skipped {
        serde_json::to_writer(
            &mut bytes,
            &serde_json::json!({"line": inv.line, "reason": inv.reason}),
        )
        .map_err(|e| Error::internal(format!("cannot encode a skipped line: {e}")))?;
        bytes.push(b'\n');
    }
    Ok(bytes)
}

/// After the output is in place: the skipped list takes its final name (or an old one is
/// removed), then the run's state goes. Safe to repeat after a kill.
fn finish_side_files(paths: &Paths, skipped: usize) -> Result<()> {
    if skipped > 0 && paths.skipped.exists() {
        std::fs::rename(&paths.skipped, &paths.skipped_final)
            .map_err(|e| Error::io(&paths.skipped_final, "cannot write", e))?;
    } else if skipped == 0 {
        let _ = std::fs::remove_file(&paths.skipped);
        let _ = std::fs::remove_file(&paths.skipped_final);
    }
    let _ = std::fs::remove_file(&paths.pending);
    let _ = std::fs::remove_file(&paths.state);
    let _ = std::fs::remove_file(&paths.state_tmp);
    Ok(())
}

fn load_state(paths: &Paths) -> Result<Option<State>> {
    match std::fs::read(&paths.state) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::run_state(
                &paths.state,
                format!(
                    "unreadable run state ({e}); remove {}* to start over",
                    paths.partial.display()
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if paths.partial.exists() {
                return Err(Error::run_state(
                    &paths.partial,
                    "exists without its run state; remove it to start over",
                ));
            }
            Ok(None)
        }
        Err(e) => Err(Error::io(&paths.state, "cannot read the run state", e)),
    }
}

/// Writes the state to a temporary file and renames it over the old one.
fn save_state(paths: &Paths, state: &State) -> Result<()> {
    let tmp = &paths.state_tmp;
    let bytes = serde_json::to_vec(state)
        .map_err(|e| Error::internal(format!("cannot encode the run state: {e}")))?;
    std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, "cannot write the run state", e))?;
    std::fs::rename(tmp, &paths.state)
        .map_err(|e| Error::io(&paths.state, "cannot write the run state", e))
}

fn open_truncated(path: &Path, len: u64) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, "cannot open for writing", e))?;
    let have = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot stat", e))?
        .len();
    if have < len {
        return Err(Error::run_state(path, format!("is shorter ({have} bytes) than the run state records ({len}); remove the run's files to start over")));
    }
    file.set_len(len)
        .map_err(|e| Error::io(path, "cannot truncate", e))?;
    Ok(file)
}

fn write_at_end(file: &mut File, path: &Path, bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    file.seek(SeekFrom::End(0))
        .map_err(|e| Error::io(path, "cannot seek", e))?;
    let mut w = BufWriter::new(&mut *file);
    w.write_all(bytes)
        .and_then(|_| w.flush())
        .map_err(|e| Error::io(path, "cannot write", e))
}

fn encode_pending(batch: usize, vectors: &Array2<f32>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(batch as u32).to_le_bytes());
    out.extend_from_slice(&(vectors.nrows() as u32).to_le_bytes());
    for x in vectors.iter() {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn read_pending(path: &Path, hidden: usize) -> Result<HashMap<usize, Array2<f32>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read", e))?;
    let mut out = HashMap::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let b = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        let n = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default()) as usize;
        at += 8;
        let len = n * hidden * 4;
        if at + len > bytes.len() {
            break;
        }
        let values: Vec<f32> = bytes[at..at + len]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        at += len;
        if let Ok(rows) = Array2::from_shape_vec((n, hidden), values) {
            out.insert(b, rows);
        }
    }
    Ok(out)
}

fn encode_row(
    out: &mut Vec<u8>,
    format: OutputFormat,
    record: &Record,
    v: ArrayView1<'_, f32>,
) -> Result<()> {
    match format {
        OutputFormat::Npy => {
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        _ => {
            let mut row = serde_json::Map::new();
            row.insert("index".into(), record.index.into());
            if let Some(id) = &record.id {
                row.insert("id".into(), id.clone().into());
            }
            let values: Vec<f32> = v.to_vec();
            row.insert(
                "embedding".into(),
                serde_json::to_value(values)
                    .map_err(|e| Error::internal(format!("cannot encode an embedding: {e}")))?,
            );
            serde_json::to_writer(&mut *out, &row)
                .map_err(|e| Error::internal(format!("cannot encode an embedding: {e}")))?;
            out.push(b'\n');
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_batches_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p");
        let mut bytes = encode_pending(3, &ndarray::array![[1.0, 2.0], [3.0, 4.0]]);
        bytes.extend(encode_pending(0, &ndarray::array![[5.0, 6.0]]));
        bytes.extend_from_slice(&[1, 2, 3]); // a torn write at the end is ignored
        std::fs::write(&p, bytes).unwrap();
        let got = read_pending(&p, 2).unwrap();
        assert_eq!(got[&3], ndarray::array![[1.0, 2.0], [3.0, 4.0]]);
        assert_eq!(got[&0], ndarray::array![[5.0, 6.0]]);
    }
}
