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
//! let options = EmbedderOptions::default().variant(Variant::Fp32).device(Device::Cpu);
//! let mut embedder = Embedder::new(pkg, &options)?;
//! let vectors = embedder.embed_documents(&["a passage", "another passage"])?;
//! assert_eq!(vectors.nrows(), 2);
//! # Ok::<(), icl_embed::Error>(())
//! ```
//!
//! How a batch goes through, for callers that batch themselves (a server): token ids from the
//! [`Encoder`] ([`Encoder::documents`], [`Encoder::queries`] under a [`QueryPrompt`]) -> the engine
//! ([`engine`]): each row costed ([`engine::plan::cost`]: its length, or on a few-shot prefix its new
//! tokens weighted by the keys they attend to) and the rows grouped under a token budget
//! ([`engine::plan::plan`]) -> the prefix's states, computed once and kept in a byte-bounded
//! [`PrefixStore`] -> each batch padded ([`engine::batch::pad`]) and run by [`Model::forward`] on
//! top of the prefix ([`engine::run::run_rows`]) -> pooled, normalised rows. [`Batches`] is that
//! loop: it yields every batch as it finishes, a failing or panicking batch failing its own rows
//! only, and counts the rows in the store's [`PrefixStats`]. [`Embedder::batches`] starts it;
//! [`Embedder`]'s methods, the corpus runner ([`corpus::run`]) and the server all go through it.

/// A builder-style setter per field of an option struct (`Options::default().variant(..)`): the
/// structs are `#[non_exhaustive]`, so outside the crate they are built from their default.
macro_rules! setters {
    ($ty:ty { $($(#[$doc:meta])* $field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                $(#[$doc])*
                pub fn $field(mut self, $field: $t) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

pub mod backend;
pub mod corpus;
mod embedder;
pub mod engine;
mod error;
pub mod package;
pub mod text;

pub use backend::{
    auto_cpu_variant, cpu_preference, default_cache_dir, shorten, shorten_row, CpuFit, Device,
    MemoryLimit, Model, ModelOptions, Prefix, Resolved, Variant,
};
pub use corpus::input::read_examples;
pub use embedder::{Embedder, EmbedderOptions, Encoder, DEFAULT_PREFIX_CACHE_BYTES};
pub use engine::{Batch, BatchLimits, Batches, Failed, Finished, PrefixStats, PrefixStore};
pub use error::{Error, Result};
pub use package::{
    is_repo_id, locate, Architecture, Dimensions, Manifest, Package, Procedure, PromptTemplate,
    Stamps, VariantSpec, MANIFEST_FILE,
};
pub use text::{Example, QueryPrompt, TextTokenizer};
