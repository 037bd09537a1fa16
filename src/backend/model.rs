//! One variant of a package on one device: the ONNX Runtime session, the graph contract it was
//! checked against (inputs, output, prefix states), and [`Model::forward`], which turns a padded
//! [`Batch`] (optionally continuing a [`Prefix`]) into pooled, normalised rows.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use ndarray::Array2;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use crate::backend::pooling;
use crate::backend::runtime::{self, Device, GraphShape, SessionSettings, TensorRtSettings};
use crate::engine::batch::{self, Batch};
use crate::error::{Error, Result};
use crate::package::{Manifest, Package, Stamps, StartStatesSpec, VariantSpec};

/// Which graph of a package to run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Variant {
    /// The device's preference among those the package has: fp16 then fp32 on a GPU, int8 then
    /// fp32 on the CPU.
    #[default]
    Auto,
    Fp32,
    Fp16,
    Int8,
    /// Any other variant a package names (for example `w8a8`).
    Other(String),
}

impl Variant {
    /// The manifest's name of this variant (`None` for `auto`).
    pub fn name(&self) -> Option<&str> {
        match self {
            Variant::Auto => None,
            Variant::Fp32 => Some("fp32"),
            Variant::Fp16 => Some("fp16"),
            Variant::Int8 => Some("int8"),
            Variant::Other(s) => Some(s),
        }
    }

    /// The variant a package's variant name stands for.
    pub fn from_name(name: &str) -> Variant {
        name.parse().unwrap_or_else(|_| Variant::Other(name.into()))
    }

    /// The name of the variant to run on `device`: this one if the package has it, or for `auto`
    /// the device's preference (the first variant the package lists when it has none of them).
    pub fn resolve(&self, package: &Package, device: Device) -> Result<String> {
        if let Some(name) = self.name() {
            package.spec(name)?;
            return Ok(name.to_string());
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
        Some(class @ ("u8s8" | "u8s7")) => {
            let kernel = if runtime::cpu_has_vnni() {
                "VNNI u8 x s8 GEMM: about 3x fp32 on bge-en-icl's layer shapes, measured with AVX-512 VNNI"
            } else if runtime::cpu_int8_needs_u8u8() && class == "u8s7" {
                "no VNNI; 7-bit weights keep the u8 x s8 GEMM exact: about 1.8x fp32 measured with CPUID masked to AVX2"
            } else if runtime::cpu_int8_needs_u8u8() {
                "no VNNI: exact u8 x u8 GEMM via session.x64quantprecision, about 1.35x fp32 measured with CPUID masked to AVX2"
            } else {
                "ONNX Runtime's int8 GEMM for this CPU, speed not measured by this project"
            };
            (
                Some("int8".into()),
                format!("{summary}; this CPU is {cpu} ({kernel})"),
            )
        }
        _ => (Some("int8".into()), summary),
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name().unwrap_or("auto"))
    }
}

impl FromStr for Variant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Variant> {
        Ok(match s {
            "auto" => Variant::Auto,
            "fp32" => Variant::Fp32,
            "fp16" => Variant::Fp16,
            "int8" => Variant::Int8,
            other
                if !other.is_empty()
                    && other
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                Variant::Other(other.into())
            }
            other => {
                return Err(Error::input(
                    "--variant",
                    format!("{other:?} is not a variant name (fp32, fp16, int8, auto, ...)"),
                ))
            }
        })
    }
}

/// How to load a [`Model`]: [`ModelOptions::default`] with the setters
/// (`ModelOptions::default().variant(Variant::Fp32).threads(Some(2))`) or fields assigned.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ModelOptions {
    pub variant: Variant,
    pub device: Device,
    /// Intra-op threads; ONNX Runtime's default (one per core) when `None`.
    pub threads: Option<usize>,
    /// ONNX Runtime library to load instead of searching.
    pub ort_lib: Option<PathBuf>,
    /// Where TensorRT keeps engines and the package checks keep their stamps; see
    /// [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Largest batch (rows, and rows x padded length) the TensorRT profile must cover.
    pub max_rows: usize,
    pub batch_tokens: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            variant: Variant::Auto,
            device: Device::Cpu,
            threads: None,
            ort_lib: None,
            cache_dir: None,
            max_rows: 64,
            batch_tokens: 4096,
        }
    }
}

setters!(ModelOptions {
    /// Sets the variant.
    variant: Variant,
    /// Sets the device.
    device: Device,
    /// Sets the intra-op threads.
    threads: Option<usize>,
    /// Sets the ONNX Runtime library.
    ort_lib: Option<PathBuf>,
    /// Sets the cache directory.
    cache_dir: Option<PathBuf>,
    /// Sets the most rows the TensorRT profile covers.
    max_rows: usize,
    /// Sets the most tokens (rows x padded length) the TensorRT profile covers.
    batch_tokens: usize,
});

/// `$XDG_CACHE_HOME/icl-embed`, else `~/.cache/icl-embed`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("icl-embed")
}

/// The key/value states of a prefix, computed once by [`Model::prefix`] and fed to every batch of
/// rows that continue it. Independent of the rows: one `Prefix` serves any number of batches.
pub struct Prefix {
    ids: Vec<u32>,
    states: Vec<DynValue>,
    bytes: usize,
}

impl Prefix {
    /// The prefix's token ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Bytes held by its key/value states (layers x 2 x kv_heads x tokens x head_dim x dtype).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prefix")
            .field("tokens", &self.ids.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Prefix-state names of a graph, and the empty states fed when there is no prefix.
struct PastLayout {
    /// (`past.*` input, `present.*` output) per layer, key then value.
    names: Vec<(String, String)>,
    empty: Vec<DynValue>,
}

/// One variant of a package, running on one device.
pub struct Model {
    session: Session,
    variant: String,
    device: Device,
    dir: PathBuf,
    /// Token inputs in graph order, and the output.
    inputs: Vec<String>,
    output: String,
    /// Fetches only `output`: the `present.*` states a batch also produces are not kept to the end
    /// of the run, nor copied back from a GPU (10 GB per 78k tokens at bge-en-icl's 32 layers).
    pooled_only: RunOptions<HasSelectedOutputs>,
    hidden: usize,
    normalize: bool,
    sliding_window: Option<usize>,
    past: Option<PastLayout>,
    /// States of the ids every input begins with, computed in fp32 by the exporter
    /// (`start_states`): rows that begin with them run on top of them.
    start: Option<Prefix>,
    notes: Vec<String>,
}

impl Model {
    /// Loads a variant of `package`. The device is decided first ([`Device::candidates`]), then
    /// the variant for it; only that variant's files are checked and opened. `auto` falls back to
    /// the next device when a GPU session cannot start, and says why in [`Model::notes`].
    /// `fetch` makes a variant's files present (the hub client for a hub package; nothing for a
    /// directory) and is called only for a variant that is about to be opened.
    pub fn load(
        package: &Package,
        options: &ModelOptions,
        fetch: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Model> {
        runtime::environment(options.ort_lib.as_deref())?;
        let cache_dir = options.cache_dir.clone().unwrap_or_else(default_cache_dir);
        let stamps = Stamps::new(&cache_dir);
        let mut notes = Vec::new();
        let candidates = options.device.candidates()?;
        let auto = options.device == Device::Auto;
        if auto {
            if !runtime::cuda_driver_present() {
                notes.push("cuda:0: no NVIDIA driver".to_string());
            } else if !runtime::provider_compiled_in(Device::Cuda(0))? {
                notes.push("cuda:0: not in this ONNX Runtime library".to_string());
            }
        }
        for device in candidates {
            runtime::require_provider(device)?;
            let name = options.variant.resolve(package, device)?;
            fetch(&name)?;
            let spec = package.check_variant(&name, &stamps)?;
            let shape = graph_shape(package, spec);
            let settings = SessionSettings {
                threads: options.threads,
                tensorrt: TensorRtSettings {
                    max_batch: options.max_rows.max(1),
                    opt_batch: options.max_rows.clamp(1, 16),
                    max_seq: options.batch_tokens.clamp(512, 4096),
                    opt_seq: 512,
                    cache_dir: cache_dir.join("tensorrt"),
                },
            };
            match runtime::session(&package.path(&spec.file), &shape, device, &settings) {
                Ok(session) => {
                    return Model::checked(package, &name, spec, session, device, notes);
                }
                Err(e) if auto && device != Device::Cpu => notes.push(format!("{device}: {e}")),
                Err(e) => return Err(e),
            }
        }
        Err(Error::Provider {
            provider: "auto".into(),
            reason: notes.join("; "),
            source: None,
        })
    }

    fn checked(
        package: &Package,
        name: &str,
        spec: &VariantSpec,
        session: Session,
        device: Device,
        notes: Vec<String>,
    ) -> Result<Model> {
        let (inputs, output) = check_graph(package, name, spec, &session)?;
        let past = past_layout(package, name, spec, &session)?;
        let start = match (&spec.start_states, &past) {
            (None, _) => None,
            (Some(start), Some(layout)) => Some(start_states(package, name, start, layout)?),
            (Some(_), None) => {
                return Err(Error::graph(
                    name,
                    "the manifest gives start states, but the graph takes no prefix states",
                ))
            }
        };
        let m = &package.manifest;
        let pooled_only = RunOptions::new()
            .map_err(Error::runtime("cannot create run options"))?
            .with_outputs(OutputSelector::no_default().with(output.as_str()));
        Ok(Model {
            session,
            variant: name.to_string(),
            device,
            dir: package.dir.clone(),
            inputs,
            output,
            pooled_only,
            hidden: m.architecture.hidden,
            normalize: m.normalize,
            sliding_window: m.architecture.sliding_window,
            past,
            start,
            notes,
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

    /// Width of the embeddings.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Why `auto` passed over the devices it did not choose.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Whether the graph takes prefix states ([`Model::prefix`]).
    pub fn supports_prefix(&self) -> bool {
        self.past.is_some()
    }

    /// The longest row (prefix included) the model embeds as the reference does: its attention
    /// window, if it has one.
    pub fn max_tokens(&self) -> Option<usize> {
        self.sliding_window
    }

    /// Computes the key/value states of `ids` as a prefix for later batches.
    pub fn prefix(&mut self, ids: &[u32]) -> Result<Prefix> {
        let layout = self.past.as_ref().ok_or_else(|| {
            Error::input(
                "prefix cache",
                format!(
                    "the {} variant's graph takes no prefix states",
                    self.variant
                ),
            )
        })?;
        self.check_tokens(ids.len(), "the few-shot prefix")?;
        let single = batch::pad(&[ids.to_vec()], &[0], 0);
        let (single, states) = match &self.start {
            Some(start) if single.begins_with(&start.ids) => {
                (single.without_first(start.ids.len()), &start.states[..])
            }
            _ => (single, &layout.empty[..]),
        };
        let feed = feed_inputs(&self.inputs, &single, &layout.names, states)?;
        let mut outputs = self.session.run(feed).map_err(Error::runtime(format!(
            "inference failed on the {}-token prefix",
            ids.len()
        )))?;
        let mut states = Vec::with_capacity(layout.names.len());
        let mut bytes = 0;
        for (_, present) in &layout.names {
            let value = outputs
                .remove(present.as_str())
                .ok_or_else(|| Error::graph(&self.variant, format!("no output {present:?}")))?;
            bytes += value_bytes(&value);
            states.push(value);
        }
        Ok(Prefix {
            ids: ids.to_vec(),
            states,
            bytes,
        })
    }

    /// Pooled (last token), normalised (when the package says so) rows of one padded batch, one
    /// row of the result per row of the batch. With `prefix`, every row continues it: the batch
    /// holds the rows' ids after the prefix, positions continuing from its length
    /// ([`Batch::without_first`], [`Batch::offset_positions`]).
    pub fn forward(&mut self, batch: &Batch, prefix: Option<&Prefix>) -> Result<Array2<f32>> {
        let shifted;
        let (batch, prefix) = match (prefix, &self.start) {
            (None, Some(start)) if batch.begins_with(&start.ids) => {
                shifted = batch.without_first(start.ids.len());
                (&shifted, Some(start))
            }
            _ => (batch, prefix),
        };
        self.check_rows(batch, prefix)?;
        let (names, states) = past_inputs(self.past.as_ref(), prefix, &self.variant)?;
        let (rows, seq) = (batch.rows.len(), batch.seq);
        let feed = feed_inputs(&self.inputs, batch, names, states)?;
        let outputs = self
            .session
            .run_with_options(feed, &self.pooled_only)
            .map_err(Error::runtime(format!(
                "inference failed on a batch of {rows} x {seq}"
            )))?;
        let value = &outputs[self.output.as_str()];
        let mut pooled = pool(value, batch, self.hidden, &self.variant)?;
        if pooled.iter().any(|x| !x.is_finite()) {
            return Err(Error::graph(
                &self.variant,
                "non-finite values in the embeddings",
            ));
        }
        if self.normalize {
            pooling::normalize_rows(&mut pooled);
        }
        Ok(pooled)
    }

    /// Refuses a batch with a row that has no tokens to pool, or one longer (with the prefix's
    /// `before` tokens) than the attention window.
    fn check_rows(&self, batch: &Batch, prefix: Option<&Prefix>) -> Result<()> {
        let before = prefix.map_or(0, |p| p.ids.len());
        for (i, &len) in batch.lengths.iter().enumerate() {
            if len == 0 {
                return Err(Error::input(
                    format!("row {i} of the batch"),
                    "has no tokens to pool (an empty text in a package whose tokenizer adds no special tokens)",
                ));
            }
            self.check_tokens(before + len, &format!("row {i} of the batch"))?;
        }
        Ok(())
    }

    /// An input error naming `what` when a row of `tokens` tokens (prefix included) is longer
    /// than the model's attention window ([`Model::max_tokens`]).
    pub fn check_tokens(&self, tokens: usize, what: &str) -> Result<()> {
        match self.sliding_window {
            Some(w) if tokens > w => Err(Error::input(
                what,
                format!(
                    "is {tokens} tokens, longer than the model's {w}-token attention window \
                     (architecture.sliding_window in {}): the exported graphs attend to every \
                     earlier token, so it would not be embedded as the reference embeds it; \
                     shorten it or lower --max-length",
                    self.dir.join(crate::package::MANIFEST_FILE).display()
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Runs the start-state graph of `spec` (no inputs) once: its outputs, in the order of the model's
/// `past.*` inputs, as the prefix of the ids every input begins with.
fn start_states(
    package: &Package,
    variant: &str,
    spec: &StartStatesSpec,
    layout: &PastLayout,
) -> Result<Prefix> {
    let path = package.path(&spec.file);
    let context = format!("cannot read the start states {}", path.display());
    let env = runtime::environment(None)?;
    let mut session = Session::builder(env)
        .map_err(Error::runtime(context.clone()))?
        .commit_from_file(&path)
        .map_err(Error::runtime(context.clone()))?;
    let mut outputs = session
        .run(Vec::<(Cow<'static, str>, SessionInputValue<'_>)>::new())
        .map_err(Error::runtime(context))?;
    let mut states = Vec::with_capacity(layout.names.len());
    let mut bytes = 0;
    for (past, _) in &layout.names {
        let value = outputs.remove(past.as_str()).ok_or_else(|| {
            Error::graph(variant, format!("{} has no output {past:?}", spec.file))
        })?;
        bytes += value_bytes(&value);
        states.push(value);
    }
    Ok(Prefix {
        ids: spec.ids.clone(),
        states,
        bytes,
    })
}

/// `past.*` input names (with their `present.*` outputs) and the states fed to them.
type PastInputs<'a> = (&'a [(String, String)], &'a [DynValue]);

/// The `past.*` input names and the states fed to them: the prefix's, the empty states when there
/// is none, nothing for a graph without prefix states.
fn past_inputs<'a>(
    past: Option<&'a PastLayout>,
    prefix: Option<&'a Prefix>,
    variant: &str,
) -> Result<PastInputs<'a>> {
    match (past, prefix) {
        (Some(layout), Some(p)) => Ok((&layout.names, &p.states)),
        (Some(layout), None) => Ok((&layout.names, &layout.empty)),
        (None, Some(_)) => Err(Error::input(
            "prefix cache",
            format!("the {variant} variant's graph takes no prefix states"),
        )),
        (None, None) => Ok((&[], &[])),
    }
}

/// The last real token's hidden state of each row of the graph's output `value`, checked against
/// the contract (`[rows, seq, hidden]`, fp32 or fp16).
fn pool(value: &DynValue, batch: &Batch, hidden: usize, variant: &str) -> Result<Array2<f32>> {
    let expect = [batch.rows.len() as i64, batch.seq as i64, hidden as i64];
    let check = |got: &[i64]| match got == expect {
        true => Ok(()),
        false => Err(Error::graph(
            variant,
            format!("output shape {got:?}, expected {expect:?}"),
        )),
    };
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float32) => {
            let (s, data) = value
                .try_extract_tensor::<f32>()
                .map_err(Error::runtime("cannot read the output"))?;
            check(&s[..])?;
            Ok(pooling::last_token(data, batch.seq, hidden, &batch.lengths))
        }
        Some(TensorElementType::Float16) => {
            let (s, data) = value
                .try_extract_tensor::<half::f16>()
                .map_err(Error::runtime("cannot read the output"))?;
            check(&s[..])?;
            Ok(pooling::last_token(data, batch.seq, hidden, &batch.lengths))
        }
        other => Err(Error::graph(
            variant,
            format!("unsupported output element type {other:?}"),
        )),
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

fn graph_shape(package: &Package, spec: &VariantSpec) -> GraphShape {
    let a = &package.manifest.architecture;
    GraphShape {
        inputs: spec.inputs.clone(),
        past: spec
            .prefix_cache
            .as_ref()
            .map(|p| p.names(a.layers).into_iter().map(|(i, _)| i).collect())
            .unwrap_or_default(),
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        fp16: spec.dtype == "float16",
    }
}

/// Checks the session's inputs and outputs against the manifest; returns the token input names in
/// graph order and the output name.
fn check_graph(
    package: &Package,
    name: &str,
    variant: &VariantSpec,
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

/// The prefix-state layout of a variant whose manifest declares one: checks that the graph has
/// every `past.*` input and `present.*` output in the declared dtype, and builds the zero-length
/// states fed to runs without a prefix.
fn past_layout(
    package: &Package,
    name: &str,
    variant: &VariantSpec,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_round_trip() {
        for name in ["auto", "fp32", "fp16", "int8", "w8a8"] {
            assert_eq!(name.parse::<Variant>().unwrap().to_string(), name);
        }
        assert_eq!(
            "w8a8".parse::<Variant>().unwrap(),
            Variant::Other("w8a8".into())
        );
        for bad in ["", "fp32/../x", "a b"] {
            let err = bad.parse::<Variant>().unwrap_err().to_string();
            assert!(err.contains("--variant"), "{bad}: {err}");
        }
    }
}
