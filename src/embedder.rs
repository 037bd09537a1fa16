//! The front door: [`Encoder`] (a package's tokenizer and prompt procedure, no ONNX Runtime needed)
//! and [`Embedder`] (an encoder, a [`Model`] and a [`PrefixCache`]), which embeds documents and
//! few-shot queries through the batch driver ([`crate::engine::run`]).

use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::backend::runtime::Device;
use crate::backend::{Model, ModelOptions, Prefix, Variant};
use crate::engine::run::{BatchLimits, Batches, Finished};
use crate::error::Result;
use crate::package::hub;
use crate::package::Package;
use crate::text::prompt::Example;
use crate::text::tokenize::{QueryPrompt, TextTokenizer};

/// Tokenization of a package: final token ids for documents and queries, exactly as the
/// reference computes them.
///
/// ```
/// # let Some(pkg) = std::env::var_os("ICL_TINY_PKG") else {
/// #     eprintln!("skipped: ICL_TINY_PKG is not set (tests/run.sh sets it)");
/// #     return Ok(());
/// # };
/// use icl_embed::{Encoder, Example};
///
/// let encoder = Encoder::open(pkg)?;
/// let docs = encoder.documents(&["a passage"], None)?;
/// let examples = [Example::new("capital of Italy", "Rome is the capital of Italy.")];
/// let prompt = encoder.query_prompt(Some("Retrieve passages that answer it"), &examples, None)?;
/// let queries = encoder.queries(&prompt, &["capital of France"])?;
/// // Every query starts with the ids its prompt shares, which a prefix cache computes once.
/// assert!(queries[0].starts_with(prompt.shared_prefix().unwrap()));
/// assert!(docs[0].len() < queries[0].len());
/// # Ok::<(), icl_embed::Error>(())
/// ```
pub struct Encoder {
    package: Package,
    tokenizer: TextTokenizer,
}

impl Encoder {
    /// Opens and checks the package (a directory or a hub repo id, see [`crate::locate`]) and
    /// loads its tokenizer.
    pub fn open(package: impl AsRef<Path>) -> Result<Encoder> {
        Encoder::from_package(Package::open(hub::locate(package)?)?)
    }

    /// The tokenizer of an opened package.
    pub fn from_package(package: Package) -> Result<Encoder> {
        let m = &package.manifest;
        let tokenizer = TextTokenizer::from_file(
            &package.path(&m.tokenizer.file),
            &m.special_tokens,
            m.clean_up_tokenization_spaces,
        )?;
        Ok(Encoder { package, tokenizer })
    }

    /// The package.
    pub fn package(&self) -> &Package {
        &self.package
    }

    /// The lower-level tokenizer (plain encoding, decoding).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The id batches are padded with.
    pub fn pad_id(&self) -> u32 {
        self.package.manifest.special_tokens.pad_id
    }

    /// Final ids of documents; `max_length` defaults to the manifest's.
    pub fn documents(&self, texts: &[&str], max_length: Option<usize>) -> Result<Vec<Vec<u32>>> {
        self.tokenizer.documents(
            texts,
            max_length.unwrap_or(self.package.manifest.max_length.document),
        )
    }

    /// The query prompt for a task and its few-shot examples: made once, used for any number of
    /// queries ([`Encoder::queries`], [`Embedder::embed_queries`]).
    pub fn query_prompt(
        &self,
        task: Option<&str>,
        examples: &[Example],
        max_length: Option<usize>,
    ) -> Result<QueryPrompt> {
        let m = &self.package.manifest;
        QueryPrompt::new(
            &self.tokenizer,
            &m.prompt,
            task,
            examples,
            max_length.unwrap_or(m.max_length.query),
        )
    }

    /// Final ids of queries under `prompt`.
    pub fn queries(&self, prompt: &QueryPrompt, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        prompt.ids(&self.tokenizer, texts)
    }
}

/// How to build an [`Embedder`].
#[derive(Debug, Clone)]
pub struct EmbedderOptions {
    /// A variant the package has, or `auto`: fp16 on GPU providers, int8 on the CPU, fp32 when the
    /// preferred one is absent.
    pub variant: Variant,
    pub device: Device,
    /// Intra-op threads; ONNX Runtime's default (one per core) when `None`.
    pub threads: Option<usize>,
    /// Token budget of one batch (rows x padded length); [`BatchLimits::default_for`] the device
    /// when `None`.
    pub batch_tokens: Option<usize>,
    /// Most rows in one batch.
    pub max_rows: usize,
    /// Overrides the manifest's maximum lengths.
    pub max_length: Option<usize>,
    /// ONNX Runtime library to load instead of searching.
    pub ort_lib: Option<PathBuf>,
    /// Where TensorRT engines and the stamps of verified files are kept; default
    /// [`crate::default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Compute a few-shot prefix once and embed queries on top of its key/value states, when the
    /// variant's graph supports it (on by default).
    pub prefix_cache: bool,
}

impl Default for EmbedderOptions {
    fn default() -> Self {
        EmbedderOptions {
            variant: Variant::Auto,
            device: Device::Cpu,
            threads: None,
            batch_tokens: None,
            max_rows: 64,
            max_length: None,
            ort_lib: None,
            cache_dir: None,
            prefix_cache: true,
        }
    }
}

/// What the prefix cache did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Length of the last prefix computed (tokens), and the size of its key/value states.
    pub prefix_tokens: usize,
    pub state_bytes: usize,
    /// Prefixes computed.
    pub prefixes: usize,
    /// Queries embedded on top of a cached prefix.
    pub cached: usize,
    /// Queries computed in full because their ids do not start with the prefix's (a tokenizer
    /// merged tokens across the boundary).
    pub fallback: usize,
}

/// Prefix states kept for reuse, least recently used out first. The [`Embedder`] keeps one (the
/// prefix of the last query prompt); a server may keep several, one per (task, examples) pair.
pub struct PrefixCache {
    entries: Vec<Prefix>,
    capacity: usize,
    stats: PrefixStats,
}

impl PrefixCache {
    /// A cache holding at most `capacity` prefixes (at least one).
    pub fn new(capacity: usize) -> PrefixCache {
        PrefixCache {
            entries: Vec::new(),
            capacity: capacity.max(1),
            stats: PrefixStats::default(),
        }
    }

    /// The states of `ids`, computed on `model` unless kept. When the cache is full the least
    /// recently used entry goes before the new states are computed.
    pub fn get(&mut self, model: &mut Model, ids: &[u32]) -> Result<&Prefix> {
        if let Some(at) = self.entries.iter().position(|p| p.ids() == ids) {
            let hit = self.entries.remove(at);
            self.entries.push(hit);
        } else {
            if self.entries.len() >= self.capacity {
                self.entries.remove(0);
            }
            let prefix = model.prefix(ids)?;
            self.stats.prefixes += 1;
            self.stats.prefix_tokens = ids.len();
            self.stats.state_bytes = prefix.bytes();
            self.entries.push(prefix);
        }
        Ok(self.entries.last().expect("just pushed"))
    }

    /// Bytes of key/value states held.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(Prefix::bytes).sum()
    }

    /// What the cache did so far.
    pub fn stats(&self) -> &PrefixStats {
        &self.stats
    }

    /// Counts the rows of a finished batch (on the prefix, or in full).
    pub fn count(&mut self, finished: &Finished) {
        self.count_rows(finished.rows.len(), finished.on_prefix);
    }

    /// Counts `rows` rows of which `on_prefix` ran on a prefix (the others in full).
    pub fn count_rows(&mut self, rows: usize, on_prefix: usize) {
        self.stats.cached += on_prefix;
        self.stats.fallback += rows - on_prefix;
    }
}

/// Makes a variant's files present (the hub client for a hub package; nothing for a directory).
type FetchVariant = dyn FnMut(&str) -> Result<()>;

/// Embeds documents and few-shot queries with one model package.
///
/// ```
/// # let Some(pkg) = std::env::var_os("ICL_TINY_PKG") else {
/// #     eprintln!("skipped: ICL_TINY_PKG is not set (tests/run.sh sets it)");
/// #     return Ok(());
/// # };
/// use icl_embed::{Embedder, EmbedderOptions, Example};
///
/// // A package directory, or a Hugging Face repo id such as "owner/name".
/// let mut embedder = Embedder::new(pkg, &EmbedderOptions::default())?;
/// let docs = embedder.embed_documents(&["Paris is the capital of France."])?;
/// let examples = [Example::new("capital of Italy", "Rome is the capital of Italy.")];
/// let prompt = embedder.query_prompt(Some("Retrieve passages that answer it"), &examples)?;
/// let queries = embedder.embed_queries(&prompt, &["capital of France?", "capital of Spain?"])?;
/// assert_eq!(queries.dim(), (2, docs.ncols()));
/// let score = docs.row(0).dot(&queries.row(0));
/// assert!(score.abs() <= 1.0001);
/// # Ok::<(), icl_embed::Error>(())
/// ```
pub struct Embedder {
    encoder: Encoder,
    model: Model,
    limits: BatchLimits,
    max_length: Option<usize>,
    use_prefix_cache: bool,
    prefixes: PrefixCache,
}

impl Embedder {
    /// Loads a package, ONNX Runtime and one variant's session. `model` is a package directory or
    /// a Hugging Face repo id (`owner/name[@revision]`), fetched into the hub cache, only the
    /// manifest, the tokenizer and the variant that runs (offline once cached; `HF_HUB_OFFLINE=1`
    /// never touches the network).
    pub fn new(model: impl AsRef<Path>, options: &EmbedderOptions) -> Result<Embedder> {
        let model = model.as_ref();
        let spec = model.to_string_lossy();
        let (package, mut fetch): (Package, Box<FetchVariant>) =
            if !model.is_dir() && hub::is_repo_id(&spec) {
                let spec = spec.into_owned();
                let package = Package::open(hub::resolve(&spec, &[])?)?;
                let fetch = move |variant: &str| -> Result<()> {
                    let name = variant.to_string();
                    hub::resolve(&spec, &[name]).map(|_| ())
                };
                (package, Box::new(fetch))
            } else {
                (Package::open(model)?, Box::new(|_: &str| Ok(())))
            };
        let encoder = Encoder::from_package(package)?;
        let limits = BatchLimits::default_for(options.device);
        let model_options = ModelOptions {
            variant: options.variant.clone(),
            device: options.device,
            threads: options.threads,
            ort_lib: options.ort_lib.clone(),
            cache_dir: options.cache_dir.clone(),
            max_rows: options.max_rows.max(1),
            batch_tokens: options.batch_tokens.unwrap_or(limits.tokens),
        };
        let model = Model::load(encoder.package(), &model_options, &mut fetch)?;
        Ok(Embedder::from_parts(encoder, model, options))
    }

    /// An embedder from a loaded encoder and model (the same package).
    pub fn from_parts(encoder: Encoder, model: Model, options: &EmbedderOptions) -> Embedder {
        let default = BatchLimits::default_for(model.device());
        Embedder {
            encoder,
            model,
            limits: BatchLimits {
                tokens: options.batch_tokens.unwrap_or(default.tokens),
                rows: options.max_rows.max(1),
            },
            max_length: options.max_length,
            use_prefix_cache: options.prefix_cache,
            prefixes: PrefixCache::new(1),
        }
    }

    /// The tokenizer side.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The model (variant, device, [`Model::forward`]).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, mutably, with the encoder beside it (a server batches and runs with both).
    pub fn parts_mut(&mut self) -> (&Encoder, &mut Model) {
        (&self.encoder, &mut self.model)
    }

    /// The batch limits in force.
    pub fn batch_limits(&self) -> BatchLimits {
        self.limits
    }

    /// Why `auto` passed over the devices it did not choose.
    pub fn fallback_notes(&self) -> &[String] {
        self.model.notes()
    }

    /// Embeddings of documents, in input order, one row each: `[texts.len(), hidden]`.
    pub fn embed_documents(&mut self, texts: &[&str]) -> Result<Array2<f32>> {
        let ids = self.encoder.documents(texts, self.max_length)?;
        self.embed_ids(&ids, None, &mut |_| {})
    }

    /// The query prompt for a task and its few-shot examples, made once for any number of
    /// [`Embedder::embed_queries`] calls.
    pub fn query_prompt(&self, task: Option<&str>, examples: &[Example]) -> Result<QueryPrompt> {
        self.encoder.query_prompt(task, examples, self.max_length)
    }

    /// Embeddings of queries under `prompt`, in input order. With few-shot examples (and a variant
    /// that supports it) the shared prefix is computed once and the queries on top of its states.
    pub fn embed_queries(&mut self, prompt: &QueryPrompt, texts: &[&str]) -> Result<Array2<f32>> {
        let ids = self.encoder.queries(prompt, texts)?;
        let prefix = self.cached_prefix(prompt).map(<[u32]>::to_vec);
        self.embed_ids(&ids, prefix.as_deref(), &mut |_| {})
    }

    /// The leading ids of `prompt`'s queries that this embedder computes once, or `None` when the
    /// cache does not apply: turned off, a graph without prefix states, or no few-shot examples.
    pub fn cached_prefix<'p>(&self, prompt: &'p QueryPrompt) -> Option<&'p [u32]> {
        if self.use_prefix_cache && self.model.supports_prefix() {
            prompt.shared_prefix()
        } else {
            None
        }
    }

    /// Embeddings of token ids, in input order; the rows that continue `prefix` run on its cached
    /// states. `each` hears every finished batch.
    pub fn embed_ids(
        &mut self,
        ids: &[Vec<u32>],
        prefix: Option<&[u32]>,
        each: &mut dyn FnMut(&Finished),
    ) -> Result<Array2<f32>> {
        let mut counted = Vec::new();
        let rows = self.batches(ids, prefix)?.collect_rows(&mut |f| {
            counted.push((f.rows.len(), f.on_prefix));
            each(f)
        })?;
        if prefix.is_some() {
            for (rows, on_prefix) in counted {
                self.prefixes.count_rows(rows, on_prefix);
            }
        }
        Ok(rows)
    }

    /// The batch driver over `ids` (see [`Batches`]), with `prefix`'s states computed (or taken
    /// from the cache) first when the cache applies. Count finished batches with
    /// [`Embedder::count_rows`] to keep [`Embedder::prefix_stats`] right.
    pub fn batches<'a>(
        &'a mut self,
        ids: &'a [Vec<u32>],
        prefix: Option<&[u32]>,
    ) -> Result<Batches<'a>> {
        for (i, row) in ids.iter().enumerate() {
            self.model
                .check_tokens(row.len(), &format!("text {}", i + 1))?;
        }
        let pad_id = self.encoder.pad_id();
        let use_prefix = prefix.filter(|p| {
            self.use_prefix_cache
                && self.model.supports_prefix()
                && ids.iter().any(|r| crate::engine::run::continues(r, p))
        });
        let states = match use_prefix {
            Some(p) => Some(self.prefixes.get(&mut self.model, p)?),
            None => None,
        };
        Ok(Batches::new(
            &mut self.model,
            ids,
            states,
            pad_id,
            self.limits,
        ))
    }

    /// Counts a finished batch's rows in [`Embedder::prefix_stats`]: `on_prefix` of `rows` ran on
    /// the prefix.
    pub fn count_rows(&mut self, rows: usize, on_prefix: usize) {
        self.prefixes.count_rows(rows, on_prefix);
    }

    /// What the prefix cache did so far.
    pub fn prefix_stats(&self) -> &PrefixStats {
        self.prefixes.stats()
    }
}
