//! `icl-embed verify`: every file of a package against the sha256 in its manifest.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use icl_embed::{Package, Stamps};

#[derive(Args)]
pub struct VerifyArgs {
    /// Model package: a directory or a Hugging Face repo id.
    model: PathBuf,
    /// Also report variants whose files are absent (a hub snapshot holds only what was fetched).
    #[arg(long)]
    all: bool,
    /// Where the stamps of verified files are kept; default $XDG_CACHE_HOME/icl-embed.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn run(args: VerifyArgs) -> Result<()> {
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
