//! Corpus-scale runs (issue 6): resuming after kill -9 gives the bytes of an uninterrupted run,
//! shards merge back into input order, and faults (changed input, duplicate ids, malformed lines,
//! a full disk, a read-only directory) get clear errors and leave resumable state.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A JSON-lines corpus of `n` short texts with ids.
fn corpus(dir: &Path, n: usize) -> PathBuf {
    let words = [
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
    ];
    let mut s = String::new();
    for i in 0..n {
        let len = 3 + (i * 7) % 29;
        let text: Vec<&str> = (0..len)
            .map(|j| words[(i * 3 + j * 5) % words.len()])
            .collect();
        s.push_str(
            &serde_json::json!({"id": format!("doc-{i}"), "text": text.join(" ")}).to_string(),
        );
        s.push('\n');
    }
    let p = dir.join("corpus.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn embed_args(pkg: &Path, input: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["embed".into(), "--model".into(), pkg.display().to_string()];
    a.extend([
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        out.display().to_string(),
    ]);
    a.extend(
        [
            "--device",
            "cpu",
            "--variant",
            "fp32",
            "-q",
            "--threads",
            "1",
            "--chunk-records",
            "64",
            "--max-batch",
            "8",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn side_files(out: &Path) -> Vec<String> {
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&name) && n != &name)
        .collect()
}

#[test]
fn a_run_killed_at_any_moment_resumes_to_the_same_bytes() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 800);
    for ext in ["npy", "jsonl"] {
        let whole = dir.path().join(format!("whole.{ext}"));
        ok(run(&embed_args(
            &f.tiny_pkg,
            &input,
            &whole,
            &["--id-field", "id"][..if ext == "jsonl" { 2 } else { 0 }],
        )));
        let resumed = dir.path().join(format!("resumed.{ext}"));
        let args = embed_args(
            &f.tiny_pkg,
            &input,
            &resumed,
            &["--id-field", "id"][..if ext == "jsonl" { 2 } else { 0 }],
        );
        let state = PathBuf::from(format!("{}.partial.state.json", resumed.display()));
        let progress = || {
            let v: serde_json::Value = std::fs::read_to_string(&state)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())?;
            Some((
                v["committed"]["rows"].as_u64()?,
                v["pending_batches"].as_array()?.len(),
            ))
        };
        let mut kills = 0;
        for attempt in 0..200u64 {
            let before = progress();
            let mut child = Command::new(bin())
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Kill as soon as the run has made progress, a varying few milliseconds later: at chunk
            // commits, between batches, in the middle of writing.
            let finished = loop {
                std::thread::sleep(Duration::from_millis(2));
                if let Some(status) = child.try_wait().unwrap() {
                    break Some(status);
                }
                let now = progress();
                // Up to 12 kills, each soon after the run has made progress, a varying few
                // milliseconds later (at a chunk commit, between batches, mid-write).
                if kills < 12 && now.is_some() && now != before {
                    std::thread::sleep(Duration::from_millis(attempt * 13 % 40));
                    // The run may have finished during the pause: then it was not killed.
                    break child.try_wait().unwrap();
                }
            };
            match finished {
                Some(status) => {
                    let o = child.wait_with_output().unwrap();
                    assert!(status.success(), "attempt {attempt}: {}", stderr(&o));
                    break;
                }
                None => {
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    kills += 1;
                    if resumed.exists() {
                        // Only the final rename makes it appear: it must be whole already.
                        assert_eq!(
                            std::fs::read(&whole).unwrap(),
                            std::fs::read(&resumed).unwrap(),
                            "a killed run left a partial {}",
                            resumed.display()
                        );
                    }
                }
            }
        }
        // A run killed between its final rename and removing its state is finished by the next
        // start of the same command, which then only tidies up.
        if progress().is_some() {
            ok(run(&args));
        }
        assert!(resumed.exists(), "the run never finished");
        assert!(
            kills >= 2,
            "the run was interrupted only {kills} times; the test proves nothing"
        );
        assert_eq!(
            std::fs::read(&whole).unwrap(),
            std::fs::read(&resumed).unwrap(),
            "{ext}: resumed output differs after {kills} kills"
        );
        assert!(
            side_files(&resumed).is_empty(),
            "side files left: {:?}",
            side_files(&resumed)
        );
        let rows = if ext == "npy" {
            read_npy(&resumed).len()
        } else {
            std::fs::read_to_string(&resumed).unwrap().lines().count()
        };
        assert_eq!(rows, 800);
    }
}

/// Starts a run and kills it once it has committed something.
fn interrupted(args: &[String], out: &Path) {
    let state = PathBuf::from(format!("{}.partial.state.json", out.display()));
    let mut child = Command::new(bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..400 {
        std::thread::sleep(Duration::from_millis(10));
        let committed = std::fs::read_to_string(&state)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        if committed.is_some_and(|v| v["committed"]["rows"].as_u64().unwrap_or(0) > 0) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        state.exists() && !out.exists(),
        "the run was not caught unfinished"
    );
}

#[test]
fn a_changed_input_or_changed_settings_are_refused_on_resume() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 3000);
    let out = dir.path().join("out.npy");
    let args = embed_args(&f.tiny_pkg, &input, &out, &[]);
    interrupted(&args, &out);
    let err = fails(run(&embed_args(
        &f.tiny_pkg,
        &input,
        &out,
        &["--max-length", "100"],
    )));
    assert!(err.contains("different settings"), "{err}");
    let mut text = std::fs::read_to_string(&input).unwrap();
    text.push_str("{\"id\": \"late\", \"text\": \"appended\"}\n");
    std::fs::write(&input, &text).unwrap();
    let err = fails(run(&args));
    assert!(err.contains("input changed"), "{err}");
    assert!(!out.exists());
}

/// Issue 27: the run records `--dimensions`, so a resumed run with another length is refused and
/// the same one finishes with rows of that length.
#[test]
fn a_resumed_run_keeps_its_dimensions() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pkg = instruct_package(&f.tiny_pkg, dir.path());
    let input = corpus(dir.path(), 3000);
    let out = dir.path().join("out.npy");
    let args = embed_args(&pkg, &input, &out, &["--dimensions", "8"]);
    interrupted(&args, &out);
    let err = fails(run(&embed_args(
        &pkg,
        &input,
        &out,
        &["--dimensions", "16"],
    )));
    assert!(err.contains("different settings"), "{err}");
    let err = fails(run(&embed_args(&pkg, &input, &out, &[])));
    assert!(err.contains("different settings"), "{err}");
    ok(run(&args));
    let rows = read_npy(&out);
    assert_eq!((rows.len(), rows[0].len()), (3000, 8));
}

#[test]
fn shards_merge_back_into_input_order() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 301);
    let whole = dir.path().join("whole.npy");
    ok(run(&embed_args(&f.tiny_pkg, &input, &whole, &[])));
    for ext in ["npy", "jsonl"] {
        let mut parts = Vec::new();
        for k in 0..3 {
            let p = dir.path().join(format!("part-{k}.{ext}"));
            ok(run(&embed_args(
                &f.tiny_pkg,
                &input,
                &p,
                &["--shard", &format!("{k}/3"), "--id-field", "id"]
                    [..if ext == "jsonl" { 4 } else { 2 }],
            )));
            parts.push(p.display().to_string());
        }
        let merged = dir.path().join(format!("merged.{ext}"));
        let mut args = vec![
            "merge".to_string(),
            "--output".into(),
            merged.display().to_string(),
        ];
        args.extend(parts.iter().cloned());
        ok(run(&args));
        let rows: Vec<Vec<f32>> = if ext == "npy" {
            read_npy(&merged)
        } else {
            read_jsonl_embeddings(&merged)
                .into_iter()
                .enumerate()
                .map(|(i, (v, e))| {
                    assert_eq!(v["id"].as_str(), Some(format!("doc-{i}").as_str()));
                    e
                })
                .collect()
        };
        let m = min(&cosines(&rows, &read_npy(&whole)));
        assert!(
            m >= 0.99999,
            "{ext}: merged shards vs whole run min cosine {m}"
        );
        // Shards given out of order are refused, not silently interleaved wrongly.
        if ext == "npy" {
            let mut bad = vec![
                "merge".to_string(),
                "--output".into(),
                dir.path().join("bad.npy").display().to_string(),
            ];
            bad.extend([parts[2].clone(), parts[0].clone(), parts[1].clone()]);
            let err = fails(run(&bad));
            assert!(err.contains("does not fit"), "{err}");
        }
    }
}

#[test]
fn duplicate_ids_and_malformed_lines_stop_the_run_or_are_skipped_and_counted() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 500);
    let mut lines: Vec<String> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines[250] = "{\"id\": \"doc-3\", \"text\": \"a duplicate id\"}".into();
    lines[400] = "{\"id\": \"broken\", \"text\": ".into();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let err = fails(run(&embed_args(
        &f.tiny_pkg,
        &input,
        &out,
        &["--id-field", "id"],
    )));
    assert!(
        err.contains("line 251")
            && err.contains("duplicate id \"doc-3\"")
            && err.contains("first on line 4"),
        "{err}"
    );
    assert!(!out.exists());
    // The same command with --skip-invalid is a different run: start over.
    for side in side_files(&out) {
        std::fs::remove_file(dir.path().join(side)).unwrap();
    }
    let o = run(&embed_args(
        &f.tiny_pkg,
        &input,
        &out,
        &["--id-field", "id", "--skip-invalid"],
    )
    .into_iter()
    .filter(|a| a != "-q")
    .collect::<Vec<_>>());
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("line 401: skipped: malformed JSON"), "{err}");
    assert!(
        err.contains("498 items") && err.contains("2 skipped"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 498);
    let skipped = std::fs::read_to_string(dir.path().join("out.jsonl.skipped.jsonl")).unwrap();
    assert_eq!(skipped.lines().count(), 2, "{skipped}");
}

/// Runs `f` with a small tmpfs mounted at a fresh directory; `None` (with a printed reason) where
/// mounting is not allowed (not root). CI runs as root.
fn with_tmpfs(size: &str, f: impl FnOnce(&Path)) -> Option<()> {
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir.path())
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        if std::env::var_os("ICL_REQUIRE_FIXTURES").is_some() {
            panic!("cannot mount a tmpfs (needed to simulate a full disk); run as root");
        }
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return None;
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(dir.path())));
    let _ = Command::new("umount").arg(dir.path()).status();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    Some(())
}

#[test]
fn a_full_disk_fails_clearly_and_the_run_resumes_once_there_is_room() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 2000);
    let whole = dir.path().join("whole.npy");
    ok(run(&embed_args(&f.tiny_pkg, &input, &whole, &[])));
    with_tmpfs("192k", |mnt| {
        let out = mnt.join("out.npy");
        let err = fails(run(&embed_args(&f.tiny_pkg, &input, &out, &[])));
        assert!(err.contains("No space left on device"), "{err}");
        assert!(!out.exists());
        let status = Command::new("mount")
            .args(["-o", "remount,size=8m"])
            .arg(mnt)
            .status()
            .unwrap();
        assert!(status.success());
        ok(run(&embed_args(&f.tiny_pkg, &input, &out, &[])));
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap());
    });
}

#[test]
fn a_read_only_output_directory_is_reported() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 10);
    with_tmpfs("1m", |mnt| {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(mnt)
            .status()
            .unwrap();
        assert!(status.success());
        let err = fails(run(&embed_args(
            &f.tiny_pkg,
            &input,
            &mnt.join("out.npy"),
            &[],
        )));
        assert!(
            err.contains("out.npy") && err.contains("Read-only file system"),
            "{err}"
        );
    });
}

/// One definition of a blank line (Unicode white space): a JSON-lines line holding only an
/// ideographic space is skipped alike by `tokenize` and by `embed`, so both number the records
/// the same way.
#[test]
fn tokenize_and_embed_number_records_alike_around_unicode_blank_lines() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"first\"}\n\u{3000}\n{\"text\": \"second\"}\n \u{a0}\n",
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    ok(run(&embed_args(&f.tiny_pkg, &input, &out, &[])));
    // The "index" of every JSON line of `embed`'s output and of `tokenize`'s.
    let indices = |text: &str| -> Vec<u64> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["index"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let embedded = indices(&std::fs::read_to_string(&out).unwrap());
    let tokenized = indices(&ok(run(&[
        "tokenize",
        "--model",
        f.tiny_pkg.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ])));
    assert_eq!(embedded, vec![0, 1]);
    assert_eq!(tokenized, embedded);
}

/// Issue 24: two runs on one output. The second is refused at once, naming the first's process
/// and the lock file, while the first runs on and writes exactly an undisturbed run's bytes.
#[test]
fn a_second_run_on_the_same_output_is_refused_at_once_and_the_first_is_undisturbed() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 12_000);
    let whole = dir.path().join("whole.npy");
    ok(run(&embed_args(&f.tiny_pkg, &input, &whole, &[])));
    let out = dir.path().join("out.npy");
    let lock = dir.path().join("out.npy.lock");
    let args = embed_args(&f.tiny_pkg, &input, &out, &[]);
    let mut first = Command::new(bin())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = first.id().to_string();
    // The first run holds the lock once its pid is in the lock file (before its model loads).
    for _ in 0..1000 {
        if std::fs::read_to_string(&lock).is_ok_and(|s| s.trim() == pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(std::fs::read_to_string(&lock).unwrap().trim(), pid);
    let started = std::time::Instant::now();
    let err = fails(run(&args));
    let took = started.elapsed();
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run ended before the second was refused; the test proves nothing"
    );
    assert!(
        err.contains(&format!("process {pid}")) && err.contains("out.npy.lock"),
        "{err}"
    );
    assert!(took < Duration::from_secs(2), "refused only after {took:?}");
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "the first run failed: {}", stderr(&o));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&whole).unwrap(),
        "the first run's output differs from an undisturbed run's"
    );
    assert!(side_files(&out).is_empty(), "{:?}", side_files(&out));
}

/// A holder killed with kill -9 leaves its lock file, but the system released the lock: the same
/// command resumes the run, and the lock file goes once it is done.
#[test]
fn a_killed_runs_stale_lock_does_not_stop_the_resumed_run() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 3000);
    let whole = dir.path().join("whole.jsonl");
    ok(run(&embed_args(
        &f.tiny_pkg,
        &input,
        &whole,
        &["--id-field", "id"],
    )));
    let out = dir.path().join("out.jsonl");
    let args = embed_args(&f.tiny_pkg, &input, &out, &["--id-field", "id"]);
    interrupted(&args, &out);
    let lock = dir.path().join("out.jsonl.lock");
    assert!(lock.exists(), "the killed run left no lock file");
    let o = run(&args
        .iter()
        .filter(|a| *a != "-q")
        .cloned()
        .collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resumed after"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap());
    assert!(side_files(&out).is_empty(), "{:?}", side_files(&out));
}

/// Issue 24: `--output` naming the input (itself, through a symbolic link, through a hard link)
/// is refused before anything is written, naming both.
#[test]
fn an_output_that_is_the_input_is_refused() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "one\ntwo\n").unwrap();
    let symlink = dir.path().join("link.npy");
    std::os::unix::fs::symlink(&input, &symlink).unwrap();
    let hard = dir.path().join("hard.npy");
    std::fs::hard_link(&input, &hard).unwrap();
    let dotted = dir.path().join(".").join("in.txt");
    for out in [&input, &symlink, &hard, &dotted] {
        let err = fails(run(&embed_args(
            &f.tiny_pkg,
            &input,
            out,
            &["--output-format", "npy"],
        )));
        assert!(
            err.contains("same file")
                && err.contains(&input.display().to_string())
                && err.contains(&out.display().to_string()),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&input).unwrap(), "one\ntwo\n");
    }
    // And the other way round: the input through a link to an existing output.
    let err = fails(run(&embed_args(&f.tiny_pkg, &symlink, &hard, &[])));
    assert!(err.contains("same file"), "{err}");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["hard.npy", "in.txt", "link.npy"]);
}

/// Issue 24: a disk full before the run's first state write leaves nothing behind (no `.partial`,
/// `.pending`, `.skipped`, `.state.json.tmp` or lock file), and the same command then works.
#[test]
fn a_run_that_fails_before_its_first_state_write_leaves_nothing() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 50);
    for ext in ["npy", "jsonl"] {
        let whole = dir.path().join(format!("whole.{ext}"));
        ok(run(&embed_args(&f.tiny_pkg, &input, &whole, &[])));
        // One page: the lock file's pid (and the .npy header) fill it, so the state cannot be
        // written.
        with_tmpfs("4k", |mnt| {
            let out = mnt.join(format!("out.{ext}"));
            let err = fails(run(&embed_args(&f.tiny_pkg, &input, &out, &[])));
            assert!(err.contains("No space left on device"), "{err}");
            let left: Vec<_> = std::fs::read_dir(mnt).unwrap().collect();
            assert!(left.is_empty(), "{ext}: left behind: {left:?}");
            let status = Command::new("mount")
                .args(["-o", "remount,size=8m"])
                .arg(mnt)
                .status()
                .unwrap();
            assert!(status.success());
            ok(run(&embed_args(&f.tiny_pkg, &input, &out, &[])));
            assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap());
            assert!(side_files(&out).is_empty(), "{:?}", side_files(&out));
        });
    }
}

/// Issue 24: a named pipe is read once, like stdin (and like stdin, an unfinished run from one is
/// not resumed); a directory is reported as one; an empty input file makes an output of no rows.
#[test]
fn a_named_pipe_is_read_like_stdin_and_a_directory_is_reported() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 300);
    let whole = dir.path().join("whole.npy");
    ok(run(&embed_args(&f.tiny_pkg, &input, &whole, &[])));
    let fifo = dir.path().join("pipe.jsonl");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let text = std::fs::read(&input).unwrap();
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            // Opening blocks until the run opens the pipe to read it.
            let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            w.write_all(&text).unwrap();
        })
    };
    let out = dir.path().join("out.npy");
    ok(run(&embed_args(&f.tiny_pkg, &fifo, &out, &[])));
    writer.join().unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap());
    assert!(side_files(&out).is_empty(), "{:?}", side_files(&out));

    let err = fails(run(&embed_args(
        &f.tiny_pkg,
        dir.path(),
        &dir.path().join("d.npy"),
        &[],
    )));
    assert!(err.contains("is a directory"), "{err}");
    assert!(!err.contains("no such file"), "{err}");

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let out = dir.path().join("empty.npy");
    ok(run(&embed_args(&f.tiny_pkg, &empty, &out, &[])));
    assert!(read_npy(&out).is_empty());
    assert!(side_files(&out).is_empty(), "{:?}", side_files(&out));
}

/// An unfinished run is not resumed from a named pipe: like stdin, it cannot be read again.
#[test]
fn an_unfinished_run_is_not_resumed_from_a_named_pipe() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = corpus(dir.path(), 3000);
    let out = dir.path().join("out.npy");
    interrupted(&embed_args(&f.tiny_pkg, &input, &out, &[]), &out);
    let fifo = dir.path().join("pipe.jsonl");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            // The run refuses before it opens the pipe: open it read-write here, never blocking.
            let mut w = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fifo)
                .unwrap();
            let _ = w.write_all(b"{\"text\": \"x\"}\n");
        })
    };
    let err = fails(run(&embed_args(&f.tiny_pkg, &fifo, &out, &[])));
    writer.join().unwrap();
    assert!(err.contains("cannot be resumed"), "{err}");
}
