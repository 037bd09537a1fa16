//! `icl-embed merge`: the outputs of sharded runs joined back into input order.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use icl_embed::corpus::output;

#[derive(Args)]
pub struct MergeArgs {
    /// The merged file (.npy or .jsonl, the format of the shards).
    #[arg(long)]
    output: PathBuf,
    /// Shard outputs in shard order: 0/N first.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let merged = output::merge(&args.output, &args.shards)?;
    eprintln!(
        "merged {} rows from {} shards -> {}",
        merged,
        args.shards.len(),
        args.output.display()
    );
    Ok(())
}
