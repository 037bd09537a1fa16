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
//! `OUT.lock` is held for the whole run ([`OutputLock`]): a second run on the same output is
//! refused at once.
//!
//! Chunks are cut at fixed record counts and batches are planned inside a chunk from the chunk
//! alone, so the batches of a resumed run are exactly those of an uninterrupted one. The run is a
//! loop over chunks ([`reader::Chunks`](crate::corpus::reader::Chunks)); each chunk goes through
//! the batch driver ([`crate::Embedder::batches`]) and is committed to the run's journal
//! (`journal.rs`).
//!
//! Ids (`--id-field`) are checked for duplicates exactly: every id seen is kept, so memory grows
//! with the ids, about their length plus 60 bytes each (some 100 MB for 1.5 million 10-byte ids).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use ndarray::Array2;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::corpus::input::InputFormat;
use crate::corpus::journal::{self, Journal, Paths, State};
use crate::corpus::lock::{lock_path, OutputLock};
use crate::corpus::output::OutputFormat;
use crate::corpus::reader::{hex, scan_input, Chunk, ChunkRules, Chunks};
pub use crate::corpus::reader::{Invalid, Record, RecordReader, Shard};
use crate::embedder::Embedder;
use crate::engine::Finished;
use crate::error::{Error, Result};
use crate::text::tokenize::QueryPrompt;

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
    /// Shortened vectors (`--dimensions`; the embedder's [`crate::EmbedderOptions::dimensions`]):
    /// a resumed run with another length is refused. Left out of the fingerprint when `None`, so
    /// that runs begun before the option resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<usize>,
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

/// The input of a run: a regular file (fingerprinted, resumable), or a stream read once
/// (neither): stdin, or a named pipe or other non-regular file. A `File` that names no regular
/// file is read as a `Stream`.
pub enum Source {
    File(PathBuf),
    Stream(PathBuf),
    Stdin,
}

/// Options of [`run`] besides the settings fingerprinted in [`RunSettings`].
pub struct RunOptions<'a> {
    /// `None` for documents; the query prompt for queries (its shared prefix runs once, when the
    /// embedder's prefix cache applies).
    pub prompt: Option<&'a QueryPrompt>,
    pub source: Source,
    pub output: &'a Path,
    /// The output's lock ([`OutputLock::acquire`]), when the caller took it before its slow start
    /// (loading the model) to refuse a second run at once; `None`: [`run`] takes it.
    pub lock: Option<OutputLock>,
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

/// Runs (or resumes) the embedding of a whole input into `options.output`, holding the output's
/// lock throughout (another run on it is refused). A run that fails after committing work keeps
/// its side files, so that the same command resumes it; one that started without any and fails
/// before committing anything (even before its first state write) removes them.
pub fn run(embedder: &mut Embedder, mut options: RunOptions<'_>) -> Result<Summary> {
    let lock = match options.lock.take() {
        Some(lock) if lock.path() == lock_path(options.output) => lock,
        Some(lock) => {
            return Err(Error::internal(format!(
                "the lock {} is not the output's",
                lock.path().display()
            )))
        }
        None => OutputLock::acquire(options.output)?,
    };
    if let Source::File(p) = &options.source {
        if std::fs::metadata(p).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
            options.source = Source::Stream(p.clone());
        }
    }
    let paths = Paths::new(options.output);
    let fresh = paths.none_exist();
    let result = run_inner(embedder, options, &paths);
    if result.is_err() && fresh {
        journal::discard_if_empty(&paths);
    }
    drop(lock); // after the side files are settled: removes OUT.lock, then unlocks
    result
}

fn run_inner(embedder: &mut Embedder, options: RunOptions<'_>, paths: &Paths) -> Result<Summary> {
    let RunOptions {
        prompt,
        source,
        output_format,
        settings,
        format,
        progress,
        warn,
        ..
    } = options;
    // Components per row: shortened vectors (`--dimensions`) are journaled and written as such.
    let hidden = embedder.width();
    let prefix: Option<Vec<u32>> = prompt
        .and_then(|p| embedder.cached_prefix(p))
        .map(<[u32]>::to_vec);
    let name = source.name();
    let state = start_state(paths, &source, format, &settings, hidden, progress)?;
    if let Some(summary) = journal::finished_earlier(paths, &state)? {
        return Ok(summary);
    }
    let (mut journal, mut pending) = Journal::open(paths, state, output_format, hidden)?;
    let summary_start = journal.committed().rows;
    let mut chunks = Chunks::new(
        RecordReader::new(
            source.open()?,
            &name,
            format,
            &settings.field,
            settings.id_field.as_deref(),
        ),
        ChunkRules {
            shard: settings.shard,
            chunk_records: settings.chunk_records,
            skip_invalid: settings.skip_invalid,
            committed_records: journal.committed().records,
        },
    );
    progress(Progress::Done {
        items: journal.committed().rows,
        tokens: journal.committed().tokens,
    });
    while let Some(chunk) = chunks.next_chunk()? {
        let ids = tokenize_chunk(embedder, &chunk, prompt, &settings, &name)?;
        let done = std::mem::take(&mut pending);
        let rows = embed_new_batches(
            embedder,
            &ids,
            prefix.as_deref(),
            done,
            &mut journal,
            progress,
        )?;
        for inv in &chunk.skipped {
            warn(format!(
                "{name}, line {}: skipped: {}",
                inv.line, inv.reason
            ));
        }
        let tokens = ids.iter().map(Vec::len).sum::<usize>();
        journal.commit_chunk(&chunk, &rows, tokens, output_format)?;
    }
    journal.finish(output_format, hidden, summary_start)
}

/// The state the run starts from (an unfinished run's, or a fresh one), after fingerprinting the
/// input file and telling `progress` its record count.
fn start_state(
    paths: &Paths,
    source: &Source,
    format: InputFormat,
    settings: &RunSettings,
    hidden: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<State> {
    let fingerprint = settings.fingerprint();
    let (fresh, resumable) = match source {
        Source::File(p) => {
            let scan = scan_input(p, format, settings.shard)?;
            progress(Progress::Total(scan.records));
            let fresh = State::new(fingerprint, scan.size, scan.sha256, hidden);
            (fresh, true)
        }
        Source::Stream(_) | Source::Stdin => {
            (State::new(fingerprint, 0, String::new(), hidden), false)
        }
    };
    journal::resume_or_start(paths, fresh, &source.name(), resumable)
}

/// The final token ids of a chunk's records, each checked against the model's attention window
/// (an error names the record's line).
fn tokenize_chunk(
    embedder: &Embedder,
    chunk: &Chunk,
    prompt: Option<&QueryPrompt>,
    settings: &RunSettings,
    name: &str,
) -> Result<Vec<Vec<u32>>> {
    let texts: Vec<&str> = chunk.records.iter().map(|r| r.text.as_str()).collect();
    let ids = match (texts.is_empty(), prompt) {
        (true, _) => Vec::new(),
        (false, Some(p)) => embedder.encoder().queries(p, &texts)?,
        (false, None) => embedder.encoder().documents(&texts, settings.max_length)?,
    };
    for (record, row) in chunk.records.iter().zip(&ids) {
        embedder
            .model()
            .check_tokens(row.len(), &format!("{name}, line {}", record.line))?;
    }
    Ok(ids)
}

/// A chunk's rows, each new batch journaled (and told to `progress`) as it finishes.
fn embed_new_batches(
    embedder: &mut Embedder,
    ids: &[Vec<u32>],
    prefix: Option<&[u32]>,
    done: HashMap<usize, Array2<f32>>,
    journal: &mut Journal<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Array2<f32>> {
    let (rows_before, tokens_before) = (journal.committed().rows, journal.committed().tokens);
    let mut chunk_tokens = 0;
    embed_chunk(embedder, ids, prefix, done, &mut |f, finished_rows| {
        journal.record_batch(f)?;
        chunk_tokens += f.tokens;
        progress(Progress::Done {
            items: rows_before + finished_rows,
            tokens: tokens_before + chunk_tokens,
        });
        Ok(())
    })
}

/// The one place the runner drives the engine: the chunk's rows in input order through
/// [`Embedder::batches`], the batches in `done` (finished by an earlier run) taken as they are.
/// `on_batch` hears every newly computed batch with the rows finished so far (resumed ones
/// included), before the next one runs.
fn embed_chunk(
    embedder: &mut Embedder,
    ids: &[Vec<u32>],
    prefix: Option<&[u32]>,
    done: HashMap<usize, Array2<f32>>,
    on_batch: &mut dyn FnMut(&Finished, usize) -> Result<()>,
) -> Result<Array2<f32>> {
    let mut rows = Array2::<f32>::zeros((ids.len(), embedder.width()));
    let mut finished_rows = 0;
    let mut batches = embedder.batches(ids, prefix)?.resume(done);
    for finished in batches.by_ref() {
        let f = finished?;
        for (&r, v) in f.rows.iter().zip(f.vectors.rows()) {
            rows.row_mut(r).assign(&v);
        }
        finished_rows += f.rows.len();
        if f.resumed {
            continue;
        }
        on_batch(&f, finished_rows)?;
    }
    drop(batches);
    if finished_rows != ids.len() {
        return Err(Error::internal("a batch of the chunk was not embedded"));
    }
    Ok(rows)
}

impl Source {
    /// The input's name in messages.
    fn name(&self) -> String {
        match self {
            Source::File(p) | Source::Stream(p) => p.display().to_string(),
            Source::Stdin => "<stdin>".to_string(),
        }
    }

    fn open(&self) -> Result<Box<dyn BufRead>> {
        Ok(match self {
            Source::File(p) | Source::Stream(p) => Box::new(BufReader::with_capacity(
                1 << 20,
                File::open(p).map_err(|e| Error::io(p, "cannot open the input", e))?,
            )),
            Source::Stdin => Box::new(BufReader::new(std::io::stdin())),
        })
    }
}
