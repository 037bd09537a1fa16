//! The model side of the server, and the only file that calls the `icl_embed` library: loading
//! the package, tokenization for the handlers ([`Frontend`], no ONNX Runtime), and the inference
//! worker ([`run`]), one thread that owns the model and embeds each [`Work`] the batching task
//! hands it. Keeping every library call here means a change of the library's API touches this file
//! only.
//!
//! The prefix cache: each few-shot prompt's shared leading ids ([`QueryPrompt::shared_prefix`])
//! key the prefix's key/value states ([`Prefix`]), kept in an LRU bounded by
//! `--prefix-cache-bytes` and shared by every request that uses the prompt; a batch of its queries
//! runs on them. A prefix whose states alone exceed the bound is computed for its batch and not
//! kept.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use icl_embed::engine::run::{self as driver, plan_cost};
use icl_embed::{corpus::input, engine::batch, Embedder, Encoder, Example, Prefix, QueryPrompt};
use tokio::sync::{mpsc, oneshot};

use super::config::{ExampleText, ExamplesSource, ServeArgs, TaskPreset, TaskText};
use super::metrics::Metrics;
use super::queue::{Ready, Work};

/// A few-shot query prompt (task instruction and examples), prepared once.
pub struct Prompt {
    /// Equal for equal (instruction, examples): the batching task groups requests by it.
    pub key: String,
    /// About how many leading tokens every query of the prompt shares (0 without examples: then
    /// there is no prefix to share and the queries batch with documents).
    pub shared_len: usize,
    task: Option<String>,
    query: QueryPrompt,
}

/// A request refused for its content: the field, the input's index, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub index: Option<usize>,
    pub message: String,
}

impl Refusal {
    fn new(field: impl Into<String>, index: Option<usize>, message: impl Into<String>) -> Refusal {
        Refusal {
            field: field.into(),
            index,
            message: message.into(),
        }
    }
}

/// What `/info` reports and the handlers check against.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub package: String,
    pub variant: String,
    pub device: String,
    pub hidden: usize,
    pub vocab: usize,
    pub max_document_tokens: usize,
    pub max_query_tokens: usize,
    pub max_batch_tokens: usize,
    pub max_batch_rows: usize,
    pub prefix_cache: bool,
    pub prefix_cache_bytes: usize,
    /// Longest row the model takes (its attention window), prefix included.
    pub max_tokens: Option<usize>,
}

/// Tokenization for the handlers: the package's tokenizer and prompts, and the `--tasks` presets.
pub struct Frontend {
    encoder: Encoder,
    presets: BTreeMap<String, Arc<Prompt>>,
    pub info: ModelInfo,
}

impl Frontend {
    pub fn preset(&self, name: &str) -> Option<Arc<Prompt>> {
        self.presets.get(name).cloned()
    }

    pub fn preset_names(&self) -> Vec<String> {
        self.presets.keys().cloned().collect()
    }

    /// The prompt of an inline task (`field` names it in refusals), or `None` when it has neither
    /// instruction nor examples (the inputs are documents).
    pub fn prompt(&self, task: &TaskText, field: &str) -> Result<Option<Arc<Prompt>>, Refusal> {
        if task.instruction.is_none() && task.examples.is_empty() {
            return Ok(None);
        }
        for (i, e) in task.examples.iter().enumerate() {
            if e.instruct.is_none() && task.instruction.is_none() {
                return Err(Refusal::new(
                    format!("{field}examples[{i}].instruct"),
                    None,
                    "the example has no \"instruct\" and no instruction was given",
                ));
            }
        }
        let examples: Vec<Example> = task.examples.iter().map(example).collect();
        let query = self
            .encoder
            .query_prompt(task.instruction.as_deref(), &examples, None)
            .map_err(|e| Refusal::new(format!("{field}examples"), None, e.to_string()))?;
        let key = serde_json::to_string(&(&task.instruction, &task.examples))
            .map_err(|e| Refusal::new(format!("{field}examples"), None, e.to_string()))?;
        let shared_len = query.shared_prefix().map_or(0, <[u32]>::len);
        Ok(Some(Arc::new(Prompt {
            key,
            shared_len,
            task: task.instruction.clone(),
            query,
        })))
    }

    /// Final token ids of `texts`: queries under `prompt`, else documents, exactly as `icl-embed
    /// tokenize` writes them. Without `truncate` a text longer than the model's limit is refused
    /// (`field`, index) instead of cut as the reference cuts it.
    pub fn token_ids(
        &self,
        prompt: Option<&Prompt>,
        texts: &[&str],
        truncate: bool,
        field: &str,
    ) -> Result<Vec<Vec<u32>>, Refusal> {
        let tokenizer = self.encoder.tokenizer();
        let failed = |e: icl_embed::Error| Refusal::new(field, None, e.to_string());
        if !truncate {
            let (plain, limit) = match prompt {
                Some(p) => {
                    let template = &self.encoder.package().manifest.prompt;
                    let wrapped: Vec<String> = texts
                        .iter()
                        .map(|t| template.query_text(p.task.as_deref(), t))
                        .collect();
                    let refs: Vec<&str> = wrapped.iter().map(String::as_str).collect();
                    (tokenizer.encode_plain_batch(&refs), p.query.text_max)
                }
                None => (
                    tokenizer.encode_plain_batch(texts),
                    self.info
                        .max_document_tokens
                        .saturating_sub(tokenizer.special_count()),
                ),
            };
            for (i, ids) in plain.map_err(failed)?.iter().enumerate() {
                if ids.len() > limit {
                    return Err(Refusal::new(
                        field,
                        Some(i),
                        format!(
                            "{} tokens, over the limit of {limit} (set \"truncate\": true to cut it as the reference does)",
                            ids.len()
                        ),
                    ));
                }
            }
        }
        let ids = match prompt {
            Some(p) => self.encoder.queries(&p.query, texts),
            None => self.encoder.documents(texts, None),
        }
        .map_err(failed)?;
        if let Some(max) = self.info.max_tokens {
            if let Some(i) = ids.iter().position(|r| r.len() > max) {
                return Err(Refusal::new(
                    field,
                    Some(i),
                    format!(
                        "{} tokens with the prompt, over the model's attention window of {max}",
                        ids[i].len()
                    ),
                ));
            }
        }
        Ok(ids)
    }
}

fn example(e: &ExampleText) -> Example {
    Example {
        instruct: e.instruct.clone(),
        query: e.query.clone(),
        response: e.response.clone(),
    }
}

/// The model and the prefix states kept between batches.
pub struct Model {
    embedder: Embedder,
    prefixes: PrefixLru<Prefix>,
    /// The cache is on and the variant's graph takes prefix states.
    use_prefix_cache: bool,
}

/// Prefix states keyed by their ids, least recently used out first, bounded in bytes. Generic
/// over the states so that the policy is tested without a model.
struct PrefixLru<S> {
    /// Least recently used first.
    entries: Vec<S>,
    budget: usize,
    ids: fn(&S) -> &[u32],
    bytes: fn(&S) -> usize,
}

impl<S> PrefixLru<S> {
    fn new(budget: usize, ids: fn(&S) -> &[u32], bytes: fn(&S) -> usize) -> PrefixLru<S> {
        PrefixLru {
            entries: Vec::new(),
            budget,
            ids,
            bytes,
        }
    }

    fn total(&self) -> usize {
        self.entries.iter().map(self.bytes).sum()
    }

    /// Makes `ids`' states the most recently used, computing them with `compute` on a miss; the
    /// least recently used go until the new states fit. States larger than the whole budget are
    /// handed back (`Err`) instead of kept. Reports the hit or miss and the bytes kept to `metrics`.
    fn get(
        &mut self,
        ids: &[u32],
        compute: impl FnOnce() -> Result<S, String>,
        metrics: &Metrics,
    ) -> Result<Result<&S, S>, String> {
        let key = self.ids;
        if let Some(at) = self.entries.iter().position(|p| key(p) == ids) {
            let hit = self.entries.remove(at);
            self.entries.push(hit);
            metrics.prefix(true, self.total());
        } else {
            let states = compute()?;
            let size = (self.bytes)(&states);
            if size > self.budget {
                metrics.prefix(false, self.total());
                return Ok(Err(states));
            }
            while self.total() + size > self.budget {
                self.entries.remove(0);
            }
            self.entries.push(states);
            metrics.prefix(false, self.total());
        }
        Ok(Ok(self.entries.last().expect("just pushed")))
    }
}

/// Loads the package (a directory or a hub id), ONNX Runtime and the model, and checks every preset
/// of `--tasks` against the package's prompt.
pub fn load(args: &ServeArgs, presets: &BTreeMap<String, TaskPreset>) -> Result<(Model, Frontend)> {
    let mut options = args.runtime.options(None);
    options.prefix_cache &= args.prefix_cache_bytes > 0;
    let embedder = Embedder::new(&args.model, &options)?;
    // The handlers' own tokenizer (the package is already open and checked).
    let encoder = Encoder::from_package(embedder.encoder().package().clone())?;
    let m = &encoder.package().manifest;
    let limits = embedder.batch_limits();
    let model = embedder.model();
    let use_prefix_cache = options.prefix_cache && model.supports_prefix();
    let info = ModelInfo {
        package: encoder.package().dir.display().to_string(),
        variant: model.variant().to_string(),
        device: model.device().to_string(),
        hidden: model.hidden(),
        vocab: m.architecture.vocab,
        max_document_tokens: m.max_length.document,
        max_query_tokens: m.max_length.query,
        max_batch_tokens: limits.tokens,
        max_batch_rows: limits.rows,
        prefix_cache: use_prefix_cache,
        prefix_cache_bytes: args.prefix_cache_bytes,
        max_tokens: model.max_tokens(),
    };
    let mut frontend = Frontend {
        encoder,
        presets: BTreeMap::new(),
        info,
    };
    for (name, preset) in presets {
        let examples = match &preset.examples {
            ExamplesSource::Inline(list) => list.clone(),
            ExamplesSource::File(path) => input::read_examples(path)
                .with_context(|| format!("task {name:?}"))?
                .into_iter()
                .map(|e| ExampleText {
                    instruct: e.instruct,
                    query: e.query,
                    response: e.response,
                })
                .collect(),
        };
        let task = TaskText {
            instruction: preset.instruction.clone(),
            examples,
        };
        let prompt = frontend
            .prompt(&task, "")
            .map_err(|r| anyhow!("tasks: task {name:?}: {}: {}", r.field, r.message))?
            .ok_or_else(|| anyhow!("tasks: task {name:?} has neither instruction nor examples"))?;
        frontend.presets.insert(name.clone(), prompt);
    }
    let model = Model {
        embedder,
        prefixes: PrefixLru::new(args.prefix_cache_bytes, Prefix::ids, Prefix::bytes),
        use_prefix_cache,
    };
    Ok((model, frontend))
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

impl Model {
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
        let mut ids = Vec::new();
        let mut counts = Vec::with_capacity(entries.len());
        for e in &mut entries {
            counts.push(e.ids.len());
            ids.append(&mut e.ids);
        }
        let Model {
            embedder,
            prefixes,
            use_prefix_cache,
        } = self;
        let limits = embedder.batch_limits();
        let (encoder, model) = embedder.parts_mut();
        let pad_id = encoder.pad_id();
        let shared = work
            .prompt
            .as_deref()
            .filter(|_| *use_prefix_cache)
            .and_then(|p| p.query.shared_prefix());
        // The prefix's states: kept in the LRU, or (too large to keep) for this work only.
        let (kept, alone) = match shared {
            None => (None, None),
            Some(ids) => {
                let compute = || model.prefix(ids).map_err(|e| e.to_string());
                match prefixes.get(ids, compute, metrics) {
                    Ok(Ok(p)) => (Some(p), None),
                    Ok(Err(p)) => (None, Some(p)),
                    Err(why) => {
                        for e in entries {
                            let _ = e
                                .reply
                                .send(Err(format!("inference failed on the prefix: {why}")));
                        }
                        return;
                    }
                }
            }
        };
        let prefix = kept.or(alone.as_ref());
        let mut rows = embed_rows(
            &ids,
            prefix.map(Prefix::ids),
            (limits.tokens, limits.rows),
            &mut |rows| {
                driver::run_rows(model, &ids, rows, prefix, pad_id)
                    .map(|(v, _)| v.outer_iter().map(|r| r.to_vec()).collect())
                    .map_err(|e| e.to_string())
            },
            metrics,
        )
        .into_iter();
        for (e, n) in entries.into_iter().zip(counts) {
            let reply: Result<Vec<Vec<f32>>, String> = rows.by_ref().take(n).collect();
            let _ = e.reply.send(reply);
        }
    }
}

/// One model run: the input indices of a planned batch to their rows' embeddings, in that order.
type RunRows<'a> = dyn FnMut(&[usize]) -> Result<Vec<Vec<f32>>, String> + 'a;

/// Embeds `ids` in batches planned under (token budget, most rows) with `run`, the rows that start
/// with `prefix` costed as what follows it. A batch that fails or panics fails its own rows only.
fn embed_rows(
    ids: &[Vec<u32>],
    prefix: Option<&[u32]>,
    (budget, max_rows): (usize, usize),
    run: &mut RunRows,
    metrics: &Metrics,
) -> Vec<Result<Vec<f32>, String>> {
    let costs: Vec<usize> = ids.iter().map(|r| plan_cost(r, prefix)).collect();
    let mut out: Vec<Result<Vec<f32>, String>> = vec![Err("not embedded".into()); ids.len()];
    for rows in batch::plan(&costs, budget, max_rows) {
        let started = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| run(&rows)))
            .unwrap_or_else(|_| Err("the model panicked on this batch".into()))
            .and_then(|v| match v.len() == rows.len() {
                true => Ok(v),
                false => Err(format!("{} rows back for {}", v.len(), rows.len())),
            });
        let tokens = rows
            .iter()
            .map(|&r| match prefix {
                Some(p) if ids[r].len() > p.len() && ids[r].starts_with(p) => {
                    ids[r].len() - p.len()
                }
                _ => ids[r].len(),
            })
            .sum();
        metrics.batch(rows.len(), tokens, started.elapsed(), result.is_ok());
        match result {
            Ok(vectors) => {
                for (&r, v) in rows.iter().zip(vectors) {
                    out[r] = Ok(v);
                }
            }
            Err(why) => {
                for &r in &rows {
                    out[r] = Err(format!("inference failed: {why}"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model over `ids`: each row's vector is [first id, length]; a batch holding id 13
    /// fails and one holding id 66 panics.
    fn fake(ids: &[Vec<u32>], which: &[usize]) -> Result<Vec<Vec<f32>>, String> {
        let rows: Vec<&[u32]> = which.iter().map(|&r| ids[r].as_slice()).collect();
        if rows.iter().any(|r| r.contains(&66)) {
            panic!("boom");
        }
        if rows.iter().any(|r| r.contains(&13)) {
            return Err("bad batch".into());
        }
        Ok(rows
            .iter()
            .map(|r| vec![r[0] as f32, r.len() as f32])
            .collect())
    }

    #[test]
    fn rows_come_back_in_order_and_a_failed_batch_fails_only_its_rows() {
        let m = Metrics::default();
        // Lengths 30, 2, 2, 30, 3: planned longest first in batches of at most 2 rows.
        let ids = vec![
            vec![1; 30],
            vec![2; 2],
            vec![13, 3],
            vec![4; 30],
            vec![5; 3],
        ];
        let out = embed_rows(&ids, None, (4096, 2), &mut |r| fake(&ids, r), &m);
        assert_eq!(out[0], Ok(vec![1.0, 30.0]));
        assert_eq!(out[3], Ok(vec![4.0, 30.0]));
        // 13 shares its batch (rows of length 2) with row 1; row 4 (length 3) is elsewhere.
        assert!(out[1].is_err() && out[2].is_err(), "{out:?}");
        assert_eq!(out[4], Ok(vec![5.0, 3.0]));
        assert!(m.render().contains("icl_embed_failed_batches_total 1\n"));
    }

    #[test]
    fn the_prefix_lru_keeps_what_fits_and_evicts_the_least_recently_used() {
        let m = Metrics::default();
        // States: (ids, bytes).
        type S = (Vec<u32>, usize);
        let mut lru: PrefixLru<S> = PrefixLru::new(100, |s| &s.0, |s| s.1);
        let computed = std::cell::Cell::new(0);
        let get = |lru: &mut PrefixLru<S>, id: u32, bytes: usize| {
            lru.get(
                &[id],
                || {
                    computed.set(computed.get() + 1);
                    Ok((vec![id], bytes))
                },
                &m,
            )
            .unwrap()
            .map(|s| s.0[0])
            .map_err(|s| s.0[0])
        };
        assert_eq!(get(&mut lru, 1, 40), Ok(1));
        assert_eq!(get(&mut lru, 2, 40), Ok(2));
        assert_eq!(get(&mut lru, 1, 40), Ok(1)); // a hit: 1 is now the most recent
        assert_eq!(get(&mut lru, 3, 40), Ok(3)); // 2 goes, the least recently used
        let kept: Vec<u32> = lru.entries.iter().map(|s| s.0[0]).collect();
        assert_eq!(kept, vec![1, 3]);
        assert_eq!(lru.total(), 80);
        assert_eq!(get(&mut lru, 4, 150), Err(4)); // larger than the budget: not kept
        assert_eq!(lru.total(), 80);
        assert_eq!(computed.get(), 4);
        let text = m.render();
        assert!(
            text.contains("icl_embed_prefix_cache_hits_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("icl_embed_prefix_cache_misses_total 4\n"),
            "{text}"
        );
    }

    #[test]
    fn a_panicking_batch_is_an_error_not_a_crash() {
        let m = Metrics::default();
        let ids = vec![vec![66; 4], vec![7; 40]];
        let out = embed_rows(&ids, None, (4096, 1), &mut |r| fake(&ids, r), &m);
        assert!(out[0].as_ref().unwrap_err().contains("panicked"));
        assert_eq!(out[1], Ok(vec![7.0, 40.0]));
    }
}
