//! The front door: [`Encoder`] (a package's tokenizer and prompt procedure, no ONNX Runtime needed)
//! and [`Embedder`] (an encoder, a [`Model`] and a [`PrefixStore`]), which embeds documents and
//! few-shot queries through the engine loop ([`crate::engine::run`]).

use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::backend::pooling::shorten;
use crate::backend::runtime::Device;
use crate::backend::{MemoryLimit, Model, ModelOptions, Variant};
use crate::engine::plan::{self, BatchLimits};
use crate::engine::prefix::{PrefixStats, PrefixStore};
use crate::engine::run::{run_rows, Batches, Finished};
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

    /// Refuses shortened vectors (`dimensions`, the Rust and Python APIs' name) that the package
    /// does not allow; `None` (the whole vector) always passes
    /// ([`crate::Manifest::check_dimensions`]).
    pub fn check_dimensions(&self, dimensions: Option<usize>) -> Result<()> {
        match dimensions {
            Some(n) => self.package.manifest.check_dimensions(n, "dimensions"),
            None => Ok(()),
        }
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

    /// The query prompt for a task (the package's default task when `None`) and its few-shot
    /// examples (refused by the `instruct` procedure): made once, used for any number of queries
    /// ([`Encoder::queries`], [`Embedder::embed_queries`]).
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

/// Bytes of prefix states an [`Embedder`] keeps by default: one prefix as long as bge-en-icl's
/// 4096-token attention window in fp32 (32 layers x 2 x 8 kv heads x 128 x 4 bytes = 256 KiB a
/// token), so a run's one prompt is always kept, and a few shorter ones beside it.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 1 << 30;

/// How to build an [`Embedder`]. Start from [`EmbedderOptions::default`] and set what differs,
/// with the setters or by assigning fields:
///
/// ```
/// use icl_embed::{Device, EmbedderOptions, Variant};
///
/// let options = EmbedderOptions::default().variant(Variant::Fp32).device(Device::Cpu).threads(Some(2));
/// let mut same = EmbedderOptions::default();
/// same.variant = Variant::Fp32;
/// same.threads = Some(2);
/// assert_eq!(format!("{options:?}"), format!("{same:?}"));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmbedderOptions {
    /// A variant the package has, or `auto`: fp16 on GPU providers; on the CPU a faithful fast
    /// int8, else fp32, else int8, among those that fit in memory ([`crate::auto_cpu_variant`]).
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
    /// Bytes of prefix states kept between calls ([`DEFAULT_PREFIX_CACHE_BYTES`]); a prefix
    /// larger than this is computed for its call and not kept.
    pub prefix_cache_bytes: usize,
    /// Most prefixes kept, besides the byte bound (`None`: only the byte bound).
    pub prefix_cache_entries: Option<usize>,
    /// The memory `auto` plans for on the CPU ([`MemoryLimit::Detect`] by default): it never
    /// takes a variant that will not fit.
    pub memory_limit: MemoryLimit,
    /// Return ONNX Runtime's free CPU arena memory to the system after each batch (on by
    /// default; see [`ModelOptions::shrink_arena`]).
    pub shrink_arena: bool,
    /// Shortened vectors: every row this embedder returns is the first N components of the
    /// pooled vector, renormalised ([`crate::shorten`]); the package must allow N
    /// ([`crate::Manifest::check_dimensions`]). `None` (the default): the whole vector. To shorten
    /// per call instead, apply [`crate::shorten`] to the rows returned.
    pub dimensions: Option<usize>,
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
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_BYTES,
            prefix_cache_entries: None,
            memory_limit: MemoryLimit::Detect,
            shrink_arena: true,
            dimensions: None,
        }
    }
}

setters!(EmbedderOptions {
    /// Sets the variant.
    variant: Variant,
    /// Sets the device.
    device: Device,
    /// Sets the intra-op threads.
    threads: Option<usize>,
    /// Sets the token budget of one batch.
    batch_tokens: Option<usize>,
    /// Sets the most rows in one batch.
    max_rows: usize,
    /// Sets the maximum length overriding the manifest's.
    max_length: Option<usize>,
    /// Sets the ONNX Runtime library.
    ort_lib: Option<PathBuf>,
    /// Sets the cache directory.
    cache_dir: Option<PathBuf>,
    /// Turns the prefix cache on or off.
    prefix_cache: bool,
    /// Sets the bytes of prefix states kept.
    prefix_cache_bytes: usize,
    /// Sets the most prefixes kept.
    prefix_cache_entries: Option<usize>,
    /// Sets the memory `auto` plans for on the CPU.
    memory_limit: MemoryLimit,
    /// Turns returning the CPU arena's free memory after each batch on or off.
    shrink_arena: bool,
    /// Sets the length of shortened vectors.
    dimensions: Option<usize>,
});

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
    prefixes: PrefixStore,
    dimensions: Option<usize>,
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
                let mut package = Package::open(hub::resolve(&spec, &[])?)?;
                package.from_hub = true;
                let fetch = move |variant: &str| -> Result<()> {
                    let name = variant.to_string();
                    hub::resolve(&spec, &[name]).map(|_| ())
                };
                (package, Box::new(fetch))
            } else {
                (Package::open(model)?, Box::new(|_: &str| Ok(())))
            };
        let encoder = Encoder::from_package(package)?;
        // Before the model loads: a refused length costs no load.
        encoder.check_dimensions(options.dimensions)?;
        let limits = BatchLimits::default_for(options.device);
        let model_options = ModelOptions::default()
            .variant(options.variant.clone())
            .device(options.device)
            .threads(options.threads)
            .ort_lib(options.ort_lib.clone())
            .cache_dir(options.cache_dir.clone())
            .max_rows(options.max_rows.max(1))
            .batch_tokens(options.batch_tokens.unwrap_or(limits.tokens))
            .memory_limit(options.memory_limit)
            .shrink_arena(options.shrink_arena);
        let model = Model::load(encoder.package(), &model_options, &mut fetch)?;
        Embedder::from_parts(encoder, model, options)
    }

    /// An embedder from a loaded encoder and model (the same package); refuses `dimensions` the
    /// package does not allow.
    pub fn from_parts(
        encoder: Encoder,
        model: Model,
        options: &EmbedderOptions,
    ) -> Result<Embedder> {
        encoder.check_dimensions(options.dimensions)?;
        let default = BatchLimits::default_for(model.device());
        Ok(Embedder {
            encoder,
            model,
            limits: BatchLimits::new(
                options.batch_tokens.unwrap_or(default.tokens),
                options.max_rows,
            ),
            max_length: options.max_length,
            use_prefix_cache: options.prefix_cache,
            prefixes: PrefixStore::new(options.prefix_cache_bytes, options.prefix_cache_entries),
            dimensions: options.dimensions,
        })
    }

    /// Components of every row this embedder returns: its `dimensions`, else the model's hidden
    /// size.
    pub fn width(&self) -> usize {
        self.dimensions.unwrap_or(self.model.hidden())
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

    /// Embeddings of documents, in input order, one row each: `[texts.len(), width]`
    /// ([`Embedder::width`]).
    pub fn embed_documents(&mut self, texts: &[&str]) -> Result<Array2<f32>> {
        let ids = self.encoder.documents(texts, self.max_length)?;
        self.embed_ids(&ids, None, &mut |_| {})
    }

    /// The query prompt for a task and its few-shot examples, made once for any number of
    /// [`Embedder::embed_queries`] calls.
    pub fn query_prompt(&self, task: Option<&str>, examples: &[Example]) -> Result<QueryPrompt> {
        self.encoder.query_prompt(task, examples, self.max_length)
    }

    /// Embeddings of queries under `prompt`, in input order. With a shared prefix (few-shot
    /// examples, or an `instruct` prompt's instruction) and a variant that supports it, the prefix
    /// is computed once and the queries on top of its states.
    pub fn embed_queries(&mut self, prompt: &QueryPrompt, texts: &[&str]) -> Result<Array2<f32>> {
        let ids = self.encoder.queries(prompt, texts)?;
        let prefix = self.cached_prefix(prompt).map(<[u32]>::to_vec);
        self.embed_ids(&ids, prefix.as_deref(), &mut |_| {})
    }

    /// The leading ids of `prompt`'s queries that this embedder computes once, or `None` when the
    /// cache does not apply: turned off, a graph without prefix states, or nothing shared
    /// ([`QueryPrompt::shared_prefix`]).
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
        // One call, one answer: a text over the window is named before any batch runs.
        for (i, row) in ids.iter().enumerate() {
            self.model
                .check_tokens(row.len(), &format!("text {}", i + 1))?;
        }
        self.batches(ids, prefix)?.collect_rows(each)
    }

    /// The engine loop over `ids` (see [`Batches`]), with `prefix`'s states computed (or taken
    /// from the prefix store) first when the cache applies. Its rows are counted in
    /// [`Embedder::prefix_stats`] as its batches finish.
    pub fn batches<'a>(
        &'a mut self,
        ids: &'a [Vec<u32>],
        prefix: Option<&[u32]>,
    ) -> Result<Batches<'a>> {
        // A row over the attention window fails its batch only (`Model::forward` checks it): a
        // server's turn holds several requests. Rows are counted only where the cache is in use,
        // so that `--no-prefix-cache` reports nothing.
        let cache = self.use_prefix_cache && self.model.supports_prefix();
        let counted = prefix.is_some() && cache;
        let used = prefix.filter(|p| cache && ids.iter().any(|r| plan::continues(r, p)));
        let Embedder {
            encoder,
            model,
            limits,
            prefixes,
            dimensions,
            ..
        } = self;
        let held = match used {
            Some(p) => Some(prefixes.get(p, |ids| model.prefix(ids))?),
            None => None,
        };
        let (pad_id, dimensions) = (encoder.pad_id(), *dimensions);
        let width = dimensions.unwrap_or(model.hidden());
        let run = move |rows: &[usize]| {
            let states = held.as_ref().map(|h| prefixes.states(h));
            let (vectors, on_prefix) = run_rows(model, ids, rows, states, pad_id)?;
            if counted {
                prefixes.count_rows(rows.len(), on_prefix);
            }
            Ok(match dimensions {
                Some(n) => (shorten(&vectors, n), on_prefix),
                None => (vectors, on_prefix),
            })
        };
        Ok(Batches::with_runner(
            ids,
            used,
            *limits,
            width,
            Box::new(run),
        ))
    }

    /// What the prefix cache did so far.
    pub fn prefix_stats(&self) -> &PrefixStats {
        self.prefixes.stats()
    }
}
