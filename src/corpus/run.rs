//! Corpus-scale runs: the input is read and the output written in fixed chunks of records, so
//! memory stays flat whatever the input size, and every finished batch is recorded beside the
//! output so that a run killed at any moment (kill -9, a full disk) continues where it stopped when
//! the same command is started again, with a result bit-identical to an uninterrupted run.
//!
//! Files beside `OUT` while a run is unfinished: `OUT.partial` (the rows of finished chunks),
//! `OUT.partial.pending` (finished batches of the current chunk), `OUT.partial.skipped` (lines
//! skipped by `--skip-invalid`) and `OUT.partial.state.json` (what is committed, and the
//! fingerprints of the input and the settings). On success `OUT.partial` becomes `OUT` (and the
//! skipped list `OUT.skipped.jsonl`); nothing is named `OUT` before the run is complete.
//!
//! Chunks are cut at fixed record counts and batches are planned inside a chunk from the chunk
//! alone, so the batches of a resumed run are exactly those of an uninterrupted one. The run is a
//! loop over chunks; each chunk goes through the batch driver ([`crate::Embedder::batches`]).
//!
//! Ids (`--id-field`) are checked for duplicates exactly: every id seen is kept, so memory grows
//! with the ids, about their length plus 60 bytes each (some 100 MB for 1.5 million 10-byte ids).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView1};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::corpus::input::{is_blank, parse_json_record, InputFormat};
use crate::corpus::output::{npy_header, OutputFormat};
use crate::embedder::Embedder;
use crate::error::{Error, Result};
use crate::text::tokenize::QueryPrompt;

/// `--shard K/N`: this run takes the records whose index is K modulo N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = Error;

    fn from_str(s: &str) -> Result<Shard> {
        let bad = || Error::input("--shard", format!("{s:?} is not K/N with 0 <= K < N"));
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

/// One record of the input.
#[derive(Debug, Clone)]
pub struct Record {
    /// 1-based line number in the input.
    pub line: usize,
    /// 0-based record index in the whole input (before sharding).
    pub index: usize,
    pub text: String,
    pub id: Option<String>,
}

/// A line that is not a usable record.
#[derive(Debug, Clone)]
pub struct Invalid {
    pub line: usize,
    pub index: usize,
    pub reason: String,
}

/// Reads records one line at a time: plain text lines, or JSON lines with a text field (blank
/// lines skipped) and optionally an id field.
pub struct RecordReader<R: BufRead> {
    reader: R,
    name: String,
    format: InputFormat,
    field: String,
    id_field: Option<String>,
    line: usize,
    index: usize,
    buf: Vec<u8>,
}

impl<R: BufRead> RecordReader<R> {
    pub fn new(
        reader: R,
        name: &str,
        format: InputFormat,
        field: &str,
        id_field: Option<&str>,
    ) -> Self {
        RecordReader {
            reader,
            name: name.to_string(),
            format,
            field: field.to_string(),
            id_field: id_field.map(str::to_string),
            line: 0,
            index: 0,
            buf: Vec::new(),
        }
    }

    /// The next record, an invalid line (`Ok(Some(Err(..)))`), or the end.
    pub fn next_record(&mut self) -> Result<Option<std::result::Result<Record, Invalid>>> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| Error::io(&self.name, "cannot read the input", e))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            let mut raw: &[u8] = &self.buf;
            raw = raw.strip_suffix(b"\n").unwrap_or(raw);
            raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if self.format == InputFormat::Jsonl && is_blank(raw) {
                continue;
            }
            let index = self.index;
            self.index += 1;
            let line = self.line;
            let invalid = |reason: String| {
                Ok(Some(Err(Invalid {
                    line,
                    index,
                    reason,
                })))
            };
            let text = match std::str::from_utf8(raw) {
                Ok(t) => t,
                Err(e) => return invalid(format!("invalid UTF-8 at byte {}", e.valid_up_to())),
            };
            if self.format != InputFormat::Jsonl {
                return Ok(Some(Ok(Record {
                    line,
                    index,
                    text: text.to_string(),
                    id: None,
                })));
            }
            return match parse_json_record(text, &self.field, self.id_field.as_deref()) {
                Ok((text, id)) => Ok(Some(Ok(Record {
                    line,
                    index,
                    text,
                    id,
                }))),
                Err(reason) => invalid(reason),
            };
        }
    }
}

/// Everything that decides the bytes of the output; a resumed run must match it exactly.
#[derive(Debug, Clone, Serialize)]
pub struct RunSettings {
    pub package_manifest_sha256: String,
    pub variant: String,
    pub device: String,
    pub queries: bool,
    pub task: Option<String>,
    pub examples: Vec<crate::text::prompt::Example>,
    pub max_length: Option<usize>,
    pub batch_tokens: usize,
    pub max_rows: usize,
    pub chunk_records: usize,
    pub shard: Shard,
    pub input_format: String,
    pub field: String,
    pub id_field: Option<String>,
    /// Not fingerprinted: a run stopped by a malformed line resumes with `--skip-invalid`.
    #[serde(skip)]
    pub skip_invalid: bool,
    pub output_format: String,
    /// Whether queries run on a cached prefix: it changes the batch plan a resumed run must repeat.
    #[serde(default)]
    pub prefix_cache: bool,
}

impl RunSettings {
    fn fingerprint(&self) -> String {
        hex(&Sha256::digest(
            serde_json::to_vec(self).unwrap_or_default(),
        ))
    }
}

/// What a finished (or stopped) run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub items: usize,
    pub tokens: usize,
    pub skipped: usize,
    /// Records already done by an earlier, interrupted run.
    pub resumed_from: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Committed {
    /// Records consumed (valid, skipped, or in other shards).
    records: usize,
    rows: usize,
    output_bytes: u64,
    skipped: usize,
    skipped_bytes: u64,
    tokens: usize,
    chunks: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    version: u32,
    settings: String,
    input_size: u64,
    input_sha256: String,
    hidden: usize,
    committed: Committed,
    /// Batches of the current chunk already in the pending file, and its length.
    pending_batches: Vec<usize>,
    pending_bytes: u64,
}

/// The files of one run.
struct Paths {
    out: PathBuf,
    partial: PathBuf,
    pending: PathBuf,
    skipped: PathBuf,
    state: PathBuf,
    skipped_final: PathBuf,
}

impl Paths {
    fn new(out: &Path) -> Paths {
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
            skipped_final: with(".skipped.jsonl"),
        }
    }
}

/// The input of a run: a file (fingerprinted, resumable) or stdin (neither).
pub enum Source {
    File(PathBuf),
    Stdin,
}

/// Options of [`run`] besides the settings fingerprinted in [`RunSettings`].
pub struct RunOptions<'a> {
    /// `None` for documents; the query prompt for queries (its shared prefix runs once, when the
    /// embedder's prefix cache applies).
    pub prompt: Option<&'a QueryPrompt>,
    pub source: Source,
    pub output: &'a Path,
    pub output_format: OutputFormat,
    pub settings: RunSettings,
    pub format: InputFormat,
    /// Told (records done in this shard, tokens) after each batch, and the total once known.
    pub progress: &'a mut dyn FnMut(Progress),
    pub warn: &'a mut dyn FnMut(String),
}

/// Progress events for the CLI's bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    Total(usize),
    Done { items: usize, tokens: usize },
}

/// Runs (or resumes) the embedding of a whole input into `options.output`. A run that fails
/// after committing work keeps its side files, so that the same command resumes it; one that
/// fails before committing anything removes them.
pub fn run(embedder: &mut Embedder, options: RunOptions<'_>) -> Result<Summary> {
    let paths = Paths::new(options.output);
    let had_state = paths.state.exists();
    let result = run_inner(embedder, options, &paths);
    if result.is_err() && !had_state {
        if let Ok(Some(state)) = load_state(&paths) {
            if state.committed.rows == 0
                && state.committed.skipped == 0
                && state.pending_batches.is_empty()
            {
                for p in [&paths.partial, &paths.pending, &paths.skipped, &paths.state] {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
    result
}

fn run_inner(embedder: &mut Embedder, options: RunOptions<'_>, paths: &Paths) -> Result<Summary> {
    let RunOptions {
        prompt,
        source,
        output,
        output_format,
        settings,
        format,
        progress,
        warn,
    } = options;
    let hidden = embedder.model().hidden();
    let prefix: Option<Vec<u32>> = prompt
        .and_then(|p| embedder.cached_prefix(p))
        .map(<[u32]>::to_vec);
    let fingerprint = settings.fingerprint();
    let name = match &source {
        Source::File(p) => p.display().to_string(),
        Source::Stdin => "<stdin>".to_string(),
    };

    // Fingerprint the input and count its records (for the ETA) in one pass.
    let (input_size, input_sha256, total) = match &source {
        Source::File(p) => scan_input(p, format, &settings)?,
        Source::Stdin => (0, String::new(), None),
    };
    if let Some(t) = total {
        progress(Progress::Total(t));
    }

    let mut state = match load_state(paths)? {
        Some(_) if matches!(source, Source::Stdin) => {
            return Err(Error::input(
                paths.state.display().to_string(),
                format!(
                "an unfinished run exists, but stdin cannot be resumed: remove {}* to start over",
                paths.partial.display()
            ),
            ))
        }
        Some(old) => {
            if old.settings != fingerprint {
                return Err(Error::input(
                    format!("output {}", output.display()),
                    format!(
                        "an unfinished run with different settings exists ({}); run the same command to resume it, or remove {}* to start over",
                        paths.state.display(),
                        paths.partial.display()
                    ),
                ));
            }
            if old.input_size != input_size || old.input_sha256 != input_sha256 {
                return Err(Error::input(
                    name.clone(),
                    format!(
                        "the input changed since the unfinished run in {} started; restore it, or remove {}* to start over",
                        paths.state.display(),
                        paths.partial.display()
                    ),
                ));
            }
            old
        }
        None => State {
            version: 1,
            settings: fingerprint,
            input_size,
            input_sha256,
            hidden,
            committed: Committed::default(),
            pending_batches: Vec::new(),
            pending_bytes: 0,
        },
    };

    if state.committed.rows > 0 && !paths.partial.exists() && paths.out.exists() {
        // Killed between renaming the finished output into place and removing the run's state:
        // the output is this very run's, complete.
        finish_side_files(paths, state.committed.skipped)?;
        return Ok(Summary {
            items: state.committed.rows,
            tokens: state.committed.tokens,
            skipped: state.committed.skipped,
            resumed_from: state.committed.rows,
        });
    }
    let mut out = open_truncated(&paths.partial, state.committed.output_bytes)?;
    if state.committed.output_bytes == 0 && output_format == OutputFormat::Npy {
        let header = npy_header(0, hidden);
        write_at_end(&mut out, &paths.partial, &header)?;
        state.committed.output_bytes = header.len() as u64;
    }
    let mut skipped_file = open_truncated(&paths.skipped, state.committed.skipped_bytes)?;
    let mut pending_file = open_truncated(&paths.pending, state.pending_bytes)?;
    let mut pending = read_pending(&paths.pending, hidden)?;
    pending.retain(|b, _| state.pending_batches.contains(b));
    save_state(paths, &state)?;

    let summary_start = state.committed.rows;
    let reader: Box<dyn BufRead> = match &source {
        Source::File(p) => Box::new(BufReader::with_capacity(
            1 << 20,
            File::open(p).map_err(|e| Error::io(p, "cannot open the input", e))?,
        )),
        Source::Stdin => Box::new(BufReader::new(std::io::stdin())),
    };
    let mut reader = RecordReader::new(
        reader,
        &name,
        format,
        &settings.field,
        settings.id_field.as_deref(),
    );
    let mut ids_seen: HashMap<String, usize> = HashMap::new();
    let mut consumed = 0usize;
    progress(Progress::Done {
        items: state.committed.rows,
        tokens: state.committed.tokens,
    });

    loop {
        // Read the next chunk: records of this shard, invalid lines handled, ids checked.
        let mut chunk: Vec<Record> = Vec::new();
        let mut chunk_skipped: Vec<Invalid> = Vec::new();
        let mut eof = false;
        while chunk.len() < settings.chunk_records {
            let Some(item) = reader.next_record()? else {
                eof = true;
                break;
            };
            consumed += 1;
            let item = item.and_then(|r| check_id(&mut ids_seen, r));
            let index = match &item {
                Ok(r) => r.index,
                Err(inv) => inv.index,
            };
            if index % settings.shard.count != settings.shard.index
                || consumed <= state.committed.records
            {
                continue; // another shard's record, or one an earlier run committed
            }
            match item {
                Ok(r) => chunk.push(r),
                Err(inv) if settings.skip_invalid => chunk_skipped.push(inv),
                Err(inv) => {
                    return Err(Error::input(
                        format!("{name}, line {}", inv.line),
                        format!(
                            "{} (pass --skip-invalid to skip such lines; the run can be resumed)",
                            inv.reason
                        ),
                    ))
                }
            }
        }
        let records_after = consumed;
        if eof && chunk.is_empty() && chunk_skipped.is_empty() {
            break;
        }

        let texts: Vec<&str> = chunk.iter().map(|r| r.text.as_str()).collect();
        let ids = match (texts.is_empty(), prompt) {
            (true, _) => Vec::new(),
            (false, Some(p)) => embedder.encoder().queries(p, &texts)?,
            (false, None) => embedder.encoder().documents(&texts, settings.max_length)?,
        };
        for (record, row) in chunk.iter().zip(&ids) {
            embedder
                .model()
                .check_tokens(row.len(), &format!("{name}, line {}", record.line))?;
        }
        let done = std::mem::take(&mut pending);
        let mut rows = Array2::<f32>::zeros((chunk.len(), hidden));
        let (mut finished_rows, mut chunk_tokens) = (0, 0);
        let mut batches = embedder.batches(&ids, prefix.as_deref())?.resume(done);
        for finished in batches.by_ref() {
            let f = finished?;
            for (&r, v) in f.rows.iter().zip(f.vectors.rows()) {
                rows.row_mut(r).assign(&v);
            }
            finished_rows += f.rows.len();
            if f.resumed {
                continue;
            }
            let bytes = encode_pending(f.index, &f.vectors);
            write_at_end(&mut pending_file, &paths.pending, &bytes)?;
            state.pending_batches.push(f.index);
            state.pending_bytes += bytes.len() as u64;
            save_state(paths, &state)?;
            chunk_tokens += f.tokens;
            progress(Progress::Done {
                items: state.committed.rows + finished_rows,
                tokens: state.committed.tokens + chunk_tokens,
            });
        }
        drop(batches);
        if finished_rows != chunk.len() {
            return Err(Error::internal("a batch of the chunk was not embedded"));
        }

        // Commit the chunk: rows in input order, skipped lines, then the state.
        let mut bytes = Vec::new();
        for (record, v) in chunk.iter().zip(rows.rows()) {
            encode_row(&mut bytes, output_format, record, v)?;
        }
        write_at_end(&mut out, &paths.partial, &bytes)?;
        let mut skipped_bytes = Vec::new();
        for inv in &chunk_skipped {
            warn(format!(
                "{name}, line {}: skipped: {}",
                inv.line, inv.reason
            ));
            serde_json::to_writer(
                &mut skipped_bytes,
                &serde_json::json!({"line": inv.line, "reason": inv.reason}),
            )
            .map_err(|e| Error::internal(format!("cannot encode a skipped line: {e}")))?;
            skipped_bytes.push(b'\n');
        }
        write_at_end(&mut skipped_file, &paths.skipped, &skipped_bytes)?;
        let c = &mut state.committed;
        c.records = records_after;
        c.rows += chunk.len();
        c.output_bytes += bytes.len() as u64;
        c.skipped += chunk_skipped.len();
        c.skipped_bytes += skipped_bytes.len() as u64;
        c.tokens += ids.iter().map(Vec::len).sum::<usize>();
        c.chunks += 1;
        state.pending_batches.clear();
        state.pending_bytes = 0;
        // State first: a kill between the two leaves a pending file longer than the state says,
        // which a resume truncates; the other order could leave it shorter, which is unrecoverable.
        save_state(paths, &state)?;
        pending_file
            .set_len(0)
            .map_err(|e| Error::io(&paths.pending, "cannot truncate", e))?;
    }

    // Finish: the real header, sync, rename into place, remove the run's side files.
    if output_format == OutputFormat::Npy {
        out.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(&paths.partial, "cannot seek", e))?;
        out.write_all(&npy_header(state.committed.rows, hidden))
            .map_err(|e| Error::io(&paths.partial, "cannot write", e))?;
    }
    out.sync_all()
        .map_err(|e| Error::io(&paths.partial, "cannot sync", e))?;
    drop(out);
    skipped_file
        .sync_all()
        .map_err(|e| Error::io(&paths.skipped, "cannot sync", e))?;
    std::fs::rename(&paths.partial, &paths.out)
        .map_err(|e| Error::io(&paths.out, "cannot write the output", e))?;
    finish_side_files(paths, state.committed.skipped)?;
    Ok(Summary {
        items: state.committed.rows,
        tokens: state.committed.tokens,
        skipped: state.committed.skipped,
        resumed_from: summary_start,
    })
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
    Ok(())
}

/// Refuses a record whose id an earlier record has; `seen` maps each id to its first line.
fn check_id(seen: &mut HashMap<String, usize>, r: Record) -> std::result::Result<Record, Invalid> {
    if let Some(id) = &r.id {
        if let Some(&first) = seen.get(id) {
            return Err(Invalid {
                line: r.line,
                index: r.index,
                reason: format!("duplicate id {id:?} (first on line {first})"),
            });
        }
        seen.insert(id.clone(), r.line);
    }
    Ok(r)
}

/// (size, sha256, records in this shard) of the input file.
fn scan_input(
    path: &Path,
    format: InputFormat,
    settings: &RunSettings,
) -> Result<(u64, String, Option<usize>)> {
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open the input", e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let (mut size, mut records) = (0u64, 0usize);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, "cannot read the input", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&line);
        size += n as u64;
        let mut raw: &[u8] = &line;
        raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if format != InputFormat::Jsonl || !is_blank(raw) {
            records += 1;
        }
    }
    if records == 0 {
        return Err(Error::input(
            path.display().to_string(),
            "holds no texts (the input is empty)",
        ));
    }
    let s = settings.shard;
    let in_shard = records / s.count + usize::from(records % s.count > s.index);
    Ok((size, hex(&hasher.finalize()), Some(in_shard)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    let tmp = paths.state.with_extension("json.tmp");
    let bytes = serde_json::to_vec(state)
        .map_err(|e| Error::internal(format!("cannot encode the run state: {e}")))?;
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, "cannot write the run state", e))?;
    std::fs::rename(&tmp, &paths.state)
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
    fn shard_parsing() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reader_reports_invalid_lines_and_skips_blank_json_lines() {
        let data =
            b"{\"text\":\"a\",\"id\":\"x\"}\n\n{\"text\":3}\n{\"text\":\"b\",\"id\":7}\n\xff\n";
        let mut r = RecordReader::new(
            &data[..],
            "in.jsonl",
            InputFormat::Jsonl,
            "text",
            Some("id"),
        );
        let a = r.next_record().unwrap().unwrap().unwrap();
        assert_eq!(
            (a.line, a.index, a.text.as_str(), a.id.as_deref()),
            (1, 0, "a", Some("x"))
        );
        let bad = r.next_record().unwrap().unwrap().unwrap_err();
        assert_eq!(bad.line, 3);
        let b = r.next_record().unwrap().unwrap().unwrap();
        assert_eq!((b.line, b.index, b.id.as_deref()), (4, 2, Some("7")));
        assert!(r
            .next_record()
            .unwrap()
            .unwrap()
            .unwrap_err()
            .reason
            .contains("UTF-8"));
        assert!(r.next_record().unwrap().is_none());
    }

    #[test]
    fn duplicate_ids_name_the_first_line() {
        let mut seen = HashMap::new();
        let rec = |line, id: &str| Record {
            line,
            index: line,
            text: String::new(),
            id: Some(id.into()),
        };
        assert!(check_id(&mut seen, rec(1, "a")).is_ok());
        assert!(check_id(&mut seen, rec(2, "b")).is_ok());
        let err = check_id(&mut seen, rec(3, "a")).unwrap_err();
        assert!(err.reason.contains("first on line 1"), "{}", err.reason);
    }

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
