//! `icl-embed embed`: a whole input file (or stdin) embedded into `.npy` or JSON lines, in chunks
//! that a killed run resumes (the corpus runner, [`icl_embed::corpus::run`]).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use icl_embed::corpus::input::InputFormat;
use icl_embed::corpus::lock::OutputLock;
use icl_embed::corpus::output::OutputFormat;
use icl_embed::corpus::run::{
    self as corpus, Progress, RunOptions, RunSettings, Shard, Source, Summary,
};
use icl_embed::{Embedder, Example, PrefixStats, QueryPrompt};

use super::runtime::RuntimeArgs;
use super::text::TextArgs;

#[derive(Args)]
#[command(mut_arg("no_prefix_cache", |a| a.requires("queries")))]
pub struct EmbedArgs {
    #[command(flatten)]
    text: TextArgs,
    /// Output file: .npy (float32 [N, hidden]) or .jsonl.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value = "auto")]
    output_format: OutputFormat,
    /// Shortened vectors: the first N components of each, renormalised, for models trained for
    /// them (the package's manifest says which N; `icl-embed info` shows the range).
    #[arg(long, value_name = "N")]
    dimensions: Option<usize>,
    #[command(flatten)]
    runtime: RuntimeArgs,
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
    /// No progress bar or summary on stderr.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let started = Instant::now();
    let format = args.output_format.resolve(&args.output)?;
    let source = check_paths(&args)?;
    // Before the model loads, so that a second run on the same output is refused at once.
    let lock = OutputLock::acquire(&args.output)?;
    let options = args
        .runtime
        .options(args.text.max_length)
        .dimensions(args.dimensions);
    let examples = args.text.examples()?;
    let mut embedder = Embedder::new(&args.text.model, &options).map_err(dimensions_flag)?;
    if let Some(warning) = embedder.model().memory_warning() {
        eprintln!("warning: {warning}");
    }
    if !args.quiet {
        announce_device(&embedder, &args.runtime);
    }
    let prompt: Option<QueryPrompt> = match args.text.queries {
        true => Some(embedder.query_prompt(args.text.task.as_deref(), &examples)?),
        false => None,
    };
    let cached_prefix: Option<Vec<u32>> = prompt
        .as_ref()
        .and_then(|p| embedder.cached_prefix(p))
        .map(<[u32]>::to_vec);
    let formats = (args.text.input_format.resolve(&args.text.input), format);
    let settings = run_settings(&args, &embedder, examples, formats, cached_prefix.is_some());
    let loaded = started.elapsed();
    let compute = Instant::now();
    let summary = run_corpus(
        &args,
        &mut embedder,
        (prompt.as_ref(), source, lock),
        settings,
        formats,
        compute,
    )?;
    if !args.quiet {
        eprintln!("{}", summary_line(&summary, compute, loaded, &args.output));
        if let Some(line) = prefix_cache_line(embedder.prefix_stats(), &cached_prefix) {
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// `Embedder::new` refuses a `dimensions` the package does not allow before the model loads; the
/// CLI's error names the flag.
fn dimensions_flag(e: icl_embed::Error) -> icl_embed::Error {
    match e {
        icl_embed::Error::Input { what, reason } if what == "dimensions" => {
            icl_embed::Error::Input {
                what: "--dimensions".into(),
                reason,
            }
        }
        e => e,
    }
}

/// Before the model loads: refuses an output in a missing directory or naming a directory, an
/// input that is missing or a directory, and an output that is the input itself; returns the
/// input to read (a named pipe or other non-regular file is read once, like stdin).
fn check_paths(args: &EmbedArgs) -> Result<Source> {
    check_output_dir(&args.output)?;
    let input = &args.text.input;
    if input == "-" {
        return Ok(Source::Stdin);
    }
    let path = PathBuf::from(input);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("input {input}: no such file"),
        Err(e) => bail!("input {input}: cannot read it: {e}"),
    };
    if meta.is_dir() {
        bail!("input {input}: is a directory");
    }
    if same_file(&path, &meta, &args.output) {
        bail!(
            "input {input} and output {} are the same file; the run would replace its input with its embeddings",
            args.output.display()
        );
    }
    Ok(match meta.is_file() {
        true => Source::File(path),
        false => Source::Stream(path),
    })
}

/// Whether `output` is the input file (`input`, whose metadata is `meta`) under another name: the
/// same device and inode when the output exists (symbolic and hard links alike), the same
/// canonical path otherwise.
fn same_file(input: &Path, meta: &std::fs::Metadata, output: &Path) -> bool {
    #[cfg(unix)]
    if let Ok(out) = std::fs::metadata(output) {
        use std::os::unix::fs::MetadataExt;
        return out.dev() == meta.dev() && out.ino() == meta.ino();
    }
    #[cfg(not(unix))]
    let _ = meta;
    let canonical_output = || {
        let name = output.file_name()?;
        let dir = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Some(dir.canonicalize().ok()?.join(name))
    };
    match (input.canonicalize(), canonical_output()) {
        (Ok(a), Some(b)) => a == b,
        _ => false,
    }
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

/// The device and variant chosen, and the devices passed over, on stderr.
fn announce_device(embedder: &Embedder, runtime: &RuntimeArgs) {
    let notes = embedder.fallback_notes();
    let why = if notes.is_empty() {
        String::new()
    } else {
        format!(" (passed over: {})", notes.join("; "))
    };
    eprintln!(
        "device {} ({}), variant {}{why}",
        embedder.model().device(),
        runtime.device,
        embedder.model().variant()
    );
    if let Some(reason) = embedder.model().variant_reason() {
        eprintln!("variant auto on the CPU: {reason}");
    }
}

/// Everything that decides the output's bytes: a resumed run must repeat it.
fn run_settings(
    args: &EmbedArgs,
    embedder: &Embedder,
    examples: Vec<Example>,
    (input_format, format): (InputFormat, OutputFormat),
    prefix_cache: bool,
) -> RunSettings {
    let limits = embedder.batch_limits();
    RunSettings {
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
        prefix_cache,
        dimensions: args.dimensions,
    }
}

/// The corpus run, with a progress bar on a terminal and warnings on stderr unless quiet.
fn run_corpus(
    args: &EmbedArgs,
    embedder: &mut Embedder,
    (prompt, source, lock): (Option<&QueryPrompt>, Source, OutputLock),
    settings: RunSettings,
    (input_format, output_format): (InputFormat, OutputFormat),
    compute: Instant,
) -> Result<Summary> {
    let bar = progress_bar(args.quiet);
    let mut on_progress = |p: Progress| {
        let Some(bar) = &bar else { return };
        match p {
            Progress::Total(n) => bar.set_length(n as u64),
            Progress::Done { items, tokens } => {
                bar.set_position(items as u64);
                let secs = compute.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!("{:.0} tokens/s", tokens as f64 / secs));
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
    let summary = corpus::run(
        embedder,
        RunOptions {
            prompt,
            source,
            output: &args.output,
            lock: Some(lock),
            output_format,
            settings,
            format: input_format,
            progress: &mut on_progress,
            warn: &mut warn,
        },
    );
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    Ok(summary?)
}

/// The `done:` line of the summary.
fn summary_line(summary: &Summary, compute: Instant, loaded: Duration, output: &Path) -> String {
    let secs = compute.elapsed().as_secs_f64().max(1e-9);
    let new_items = summary.items - summary.resumed_from;
    let resumed = if summary.resumed_from > 0 {
        format!(", resumed after {}", summary.resumed_from)
    } else {
        String::new()
    };
    format!(
        "done: {} items, {} tokens, {:.2} s, {} skipped ({:.1} items/s, {:.0} tokens/s; load {:.2} s{resumed}) -> {}",
        summary.items,
        summary.tokens,
        secs,
        summary.skipped,
        new_items as f64 / secs,
        summary.tokens as f64 / secs,
        loaded.as_secs_f64(),
        output.display()
    )
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};

    fn parse(extra: &[&str]) -> Result<super::EmbedArgs, clap::Error> {
        let base = [
            "icl-embed",
            "embed",
            "--model",
            "m",
            "--input",
            "i",
            "--output",
            "o.npy",
        ];
        match Cli::try_parse_from([&base[..], extra].concat())?.command {
            Command::Embed(a) => Ok(a),
            _ => panic!("not embed"),
        }
    }

    #[test]
    fn embed_takes_the_shared_runtime_flags() {
        let a = parse(&["--batch-tokens", "64", "--max-batch", "2", "--threads", "1"]).unwrap();
        let o = a.runtime.options(Some(100));
        assert_eq!(
            (o.batch_tokens, o.max_rows, o.threads),
            (Some(64), 2, Some(1))
        );
        assert_eq!(o.max_length, Some(100));
        let a = parse(&["--max-batch-tokens", "64"]).unwrap();
        assert_eq!(a.runtime.batch_tokens, Some(64));
    }

    #[test]
    fn no_prefix_cache_needs_queries_in_embed() {
        let err = parse(&["--no-prefix-cache"]).err().expect("refused");
        assert!(err.to_string().contains("--queries"), "{err}");
        assert!(parse(&["--no-prefix-cache", "--queries"]).is_ok());
    }
}
