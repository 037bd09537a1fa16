//! The `icl-embed` command line: `embed`, `tokenize`, `info`, `merge` and `verify`. Each subcommand
//! parses its arguments, calls the library and prints a summary; errors are printed with their
//! whole chain and exit with status 2.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use icl_embed::backend::runtime;
use icl_embed::corpus::input::{self, InputFormat};
use icl_embed::corpus::output::{self, OutputFormat};
use icl_embed::corpus::run::{self as stream, Progress, RunOptions, RunSettings, Shard, Source};
use icl_embed::{
    Device, Embedder, EmbedderOptions, Encoder, Example, Package, PrefixStats, QueryPrompt, Stamps,
    Variant,
};

#[cfg(feature = "serve")]
mod server;

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
    /// Join the outputs of `--shard 0/N` ... `--shard N-1/N` runs back into input order.
    Merge(MergeArgs),
    /// Check every file of a package against the sha256 in its manifest (and remember the
    /// result, so that later starts compare sizes and times instead of reading the weights).
    Verify(VerifyArgs),
    #[cfg(feature = "serve")]
    /// Serve embeddings over HTTP: OpenAI's /v1/embeddings, TEI's /embed, few-shot task presets.
    Serve(server::ServeArgs),
}

#[derive(Args)]
struct VerifyArgs {
    /// Model package: a directory or a Hugging Face repo id.
    model: PathBuf,
    /// Also report variants whose files are absent (a hub snapshot holds only what was fetched).
    #[arg(long)]
    all: bool,
    /// Where the stamps of verified files are kept; default $XDG_CACHE_HOME/icl-embed.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(Args)]
struct MergeArgs {
    /// The merged file (.npy or .jsonl, the format of the shards).
    #[arg(long)]
    output: PathBuf,
    /// Shard outputs in shard order: 0/N first.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
}

#[derive(Args)]
struct TextArgs {
    /// Model package: a directory made by `python -m export`, or a Hugging Face repo id
    /// (`owner/name[@revision]`) holding one, fetched into the hub cache (offline once cached).
    #[arg(long)]
    model: PathBuf,
    /// Input file of texts, `-` for stdin.
    #[arg(long)]
    input: String,
    /// Input layout: `.jsonl`/`.ndjson` are JSON lines, anything else one text per line.
    #[arg(long, default_value = "auto")]
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
    #[arg(long, default_value = "auto")]
    output_format: OutputFormat,
    /// fp32, fp16, int8 or auto (fp16 on GPU, int8 on CPU).
    #[arg(long, default_value = "auto")]
    variant: Variant,
    /// cpu, cuda[:N], tensorrt[:N] or auto (TensorRT, CUDA, CPU: the first this machine can run;
    /// says which it chose).
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Intra-op threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Token budget of one batch, rows x padded length (default 512 on CPU, 16384 on GPU).
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Most rows in one batch.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// ONNX Runtime library (default: ORT_DYLIB_PATH, the project's .venv, python3's onnxruntime, the system).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// Cache directory (TensorRT engines, stamps of verified files); default
    /// $XDG_CACHE_HOME/icl-embed.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Take every N-th record starting at K (`K/N`), for job arrays; `merge` joins the outputs.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// JSON-lines field carried into JSON-lines output as "id" (duplicates are refused).
    #[arg(long)]
    id_field: Option<String>,
    /// Skip (and count, and list in OUTPUT.skipped.jsonl) malformed lines instead of stopping.
    #[arg(long)]
    skip_invalid: bool,
    /// Records read, embedded and committed at a time (memory and resume granularity).
    #[arg(long, default_value_t = 1024)]
    chunk_records: usize,
    /// Compute every query in full instead of computing the few-shot prefix once and the queries
    /// on top of its key/value states (for comparison; the cache is on by default).
    #[arg(long, requires = "queries")]
    no_prefix_cache: bool,
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
        Command::Merge(args) => merge(args),
        Command::Verify(args) => verify(args),
        #[cfg(feature = "serve")]
        Command::Serve(args) => server::run(args),
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

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let encoder = Encoder::open(&args.text.model)?;
    let job = read_job(&args.text)?;
    let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
    let ids = if args.text.queries {
        let prompt =
            encoder.query_prompt(job.task.as_deref(), &job.examples, args.text.max_length)?;
        encoder.queries(&prompt, &texts)?
    } else {
        encoder.documents(&texts, args.text.max_length)?
    };
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
    if args.text.input != "-" && !Path::new(&args.text.input).is_file() {
        bail!("input {}: no such file", args.text.input);
    }
    let options = EmbedderOptions::default()
        .variant(args.variant.clone())
        .device(args.device)
        .threads(args.threads)
        .batch_tokens(args.batch_tokens)
        .max_rows(args.max_batch)
        .max_length(args.text.max_length)
        .ort_lib(args.ort_lib.clone())
        .cache_dir(args.cache_dir.clone())
        .prefix_cache(!args.no_prefix_cache);
    let examples = match &args.text.examples {
        Some(path) => input::read_examples(path)?,
        None => Vec::new(),
    };
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
            embedder.model().device(),
            args.device,
            embedder.model().variant()
        );
    }
    let prompt: Option<QueryPrompt> = match args.text.queries {
        true => Some(embedder.query_prompt(args.text.task.as_deref(), &examples)?),
        false => None,
    };
    let cached_prefix: Option<Vec<u32>> = prompt
        .as_ref()
        .and_then(|p| embedder.cached_prefix(p))
        .map(<[u32]>::to_vec);
    let limits = embedder.batch_limits();
    let input_format = args.text.input_format.resolve(&args.text.input);
    let settings = RunSettings {
        package_manifest_sha256: embedder.encoder().package().manifest_sha256.clone(),
        variant: embedder.model().variant().to_string(),
        device: embedder.model().device().to_string(),
        queries: args.text.queries,
        task: args.text.task.clone(),
        examples,
        max_length: args.text.max_length,
        batch_tokens: limits.tokens,
        max_rows: limits.rows,
        chunk_records: args.chunk_records.max(1),
        shard: args.shard,
        input_format: format!("{input_format:?}"),
        field: args.text.field.clone(),
        id_field: args.id_field.clone(),
        skip_invalid: args.skip_invalid,
        output_format: format!("{format:?}"),
        prefix_cache: cached_prefix.is_some(),
    };
    let loaded = started.elapsed();
    let compute = Instant::now();
    let bar = progress_bar(args.quiet);
    let mut on_progress = |p: Progress| {
        if let Some(bar) = &bar {
            match p {
                Progress::Total(n) => bar.set_length(n as u64),
                Progress::Done { items, tokens } => {
                    bar.set_position(items as u64);
                    let secs = compute.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!("{:.0} tokens/s", tokens as f64 / secs));
                }
            }
        }
    };
    let mut warn = |line: String| {
        if !args.quiet {
            match &bar {
                Some(bar) => bar.println(format!("warning: {line}")),
                None => eprintln!("warning: {line}"),
            }
        }
    };
    let source = if args.text.input == "-" {
        Source::Stdin
    } else {
        Source::File(PathBuf::from(&args.text.input))
    };
    let summary = stream::run(
        &mut embedder,
        RunOptions {
            prompt: prompt.as_ref(),
            source,
            output: &args.output,
            output_format: format,
            settings,
            format: input_format,
            progress: &mut on_progress,
            warn: &mut warn,
        },
    );
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    if !args.quiet {
        let secs = compute.elapsed().as_secs_f64().max(1e-9);
        let new_items = summary.items - summary.resumed_from;
        let resumed = if summary.resumed_from > 0 {
            format!(", resumed after {}", summary.resumed_from)
        } else {
            String::new()
        };
        eprintln!(
            "done: {} items, {} tokens, {:.2} s, {} skipped ({:.1} items/s, {:.0} tokens/s; load {:.2} s{resumed}) -> {}",
            summary.items,
            summary.tokens,
            secs,
            summary.skipped,
            new_items as f64 / secs,
            summary.tokens as f64 / secs,
            loaded.as_secs_f64(),
            args.output.display()
        );
        if let Some(line) = prefix_cache_line(embedder.prefix_stats(), &cached_prefix) {
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// The summary's line on the prefix cache, for query runs where it applied.
fn prefix_cache_line(stats: &PrefixStats, prefix: &Option<Vec<u32>>) -> Option<String> {
    let prefix = prefix.as_ref()?;
    Some(format!(
        "prefix cache: {}-token prefix computed {} time(s), {:.1} MiB of key/value states; {} queries on top of it, {} computed in full (their ids do not start with the prefix's)",
        prefix.len(),
        stats.prefixes,
        stats.state_bytes as f64 / (1024.0 * 1024.0),
        stats.cached,
        stats.fallback
    ))
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

fn progress_bar(quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
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
        let package = Package::open(icl_embed::locate(dir)?)?;
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
            if let Some(start) = &v.start_states {
                writeln!(
                    out,
                    "    start states: inputs beginning with {:?} run on their fp32 states ({})",
                    start.ids, start.file
                )?;
            }
        }
        let (choice, why) = icl_embed::auto_cpu_variant(m);
        writeln!(
            out,
            "  --variant auto on the CPU: {} ({why})",
            choice.as_deref().unwrap_or("none")
        )?;
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

fn merge(args: MergeArgs) -> Result<()> {
    let merged = output::merge(&args.output, &args.shards)?;
    eprintln!(
        "merged {} rows from {} shards -> {}",
        merged,
        args.shards.len(),
        args.output.display()
    );
    Ok(())
}

fn verify(args: VerifyArgs) -> Result<()> {
    let package = Package::open(icl_embed::locate(&args.model)?)?;
    let stamps = Stamps::new(args.cache_dir.unwrap_or_else(icl_embed::default_cache_dir));
    let results = package.verify(&stamps, args.all);
    if results.is_empty() {
        bail!(
            "model package {}: no variant has all its files present",
            package.dir.display()
        );
    }
    let mut bad = 0;
    for (file, result) in &results {
        match result {
            Ok(()) => println!("ok      {file}"),
            Err(e) => {
                bad += 1;
                println!("FAILED  {file}: {e}");
            }
        }
    }
    if bad > 0 {
        bail!(
            "model package {}: {bad} of {} files failed",
            package.dir.display(),
            results.len()
        );
    }
    eprintln!(
        "verified {} files of {}",
        results.len(),
        package.dir.display()
    );
    Ok(())
}
