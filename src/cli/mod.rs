//! The `icl-embed` command line: `embed`, `tokenize`, `info`, `merge`, `verify` and `serve`. Each
//! subcommand parses its arguments, calls the library and prints a summary; [`run`] dispatches.

mod embed;
mod info;
mod merge;
pub mod runtime;
mod text;
mod tokenize;
mod verify;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Embeddings from BAAI/bge-en-icl model packages on ONNX Runtime, with few-shot query prompts.
#[derive(Parser)]
#[command(name = "icl-embed", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed documents (default) or few-shot queries and write .npy or JSON lines.
    Embed(embed::EmbedArgs),
    /// Print the final token ids of each input as JSON lines (the parity probe).
    Tokenize(tokenize::TokenizeArgs),
    /// Show what a package holds and which execution providers this machine can run.
    Info(info::InfoArgs),
    /// Join the outputs of `--shard 0/N` ... `--shard N-1/N` runs back into input order.
    Merge(merge::MergeArgs),
    /// Check every file of a package against the sha256 in its manifest (and remember the
    /// result, so that later starts compare sizes and times instead of reading the weights).
    Verify(verify::VerifyArgs),
    #[cfg(feature = "serve")]
    /// Serve embeddings over HTTP: OpenAI's /v1/embeddings, TEI's /embed, few-shot task presets.
    Serve(crate::server::ServeArgs),
}

/// Runs the subcommand.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed(args) => embed::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Info(args) => info::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Verify(args) => verify::run(args),
        #[cfg(feature = "serve")]
        Command::Serve(args) => crate::server::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[cfg(feature = "serve")]
    #[test]
    fn serve_takes_the_shared_runtime_flags_and_its_old_names() {
        let parse = |extra: &[&str]| {
            let args = [&["icl-embed", "serve", "--model", "m"][..], extra].concat();
            match Cli::try_parse_from(args).map(|c| c.command) {
                Ok(Command::Serve(a)) => a.runtime,
                Ok(_) => panic!("not serve"),
                Err(e) => panic!("{e}"),
            }
        };
        let old = parse(&["--max-batch-tokens", "100", "--max-batch-rows", "3"]);
        let new = parse(&["--batch-tokens", "100", "--max-batch", "3"]);
        for r in [&old, &new] {
            assert_eq!((r.batch_tokens, r.max_batch), (Some(100), 3));
        }
        let r = parse(&[
            "--device",
            "cuda:1",
            "--variant",
            "w8a8",
            "--no-prefix-cache",
        ]);
        assert_eq!(r.device, icl_embed::Device::Cuda(1));
        assert_eq!(r.variant, icl_embed::Variant::Other("w8a8".into()));
        let options = r.options(None);
        assert!(!options.prefix_cache && options.max_rows == 64);
        let bad = ["icl-embed", "serve", "--model", "m", "--device", "gpu"];
        assert!(Cli::try_parse_from(bad).is_err());
    }
}
