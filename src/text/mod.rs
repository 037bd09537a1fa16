//! Text to token ids, exactly as the reference does it: the prompt text of few-shot queries
//! ([`prompt`]) and the tokenizer with its truncation and decode/re-encode step ([`tokenize`]).

pub(crate) mod prompt;
pub(crate) mod tokenize;

pub use prompt::Example;
pub use tokenize::{QueryPrompt, TextTokenizer};
