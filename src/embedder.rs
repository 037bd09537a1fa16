//! The glue: a package's tokenizer and prompt procedure ([`Encoder`], no ONNX Runtime needed) and
//! an ONNX Runtime session that turns token ids into normalised embeddings ([`Embedder`]).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use crate::batch::{self, Batch};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, Package, Variant};
use crate::pooling;
use crate::prompt::Example;
use crate::runtime::{self, Device, SessionSettings, TensorRtSettings};
use crate::tokenize::{QueryPrompt, TextTokenizer};

/// Tokenization of a package: final token ids for documents and queries, exactly as the
/// reference computes them.
pub struct Encoder {
    pub package: Package,
    pub tokenizer: TextTokenizer,
}

impl Encoder {
    /// Opens and checks the package at `dir` and loads its tokenizer.
    pub fn open(dir: impl AsRef<Path>) -> Result<Encoder> {
        let package = Package::open(dir)?;
        let m = &package.manifest;
        let tokenizer = TextTokenizer::from_file(
            &package.path(&m.tokenizer.file),
            &m.special_tokens,
            m.clean_up_tokenization_spaces,
        )?;
        Ok(Encoder { package, tokenizer })
    }

    /// Final ids of documents; `max_length` defaults to the manifest's.
    pub fn documents(&self, texts: &[&str], max_length: Option<usize>) -> Result<Vec<Vec<u32>>> {
        self.tokenizer.documents(
            texts,
            max_length.unwrap_or(self.package.manifest.max_length.document),
        )
    }

    /// The query prompt for a task and its few-shot examples.
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

    /// Final ids of queries with an optional task instruction and few-shot examples.
    pub fn queries(
        &self,
        task: Option<&str>,
        examples: &[Example],
        texts: &[&str],
        max_length: Option<usize>,
    ) -> Result<Vec<Vec<u32>>> {
        self.query_prompt(task, examples, max_length)?
            .ids(&self.tokenizer, texts)
    }
}

/// How to build an [`Embedder`].
#[derive(Debug, Clone)]
pub struct EmbedderOptions {
    /// `fp32`, `fp16`, `int8` (or any variant the package has), or `auto`: fp16 on GPU providers,
    /// int8 on the CPU, fp32 when the preferred one is absent.
    pub variant: String,
    pub device: Device,
    /// Intra-op threads; ONNX Runtime's default (one per core) when `None`.
    pub threads: Option<usize>,
    /// Token budget of one batch (rows x padded length); see [`EmbedderOptions::default_batch_tokens`].
    pub batch_tokens: Option<usize>,
    /// Most rows in one batch.
    pub max_rows: usize,
    /// Overrides the manifest's maximum lengths.
    pub max_length: Option<usize>,
    /// ONNX Runtime library to load instead of searching.
    pub ort_lib: Option<PathBuf>,
    /// Where TensorRT keeps engines and timing caches.
    pub cache_dir: Option<PathBuf>,
    /// Compute a few-shot prefix once and embed queries on top of its key/value states, when the
    /// package's graph supports it (on by default).
    pub prefix_cache: bool,
}

impl Default for EmbedderOptions {
    fn default() -> Self {
        EmbedderOptions {
            variant: "auto".into(),
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

impl EmbedderOptions {
    /// 4096 tokens on the CPU (larger batches add memory, not speed), 16384 on a GPU.
    pub fn default_batch_tokens(device: Device) -> usize {
        if device.is_gpu() {
            16384
        } else {
            4096
        }
    }
}

/// Embeds documents and few-shot queries with one model package.
///
/// ```no_run
/// use icl_embed::{Embedder, EmbedderOptions, Example};
///
/// let mut embedder = Embedder::new("models/bge-en-icl", &EmbedderOptions::default())?;
/// let docs = embedder.embed_documents(&["Paris is the capital of France."])?;
/// let examples = [Example { instruct: None, query: "capital of Italy".into(), response: "Rome is the capital of Italy.".into() }];
/// let queries = embedder.embed_queries(
///     Some("Given a question, retrieve passages that answer it"),
///     &examples,
///     &["what is the capital of France?"],
/// )?;
/// let score: f32 = docs[0].iter().zip(&queries[0]).map(|(a, b)| a * b).sum();
/// assert!(score.abs() <= 1.0001);
/// # Ok::<(), icl_embed::Error>(())
/// ```
pub struct Embedder {
    pub encoder: Encoder,
    session: Session,
    variant: String,
    device: Device,
    inputs: Vec<String>,
    output: String,
    hidden: usize,
    batch_tokens: usize,
    max_rows: usize,
    max_length: Option<usize>,
    notes: Vec<String>,
    /// The graph's prefix-state inputs and outputs, with zero-length states for runs without a prefix.
    past: Option<PastLayout>,
    use_prefix_cache: bool,
    /// States of the last prefix computed (one (task, examples) pair at a time).
    prefix: Option<PrefixStates>,
    prefix_stats: PrefixStats,
}

/// Prefix-state names of a graph, and the empty states fed when there is no prefix.
struct PastLayout {
    /// (`past.*` input, `present.*` output) per layer, key then value.
    names: Vec<(String, String)>,
    empty: Vec<DynValue>,
}

/// The key/value states of one prefix, kept for the queries that start with it.
struct PrefixStates {
    ids: Vec<u32>,
    states: Vec<DynValue>,
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

impl Embedder {
    /// Loads the package at `dir`, ONNX Runtime and one variant's session.
    pub fn new(dir: impl AsRef<Path>, options: &EmbedderOptions) -> Result<Embedder> {
        let encoder = Encoder::open(dir)?;
        runtime::environment(options.ort_lib.as_deref())?;
        let candidates = match options.device {
            Device::Auto => vec![Device::TensorRt(0), Device::Cuda(0), Device::Cpu],
            d => vec![d],
        };
        let mut notes = Vec::new();
        for device in candidates {
            let name = choose_variant(&encoder.package, &options.variant, device)?;
            let variant = encoder.package.variant(&name)?.clone();
            if options.device == Device::Auto && device.is_gpu() {
                if !runtime::provider_compiled_in(device)? {
                    notes.push(format!("{device}: not in this ONNX Runtime library"));
                    continue;
                }
                if !runtime::cuda_driver_present() {
                    notes.push(format!("{device}: no NVIDIA driver"));
                    continue;
                }
            }
            let settings = session_settings(options, device);
            match runtime::session(
                &encoder.package.path(&variant.file),
                &variant.inputs,
                device,
                &settings,
            ) {
                Ok(session) => {
                    let (inputs, output) =
                        check_graph(&encoder.package, &name, &variant, &session)?;
                    let past = past_layout(&encoder.package, &name, &variant, &session)?;
                    let hidden = encoder.package.manifest.architecture.hidden;
                    return Ok(Embedder {
                        encoder,
                        session,
                        variant: name,
                        device,
                        inputs,
                        output,
                        hidden,
                        batch_tokens: options
                            .batch_tokens
                            .unwrap_or(EmbedderOptions::default_batch_tokens(device)),
                        max_rows: options.max_rows.max(1),
                        max_length: options.max_length,
                        notes,
                        past,
                        use_prefix_cache: options.prefix_cache,
                        prefix: None,
                        prefix_stats: PrefixStats::default(),
                    });
                }
                Err(e) if options.device == Device::Auto && device != Device::Cpu => {
                    notes.push(format!("{device}: {e}"))
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Provider {
            provider: "auto".into(),
            reason: notes.join("; "),
        })
    }

    /// The variant that runs.
    pub fn variant(&self) -> &str {
        &self.variant
    }

    /// The device that runs it.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The batch limits in force: (token budget, most rows).
    pub fn batch_limits(&self) -> (usize, usize) {
        (self.batch_tokens, self.max_rows)
    }

    /// Why `auto` passed over the providers it did not choose.
    pub fn fallback_notes(&self) -> &[String] {
        &self.notes
    }

    /// Embeddings of documents, in input order, L2-normalised.
    pub fn embed_documents(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = self.encoder.documents(texts, self.max_length)?;
        self.embed_ids(&ids, &mut |_, _| {})
    }

    /// Embeddings of queries with an optional task instruction and few-shot examples. With examples
    /// (and a package that supports it) the shared prefix is computed once and the queries on top
    /// of it; see [`Embedder::cache_prefix`].
    pub fn embed_queries(
        &mut self,
        task: Option<&str>,
        examples: &[Example],
        texts: &[&str],
    ) -> Result<Vec<Vec<f32>>> {
        let prompt = self.encoder.query_prompt(task, examples, self.max_length)?;
        let ids = prompt.ids(&self.encoder.tokenizer, texts)?;
        let prefix = self.cache_prefix(&prompt)?;
        let costs: Vec<usize> = ids
            .iter()
            .map(|r| plan_cost(r, prefix.as_deref()))
            .collect();
        let pad_id = self.encoder.package.manifest.special_tokens.pad_id;
        let mut out = vec![Vec::new(); ids.len()];
        for rows in batch::plan(&costs, self.batch_tokens, self.max_rows) {
            let batch = batch::pad(&ids, &rows, pad_id);
            let vectors = self.embed_batch_after(&batch, prefix.as_deref())?;
            for (row, v) in batch.rows.iter().zip(vectors) {
                out[*row] = v;
            }
        }
        Ok(out)
    }

    /// The leading ids of `prompt`'s queries that the prefix cache computes once, or `None` when the
    /// cache does not apply: turned off, a graph without prefix-state inputs, or no few-shot
    /// examples. Each candidate ([`QueryPrompt::shared_prefixes`]) is cut to what a probe query's
    /// ids share with it (a tokenizer may merge the prefix's last tokens with the query's first:
    /// smollm2's byte-level BPE splits a closing "\n\n" differently when text follows it), and the
    /// longest cut wins. The probe, not the input, decides, so the choice is the same for every
    /// chunk of a run and for a resumed one.
    pub fn cache_prefix(&self, prompt: &QueryPrompt) -> Result<Option<Vec<u32>>> {
        if !self.use_prefix_cache || self.past.is_none() {
            return Ok(None);
        }
        let tokenizer = &self.encoder.tokenizer;
        let probe = prompt.ids(tokenizer, &["probe"])?.remove(0);
        let shared = |c: &Vec<u32>| {
            c.iter()
                .zip(&probe)
                .take_while(|(a, b)| a == b)
                .count()
                .min(probe.len() - 1)
        };
        let best = prompt
            .shared_prefixes(tokenizer)?
            .iter()
            .map(shared)
            .max()
            .unwrap_or(0);
        let specials = self.encoder.package.manifest.special_tokens.prepend.len();
        Ok((best > specials).then(|| probe[..best].to_vec()))
    }

    /// What the prefix cache did so far.
    pub fn prefix_stats(&self) -> &PrefixStats {
        &self.prefix_stats
    }

    /// Embeddings of already tokenized inputs, in input order. `progress` hears (rows, tokens) after
    /// each batch.
    pub fn embed_ids(
        &mut self,
        ids: &[Vec<u32>],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
        let pad_id = self.encoder.package.manifest.special_tokens.pad_id;
        let mut out = vec![Vec::new(); ids.len()];
        for rows in batch::plan(&lengths, self.batch_tokens, self.max_rows) {
            let batch = batch::pad(ids, &rows, pad_id);
            let vectors = self.embed_batch(&batch)?;
            for (row, v) in batch.rows.iter().zip(vectors) {
                out[*row] = v;
            }
            progress(batch.rows.len(), batch.tokens());
        }
        Ok(out)
    }

    /// Normalised embeddings of one padded batch of full rows, row by row.
    pub fn embed_batch(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        self.run_batch(batch, None)
    }

    /// Like [`Embedder::embed_batch`], with the rows that start with `prefix` computed on top of its
    /// cached states (computed now if it is not the cached one) and the others in full.
    pub fn embed_batch_after(
        &mut self,
        batch: &Batch,
        prefix: Option<&[u32]>,
    ) -> Result<Vec<Vec<f32>>> {
        let Some(prefix) = prefix else {
            return self.run_batch(batch, None);
        };
        let (mut on_prefix, mut full) = (Vec::new(), Vec::new());
        for (i, row) in batch.row_ids().enumerate() {
            if row.len() > prefix.len() && row.starts_with(prefix) {
                on_prefix.push(i);
            } else {
                full.push(i);
            }
        }
        let mut out = vec![Vec::new(); batch.rows.len()];
        if !on_prefix.is_empty() {
            self.ensure_prefix(prefix)?;
            let suffixes = batch.suffixes(&on_prefix, prefix.len());
            let states = self.prefix.take();
            let result = self.run_batch(&suffixes, states.as_ref());
            self.prefix = states;
            for (i, v) in on_prefix.iter().zip(result?) {
                out[*i] = v;
            }
            self.prefix_stats.cached += on_prefix.len();
        }
        if !full.is_empty() {
            let rest = batch.select(&full);
            for (i, v) in full.iter().zip(self.run_batch(&rest, None)?) {
                out[*i] = v;
            }
            self.prefix_stats.fallback += full.len();
        }
        Ok(out)
    }

    /// Computes and keeps the key/value states of `prefix`, unless they are the ones kept.
    fn ensure_prefix(&mut self, prefix: &[u32]) -> Result<()> {
        if self.prefix.as_ref().is_some_and(|p| p.ids == prefix) {
            return Ok(());
        }
        self.prefix = None; // the old states go before the new ones are computed
        let layout = self.past.as_ref().ok_or_else(|| {
            Error::input(
                "prefix cache",
                "this variant's graph takes no prefix states",
            )
        })?;
        let single = batch::pad(&[prefix.to_vec()], &[0], 0);
        let feed = feed_inputs(&self.inputs, &single, &layout.names, &layout.empty)?;
        let mut outputs = self.session.run(feed).map_err(Error::runtime(format!(
            "inference failed on the {}-token prefix",
            prefix.len()
        )))?;
        let mut states = Vec::with_capacity(layout.names.len());
        let mut bytes = 0;
        for (_, present) in &layout.names {
            let value = outputs
                .remove(present.as_str())
                .ok_or_else(|| Error::input("graph output", format!("no output {present:?}")))?;
            bytes += value_bytes(&value);
            states.push(value);
        }
        drop(outputs);
        self.prefix_stats.prefix_tokens = prefix.len();
        self.prefix_stats.state_bytes = bytes;
        self.prefix_stats.prefixes += 1;
        self.prefix = Some(PrefixStates {
            ids: prefix.to_vec(),
            states,
        });
        Ok(())
    }

    /// One session run; `past` are the prefix states the rows continue (positions already offset).
    fn run_batch(&mut self, batch: &Batch, past: Option<&PrefixStates>) -> Result<Vec<Vec<f32>>> {
        let shape = [batch.rows.len(), batch.seq];
        let no_names = Vec::new();
        let (names, states): (&Vec<(String, String)>, &[DynValue]) = match (&self.past, past) {
            (Some(layout), Some(p)) => (&layout.names, &p.states),
            (Some(layout), None) => (&layout.names, &layout.empty),
            (None, Some(_)) => {
                return Err(Error::input(
                    "prefix cache",
                    "this variant's graph takes no prefix states",
                ))
            }
            (None, None) => (&no_names, &[]),
        };
        let feed = feed_inputs(&self.inputs, batch, names, states)?;
        let outputs = self.session.run(feed).map_err(Error::runtime(format!(
            "inference failed on a batch of {} x {}",
            shape[0], shape[1]
        )))?;
        let value = &outputs[self.output.as_str()];
        let expect = [shape[0] as i64, shape[1] as i64, self.hidden as i64];
        let mut rows = match value.dtype().tensor_type() {
            Some(TensorElementType::Float32) => {
                let (s, data) = value
                    .try_extract_tensor::<f32>()
                    .map_err(Error::runtime("cannot read the output"))?;
                check_output_shape(&s[..], &expect)?;
                pooling::last_token(data, batch.seq, self.hidden, &batch.lengths)
            }
            Some(TensorElementType::Float16) => {
                let (s, data) = value
                    .try_extract_tensor::<half::f16>()
                    .map_err(Error::runtime("cannot read the output"))?;
                check_output_shape(&s[..], &expect)?;
                pooling::last_token(data, batch.seq, self.hidden, &batch.lengths)
            }
            other => {
                return Err(Error::input(
                    "graph output",
                    format!("unsupported element type {other:?}"),
                ))
            }
        };
        for v in &mut rows {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::input(
                    "graph output",
                    format!(
                        "non-finite values in the embeddings ({} variant)",
                        self.variant
                    ),
                ));
            }
            if self.encoder.package.manifest.normalize {
                pooling::normalize(v);
            }
        }
        Ok(rows)
    }
}

/// The session feed: the int64 inputs of `batch`, then each prefix-state input with its value.
fn feed_inputs<'v>(
    inputs: &[String],
    batch: &Batch,
    past: &[(String, String)],
    states: &'v [DynValue],
) -> Result<Vec<(Cow<'static, str>, SessionInputValue<'v>)>> {
    let shape = [batch.rows.len(), batch.seq];
    let mut feed: Vec<(Cow<'static, str>, SessionInputValue<'v>)> =
        Vec::with_capacity(inputs.len() + past.len());
    for name in inputs {
        let data = match name.as_str() {
            "input_ids" => &batch.input_ids,
            "attention_mask" => &batch.attention_mask,
            _ => &batch.position_ids,
        };
        let tensor = Tensor::from_array((shape, data.clone()))
            .map_err(Error::runtime(format!("cannot build input {name}")))?;
        feed.push((Cow::Owned(name.clone()), tensor.into()));
    }
    for ((name, _), value) in past.iter().zip(states) {
        feed.push((Cow::Owned(name.clone()), SessionInputValue::from(value)));
    }
    Ok(feed)
}

/// Bytes held by a tensor value.
fn value_bytes(value: &DynValue) -> usize {
    match value.dtype() {
        ValueType::Tensor { ty, shape, .. } => {
            let n: i64 = shape.iter().product();
            n.max(0) as usize * ty.byte_size(1).unwrap_or(4)
        }
        _ => 0,
    }
}

/// The cost of a row in batch planning: its length, or for a row on a cached prefix its new tokens
/// weighted by how many keys each attends to (prefix included), relative to a 512-token document.
pub fn plan_cost(ids: &[u32], prefix: Option<&[u32]>) -> usize {
    match prefix {
        Some(p) if ids.len() > p.len() && ids.starts_with(p) => {
            let new = ids.len() - p.len();
            new.max(new * ids.len() / 512)
        }
        _ => ids.len(),
    }
}

fn check_output_shape(got: &[i64], want: &[i64; 3]) -> Result<()> {
    if got != want {
        return Err(Error::input(
            "graph output",
            format!("shape {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}

/// Resolves `auto` to the variant preferred on `device`.
pub fn choose_variant(package: &Package, requested: &str, device: Device) -> Result<String> {
    if requested != "auto" {
        package
            .variant_names()
            .iter()
            .find(|n| **n == requested)
            .ok_or_else(|| {
                Error::package(
                    &package.dir,
                    format!(
                        "has no variant {requested:?} (it has {})",
                        package.variant_names().join(", ")
                    ),
                )
            })?;
        return Ok(requested.to_string());
    }
    if !device.is_gpu() {
        if let Some(name) = auto_cpu_variant(&package.manifest).0 {
            return Ok(name);
        }
    }
    let preferred: &[&str] = if device.is_gpu() {
        &["fp16", "fp32"]
    } else {
        &["int8", "fp32"]
    };
    preferred
        .iter()
        .find(|p| package.manifest.variants.contains_key(**p))
        .map(|p| p.to_string())
        .or_else(|| package.variant_names().first().map(|s| s.to_string()))
        .ok_or_else(|| Error::package(&package.dir, "has no variants"))
}

/// What `--variant auto` takes on the CPU, by what the package records about its int8 variant
/// (kernel class and fidelity; FORMAT.md), and why, in words. `None` when the package has neither
/// int8 nor fp32.
pub fn auto_cpu_variant(manifest: &Manifest) -> (Option<String>, String) {
    let variants = &manifest.variants;
    let has_fp32 = variants.contains_key("fp32");
    let cpu = runtime::cpu_int8_class();
    let Some(int8) = variants.get("int8") else {
        let why = "the package has no int8 variant".to_string();
        return (has_fp32.then(|| "fp32".to_string()), why);
    };
    let summary = int8.int8_summary();
    if int8.int8_faithful() == Some(false) && has_fp32 {
        return (
            Some("fp32".into()),
            format!("fp32: the int8 variant ({summary}) missed the exporter's fidelity thresholds"),
        );
    }
    match int8.int8_kernel().as_deref() {
        Some("matmulnbits-fp32") if has_fp32 => (
            Some("fp32".into()),
            format!(
                "fp32: the int8 variant ({summary}) is weight-only with fp32 compute, slower than fp32 \
                 (pass --variant int8 for a third of the memory)"
            ),
        ),
        Some("u8s8") => {
            let kernel = if runtime::cpu_int8_needs_u8u8() {
                "no VNNI: exact u8 x u8 GEMM via session.x64quantprecision, about 1.6x fp32 measured on AVX2"
            } else {
                "u8 x s8 GEMM, 3x+ fp32 measured with AVX-512 VNNI"
            };
            (
                Some("int8".into()),
                format!("int8 ({summary}); this CPU is {cpu} ({kernel})"),
            )
        }
        _ => (Some("int8".into()), format!("int8 ({summary})")),
    }
}

fn session_settings(options: &EmbedderOptions, device: Device) -> SessionSettings {
    let batch_tokens = options
        .batch_tokens
        .unwrap_or(EmbedderOptions::default_batch_tokens(device));
    let cache_dir = options
        .cache_dir
        .clone()
        .unwrap_or_else(default_cache_dir)
        .join("tensorrt");
    SessionSettings {
        threads: options.threads,
        tensorrt: TensorRtSettings {
            max_batch: options.max_rows.max(1),
            opt_batch: options.max_rows.clamp(1, 16),
            max_seq: batch_tokens.clamp(512, 4096),
            opt_seq: 512,
            cache_dir,
        },
    }
}

/// `$XDG_CACHE_HOME/icl-embed`, else `~/.cache/icl-embed`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("icl-embed")
}

/// Checks the session's inputs and outputs against the manifest; returns the input names in graph
/// order and the output name.
fn check_graph(
    package: &Package,
    name: &str,
    variant: &Variant,
    session: &Session,
) -> Result<(Vec<String>, String)> {
    let past: Vec<String> = match &variant.prefix_cache {
        Some(spec) => spec
            .names(package.manifest.architecture.layers)
            .into_iter()
            .map(|(input, _)| input)
            .collect(),
        None => Vec::new(),
    };
    let graph_inputs: Vec<String> = session
        .inputs()
        .iter()
        .map(|i| i.name().to_string())
        .filter(|n| !past.contains(n))
        .collect();
    let mut a: Vec<String> = session
        .inputs()
        .iter()
        .map(|i| i.name().to_string())
        .collect();
    let mut b: Vec<String> = variant.inputs.iter().chain(&past).cloned().collect();
    a.sort();
    b.sort();
    if a != b {
        return Err(Error::package(
            &package.dir,
            format!("variant {name}: the graph takes inputs {a:?}, the manifest says {b:?}"),
        ));
    }
    for input in session
        .inputs()
        .iter()
        .filter(|i| !past.iter().any(|p| p == i.name()))
    {
        if let ValueType::Tensor { ty, .. } = input.dtype() {
            if *ty != TensorElementType::Int64 {
                return Err(Error::package(
                    &package.dir,
                    format!(
                        "variant {name}: input {} is {ty:?}, expected int64",
                        input.name()
                    ),
                ));
            }
        }
    }
    if !session.outputs().iter().any(|o| o.name() == variant.output) {
        let have: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        return Err(Error::package(
            &package.dir,
            format!(
                "variant {name}: the graph has no output {:?} (it has {have:?})",
                variant.output
            ),
        ));
    }
    Ok((graph_inputs, variant.output.clone()))
}

/// One run's work for [`crate::stream::run`]: documents, or queries under one prompt (prefix and
/// limits computed once for the whole run).
pub struct EmbedJob<'a> {
    pub embedder: &'a mut Embedder,
    pub prompt: Option<QueryPrompt>,
    /// The leading ids computed once ([`Embedder::cache_prefix`]); `None` runs every row in full.
    pub cached_prefix: Option<Vec<u32>>,
}

impl<'a> EmbedJob<'a> {
    /// A job for documents (`prompt` = `None`) or for queries under `prompt`, with the prefix cache
    /// where it applies.
    pub fn new(embedder: &'a mut Embedder, prompt: Option<QueryPrompt>) -> Result<EmbedJob<'a>> {
        let cached_prefix = match &prompt {
            Some(p) => embedder.cache_prefix(p)?,
            None => None,
        };
        Ok(EmbedJob {
            embedder,
            prompt,
            cached_prefix,
        })
    }
}

impl crate::stream::BatchEmbedder for EmbedJob<'_> {
    fn token_ids(&mut self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        match &self.prompt {
            Some(prompt) => prompt.ids(&self.embedder.encoder.tokenizer, texts),
            None => self
                .embedder
                .encoder
                .documents(texts, self.embedder.max_length),
        }
    }

    fn embed(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        self.embedder
            .embed_batch_after(batch, self.cached_prefix.as_deref())
    }

    fn plan_cost(&self, ids: &[u32]) -> usize {
        plan_cost(ids, self.cached_prefix.as_deref())
    }

    fn pad_id(&self) -> u32 {
        self.embedder.encoder.package.manifest.special_tokens.pad_id
    }

    fn hidden(&self) -> usize {
        self.embedder.hidden
    }
}

/// The prefix-state layout of a variant whose manifest declares one: checks that the graph has
/// every `past.*` input and `present.*` output in the declared dtype, and builds the zero-length
/// states fed to runs without a prefix.
fn past_layout(
    package: &Package,
    name: &str,
    variant: &Variant,
    session: &Session,
) -> Result<Option<PastLayout>> {
    let Some(spec) = &variant.prefix_cache else {
        return Ok(None);
    };
    let arch = &package.manifest.architecture;
    let want = match spec.dtype.as_str() {
        "float32" => TensorElementType::Float32,
        "float16" => TensorElementType::Float16,
        other => {
            return Err(Error::package(
                &package.dir,
                format!("variant {name}: prefix_cache dtype {other:?} is not float32 or float16"),
            ))
        }
    };
    let names = spec.names(arch.layers);
    let bad = |what: String| Error::package(&package.dir, format!("variant {name}: {what}"));
    for (input, output) in &names {
        let i = session
            .inputs()
            .iter()
            .find(|i| i.name() == input)
            .ok_or_else(|| bad(format!("the graph has no prefix-state input {input:?}")))?;
        if !matches!(i.dtype(), ValueType::Tensor { ty, .. } if *ty == want) {
            return Err(bad(format!(
                "prefix-state input {input:?} is not {}",
                spec.dtype
            )));
        }
        if !session.outputs().iter().any(|o| o.name() == output) {
            return Err(bad(format!(
                "the graph has no prefix-state output {output:?}"
            )));
        }
    }
    let shape = [1usize, arch.kv_heads, 0, arch.head_dim];
    let empty = names
        .iter()
        .map(|(input, _)| -> Result<DynValue> {
            let value = match want {
                TensorElementType::Float16 => {
                    Tensor::from_array((shape, Vec::<half::f16>::new())).map(|t| t.into_dyn())
                }
                _ => Tensor::from_array((shape, Vec::<f32>::new())).map(|t| t.into_dyn()),
            };
            value.map_err(Error::runtime(format!("cannot build input {input}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(PastLayout { names, empty }))
}
