//! One variant of a package on one device: the variant chosen, the model's construction (the ONNX
//! Runtime session, checked against the graph contract in `contract.rs`), and the forward pass
//! (`forward.rs`): [`Model::forward`] turns a padded [`crate::Batch`] (optionally continuing a
//! [`Prefix`]) into pooled, normalised rows.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session};
use ort::value::DynValue;

use crate::backend::memory::{self, Available, MemoryLimit};
use crate::backend::runtime::{self, Device, SessionSettings, TensorRtSettings};
use crate::error::{Error, Result};
use crate::package::{Manifest, Package, Stamps, VariantSpec};

mod contract;
mod forward;

use contract::{check_graph, graph_shape, past_layout, start_states};

/// Which graph of a package to run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Variant {
    /// The device's preference among those the package has: fp16 then fp32 on a GPU; on the CPU
    /// a faithful fast int8, else fp32, else int8, among those that fit ([`auto_cpu_variant`]).
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

    /// The variant to run on `device`: this one if the package has it (with a warning when it
    /// will not fit in `fit`'s memory), or for `auto` the device's choice among the variants whose
    /// files are here or can be fetched ([`auto_cpu_variant`] on the CPU; fp16 then fp32 on a GPU,
    /// else the first the package lists).
    pub fn resolve(&self, package: &Package, device: Device, fit: &CpuFit) -> Result<Resolved> {
        if let Some(name) = self.name() {
            let spec = package.spec(name)?;
            let warning = match &fit.memory {
                Some(available) if !device.is_gpu() => {
                    let need = memory::cpu_need(package, spec, fit.batch_tokens);
                    (need.total() > available.bytes).then(|| {
                        format!(
                            "variant {name} needs about {need}, more than the {available} \
                             available; loading it since it was asked for"
                        )
                    })
                }
                _ => None,
            };
            return Ok(Resolved {
                name: name.to_string(),
                reason: None,
                warning,
            });
        }
        if !device.is_gpu() {
            let (name, reason) = auto_cpu_variant(package, fit)?;
            return Ok(Resolved {
                name,
                reason: Some(reason),
                warning: None,
            });
        }
        ["fp16", "fp32"]
            .into_iter()
            .chain(package.variant_names())
            .find(|name| package.variant_available(name))
            .map(|name| Resolved {
                name: name.to_string(),
                reason: None,
                warning: None,
            })
            .ok_or_else(|| absent_files(package))
    }
}

/// The variant [`Variant::resolve`] chose, and what to tell the user about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Resolved {
    pub name: String,
    /// Why `auto` took it (on the CPU).
    pub reason: Option<String>,
    /// An explicitly asked variant that will not fit in the memory available.
    pub warning: Option<String>,
}

/// What `--variant auto` weighs on the CPU besides the manifest: the memory this process may
/// still use (`None`: not checked) and the batch size its activations are sized for.
#[derive(Debug, Clone)]
pub struct CpuFit {
    pub memory: Option<Available>,
    pub batch_tokens: usize,
}

impl CpuFit {
    /// The memory `limit` gives (detected, or the user's) for batches of `batch_tokens` tokens.
    pub fn new(limit: MemoryLimit, batch_tokens: usize) -> CpuFit {
        CpuFit {
            memory: limit.available(),
            batch_tokens,
        }
    }
}

fn absent_files(package: &Package) -> Error {
    let missing: Vec<String> = package
        .manifest
        .variants
        .iter()
        .filter_map(|(name, v)| Some(format!("{name} ({})", package.missing_file(v)?)))
        .collect();
    Error::package(
        &package.dir,
        format!(
            "holds the files of none of its variants: missing {}",
            missing.join(", ")
        ),
    )
}

/// What `--variant auto` takes on the CPU, and why, in words. Candidates in order: the variant
/// [`cpu_preference`] names by what the package records about its int8 variant (a faithful int8
/// with a fast kernel, else fp32), then fp32, then int8, then the others the package lists. A
/// candidate is passed over when its files are absent from a package directory (a hub package
/// fetches what is chosen), or when `fit` knows the memory available and the candidate needs more
/// ([`memory::cpu_need`]). When every candidate is passed over for memory: an error naming each
/// one's need and the limit.
pub fn auto_cpu_variant(package: &Package, fit: &CpuFit) -> Result<(String, String)> {
    let variants = &package.manifest.variants;
    let (preferred, why) = cpu_preference(&package.manifest);
    let mut order: Vec<&str> = Vec::new();
    for name in preferred
        .as_deref()
        .into_iter()
        .chain(["fp32", "int8"])
        .chain(variants.keys().map(String::as_str))
    {
        if variants.contains_key(name) && !order.contains(&name) {
            order.push(name);
        }
    }
    let mut passed = Vec::new();
    let mut too_big = Vec::new();
    for name in order {
        let spec = &variants[name];
        if !package.variant_available(name) {
            let file = package.missing_file(spec).unwrap_or_default();
            passed.push(format!("{name}: {file} is not in the package directory"));
            continue;
        }
        let need = memory::cpu_need(package, spec, fit.batch_tokens);
        match &fit.memory {
            Some(available) if need.total() > available.bytes => {
                passed.push(format!("{name} needs about {}", memory::size(need.total())));
                too_big.push(format!("{name} needs about {need}"));
            }
            _ => {
                let mut reason = match preferred.as_deref() {
                    Some(p) if p != name => format!("{name} in place of {p} ({why})"),
                    _ => why,
                };
                if !passed.is_empty() {
                    reason.push_str(&format!("; passed over: {}", passed.join("; ")));
                }
                if let Some(available) = &fit.memory {
                    reason.push_str(&format!(
                        "; {name} needs about {}, {available} available",
                        memory::size(need.total())
                    ));
                }
                return Ok((name.to_string(), reason));
            }
        }
    }
    match (&fit.memory, too_big.is_empty()) {
        (Some(available), false) => Err(Error::Memory {
            reason: format!(
                "no variant of {} fits on the CPU in the {available} available: {}{}; \
                 pass --memory-limit with more (or none) or --variant to load one anyway",
                package.dir.display(),
                too_big.join("; "),
                if passed.len() > too_big.len() {
                    format!(" (also passed over: {})", passed.join("; "))
                } else {
                    String::new()
                }
            ),
        }),
        _ => Err(absent_files(package)),
    }
}

/// What `--variant auto` prefers on the CPU, by what the package records about its int8 variant
/// (kernel class and fidelity; FORMAT.md), and why, in words, before memory and absent files are
/// weighed ([`auto_cpu_variant`]). `None` when the package has neither int8 nor fp32.
pub fn cpu_preference(manifest: &Manifest) -> (Option<String>, String) {
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
        // ONNX Runtime's MatMulNBits int8 kernel, from the CLI on slice7b's documents
        // (BENCHMARKS.md "Block-wise int8 on a quiet machine"): with VNNI blocks of 128 1.32x
        // fp32 and blocks of 32 (llama.cpp q8_0's layout) 0.85x; without VNNI (CPUID masked to
        // AVX2) 0.65x and 0.61x. So fp32 where it fits, but for blocks of 128 with VNNI.
        Some("matmulnbits-int8") => {
            let vnni = runtime::cpu_has_vnni();
            let small = int8.block_size().is_some_and(|b| b <= 32);
            let speed = match (vnni, small) {
                (true, false) => {
                    "blocks of 128 measured 1.32x fp32 on bge-en-icl's documents and 2.1x on a \
                     short text with AVX-512 VNNI"
                }
                (true, true) => {
                    "blocks of 32 measured 0.85x fp32 on bge-en-icl's documents (1.7x on a short \
                     text) with AVX-512 VNNI"
                }
                (false, _) => {
                    "without VNNI it measured 0.6x fp32 on bge-en-icl's documents with CPUID \
                     masked to AVX2"
                }
            };
            if has_fp32 && (small || !vnni) {
                (
                    Some("fp32".into()),
                    format!(
                        "fp32: the int8 variant ({summary}) is block-wise int8 x int8 and this CPU \
                         is {cpu}: {speed} (pass --variant int8 for less memory: a third at \
                         bge-en-icl's full size)"
                    ),
                )
            } else {
                (
                    Some("int8".into()),
                    format!(
                        "{summary}; this CPU is {cpu} (block-wise int8 x int8, MatMulNBits with \
                         int8 compute: {speed})"
                    ),
                )
            }
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
    /// The memory `auto` plans for on the CPU: detected by default ([`MemoryLimit`]).
    pub memory_limit: MemoryLimit,
    /// Hand the free memory of ONNX Runtime's CPU arena back to the system after every run on
    /// the CPU (on by default): without it the arena keeps one large batch's peak for the life of
    /// the process (issue 24).
    pub shrink_arena: bool,
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
            memory_limit: MemoryLimit::Detect,
            shrink_arena: true,
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
    /// Sets the memory `auto` plans for on the CPU.
    memory_limit: MemoryLimit,
    /// Turns returning the CPU arena's free memory after each run on or off.
    shrink_arena: bool,
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

/// Run options; with `shrink_arena`, ONNX Runtime frees the CPU arena's unused regions when each
/// run ends. Without it, the arena grows to the largest run's peak and keeps it: the server on the
/// tiny stand-in stayed at 2.1 GB after one 6.7k-token few-shot prompt, from 95 MB before
/// (tests/server.rs, BENCHMARKS.md "Long inputs (issue 24)"). Only the CPU's: a GPU session's CPU
/// allocator may not be an arena, and ONNX Runtime refuses the run when the named arena is absent.
fn run_options(shrink_arena: bool) -> Result<RunOptions> {
    let mut options = RunOptions::new().map_err(Error::runtime("cannot create run options"))?;
    if shrink_arena {
        options
            .set("memory.enable_memory_arena_shrinkage", "cpu:0")
            .map_err(Error::runtime(
                "cannot set memory.enable_memory_arena_shrinkage",
            ))?;
    }
    Ok(options)
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
    /// Fetches every output (a prefix's states).
    all_outputs: RunOptions,
    /// Whether runs shrink the CPU arena ([`run_options`]).
    shrink_arena: bool,
    hidden: usize,
    normalize: bool,
    sliding_window: Option<usize>,
    past: Option<PastLayout>,
    /// States of the ids every input begins with, computed in fp32 by the exporter
    /// (`start_states`): rows that begin with them run on top of them.
    start: Option<Prefix>,
    notes: Vec<String>,
    variant_reason: Option<String>,
    warning: Option<String>,
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
        // Read once, after ONNX Runtime's library is loaded, so its own mappings count as used.
        let fit = CpuFit::new(options.memory_limit, options.batch_tokens);
        for device in candidates {
            runtime::require_provider(device)?;
            let resolved = options.variant.resolve(package, device, &fit)?;
            let name = resolved.name;
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
                    let shrink = options.shrink_arena && !device.is_gpu();
                    let mut model =
                        Model::checked(package, &name, spec, session, device, shrink, notes)?;
                    model.variant_reason = resolved.reason;
                    model.warning = resolved.warning;
                    return Ok(model);
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
        shrink_arena: bool,
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
        let all_outputs = run_options(shrink_arena)?;
        let pooled_only = run_options(shrink_arena)?
            .with_outputs(OutputSelector::no_default().with(output.as_str()));
        Ok(Model {
            session,
            variant: name.to_string(),
            device,
            dir: package.dir.clone(),
            inputs,
            output,
            pooled_only,
            all_outputs,
            shrink_arena,
            hidden: m.architecture.hidden,
            normalize: m.normalize,
            sliding_window: m.architecture.sliding_window,
            past,
            start,
            notes,
            variant_reason: None,
            warning: None,
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

    /// Why `--variant auto` took this variant on the CPU ([`auto_cpu_variant`]).
    pub fn variant_reason(&self) -> Option<&str> {
        self.variant_reason.as_deref()
    }

    /// A variant asked for by name that needs more memory than is available.
    pub fn memory_warning(&self) -> Option<&str> {
        self.warning.as_deref()
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

#[cfg(test)]
mod auto_tests {
    //! `--variant auto` on the CPU against memory and absent files (issue 26): packages with
    //! variant files of chosen sizes (sparse), the choice under a given amount of memory.

    use super::*;
    use serde_json::json;

    const MIB: u64 = 1 << 20;

    /// A variant: name, dtype, the int8 `quantization` (null for fp32/fp16), its data file's
    /// size in MiB, and whether its files are in the directory.
    struct V(&'static str, &'static str, serde_json::Value, u64, bool);

    fn int8(kernel: &str, faithful: bool) -> serde_json::Value {
        json!({"recipe": "r", "method": "w8a8", "kernel": kernel,
               "selection": {"faithful": faithful, "tried": []}})
    }

    fn blocks(size: u64) -> serde_json::Value {
        json!({"recipe": format!("nbits8-acc4-b{size}"), "method": "matmulnbits",
               "kernel": "matmulnbits-int8", "block_size": size, "accuracy_level": 4,
               "selection": {"faithful": true, "tried": []}})
    }

    fn package(dir: &std::path::Path, variants: &[V]) -> Package {
        let tokenizer = b"{}";
        std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
        let mut specs = serde_json::Map::new();
        for V(name, dtype, q, mib, present) in variants {
            let (file, data) = (
                format!("{name}/model.onnx"),
                format!("{name}/model.onnx.data"),
            );
            if *present {
                std::fs::create_dir_all(dir.join(name)).unwrap();
                std::fs::write(dir.join(&file), b"graph").unwrap();
                let f = std::fs::File::create(dir.join(&data)).unwrap();
                f.set_len(mib * MIB).unwrap();
            }
            specs.insert(
                name.to_string(),
                json!({"file": file, "data": data, "dtype": dtype,
                       "inputs": ["input_ids", "attention_mask"], "output": "h",
                       "sha256": {}, "quantization": q}),
            );
        }
        let manifest = json!({
            "format": "icl-embed/1",
            "architecture": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
                             "vocab": 1000, "intermediate": 128},
            "pooling": "last_token", "normalize": true,
            "prompt": {"query": "{task}{query}", "example": "{instruct}{query}{response}",
                       "example_separator": "\n", "suffix": ""},
            "special_tokens": {"prepend": [], "append": [], "pad_id": 0},
            "max_length": {"query": 512, "document": 512},
            "clean_up_tokenization_spaces": false,
            "tokenizer": {"file": "tokenizer.json",
                          "sha256": crate::package::sha256_file(&dir.join("tokenizer.json")).unwrap()},
            "variants": specs,
        });
        std::fs::write(dir.join("embedder.json"), manifest.to_string()).unwrap();
        Package::open(dir).unwrap()
    }

    fn fit(mib: Option<u64>) -> CpuFit {
        CpuFit {
            memory: mib.map(|m| Available {
                bytes: m * MIB,
                source: "a test".into(),
            }),
            batch_tokens: 512,
        }
    }

    /// The runtime's share in these packages (256 MiB and 9.5 MiB of activations): a variant of
    /// N MiB of files fits in N + 266 MiB, not in N + 265.
    const R: u64 = 266;

    /// What, the variants, memory in MiB (`None`: not checked), the choice or an error's words.
    type Case = (
        &'static str,
        Vec<V>,
        Option<u64>,
        Result<&'static str, &'static [&'static str]>,
    );

    #[test]
    fn auto_takes_the_best_variant_that_fits() {
        let fp32 = || V("fp32", "float32", json!(null), 4000, true);
        let fp16 = || V("fp16", "float16", json!(null), 2000, true);
        let fast = || V("int8", "int8", int8("u8s8", true), 1000, true);
        let fast7 = || V("int8", "int8", int8("u8s7", true), 1000, true);
        let blockwise = || V("int8", "int8", blocks(128), 1100, true);
        let blocks32 = || V("int8", "int8", blocks(32), 1100, true);
        let weight_only = || V("int8", "int8", int8("matmulnbits-fp32", true), 1000, true);
        let unfaithful = || V("int8", "int8", int8("u8s8", false), 1000, true);
        let blockwise_choice = if runtime::cpu_has_vnni() {
            "int8"
        } else {
            "fp32"
        };
        let cases: Vec<Case> = vec![
            (
                "fast int8, unlimited",
                vec![fp32(), fast()],
                None,
                Ok("int8"),
            ),
            (
                "fast int8 fits",
                vec![fp32(), fast()],
                Some(1000 + R),
                Ok("int8"),
            ),
            (
                "fast int8 just does not fit",
                vec![fp32(), fast()],
                Some(1000 + R - 1),
                Err(&["int8 needs about 1.2 GiB (1000.0 MiB of weights + 265.5 MiB runtime"]),
            ),
            (
                "7-bit int8 fits",
                vec![fp32(), fast7()],
                Some(8000),
                Ok("int8"),
            ),
            (
                "block-wise int8 is fast with VNNI; without, fp32 when it fits",
                vec![fp32(), blockwise()],
                Some(8000),
                Ok(blockwise_choice),
            ),
            (
                "block-wise int8 when fp32 does not fit, with or without VNNI",
                vec![fp32(), blockwise()],
                Some(4000),
                Ok("int8"),
            ),
            (
                "block-wise int8 in blocks of 32 is slower than fp32 with or without VNNI",
                vec![fp32(), blocks32()],
                Some(8000),
                Ok("fp32"),
            ),
            (
                "blocks of 32 when fp32 does not fit",
                vec![fp32(), blocks32()],
                Some(4000),
                Ok("int8"),
            ),
            (
                "weight-only: fp32 when it fits",
                vec![fp32(), weight_only()],
                Some(4000 + R),
                Ok("fp32"),
            ),
            (
                "weight-only: int8 when fp32 does not fit",
                vec![fp32(), weight_only()],
                Some(4000),
                Ok("int8"),
            ),
            (
                "unfaithful: fp32 when it fits",
                vec![fp32(), unfaithful()],
                None,
                Ok("fp32"),
            ),
            (
                "unfaithful: int8 when fp32 does not fit",
                vec![fp32(), unfaithful()],
                Some(2000),
                Ok("int8"),
            ),
            (
                "fp16 counts twice on the CPU: nothing fits",
                vec![fp16()],
                Some(3000),
                Err(&[
                    "fp16 needs about 4.2 GiB (3.9 GiB of weights",
                    "2.9 GiB (a test)",
                ]),
            ),
            (
                "fp16 alone, when it fits",
                vec![fp16()],
                Some(4000 + R),
                Ok("fp16"),
            ),
            (
                "nothing fits: every need and the limit",
                vec![fp32(), fp16(), fast()],
                Some(1000),
                Err(&[
                    "no variant of",
                    "int8 needs about 1.2 GiB",
                    "fp32 needs about 4.2 GiB",
                    "fp16 needs about",
                    "in the 1000.0 MiB (a test) available",
                    "--memory-limit",
                ]),
            ),
            // Issue 26: a directory holding only int8's files, fp32 listed in the manifest.
            (
                "local fp32 absent",
                vec![
                    V("fp32", "float32", json!(null), 4000, false),
                    weight_only(),
                ],
                None,
                Ok("int8"),
            ),
            (
                "local int8 absent",
                vec![fp32(), V("int8", "int8", int8("u8s8", true), 1000, false)],
                None,
                Ok("fp32"),
            ),
            (
                "nothing present",
                vec![V("fp32", "float32", json!(null), 4000, false)],
                None,
                Err(&[
                    "holds the files of none of its variants",
                    "fp32 (fp32/model.onnx)",
                ]),
            ),
        ];
        for (what, variants, memory, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let p = package(dir.path(), &variants);
            match (auto_cpu_variant(&p, &fit(memory)), want) {
                (Ok((name, why)), Ok(want)) => {
                    assert_eq!(name, want, "{what}: {why}");
                    if memory.is_some() {
                        assert!(why.contains("available"), "{what}: {why}");
                    }
                }
                (Err(e), Err(words)) => {
                    let e = e.to_string();
                    for w in words {
                        assert!(e.contains(w), "{what}: {w:?} not in {e}");
                    }
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn reasons_say_what_was_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = package(
            dir.path(),
            &[
                V("fp32", "float32", json!(null), 4000, false),
                V("int8", "int8", int8("matmulnbits-fp32", true), 1000, true),
            ],
        );
        let (name, why) = auto_cpu_variant(&p, &fit(Some(2000))).unwrap();
        assert_eq!(name, "int8");
        assert!(
            why.starts_with("int8 in place of fp32 (fp32: the int8 variant"),
            "{why}"
        );
        assert!(
            why.contains("passed over: fp32: fp32/model.onnx is not in the package directory"),
            "{why}"
        );
        assert!(
            why.contains("needs about 1.2 GiB, 2.0 GiB (a test) available"),
            "{why}"
        );
        // A hub snapshot fetches what is chosen: the absent fp32 is a candidate, its need estimated.
        let mut hub = p.clone();
        hub.from_hub = true;
        let (name, _) = auto_cpu_variant(&hub, &fit(None)).unwrap();
        assert_eq!(name, "fp32");
        let need = memory::cpu_need(&hub, &hub.manifest.variants["fp32"], 512);
        assert!(!need.measured);
        // 2 layers x (64 x 64 x 2 + 64 x 32 x 2 + 3 x 64 x 128) + 1000 x 64 parameters, 4 bytes each.
        assert_eq!(need.weights, (2 * (8192 + 4096 + 24576) + 64000) * 4);
    }

    #[test]
    fn an_explicit_variant_is_honoured_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = package(
            dir.path(),
            &[
                V("fp32", "float32", json!(null), 4000, true),
                V("int8", "int8", int8("u8s8", true), 1000, true),
            ],
        );
        let r = Variant::Fp32
            .resolve(&p, Device::Cpu, &fit(Some(2000)))
            .unwrap();
        assert_eq!(r.name, "fp32");
        let w = r.warning.expect("a warning");
        assert!(
            w.contains("needs about 4.2 GiB") && w.contains("2.0 GiB (a test)"),
            "{w}"
        );
        let r = Variant::Fp32
            .resolve(&p, Device::Cpu, &fit(Some(8000)))
            .unwrap();
        assert_eq!(r.warning, None);
        let r = Variant::Auto
            .resolve(&p, Device::Cpu, &fit(Some(8000)))
            .unwrap();
        assert_eq!(r.name, "int8");
        assert!(r.reason.is_some());
    }
}
