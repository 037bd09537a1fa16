//! ONNX Runtime: finding the shared library (`load-dynamic`), choosing an execution provider and
//! building the session. An explicitly requested provider that cannot start is an error; only
//! `auto` falls back, and it says what it chose.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

use crate::error::{Error, Result};

/// Where to run: `cpu`, `cuda[:N]`, `tensorrt[:N]` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Device {
    Cpu,
    Cuda(i32),
    TensorRt(i32),
    Auto,
}

impl Device {
    /// Whether this device runs on a GPU (and so prefers the fp16 variant).
    pub fn is_gpu(self) -> bool {
        matches!(self, Device::Cuda(_) | Device::TensorRt(_))
    }

    /// The ONNX Runtime provider name.
    pub fn provider_name(self) -> &'static str {
        match self {
            Device::Cpu => "CPUExecutionProvider",
            Device::Cuda(_) => "CUDAExecutionProvider",
            Device::TensorRt(_) => "TensorrtExecutionProvider",
            Device::Auto => "auto",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::TensorRt(n) => write!(f, "tensorrt:{n}"),
            Device::Auto => f.write_str("auto"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device> {
        let (name, index) = match s.split_once(':') {
            Some((name, n)) => {
                let n: i32 = n.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    Error::input(
                        "--device",
                        format!("{s:?}: the device number must be a whole number >= 0"),
                    )
                })?;
                (name, Some(n))
            }
            None => (s, None),
        };
        match (name.to_ascii_lowercase().as_str(), index) {
            ("cpu", None) => Ok(Device::Cpu),
            ("auto", None) => Ok(Device::Auto),
            ("cuda", n) => Ok(Device::Cuda(n.unwrap_or(0))),
            ("tensorrt" | "trt", n) => Ok(Device::TensorRt(n.unwrap_or(0))),
            _ => Err(Error::input(
                "--device",
                format!("{s:?} is not one of cpu, cuda[:N], tensorrt[:N], auto"),
            )),
        }
    }
}

impl Device {
    /// The devices `auto` tries, in order, decided before any variant is opened: TensorRT and then
    /// CUDA when the loaded ONNX Runtime library has them and an NVIDIA driver is present, then
    /// the CPU. Any other device is tried alone.
    pub fn candidates(self) -> Result<Vec<Device>> {
        if self != Device::Auto {
            return Ok(vec![self]);
        }
        let mut out = Vec::new();
        if cuda_driver_present() {
            for gpu in [Device::TensorRt(0), Device::Cuda(0)] {
                if provider_compiled_in(gpu)? {
                    out.push(gpu);
                }
            }
        }
        out.push(Device::Cpu);
        Ok(out)
    }
}

/// Settings for the TensorRT provider: optimisation profile bounds and the cache directory for
/// engines and timing data (building an engine takes minutes; the cache makes it once per shape
/// range and machine).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TensorRtSettings {
    pub max_batch: usize,
    pub opt_batch: usize,
    pub max_seq: usize,
    pub opt_seq: usize,
    pub cache_dir: PathBuf,
}

/// What the TensorRT profile and precision need to know about a graph.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct GraphShape {
    /// The int64 `[batch, seq]` inputs.
    pub inputs: Vec<String>,
    /// The prefix-state inputs `[1, kv_heads, past, head_dim]` (empty without a prefix cache).
    pub past: Vec<String>,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Whether the variant is an fp16 graph: only then may TensorRT compute in fp16.
    pub fp16: bool,
}

impl TensorRtSettings {
    /// `name:dims,...` for every dynamic input of the graph, as the provider's profile options
    /// expect: `BxS` for the token inputs, `1xKxPxD` for the prefix states (ONNX Runtime refuses a
    /// profile that leaves out a dynamic input). `past` runs from 0 (no prefix) to `max_seq`.
    pub fn profile(&self, graph: &GraphShape, batch: usize, seq: usize, past: usize) -> String {
        let tokens = graph.inputs.iter().map(|i| format!("{i}:{batch}x{seq}"));
        let states = graph
            .past
            .iter()
            .map(|i| format!("{i}:1x{}x{past}x{}", graph.kv_heads, graph.head_dim));
        tokens.chain(states).collect::<Vec<_>>().join(",")
    }
}

/// Everything the session needs besides the graph file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionSettings {
    pub threads: Option<usize>,
    pub tensorrt: TensorRtSettings,
}

static RUNTIME: OnceLock<(PathBuf, Environment)> = OnceLock::new();

/// Loads ONNX Runtime once per process from the first library [`find_library`] finds.
pub fn environment(explicit: Option<&Path>) -> Result<&'static Environment> {
    if let Some((path, env)) = RUNTIME.get() {
        if let Some(want) = explicit {
            if want != path {
                return Err(Error::input(
                    "--ort-lib",
                    format!("ONNX Runtime is already loaded from {}", path.display()),
                ));
            }
        }
        return Ok(env);
    }
    let path = find_library(explicit)?;
    let builder = ort::init_from(&path).map_err(|e| Error::OrtLibrary {
        tried: vec![format!("{}: {e}", path.display())],
    })?;
    let env = builder
        .with_name("icl-embed")
        .build()
        .map_err(Error::runtime("cannot create the environment"))?;
    Ok(&RUNTIME.get_or_init(|| (path, env)).1)
}

/// The library that [`environment`] loaded, if any.
pub fn loaded_library() -> Option<&'static Path> {
    RUNTIME.get().map(|(p, _)| p.as_path())
}

/// Finds `libonnxruntime`, most explicit first: `explicit` (`--ort-lib`), `ORT_DYLIB_PATH`, the
/// `onnxruntime`/`onnxruntime-gpu` wheel of the project's `.venv` (searched upwards from the
/// executable and the working directory) or of the active `VIRTUAL_ENV`, then of `python3` on PATH,
/// then the system library directories. The error lists every place tried.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut tried = Vec::new();
    let check = |label: &str, path: PathBuf, tried: &mut Vec<String>| -> Option<PathBuf> {
        if path.is_file() {
            Some(path)
        } else {
            tried.push(format!("{label}: {} (not found)", path.display()));
            None
        }
    };
    if let Some(p) = explicit {
        return check("--ort-lib", p.to_path_buf(), &mut tried).ok_or(Error::OrtLibrary { tried });
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return check("ORT_DYLIB_PATH", PathBuf::from(p), &mut tried)
            .ok_or(Error::OrtLibrary { tried });
    }
    for venv in venv_candidates() {
        match wheel_library(&venv.join("lib")) {
            Some(p) => return Ok(p),
            None => tried.push(format!(
                "python environment {}: no onnxruntime wheel",
                venv.display()
            )),
        }
    }
    match python_site_packages() {
        Some(site) => match wheel_library_in_site(&site) {
            Some(p) => return Ok(p),
            None => tried.push(format!(
                "python3 on PATH ({}): no onnxruntime wheel",
                site.display()
            )),
        },
        None => tried.push("python3 on PATH: not found or no site-packages".into()),
    }
    for dir in [
        "/usr/local/lib",
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
    ] {
        if let Some(p) = check(
            "system",
            Path::new(dir).join("libonnxruntime.so"),
            &mut tried,
        ) {
            return Ok(p);
        }
    }
    Err(Error::OrtLibrary { tried })
}

fn venv_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut push = |p: PathBuf| {
        if p.is_dir() && !out.contains(&p) {
            out.push(p);
        }
    };
    let starts = [
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf)),
        std::env::current_dir().ok(),
    ];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors().take(5) {
            push(dir.join(".venv"));
        }
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        push(PathBuf::from(v));
    }
    out
}

/// `lib/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so.*` under a venv's `lib`.
fn wheel_library(lib: &Path) -> Option<PathBuf> {
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    pythons.sort();
    pythons
        .into_iter()
        .find_map(|p| wheel_library_in_site(&p.join("site-packages")))
}

fn wheel_library_in_site(site: &Path) -> Option<PathBuf> {
    let capi = site.join("onnxruntime").join("capi");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    libs.sort();
    libs.pop()
}

fn python_site_packages() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['platlib'])",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// Whether the loaded library was built with this provider. Being compiled in is necessary, not
/// sufficient: CUDA also needs a driver and a device, found only when a session starts.
pub fn provider_compiled_in(device: Device) -> Result<bool> {
    let r = match device {
        Device::Cpu | Device::Auto => Ok(true),
        Device::Cuda(_) => ep::CUDA::is_available(),
        Device::TensorRt(_) => ep::TensorRT::is_available(),
    };
    r.map_err(Error::runtime("cannot list execution providers"))
}

/// Whether an NVIDIA driver library can be loaded on this machine.
pub fn cuda_driver_present() -> bool {
    // SAFETY: loading libcuda runs only its initialisers; the handle is dropped at once.
    unsafe { libloading::Library::new("libcuda.so.1") }.is_ok()
}

/// An error unless the loaded library was built with `device`'s provider.
pub fn require_provider(device: Device) -> Result<()> {
    if provider_compiled_in(device)? {
        return Ok(());
    }
    let lib = loaded_library()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Err(Error::Provider {
        provider: device.to_string(),
        reason: format!(
            "the ONNX Runtime library {lib} was built without {}; install the onnxruntime-gpu wheel (and CUDA/cuDNN{}) or pass --ort-lib",
            device.provider_name(),
            if matches!(device, Device::TensorRt(_)) { ", TensorRT" } else { "" }
        ),
        source: None,
    })
}

/// Builds a session for `model` on `device` (not `auto`: see [`Device::candidates`]).
pub fn session(
    model: &Path,
    graph: &GraphShape,
    device: Device,
    settings: &SessionSettings,
) -> Result<Session> {
    let env = environment(None)?;
    require_provider(device)?;
    let context = format!(
        "cannot create a session for {} on {device}",
        model.display()
    );
    let mut builder = Session::builder(env)
        .map_err(Error::runtime(context.clone()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| Error::runtime(context.clone())(e.into()))?;
    if let Some(n) = settings.threads {
        builder = builder
            .with_intra_threads(n)
            .map_err(|e| Error::runtime(context.clone())(e.into()))?;
    }
    if cpu_int8_needs_u8u8() {
        // Without VNNI, ONNX Runtime's u8 x s8 GEMM saturates int16 pair sums on full-range s8
        // weights (the int8 variant's); this makes it rewrite them to exact u8 x u8 at load.
        builder = builder
            .with_config_entry(X64_QUANT_PRECISION, "1")
            .map_err(|e| Error::runtime(context.clone())(e.into()))?;
    }
    if !device.is_gpu() {
        // A memory pattern is planned per input shape and allocated as one block; batches here
        // rarely repeat a shape, and on 512-token batches the blocks cost slice7b int8 140 MiB
        // of peak RSS (BENCHMARKS.md) at the same speed.
        builder = builder
            .with_memory_pattern(false)
            .map_err(|e| Error::runtime(context.clone())(e.into()))?;
    }
    let providers = match device {
        Device::Cpu | Device::Auto => vec![],
        Device::Cuda(n) => vec![ep::CUDA::default()
            .with_device_id(n)
            .build()
            .error_on_failure()],
        Device::TensorRt(n) => vec![
            tensorrt(n, graph, &settings.tensorrt)?,
            ep::CUDA::default().with_device_id(n).build(),
        ],
    };
    if !providers.is_empty() {
        builder = builder
            .with_execution_providers(providers)
            .map_err(|e| Error::Provider {
                provider: device.to_string(),
                reason: "cannot register the provider".into(),
                source: Some(ort::Error::<()>::from(e)),
            })?;
    }
    builder.commit_from_file(model).map_err(|e| {
        if device.is_gpu() {
            Error::Provider {
                provider: device.to_string(),
                reason: format!("cannot create a session for {}", model.display()),
                source: Some(e),
            }
        } else {
            Error::runtime(context)(e)
        }
    })
}

/// ONNX Runtime's session option (`kOrtSessionOptionsAvx2PrecisionMode`): when "1" and MLAS's u8 x s8
/// kernel can overflow on this CPU, the s8 weights of MatMulIntegerToFloat, MatMulInteger, QGemm,
/// DynamicQuantizeMatMul, ... are converted to u8 (exact, slower) when the session is built.
pub const X64_QUANT_PRECISION: &str = "session.x64quantprecision";

/// Whether this CPU lacks the VNNI dot-product instructions, so that u8 x s8 int8 GEMM must be
/// made exact with [`X64_QUANT_PRECISION`]: x86-64 without AVX-512 VNNI or AVX-VNNI. With VNNI the
/// fast kernel is exact and the option would only slow it down; other architectures never need it.
pub fn cpu_int8_needs_u8u8() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !cpu_has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x86-64 with AVX-512 VNNI or AVX-VNNI (the int8 variant's fast, exact u8 x s8 GEMM).
pub fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni")
            || std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The CPU's instruction sets that decide int8 speed, in words (for `info` and `--variant auto`).
pub fn cpu_int8_class() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cpu_has_vnni() {
            "x86-64 with VNNI"
        } else if std::arch::is_x86_feature_detected!("avx2") {
            "x86-64 AVX2 without VNNI"
        } else {
            "x86-64 without AVX2"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "not x86-64"
    }
}

fn tensorrt(
    device: i32,
    graph: &GraphShape,
    s: &TensorRtSettings,
) -> Result<ep::ExecutionProviderDispatch> {
    let dir = &s.cache_dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(dir, "cannot create the TensorRT cache directory", e))?;
    Ok(ep::TensorRT::default()
        .with_device_id(device)
        .with_fp16(graph.fp16)
        .with_engine_cache(true)
        .with_engine_cache_path(dir.display())
        .with_timing_cache(true)
        .with_timing_cache_path(dir.display())
        .with_profile_min_shapes(s.profile(graph, 1, 1, 0))
        .with_profile_opt_shapes(s.profile(graph, s.opt_batch, s.opt_seq, s.opt_seq))
        .with_profile_max_shapes(s.profile(graph, s.max_batch, s.max_seq, s.max_seq))
        .build()
        .error_on_failure())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parsing() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!("tensorrt:1".parse::<Device>().unwrap(), Device::TensorRt(1));
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        for bad in ["gpu", "cuda:x", "cuda:-1", "cpu:0", ""] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(err.contains("--device"), "{bad}: {err}");
        }
    }

    #[test]
    fn tensorrt_profiles_name_every_input() {
        let s = TensorRtSettings {
            max_batch: 32,
            opt_batch: 8,
            max_seq: 4096,
            opt_seq: 512,
            cache_dir: "/tmp/x".into(),
        };
        let graph = GraphShape {
            inputs: vec!["input_ids".to_string(), "attention_mask".to_string()],
            past: vec!["past.0.key".to_string(), "past.0.value".to_string()],
            kv_heads: 8,
            head_dim: 128,
            fp16: false,
        };
        assert_eq!(
            s.profile(&graph, s.max_batch, s.max_seq, 4096),
            "input_ids:32x4096,attention_mask:32x4096,past.0.key:1x8x4096x128,past.0.value:1x8x4096x128"
        );
        assert_eq!(
            s.profile(&graph, 1, 1, 0),
            "input_ids:1x1,attention_mask:1x1,past.0.key:1x8x0x128,past.0.value:1x8x0x128"
        );
    }
}
