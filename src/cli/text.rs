//! The input options `embed` and `tokenize` share: the package, the texts, and for queries the
//! task and its few-shot examples.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use icl_embed::corpus::input::{self, InputFormat};
use icl_embed::Example;

#[derive(Args)]
pub struct TextArgs {
    /// Model package: a directory made by `python -m export`, or a Hugging Face repo id
    /// (`owner/name[@revision]`) holding one, fetched into the hub cache (offline once cached).
    #[arg(long)]
    pub model: PathBuf,
    /// Input file of texts, `-` for stdin.
    #[arg(long)]
    pub input: String,
    /// Input layout: `.jsonl`/`.ndjson` are JSON lines, anything else one text per line.
    #[arg(long, default_value = "auto")]
    pub input_format: InputFormat,
    /// Field holding the text in JSON lines.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Treat the inputs as queries (instruction, few-shot examples, suffix) instead of documents.
    #[arg(long)]
    pub queries: bool,
    /// Task instruction for queries.
    #[arg(long, requires = "queries")]
    pub task: Option<String>,
    /// Few-shot examples for queries: a JSON list or JSON lines of {instruct?, query, response}.
    #[arg(long, requires = "queries")]
    pub examples: Option<PathBuf>,
    /// Maximum length in tokens (the reference's max_length; default from the package, 512).
    #[arg(long)]
    pub max_length: Option<usize>,
}

impl TextArgs {
    /// The few-shot examples of `--examples` (none without it).
    pub fn examples(&self) -> Result<Vec<Example>> {
        Ok(match &self.examples {
            Some(path) => input::read_examples(path)?,
            None => Vec::new(),
        })
    }

    /// All the texts of `--input`, read at once.
    pub fn read_texts(&self) -> Result<Vec<String>> {
        Ok(input::read_texts(
            &self.input,
            self.input_format,
            &self.field,
        )?)
    }
}
