//! `icl-embed`: embeddings from BAAI/bge-en-icl (and models exported the same way) on ONNX Runtime,
//! with the few-shot query prompts of the reference implementation reproduced token for token.
//!
//! A model package (made by `python -m export`, see `export/FORMAT.md`) holds the manifest, the
//! tokenizer and fp32/fp16/int8 graphs. [`Embedder`] loads one and embeds:
//!
//! ```no_run
//! use icl_embed::{Embedder, EmbedderOptions};
//!
//! let mut embedder = Embedder::new("models/tiny", &EmbedderOptions::default())?;
//! let vectors = embedder.embed_documents(&["a passage", "another passage"])?;
//! assert_eq!(vectors.len(), 2);
//! # Ok::<(), icl_embed::Error>(())
//! ```

pub mod batch;
pub mod embedder;
pub mod error;
pub mod hub;
pub mod input;
pub mod manifest;
pub mod output;
pub mod pooling;
pub mod prompt;
pub mod runtime;
pub mod stream;
pub mod tokenize;

pub use embedder::{Embedder, EmbedderOptions, Encoder};
pub use error::{Error, Result};
pub use manifest::{Manifest, Package};
pub use prompt::Example;
pub use runtime::Device;
