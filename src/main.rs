//! The `icl-embed` command line: `embed`, `tokenize` and `info`. Errors from the library become
//! `anyhow` here, are printed with their whole chain, and exit with status 2.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use icl_embed::input::{self, InputFormat};
use icl_embed::output::{self, OutputFormat};
use icl_embed::runtime::{self, Device};
use icl_embed::{Embedder, EmbedderOptions, Encoder, Example, Package};

/// Embeddings from BAAI/bge-en-icl model packages on ONNX Runtime, with few-shot query prompts.
#[derive(Parser)]
#[command(name = "icl-embed", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed documents (default) or few-shot queries and write .npy or JSON lines.
    Embed(EmbedArgs),
    /// Print the final token ids of each input as JSON lines (the parity probe).
    Tokenize(TokenizeArgs),
    /// Show what a package holds and which execution providers this machine can run.
    Info(InfoArgs),
}

#[derive(Args)]
struct TextArgs {
    /// Model package directory (made by `python -m export`).
    #[arg(long)]
    model: PathBuf,
    /// Input file of texts, `-` for stdin.
    #[arg(long)]
    input: String,
    /// Input layout: `.jsonl`/`.ndjson` are JSON lines, anything else one text per line.
    #[arg(long, value_enum, default_value = "auto")]
    input_format: InputFormat,
    /// Field holding the text in JSON lines.
    #[arg(long, default_value = "text")]
    field: String,
    /// Treat the inputs as queries (instruction, few-shot examples, suffix) instead of documents.
    #[arg(long)]
    queries: bool,
    /// Task instruction for queries.
    #[arg(long, requires = "queries")]
    task: Option<String>,
    /// Few-shot examples for queries: a JSON list or JSON lines of {instruct?, query, response}.
    #[arg(long, requires = "queries")]
    examples: Option<PathBuf>,
    /// Maximum length in tokens (the reference's max_length; default from the package, 512).
    #[arg(long)]
    max_length: Option<usize>,
}

#[derive(Args)]
struct EmbedArgs {
    #[command(flatten)]
    text: TextArgs,
    /// Output file: .npy (float32 [N, hidden]) or .jsonl.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    output_format: OutputFormat,
    /// fp32, fp16, int8 or auto (fp16 on GPU, int8 on CPU).
    #[arg(long, default_value = "auto")]
    variant: String,
    /// cpu, cuda[:N], tensorrt[:N] or auto (tries TensorRT, CUDA, CPU and says which it chose).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Intra-op threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Token budget of one batch, rows x padded length (default 4096 on CPU, 16384 on GPU).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Most rows in one batch.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// ONNX Runtime library (default: ORT_DYLIB_PATH, the project's .venv, python3's onnxruntime, the system).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Cache directory (TensorRT engines); default $XDG_CACHE_HOME/icl-embed.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// No progress bar or summary on stderr.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    text: TextArgs,
}

#[derive(Args)]
struct InfoArgs {
    /// Model package directory; without it only the runtime is described.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    ort_lib: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed(args),
        Command::Tokenize(args) => tokenize(args),
        Command::Info(args) => info(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Texts and, for queries, the task and examples.
struct Job {
    texts: Vec<String>,
    task: Option<String>,
    examples: Vec<Example>,
}

fn read_job(args: &TextArgs) -> Result<Job> {
    let examples = match &args.examples {
        Some(path) => input::read_examples(path)?,
        None => Vec::new(),
    };
    let texts = input::read_texts(&args.input, args.input_format, &args.field)?;
    Ok(Job {
        texts,
        task: args.task.clone(),
        examples,
    })
}

fn token_ids(encoder: &Encoder, args: &TextArgs, job: &Job) -> Result<Vec<Vec<u32>>> {
    let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
    Ok(if args.queries {
        encoder.queries(job.task.as_deref(), &job.examples, &texts, args.max_length)?
    } else {
        encoder.documents(&texts, args.max_length)?
    })
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let encoder = Encoder::open(&args.text.model)?;
    let job = read_job(&args.text)?;
    let ids = token_ids(&encoder, &args.text, &job)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (index, ids) in ids.iter().enumerate() {
        serde_json::to_writer(&mut out, &serde_json::json!({"index": index, "ids": ids}))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn embed(args: EmbedArgs) -> Result<()> {
    let started = Instant::now();
    let format = args.output_format.resolve(&args.output)?;
    check_output_dir(&args.output)?;
    let options = EmbedderOptions {
        variant: args.variant.clone(),
        device: args.device.parse::<Device>()?,
        threads: args.threads,
        batch_tokens: args.batch_tokens,
        max_rows: args.max_batch,
        max_length: args.text.max_length,
        ort_lib: args.ort_lib.clone(),
        cache_dir: args.cache_dir.clone(),
    };
    let job = read_job(&args.text)?;
    let mut embedder = Embedder::new(&args.text.model, &options)?;
    if !args.quiet {
        let notes = embedder.fallback_notes();
        let why = if notes.is_empty() {
            String::new()
        } else {
            format!(" (passed over: {})", notes.join("; "))
        };
        eprintln!(
            "device {} ({}), variant {}{why}",
            embedder.device(),
            args.device,
            embedder.variant()
        );
    }
    let loaded = started.elapsed();
    let ids = token_ids(&embedder.encoder, &args.text, &job)?;
    let total_tokens: usize = ids.iter().map(Vec::len).sum();
    let bar = progress_bar(ids.len(), args.quiet);
    let (mut rows_done, mut tokens_done) = (0usize, 0usize);
    let compute = Instant::now();
    let vectors = embedder.embed_ids(&ids, &mut |rows, tokens| {
        rows_done += rows;
        tokens_done += tokens;
        if let Some(bar) = &bar {
            bar.set_position(rows_done as u64);
            let secs = compute.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{:.0} tokens/s", tokens_done as f64 / secs));
        }
    })?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let hidden = embedder.encoder.package.manifest.architecture.hidden;
    output::write(&args.output, format, &vectors, hidden)?;
    if !args.quiet {
        let secs = compute.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "embedded {} texts ({} tokens) in {:.2} s ({:.1} texts/s, {:.0} tokens/s; load {:.2} s) -> {}",
            vectors.len(),
            total_tokens,
            secs,
            vectors.len() as f64 / secs,
            total_tokens as f64 / secs,
            loaded.as_secs_f64(),
            args.output.display()
        );
    }
    Ok(())
}

fn check_output_dir(output: &Path) -> Result<()> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "output {}: directory {} does not exist",
            output.display(),
            dir.display()
        );
    }
    if output.is_dir() {
        bail!("output {}: is a directory", output.display());
    }
    Ok(())
}

fn progress_bar(len: usize, quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} texts, {per_sec}, {msg}, eta {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

fn info(args: InfoArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if let Some(dir) = &args.model {
        let package = Package::open(dir)?;
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
        for (name, v) in &m.variants {
            let bytes: u64 = std::iter::once(&v.file)
                .chain(v.data.iter())
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
        }
    }
    match runtime::environment(args.ort_lib.as_deref()) {
        Ok(_) => {
            let lib = runtime::loaded_library()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            writeln!(out, "onnx runtime: {lib}")?;
            writeln!(out, "  cpu: available")?;
            let driver = runtime::cuda_driver_present();
            for device in [Device::Cuda(0), Device::TensorRt(0)] {
                let status = match (runtime::provider_compiled_in(device)?, driver) {
                    (false, _) => "unavailable (not built into this ONNX Runtime library; install onnxruntime-gpu)".to_string(),
                    (true, false) => "unavailable (built in, but no NVIDIA driver on this machine)".to_string(),
                    (true, true) => "built in, NVIDIA driver present (the device is checked when a session starts)".to_string(),
                };
                let name = if matches!(device, Device::Cuda(_)) {
                    "cuda"
                } else {
                    "tensorrt"
                };
                writeln!(out, "  {name}: {status}")?;
            }
        }
        Err(e) => writeln!(out, "onnx runtime: not found\n  {e}").context("cannot write")?,
    }
    Ok(())
}
