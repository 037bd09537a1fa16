//! The model side of the server, and the only file that calls the `icl_embed` library: loading
//! the package, tokenization for the handlers ([`Frontend`], no ONNX Runtime), and the inference
//! worker ([`run`]), one thread that owns the model and embeds each [`Work`] the batching task
//! hands it. Keeping every library call here means a change of the library's API touches this file
//! only.
//!
//! The prefix cache: each few-shot prompt's shared leading ids are found once
//! ([`Embedder::cache_prefix`]) and a batch of its queries runs on the prefix's key/value states.
//! This library version keeps one prefix's states inside the `Embedder` (the one used last), so the
//! worker holds at most one set of states at a time; `--prefix-cache-bytes` bounds them (a prefix
//! whose states would be larger is computed with each query), and the batching task's grouping by
//! prompt keeps consecutive batches on the same prefix.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use icl_embed::batch;
use icl_embed::embedder::plan_cost;
use icl_embed::tokenize::QueryPrompt;
use icl_embed::{input, Device, Embedder, EmbedderOptions, Encoder, Example};
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
        let shared_len = match query.prefix_ids.is_empty() {
            true => 0,
            false => query.prefix_ids.len() + self.encoder.tokenizer.special_count(),
        };
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
        let tokenizer = &self.encoder.tokenizer;
        let failed = |e: icl_embed::Error| Refusal::new(field, None, e.to_string());
        if !truncate {
            let (plain, limit) = match prompt {
                Some(p) => {
                    let template = &self.encoder.package.manifest.prompt;
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
        match prompt {
            Some(p) => p.query.ids(tokenizer, texts),
            None => self.encoder.documents(texts, None),
        }
        .map_err(failed)
    }
}

fn example(e: &ExampleText) -> Example {
    Example {
        instruct: e.instruct.clone(),
        query: e.query.clone(),
        response: e.response.clone(),
    }
}

/// The model and what the worker remembers between batches.
pub struct Model {
    embedder: Embedder,
    /// Leading ids computed once per prompt key (`None`: the prompt's queries run in full).
    prefixes: HashMap<String, Option<Vec<u32>>>,
    prefix_budget: usize,
    /// Bytes of key/value states per prefix token.
    state_bytes_per_token: usize,
}

/// Loads the package (a directory or a hub id), ONNX Runtime and the model, and checks every preset
/// of `--tasks` against the package's prompt.
pub fn load(args: &ServeArgs, presets: &BTreeMap<String, TaskPreset>) -> Result<(Model, Frontend)> {
    let device: Device = args.device.parse()?;
    let dir = crate::model_dir(&args.model, &args.variant, device)?;
    let options = EmbedderOptions {
        variant: args.variant.clone(),
        device,
        threads: args.threads,
        batch_tokens: args.max_batch_tokens,
        max_rows: args.max_batch_rows,
        max_length: None,
        ort_lib: args.ort_lib.clone(),
        cache_dir: args.cache_dir.clone(),
        prefix_cache: !args.no_prefix_cache && args.prefix_cache_bytes > 0,
    };
    let embedder = Embedder::new(&dir, &options)?;
    let encoder = Encoder::open(&dir)?;
    let m = &encoder.package.manifest;
    let variant = encoder.package.variant(embedder.variant())?;
    let (batch_tokens, batch_rows) = embedder.batch_limits();
    let dtype_bytes = match variant.prefix_cache.as_ref().map(|p| p.dtype.as_str()) {
        Some("float16") => 2,
        _ => 4,
    };
    let a = &m.architecture;
    let state_bytes_per_token = a.layers * 2 * a.kv_heads * a.head_dim * dtype_bytes;
    let info = ModelInfo {
        package: encoder.package.dir.display().to_string(),
        variant: embedder.variant().to_string(),
        device: embedder.device().to_string(),
        hidden: a.hidden,
        vocab: a.vocab,
        max_document_tokens: m.max_length.document,
        max_query_tokens: m.max_length.query,
        max_batch_tokens: batch_tokens,
        max_batch_rows: batch_rows,
        prefix_cache: options.prefix_cache && variant.prefix_cache.is_some(),
        prefix_cache_bytes: args.prefix_cache_bytes,
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
        prefixes: HashMap::new(),
        prefix_budget: args.prefix_cache_bytes,
        state_bytes_per_token,
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
    /// The leading ids that `prompt`'s queries run on, computed once per prompt; `None` when the
    /// cache does not apply or the prefix's states would exceed `--prefix-cache-bytes`.
    fn prefix_for(&mut self, prompt: &Prompt) -> Option<Vec<u32>> {
        if let Some(p) = self.prefixes.get(&prompt.key) {
            return p.clone();
        }
        let prefix = match self.embedder.cache_prefix(&prompt.query) {
            Ok(Some(ids)) if ids.len() * self.state_bytes_per_token <= self.prefix_budget => {
                Some(ids)
            }
            _ => None,
        };
        if self.prefixes.len() >= 4096 {
            self.prefixes.clear(); // inline prompts are many; recomputing the ids is cheap
        }
        self.prefixes.insert(prompt.key.clone(), prefix.clone());
        prefix
    }

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
        let prefix = work.prompt.as_deref().and_then(|p| self.prefix_for(p));
        let mut ids = Vec::new();
        let mut counts = Vec::with_capacity(entries.len());
        for e in &mut entries {
            counts.push(e.ids.len());
            ids.append(&mut e.ids);
        }
        let before = self.embedder.prefix_stats().clone();
        let (budget, max_rows) = self.embedder.batch_limits();
        let pad_id = self.embedder.encoder.package.manifest.special_tokens.pad_id;
        let embedder = &mut self.embedder;
        let on = prefix.as_deref();
        let mut rows = embed_rows(
            &ids,
            on,
            (budget, max_rows),
            &mut |rows| {
                let batch = batch::pad(&ids, rows, pad_id);
                embedder
                    .embed_batch_after(&batch, on)
                    .map_err(|e| e.to_string())
            },
            metrics,
        )
        .into_iter();
        if prefix.is_some() {
            let after = self.embedder.prefix_stats();
            if after.cached > before.cached {
                metrics.prefix(after.prefixes == before.prefixes, after.state_bytes);
            }
        }
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
    fn a_panicking_batch_is_an_error_not_a_crash() {
        let m = Metrics::default();
        let ids = vec![vec![66; 4], vec![7; 40]];
        let out = embed_rows(&ids, None, (4096, 1), &mut |r| fake(&ids, r), &m);
        assert!(out[0].as_ref().unwrap_err().contains("panicked"));
        assert_eq!(out[1], Ok(vec![7.0, 40.0]));
    }
}
