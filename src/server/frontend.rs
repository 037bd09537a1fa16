//! The tokenizer front end of the server: the package's tokenizer and prompts for the handlers
//! ([`Frontend`]; no ONNX Runtime), the `--tasks` presets, and what `/info` reports
//! ([`ModelInfo`]). The handlers tokenize here, off the model's thread, and the queue sizes its
//! turns from the [`Prompt`]s made here.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use icl_embed::{corpus::input, Encoder, Example, QueryPrompt};

use super::config::{ExampleText, ExamplesSource, TaskPreset, TaskText};

/// The preset that embeds queries with the package's default task (`"task": "query"` or TEI's
/// `"prompt_name": "query"`, the name sentence-transformers gives the query prompt), when the
/// package has one: a request without task, instruction or examples is documents.
pub const DEFAULT_TASK_PRESET: &str = "query";

/// A query prompt (task instruction and few-shot examples), prepared once.
pub struct Prompt {
    /// Equal for equal (instruction, examples): the batching task groups requests by it.
    pub key: String,
    /// About how many leading tokens every query of the prompt shares (0 when nothing is shared,
    /// a few-shot prompt without examples: then the queries batch with documents).
    pub shared_len: usize,
    query: QueryPrompt,
    /// The server keeps prefix states (`--prefix-cache-bytes`, and a graph that takes them).
    cached: bool,
}

impl Prompt {
    /// The leading ids the model computes once for every query of the prompt, or `None` when the
    /// prefix cache is off or the prompt has no examples. The queue costs rows on them as the
    /// engine will run them.
    pub fn cached_prefix(&self) -> Option<&[u32]> {
        self.query.shared_prefix().filter(|_| self.cached)
    }
}

/// A request refused for its content: the field, the input's index, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub index: Option<usize>,
    pub message: String,
    /// Over a size bound (the prompt-token bound): answered 413 rather than 422.
    pub too_large: bool,
}

impl Refusal {
    fn new(field: impl Into<String>, index: Option<usize>, message: impl Into<String>) -> Refusal {
        Refusal {
            field: field.into(),
            index,
            message: message.into(),
            too_large: false,
        }
    }

    fn too_large(field: impl Into<String>, index: Option<usize>, message: String) -> Refusal {
        Refusal {
            too_large: true,
            ..Refusal::new(field, index, message)
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
    /// Most tokens of one prompt (prefix and query): the attention window, else
    /// `--max-prompt-tokens`.
    pub max_prompt_tokens: usize,
}

impl ModelInfo {
    /// Where [`ModelInfo::max_prompt_tokens`] comes from, for refusals.
    fn prompt_bound(&self) -> String {
        match self.max_tokens {
            Some(w) => format!("the bound of {w} tokens a prompt (the model's attention window)"),
            None => format!(
                "the bound of {} tokens a prompt (the server's --max-prompt-tokens)",
                self.max_prompt_tokens
            ),
        }
    }
}

/// Tokenization for the handlers: the package's tokenizer and prompts, and the `--tasks` presets.
pub struct Frontend {
    encoder: Encoder,
    presets: BTreeMap<String, Arc<Prompt>>,
    pub info: ModelInfo,
}

impl Frontend {
    /// The front end of `encoder` reporting `info`, with the `--tasks` presets checked against
    /// the package's prompt, and the preset [`DEFAULT_TASK_PRESET`] of the package's default task
    /// unless the tasks file names one so.
    pub fn new(
        encoder: Encoder,
        info: ModelInfo,
        presets: &BTreeMap<String, TaskPreset>,
    ) -> Result<Frontend> {
        let mut frontend = Frontend {
            encoder,
            presets: BTreeMap::new(),
            info,
        };
        for (name, preset) in presets {
            let prompt = frontend.preset_prompt(name, preset)?;
            frontend.presets.insert(name.clone(), prompt);
        }
        let default_task = frontend.manifest().prompt.default_task.clone();
        if let (Some(task), false) = (
            default_task,
            frontend.presets.contains_key(DEFAULT_TASK_PRESET),
        ) {
            let preset = TaskPreset {
                instruction: Some(task),
                examples: ExamplesSource::Inline(Vec::new()),
            };
            let prompt = frontend.preset_prompt(DEFAULT_TASK_PRESET, &preset)?;
            frontend
                .presets
                .insert(DEFAULT_TASK_PRESET.to_string(), prompt);
        }
        Ok(frontend)
    }

    /// The prompt of a `--tasks` preset, its examples read from their file where they are in one.
    fn preset_prompt(&self, name: &str, preset: &TaskPreset) -> Result<Arc<Prompt>> {
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
        self.prompt(&task, "")
            .map_err(|r| anyhow!("tasks: task {name:?}: {}: {}", r.field, r.message))?
            .ok_or_else(|| anyhow!("tasks: task {name:?} has neither instruction nor examples"))
    }

    /// The package's manifest (its prompt procedure, shortened vectors).
    pub fn manifest(&self) -> &icl_embed::Manifest {
        &self.encoder.package().manifest
    }

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
        // Checked here, before any query is tokenized or any model work: a prefix alone at the
        // bound leaves no room for a query.
        if shared_len >= self.info.max_prompt_tokens {
            return Err(Refusal::too_large(
                format!("{field}examples"),
                None,
                format!(
                    "the prefix every query shares (examples, instruction) is {shared_len} tokens, at or over {}, which counts prefix and query; send fewer or shorter examples",
                    self.info.prompt_bound()
                ),
            ));
        }
        Ok(Some(Arc::new(Prompt {
            key,
            shared_len,
            query,
            cached: self.info.prefix_cache,
        })))
    }

    /// Refuses (`field`, index) the first text over the model's limit: the query text under
    /// `prompt`'s instruction, else the document. Only whether a text is over matters, so at most
    /// limit + 1 ids of each are tokenized, and a 2 MB text costs what a limit-sized one does.
    fn refuse_over_limit(
        &self,
        prompt: Option<&Prompt>,
        texts: &[&str],
        field: &str,
    ) -> Result<(), Refusal> {
        let tokenizer = self.encoder.tokenizer();
        let failed = |e: icl_embed::Error| Refusal::new(field, None, e.to_string());
        let (head, limit) = match prompt {
            Some(p) => {
                let wrapped = p.query.query_texts(texts);
                let refs: Vec<&str> = wrapped.iter().map(String::as_str).collect();
                (
                    tokenizer.encode_plain_head(&refs, p.query.text_max + 1),
                    p.query.text_max,
                )
            }
            None => {
                let limit = self
                    .info
                    .max_document_tokens
                    .saturating_sub(tokenizer.special_count());
                (tokenizer.encode_plain_head(texts, limit + 1), limit)
            }
        };
        let head = head.map_err(failed)?;
        match head.iter().position(|ids| ids.len() > limit) {
            Some(i) => Err(Refusal::new(
                field,
                Some(i),
                format!(
                    "over the limit of {limit} tokens (set \"truncate\": true to cut it as the reference does)"
                ),
            )),
            None => Ok(()),
        }
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
        let failed = |e: icl_embed::Error| Refusal::new(field, None, e.to_string());
        if !truncate {
            self.refuse_over_limit(prompt, texts, field)?;
        }
        let ids = match prompt {
            Some(p) => self.encoder.queries(&p.query, texts),
            None => self.encoder.documents(texts, None),
        }
        .map_err(failed)?;
        // Every row within the attention window; without one, query rows within
        // --max-prompt-tokens (documents are bounded by the package's document length).
        let max = match (self.info.max_tokens, prompt) {
            (Some(window), _) => window,
            (None, Some(_)) => self.info.max_prompt_tokens,
            (None, None) => usize::MAX,
        };
        if let Some(i) = ids.iter().position(|r| r.len() > max) {
            return Err(Refusal::too_large(
                field,
                Some(i),
                format!(
                    "{} tokens with the prompt, over {}",
                    ids[i].len(),
                    self.info.prompt_bound()
                ),
            ));
        }
        Ok(ids)
    }
}

fn example(e: &ExampleText) -> Example {
    let mut example = Example::new(&e.query, &e.response);
    example.instruct = e.instruct.clone();
    example
}
