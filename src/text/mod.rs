//! Text to token ids, exactly as the reference does it: the prompt text of few-shot queries
//! ([`Example`], and the templates in `prompt.rs`) and the tokenizer with its truncation and
//! decode/re-encode step ([`TextTokenizer`], [`QueryPrompt`]).

pub(crate) mod cut;
pub(crate) mod prompt;
pub(crate) mod tokenize;

pub use prompt::Example;
pub use tokenize::{QueryPrompt, TextTokenizer};
