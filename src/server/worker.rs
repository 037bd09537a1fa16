//! The model side of the server: loading the package, and the inference worker ([`run`]), one
//! thread that owns the [`Embedder`] and answers each [`Work`] the batching task hands it. The
//! worker only gathers the rows of a turn's requests and hands each request its rows back;
//! batching, the prefix's states and the isolation of a failing batch are the engine's
//! ([`icl_embed::engine`]).
//!
//! The prefix cache: each few-shot prompt's shared leading ids key the prefix's key/value states,
//! kept in the embedder's prefix store bounded by `--prefix-cache-bytes` and shared by every
//! request that uses the prompt; a batch of its queries runs on them. A prefix whose states alone
//! exceed the bound is computed for its batch and not kept.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use icl_embed::{Embedder, EmbedderOptions, Encoder, Error, Failed, Finished};
use tokio::sync::{mpsc, oneshot};

use super::config::{ServeArgs, TaskPreset};
use super::frontend::{Frontend, ModelInfo, Prompt};
use super::metrics::Metrics;
use super::queue::{Entry, Ready, Reply, Work};

/// The model, with the prefix states it keeps between batches.
pub struct Model {
    embedder: Embedder,
}

/// Loads the package (a directory or a hub id), ONNX Runtime and the model, and checks every preset
/// of `--tasks` against the package's prompt.
pub fn load(args: &ServeArgs, presets: &BTreeMap<String, TaskPreset>) -> Result<(Model, Frontend)> {
    let options = args.runtime.options(None);
    let prefix_cache = options.prefix_cache && args.prefix_cache_bytes > 0;
    let options = options
        .prefix_cache(prefix_cache)
        .prefix_cache_bytes(args.prefix_cache_bytes);
    let embedder = Embedder::new(&args.model, &options)?;
    if let Some(warning) = embedder.model().memory_warning() {
        eprintln!("warning: {warning}");
    }
    if let Some(reason) = embedder.model().variant_reason() {
        eprintln!("variant auto on the CPU: {reason}");
    }
    // The handlers' own tokenizer (the package is already open and checked).
    let encoder = Encoder::from_package(embedder.encoder().package().clone())?;
    let info = model_info(&embedder, &encoder, &options, args);
    let frontend = Frontend::new(encoder, info, presets)?;
    Ok((Model { embedder }, frontend))
}

/// What `/info` reports of the loaded model.
fn model_info(
    embedder: &Embedder,
    encoder: &Encoder,
    options: &EmbedderOptions,
    args: &ServeArgs,
) -> ModelInfo {
    let m = &encoder.package().manifest;
    let limits = embedder.batch_limits();
    let model = embedder.model();
    ModelInfo {
        package: encoder.package().dir.display().to_string(),
        variant: model.variant().to_string(),
        device: model.device().to_string(),
        hidden: model.hidden(),
        vocab: m.architecture.vocab,
        max_document_tokens: m.max_length.document,
        max_query_tokens: m.max_length.query,
        max_batch_tokens: limits.tokens,
        max_batch_rows: limits.rows,
        prefix_cache: options.prefix_cache && model.supports_prefix(),
        prefix_cache_bytes: args.prefix_cache_bytes,
        max_tokens: model.max_tokens(),
        max_prompt_tokens: model.max_tokens().unwrap_or(args.max_prompt_tokens.max(1)),
    }
}

/// The worker thread: asks the batching task for work, embeds it, answers each request; returns
/// when the batching task is gone.
pub fn run(mut model: Model, ready: mpsc::Sender<Ready>, metrics: Arc<Metrics>) {
    loop {
        let (tx, rx) = oneshot::channel();
        if ready.blocking_send(tx).is_err() {
            return;
        }
        match rx.blocking_recv() {
            Ok(work) => model.process(work, &metrics),
            Err(_) => return,
        }
    }
}

/// One row's embedding, or the error of the batch (or the prefix) it was part of.
type Row = Result<Vec<f32>, Arc<Error>>;

impl Model {
    /// Embeds the rows of a turn's requests together and answers each request with its rows.
    fn process(&mut self, work: Work, metrics: &Metrics) {
        let started = Instant::now();
        let mut entries = work.entries;
        entries.retain(|e| !e.reply.is_closed());
        if entries.is_empty() {
            return;
        }
        for e in &entries {
            metrics.queued(started.saturating_duration_since(e.enqueued));
        }
        let counts: Vec<usize> = entries.iter().map(|e| e.ids.len()).collect();
        let ids: Vec<Vec<u32>> = entries
            .iter_mut()
            .flat_map(|e| std::mem::take(&mut e.ids))
            .collect();
        let prefix = work.prompt.as_deref().and_then(Prompt::cached_prefix);
        let mut rows = self.embed(&ids, prefix, metrics);
        // A failed batch fails every request with rows in it. When more than one request failed,
        // each runs again alone, so that a request whose rows cannot run (ONNX Runtime out of
        // memory, say) fails by itself and the others are answered.
        let failed = failed_entries(&counts, &rows);
        if failed.len() > 1 {
            let starts: Vec<usize> = counts
                .iter()
                .scan(0, |at, n| {
                    *at += n;
                    Some(*at - n)
                })
                .collect();
            for e in failed {
                let span = starts[e]..starts[e] + counts[e];
                let again = self.embed(&ids[span.clone()], prefix, metrics);
                rows.splice(span, again);
            }
        }
        reply(entries, counts, rows);
    }

    /// Every row of `ids` through the engine, on `prefix` where it applies; each batch's outcome
    /// goes to `metrics`.
    fn embed(&mut self, ids: &[Vec<u32>], prefix: Option<&[u32]>, metrics: &Metrics) -> Vec<Row> {
        let before = self.embedder.prefix_stats().clone();
        let mut out: Vec<Row> =
            vec![Err(Arc::new(Error::Internal("not embedded".into()))); ids.len()];
        match self.embedder.batches(ids, prefix) {
            Ok(batches) => {
                for item in batches {
                    record(&mut out, item, metrics);
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                out.iter_mut().for_each(|r| *r = Err(e.clone()));
            }
        }
        let after = self.embedder.prefix_stats();
        if after.hits > before.hits || after.misses > before.misses {
            metrics.prefix(after.hits > before.hits, after.bytes);
        }
        out
    }
}

/// Puts one finished (or failed) batch's rows into `out` and counts it in `metrics`.
fn record(out: &mut [Row], item: Result<Finished, Failed>, metrics: &Metrics) {
    match item {
        Ok(f) => {
            metrics.batch(f.rows.len(), f.run_tokens, f.elapsed, true);
            for (&r, v) in f.rows.iter().zip(f.vectors.rows()) {
                out[r] = Ok(v.to_vec());
            }
        }
        Err(failed) => {
            metrics.batch(failed.rows.len(), failed.run_tokens, failed.elapsed, false);
            let error = Arc::new(failed.error);
            for &r in &failed.rows {
                out[r] = Err(error.clone());
            }
        }
    }
}

/// The entries (by index) of `counts[i]` rows each that have a failed row in `rows`.
fn failed_entries(counts: &[usize], rows: &[Row]) -> Vec<usize> {
    let mut at = 0;
    let mut failed = Vec::new();
    for (e, &n) in counts.iter().enumerate() {
        if rows[at..at + n].iter().any(Result::is_err) {
            failed.push(e);
        }
        at += n;
    }
    failed
}

/// Answers each entry with its `counts[i]` rows of `rows`, in order: its embeddings, or the first
/// error among them.
fn reply(entries: Vec<Entry>, counts: Vec<usize>, rows: Vec<Row>) {
    let mut rows = rows.into_iter();
    for (e, n) in entries.into_iter().zip(counts) {
        let answer: Reply = rows.by_ref().take(n).collect();
        let _ = e.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_entries_are_those_with_a_failed_row() {
        let error = Arc::new(Error::Internal("out of memory".into()));
        let ok = || Ok(vec![0.0]);
        let rows = vec![ok(), Err(error.clone()), ok(), ok(), Err(error)];
        assert_eq!(failed_entries(&[2, 2, 1], &rows), vec![0, 2]);
        assert_eq!(failed_entries(&[1, 1, 1, 1, 1], &rows), vec![1, 4]);
        assert!(failed_entries(&[], &[]).is_empty());
    }
}
