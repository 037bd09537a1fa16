//! `icl-embed info`: what a package holds and which execution providers this machine can run.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use icl_embed::backend::memory;
use icl_embed::backend::runtime;
use icl_embed::{BatchLimits, CpuFit, Device, MemoryLimit, Package};

#[derive(Args)]
pub struct InfoArgs {
    /// Model package directory; without it only the runtime is described.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Memory `--variant auto` plans for on the CPU, as `embed --memory-limit` takes it: a size,
    /// auto or none.
    #[arg(long, default_value = "auto")]
    memory_limit: MemoryLimit,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if let Some(dir) = &args.model {
        describe_package(&mut out, dir, args.memory_limit)?;
    }
    describe_runtime(&mut out, args.ort_lib.as_deref())
}

fn describe_package(out: &mut impl Write, dir: &Path, limit: MemoryLimit) -> Result<()> {
    let mut package = Package::open(icl_embed::locate(dir)?)?;
    package.from_hub = !dir.is_dir() && icl_embed::is_repo_id(&dir.to_string_lossy());
    let fit = CpuFit::new(limit, BatchLimits::default_for(Device::Cpu).tokens);
    let m = &package.manifest;
    writeln!(out, "package {}", package.dir.display())?;
    writeln!(out, "  source: {}", m.source)?;
    let a = &m.architecture;
    writeln!(
        out,
        "  architecture: {} layers, hidden {}, {} heads / {} kv heads x {}, vocab {}",
        a.layers, a.hidden, a.heads, a.kv_heads, a.head_dim, a.vocab
    )?;
    writeln!(
        out,
        "  max length: queries {}, documents {}",
        m.max_length.query, m.max_length.document
    )?;
    describe_prompt(out, m)?;
    for (name, v) in &m.variants {
        describe_variant(out, &package, name, v, &fit)?;
    }
    let memory = fit
        .memory
        .as_ref()
        .map_or("not checked".to_string(), ToString::to_string);
    writeln!(out, "  memory available: {memory}")?;
    match icl_embed::auto_cpu_variant(&package, &fit) {
        Ok((choice, why)) => writeln!(out, "  --variant auto on the CPU: {choice} ({why})")?,
        Err(e) => writeln!(out, "  --variant auto on the CPU: none ({e})")?,
    }
    Ok(())
}

/// The manifest's format, its prompt procedure and default task, and the shortened vectors it
/// allows.
fn describe_prompt(out: &mut impl Write, m: &icl_embed::Manifest) -> Result<()> {
    let family = m
        .source
        .get("family")
        .and_then(|f| f.as_str())
        .map(|f| format!(", family {f}"))
        .unwrap_or_default();
    writeln!(out, "  format: {}{family}", m.format)?;
    let task = match &m.prompt.default_task {
        Some(t) => format!("default task {t:?}"),
        None => "no default task (queries without --task are their raw text)".to_string(),
    };
    writeln!(
        out,
        "  prompt: procedure {}, {task}",
        m.prompt.procedure.name()
    )?;
    match m.dimensions {
        Some(d) => writeln!(
            out,
            "  shortened vectors: --dimensions {}..={}",
            d.min, m.architecture.hidden
        )?,
        None => writeln!(
            out,
            "  shortened vectors: none (the model is not trained for them)"
        )?,
    }
    Ok(())
}

fn describe_variant(
    out: &mut impl Write,
    package: &Package,
    name: &str,
    v: &icl_embed::VariantSpec,
    fit: &CpuFit,
) -> Result<()> {
    let bytes: u64 = v
        .files()
        .iter()
        .filter_map(|f| std::fs::metadata(package.path(f)).ok())
        .map(|md| md.len())
        .sum();
    let parity = v
        .parity
        .get("min_cosine")
        .map(|c| format!(", min cosine vs PyTorch {c}"))
        .unwrap_or_default();
    writeln!(
        out,
        "  variant {name}: {} ({:.1} MiB), inputs {}{parity}",
        v.dtype,
        bytes as f64 / (1 << 20) as f64,
        v.inputs.join(", ")
    )?;
    let need = memory::cpu_need(package, v, fit.batch_tokens);
    let absent = if package.variant_available(name) {
        ""
    } else {
        ", files absent"
    };
    writeln!(
        out,
        "    on the CPU needs about {need} with {}-token batches{absent}",
        fit.batch_tokens
    )?;
    if let Some(start) = &v.start_states {
        writeln!(
            out,
            "    start states: inputs beginning with {:?} run on their fp32 states ({})",
            start.ids, start.file
        )?;
    }
    Ok(())
}

fn describe_runtime(out: &mut impl Write, ort_lib: Option<&Path>) -> Result<()> {
    if let Err(e) = runtime::environment(ort_lib) {
        writeln!(out, "onnx runtime: not found\n  {e}").context("cannot write")?;
        return Ok(());
    }
    let lib = runtime::loaded_library()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    writeln!(out, "onnx runtime: {lib}")?;
    writeln!(out, "  cpu: available")?;
    let driver = runtime::cuda_driver_present();
    for device in [Device::Cuda(0), Device::TensorRt(0)] {
        let status = match (runtime::provider_compiled_in(device)?, driver) {
            (false, _) => {
                "unavailable (not built into this ONNX Runtime library; install onnxruntime-gpu)"
            }
            (true, false) => "unavailable (built in, but no NVIDIA driver on this machine)",
            (true, true) => {
                "built in, NVIDIA driver present (the device is checked when a session starts)"
            }
        };
        let name = if matches!(device, Device::Cuda(_)) {
            "cuda"
        } else {
            "tensorrt"
        };
        writeln!(out, "  {name}: {status}")?;
    }
    Ok(())
}
