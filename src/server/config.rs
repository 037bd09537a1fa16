//! What `icl-embed serve` is told: the command-line options (the runtime ones shared with `embed`,
//! [`RuntimeArgs`]) and the task presets of `--tasks` (read here, validated against the model's
//! prompt when the worker loads it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::cli::runtime::RuntimeArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model package: a directory made by `python -m export`, or a Hugging Face repo id
    /// (`owner/name[@revision]`) holding one.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (0.0.0.0 to accept connections from other hosts).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Few-shot task presets: a JSON object of name -> {"instruction": ..., "examples": [...] or
    /// "file.json"} (example files relative to this file), checked at start.
    #[arg(long)]
    pub tasks: Option<PathBuf>,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    pub api_key: Option<String>,
    // Where and how the model runs, and the batches: the options `embed` has.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Requests handled at once (from the moment their body is read); one more is answered 429.
    #[arg(long, default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Client connections open at once; more wait in the listen backlog until one closes.
    #[arg(long, default_value_t = 2048)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers; then the connection is closed.
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub header_read_timeout: Duration,
    /// Seconds a client has to send a request's body; then it is answered 408 and the connection
    /// closed.
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub body_read_timeout: Duration,
    /// Seconds SIGTERM or SIGINT waits for the requests in flight before the process exits anyway
    /// (connections still open then are dropped).
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub shutdown_grace: Duration,
    /// Most tokens of one prompt (few-shot prefix and query) when the package records no
    /// attention window (with one, the window bounds every row); a longer prompt is answered 413
    /// before any model work. Documents are bounded by the package's document length.
    #[arg(long, default_value_t = 8192)]
    pub max_prompt_tokens: usize,
    /// Most inputs in one request; more is answered 422.
    #[arg(long, default_value_t = 32)]
    pub max_client_batch_size: usize,
    /// Largest request body in bytes; a larger one is answered 413.
    #[arg(long, default_value_t = 2_000_000)]
    pub payload_limit: usize,
    /// Bytes of few-shot prefix key/value states kept between requests; a prefix whose states
    /// would not fit is computed with every query instead.
    #[arg(long, default_value_t = 1 << 30)]
    pub prefix_cache_bytes: usize,
    /// The model name reported in responses (default: the last part of --model).
    #[arg(long)]
    pub served_model_name: Option<String>,
}

/// A number of seconds (fractions allowed), positive and at most a day.
fn seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!(
            "{text:?}: expected seconds, more than 0 and at most 86400"
        )),
    }
}

impl ServeArgs {
    pub fn served_name(&self) -> String {
        self.served_model_name.clone().unwrap_or_else(|| {
            self.model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.model.display().to_string())
        })
    }
}

/// One few-shot example as clients and task files write it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleText {
    #[serde(default)]
    pub instruct: Option<String>,
    pub query: String,
    pub response: String,
}

/// A few-shot task: the instruction and the examples put before each query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskText {
    pub instruction: Option<String>,
    pub examples: Vec<ExampleText>,
}

/// A preset's examples: listed in the tasks file, or a file of them (a JSON list or JSON lines,
/// as `embed --examples` reads).
#[derive(Debug, Clone)]
pub enum ExamplesSource {
    Inline(Vec<ExampleText>),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct TaskPreset {
    pub instruction: Option<String>,
    pub examples: ExamplesSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresetEntry {
    #[serde(default)]
    instruction: Option<String>,
    #[serde(default)]
    examples: Option<PresetExamples>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PresetExamples {
    File(String),
    Inline(Vec<ExampleText>),
}

/// The presets of a `--tasks` file (none without one). Example-file paths are resolved against the
/// tasks file's directory.
pub fn read_tasks(path: Option<&Path>) -> Result<BTreeMap<String, TaskPreset>> {
    let Some(path) = path else {
        return Ok(BTreeMap::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("tasks {}: cannot read", path.display()))?;
    let entries: BTreeMap<String, PresetEntry> = serde_json::from_str(&text).with_context(|| {
        format!(
            "tasks {}: expected a JSON object of name -> {{\"instruction\": ..., \"examples\": [...] or \"file.json\"}}",
            path.display()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut presets = BTreeMap::new();
    for (name, entry) in entries {
        if name.is_empty() {
            bail!("tasks {}: a task has an empty name", path.display());
        }
        if entry.instruction.is_none() && entry.examples.is_none() {
            bail!(
                "tasks {}: task {name:?} has neither an instruction nor examples",
                path.display()
            );
        }
        let examples = match entry.examples {
            None => ExamplesSource::Inline(Vec::new()),
            Some(PresetExamples::Inline(list)) => ExamplesSource::Inline(list),
            Some(PresetExamples::File(file)) => ExamplesSource::File(base.join(file)),
        };
        presets.insert(
            name,
            TaskPreset {
                instruction: entry.instruction,
                examples,
            },
        );
    }
    Ok(presets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_file_resolves_example_files_and_refuses_empty_tasks() {
        let dir = std::env::temp_dir().join(format!("icl-serve-tasks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tasks.json");
        std::fs::write(
            &path,
            r#"{"a": {"instruction": "Find it.", "examples": "ex.json"},
                "b": {"examples": [{"instruct": "I", "query": "q", "response": "r"}]}}"#,
        )
        .unwrap();
        let tasks = read_tasks(Some(&path)).unwrap();
        assert!(
            matches!(&tasks["a"].examples, ExamplesSource::File(p) if *p == dir.join("ex.json"))
        );
        assert!(matches!(&tasks["b"].examples, ExamplesSource::Inline(v) if v.len() == 1));
        std::fs::write(&path, r#"{"a": {}}"#).unwrap();
        let err = read_tasks(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("\"a\" has neither"), "{err}");
        std::fs::write(&path, r#"{"a": {"instructions": "typo"}}"#).unwrap();
        assert!(read_tasks(Some(&path)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
