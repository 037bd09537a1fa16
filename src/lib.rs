//! `icl-embed`: embeddings from BAAI/bge-en-icl (and models exported the same way) on ONNX Runtime,
//! with the few-shot query prompts of the reference implementation reproduced token for token.
//!
//! A model package (made by `python -m export`, see `export/FORMAT.md`) holds the manifest, the
//! tokenizer and fp32/fp16/int8 graphs. [`Embedder`] loads one (a directory or a Hugging Face repo
//! id) and embeds; results are [`ndarray::Array2`] rows, L2-normalised:
//!
//! ```
//! # let Some(pkg) = std::env::var_os("ICL_TINY_PKG") else {
//! #     eprintln!("skipped: ICL_TINY_PKG is not set (tests/run.sh sets it)");
//! #     return Ok(());
//! # };
//! use icl_embed::{Device, Embedder, EmbedderOptions, Variant};
//!
//! let options = EmbedderOptions { variant: Variant::Fp32, device: Device::Cpu, ..Default::default() };
//! let mut embedder = Embedder::new(pkg, &options)?;
//! let vectors = embedder.embed_documents(&["a passage", "another passage"])?;
//! assert_eq!(vectors.nrows(), 2);
//! # Ok::<(), icl_embed::Error>(())
//! ```
//!
//! How a batch goes through, for callers that batch themselves (a server): token ids from the
//! [`Encoder`] ([`Encoder::documents`], [`Encoder::queries`] under a [`QueryPrompt`]) -> a plan
//! under a token budget ([`driver::plan`]) -> a padded [`Batch`] ([`batch::pad`]) ->
//! [`Model::forward`] (on top of a [`Prefix`] for few-shot queries) -> pooled, normalised rows.
//! [`driver::Batches`] runs that loop; [`Embedder`] and the corpus runner ([`stream`]) use it.

pub mod batch;
pub mod driver;
mod embedder;
mod error;
mod hub;
pub mod input;
mod manifest;
mod model;
pub mod output;
mod pooling;
mod prompt;
pub mod runtime;
pub mod stream;
mod tokenize;

pub use batch::Batch;
pub use driver::{BatchLimits, Batches, Finished};
pub use embedder::{Embedder, EmbedderOptions, Encoder, PrefixCache, PrefixStats};
pub use error::{Error, Result};
pub use hub::{is_repo_id, locate};
pub use manifest::{Architecture, Manifest, Package, Stamps, VariantSpec, MANIFEST_FILE};
pub use model::{default_cache_dir, Model, ModelOptions, Prefix, Variant};
pub use prompt::Example;
pub use runtime::Device;
pub use tokenize::{QueryPrompt, TextTokenizer};
