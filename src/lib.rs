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
//! under a token budget ([`engine::run::plan`]) -> a padded [`Batch`] ([`engine::batch::pad`]) ->
//! [`Model::forward`] (on top of a [`Prefix`] for few-shot queries) -> pooled, normalised rows.
//! [`engine::Batches`] runs that loop; [`Embedder`] and the corpus runner ([`corpus::run`]) use it.

pub mod backend;
pub mod corpus;
mod embedder;
pub mod engine;
mod error;
pub mod package;
pub mod text;

pub use backend::{
    auto_cpu_variant, default_cache_dir, Device, Model, ModelOptions, Prefix, Variant,
};
pub use corpus::input::read_examples;
pub use embedder::{Embedder, EmbedderOptions, Encoder, PrefixCache, PrefixStats};
pub use engine::{Batch, BatchLimits, Batches, Finished};
pub use error::{Error, Result};
pub use package::{
    is_repo_id, locate, Architecture, Manifest, Package, Stamps, VariantSpec, MANIFEST_FILE,
};
pub use text::{Example, QueryPrompt, TextTokenizer};
