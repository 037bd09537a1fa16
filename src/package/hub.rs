//! Model packages on the Hugging Face Hub: `--model owner/name[@revision]` is looked up in the
//! hub client's cache (`$HF_HOME/hub`, laid out as `huggingface_hub` lays it out) and fetched with
//! `hf-hub` only when files are missing. Only the manifest, the tokenizer and the files of the
//! variants a run can use are fetched, not every precision of a 7B model. With
//! `HF_HUB_OFFLINE=1` the network is never touched.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::package::{Manifest, MANIFEST_FILE};

/// Whether `spec` names a hub repository rather than a directory: `owner/name` or
/// `owner/name@revision`, and no such path exists here.
pub fn is_repo_id(spec: &str) -> bool {
    if Path::new(spec).exists() || spec.starts_with(['.', '/', '~']) {
        return false;
    }
    let id = spec.split('@').next().unwrap_or_default();
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The local directory of a package given as a directory or a hub repo id (fetching only the
/// manifest and the tokenizer for the latter).
pub fn locate(spec: impl AsRef<Path>) -> Result<PathBuf> {
    let path = spec.as_ref();
    let text = path.to_string_lossy();
    if path.is_dir() || !is_repo_id(&text) {
        return Ok(path.to_path_buf());
    }
    resolve(&text, &[])
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The local directory of the package `spec` (a repo id), with the manifest, the tokenizer and
/// the files of the variants named in `variants` present. Files already in the cache are used
/// without the network; the others are fetched (their checksums are checked when the variant is
/// first opened, [`crate::Package::check_variant`]).
pub fn resolve(spec: &str, variants: &[String]) -> Result<PathBuf> {
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (spec.to_string(), "main".to_string()),
    };
    let repo = Repo::with_revision(id, RepoType::Model, revision.clone());
    if let Some(dir) = from_cache(spec, &repo, &revision, variants)? {
        return Ok(dir);
    }
    fetch(spec, repo, &revision, variants)
}

/// An error of the hub for `spec`, without an underlying client error.
fn hub_error(spec: &str, reason: String) -> Error {
    Error::Hub {
        spec: spec.to_string(),
        reason,
        source: None,
    }
}

/// The files a run needs besides the manifest in the package `dir`: the tokenizer and the files
/// of `variants`.
fn needed(dir: &Path, variants: &[String]) -> Result<Vec<String>> {
    let manifest = read_manifest(&dir.join(MANIFEST_FILE))?;
    let mut files = vec![manifest.tokenizer.file.clone()];
    for name in variants {
        if let Some(v) = manifest.variants.get(name) {
            files.extend(v.files());
        }
    }
    Ok(files)
}

/// The snapshot directory when the hub cache already holds every needed file; `None` when some
/// must be fetched; an error when they must but `HF_HUB_OFFLINE` forbids it.
fn from_cache(
    spec: &str,
    repo: &Repo,
    revision: &str,
    variants: &[String],
) -> Result<Option<PathBuf>> {
    let cache = Cache::from_env();
    let cached = cache.repo(repo.clone());
    if let Some(manifest_path) = cached.get(MANIFEST_FILE) {
        let dir = manifest_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let files = needed(&dir, variants)?;
        let missing: Vec<&String> = files.iter().filter(|f| cached.get(f).is_none()).collect();
        if missing.is_empty() {
            return Ok(Some(dir));
        }
        if offline() {
            return Err(hub_error(
                spec,
                format!(
                    "the cached snapshot in {} lacks {missing:?} and HF_HUB_OFFLINE is set",
                    dir.display()
                ),
            ));
        }
    } else if offline() {
        let snapshot = cache.path().join(repo.folder_name());
        let reason = if snapshot.join("refs").join(revision).exists() {
            format!(
                "the cached snapshot in {} holds no icl-embed package (no {MANIFEST_FILE})",
                snapshot.display()
            )
        } else {
            format!(
                "not in the Hugging Face cache {} and HF_HUB_OFFLINE is set",
                cache.path().display()
            )
        };
        return Err(hub_error(spec, reason));
    }
    Ok(None)
}

/// Fetches the manifest, then the needed files, into the hub cache; returns the snapshot
/// directory.
fn fetch(spec: &str, repo: Repo, revision: &str, variants: &[String]) -> Result<PathBuf> {
    let failed = |reason: String| {
        move |e| Error::Hub {
            spec: spec.to_string(),
            reason,
            source: Some(e),
        }
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(failed("cannot start the Hugging Face Hub client".into()))?;
    let remote = api.repo(repo);
    let manifest_path = remote.get(MANIFEST_FILE).map_err(|e| {
        let reason = if e.to_string().contains("404") {
            format!("the repository holds no icl-embed package (no {MANIFEST_FILE} at revision {revision}); make one with `python -m export` and upload it")
        } else {
            format!("cannot fetch {MANIFEST_FILE} from the Hugging Face Hub (files already in the cache are used without the network)")
        };
        failed(reason)(e)
    })?;
    let dir = manifest_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    for file in needed(&dir, variants)? {
        remote
            .get(&file)
            .map_err(failed(format!("cannot fetch {file}")))?;
    }
    Ok(dir)
}

fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(path, "cannot read the manifest", e))?;
    serde_json::from_str(&text).map_err(|source| Error::Manifest {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths() {
        assert!(is_repo_id("BAAI/bge-en-icl"));
        assert!(is_repo_id("org/pkg@v1.0"));
        for path in [
            "models/x/y",
            "./org/name",
            "/abs/path",
            "name",
            "org/",
            "a b/c",
        ] {
            assert!(!is_repo_id(path), "{path}");
        }
    }
}
