//! One run per output: an exclusive lock on `OUT.lock`, held for the whole run and released by the
//! operating system when the process ends in any way (kill -9 included), so a killed run's stale
//! lock file never stops the next one. The holder writes its process id into the file, and a
//! second run on the same output is refused at once, naming that process and the lock file.
//!
//! Release order: the holder removes `OUT.lock` while it still holds the lock, then unlocks (by
//! closing the file). A run that opened the file just before the removal can lock it only after
//! the holder closes it, when it no longer has that name; so every run checks, once locked, that
//! the path still names the very file it locked, and opens the path again if not. The other order
//! (unlock, then remove) would let a second run lock the file and then lose it to the first run's
//! removal, so that a third could lock a fresh `OUT.lock` alongside it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock on one output of a corpus run: taken by [`OutputLock::acquire`], released (and its
/// file removed) when dropped.
#[derive(Debug)]
pub struct OutputLock {
    file: Option<File>,
    path: PathBuf,
}

/// The lock file of `output`: `OUT.lock`.
pub fn lock_path(output: &Path) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".lock");
    output.with_file_name(name)
}

impl OutputLock {
    /// Locks `output` for this process, or refuses at once when another run holds it (the error
    /// names its process id, read from the lock file, and the lock file).
    pub fn acquire(output: &Path) -> Result<OutputLock> {
        let path = lock_path(output);
        // Each turn loses only to a holder that removed the file between our open and our lock;
        // a few turns are plenty.
        for _ in 0..16 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, "cannot open the lock file", e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(busy(output, &path)),
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io(&path, "cannot lock the lock file", e))
                }
            }
            if !names_file(&path, &file) {
                continue; // locked a file its holder removed before unlocking it: open again
            }
            let mut lock = OutputLock {
                file: Some(file),
                path,
            };
            lock.write_pid()?; // on failure the lock is dropped: file removed, then unlocked
            return Ok(lock);
        }
        Err(busy(output, &path))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_pid(&mut self) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.set_len(0)
            .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&self.path, "cannot write the lock file", e))
    }
}

impl Drop for OutputLock {
    /// Removes the lock file, then unlocks it (see the module's notes on the order).
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            if names_file(&self.path, &file) {
                let _ = std::fs::remove_file(&self.path);
            }
            drop(file);
        }
    }
}

/// The refusal of a second run: the holder's process id when its lock file says it.
fn busy(output: &Path, path: &Path) -> Error {
    let pid = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let holder = match pid {
        Some(pid) => format!("process {pid} (lock file {})", path.display()),
        None => format!("another process (lock file {})", path.display()),
    };
    Error::input(
        format!("output {}", output.display()),
        format!("another run is writing it: {holder}; wait for it to finish or stop it (a killed run's lock is released by the system, and the same command then resumes it)"),
    )
}

/// Whether `path` names the open `file` (same device and inode).
#[cfg(unix)]
fn names_file(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Elsewhere an open file cannot be removed or replaced, so the path names it.
#[cfg(not(unix))]
fn names_file(path: &Path, _file: &File) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_the_file_goes_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.npy");
        let lock = OutputLock::acquire(&out).unwrap();
        let path = dir.path().join("out.npy.lock");
        assert_eq!(lock.path(), path);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        let err = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id()))
                && err.contains("out.npy.lock"),
            "{err}"
        );
        drop(lock);
        assert!(!path.exists());
        // A stale lock file (a killed holder's) does not stop the next run.
        std::fs::write(&path, "999999\n").unwrap();
        let again = OutputLock::acquire(&out).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
        drop(again);
        assert!(!path.exists());
    }

    /// Many runs racing for one output, each removing the lock file as it ends: never two holders
    /// at once (the re-check after locking keeps out a run that locked a removed file).
    #[test]
    fn racing_runs_never_hold_one_output_together() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.npy");
        let holders = AtomicUsize::new(0);
        let held = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..300 {
                        let Ok(lock) = OutputLock::acquire(&out) else {
                            continue;
                        };
                        assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        held.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                        holders.fetch_sub(1, Ordering::SeqCst);
                        drop(lock);
                    }
                });
            }
        });
        assert!(held.load(Ordering::SeqCst) > 0);
        assert!(!lock_path(&out).exists());
    }
}
