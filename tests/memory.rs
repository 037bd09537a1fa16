//! `--variant auto` on the CPU never takes a variant that will not fit (issue 26): the real binary
//! started under a memory limit the test sets (`RLIMIT_DATA` through bash's `ulimit -d`, which any
//! user may lower for a child process; and a memory cgroup where the test runs as root and the
//! cgroup file system is writable), and a package directory holding only its int8 files.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A package made of `src`'s manifest (changed by `edit`), its tokenizer and the files of
/// `variants`, linked rather than copied.
fn package_with(
    src: &Path,
    dst: &Path,
    variants: &[&str],
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let text = std::fs::read_to_string(src.join("embedder.json")).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut files = vec![manifest["tokenizer"]["file"].as_str().unwrap().to_string()];
    for v in variants {
        let sha = manifest["variants"][v]["sha256"].as_object().unwrap();
        files.extend(sha.keys().cloned());
    }
    for file in &files {
        let to = dst.join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(src.join(file).canonicalize().unwrap(), to).unwrap();
    }
    edit(&mut manifest);
    std::fs::write(dst.join("embedder.json"), manifest.to_string()).unwrap();
    dst.to_path_buf()
}

/// smollm2's fp32 and int8 (fp32 about 540 MB, int8 about half that: room between them for a
/// limit), its int8 marked unfaithful so that auto prefers fp32 where it fits, in `dst`.
fn smollm2_with_unfaithful_int8(smollm2: &Path, dst: &Path) -> PathBuf {
    package_with(smollm2, dst, &["fp32", "int8"], |m| {
        m["variants"]["int8"]["quantization"]["selection"]["faithful"] = false.into();
    })
}

/// The binary with `args`, its data segment limited to `limit` bytes.
fn run_limited(limit: u64, args: &[&str]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -d "$1" && shift && exec "$@""#)
        .arg("bash")
        .arg((limit / 1024).to_string())
        .arg(bin())
        .args(args)
        .output()
        .expect("cannot start bash")
}

/// Bytes of a size as the binary writes it (`812.3 MiB`), to its 0.1 precision.
fn bytes_of(text: &str) -> u64 {
    let (number, unit) = text.trim().split_once(' ').unwrap();
    let shift = match unit {
        "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        other => panic!("unit {other:?} in {text:?}"),
    };
    (number.parse::<f64>().unwrap() * (1u64 << shift) as f64) as u64
}

/// The size written right after `before` in `text`.
fn size_after(text: &str, before: &str) -> u64 {
    let at = text
        .find(before)
        .unwrap_or_else(|| panic!("{before:?} not in {text}"));
    let mut words = text[at + before.len()..].split_whitespace();
    let number = words.next().unwrap();
    let unit = words.next().unwrap().trim_end_matches([',', ')', ';']);
    bytes_of(&format!("{number} {unit}"))
}

#[test]
fn a_local_package_without_fp32_files_runs_auto_on_int8() {
    // Issue 26: a slice7b package holding only its int8 files (a weight-only recipe, so auto
    // prefers fp32; fp32 listed in the manifest) failed with "fp32/model.onnx is missing".
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pkg = package_with(&f.tiny_pkg, &dir.path().join("pkg"), &["int8"], |m| {
        m["variants"]["int8"]["quantization"]["kernel"] = "matmulnbits-fp32".into();
    });
    assert!(!pkg.join("fp32").exists());
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\nworld\n").unwrap();
    let out = dir.path().join("out.npy");
    let o = run(&embed_args(&pkg, &input, &out, &[]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("variant int8"), "{err}");
    assert!(
        err.contains("int8 in place of fp32")
            && err.contains("fp32: fp32/model.onnx is not in the package directory"),
        "{err}"
    );
    assert_eq!(read_npy(&out).len(), 2);
    let info = ok(run(&["info", "--model", pkg.to_str().unwrap()]));
    assert!(
        info.contains("--variant auto on the CPU: int8 (int8 in place of fp32"),
        "{info}"
    );
}

#[test]
fn a_memory_limit_the_process_runs_under_makes_auto_take_int8_or_refuse() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pkg = smollm2_with_unfaithful_int8(&f.smollm2_pkg, dir.path());
    let pkg = pkg.to_str().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\nworld\n").unwrap();
    let input = input.to_str().unwrap();
    let embed = |limit: u64, out: &str| {
        let out = dir.path().join(out);
        let args = [
            "embed",
            "--model",
            pkg,
            "--input",
            input,
            "--output",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--threads",
            "2",
        ];
        (run_limited(limit, &args), out)
    };

    // Under a roomy limit fp32 fits and is taken; the reason gives its need and what the process
    // had already mapped when it decided.
    let (o, out) = embed(3 << 29, "roomy.npy");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("variant fp32"), "{err}");
    assert_eq!(read_npy(&out).len(), 2);
    let fp32_need = size_after(&err, "needs about ");
    let mapped = size_after(&err, "RLIMIT_DATA 1.5 GiB less the ");
    let info = ok(run(&["info", "--model", pkg]));
    let int8_line = info
        .lines()
        .skip_while(|l| !l.starts_with("  variant int8"))
        .nth(1)
        .unwrap();
    let int8_need = size_after(int8_line, "on the CPU needs about ");
    assert!(
        fp32_need > int8_need + (128 << 20),
        "fp32 {fp32_need}, int8 {int8_need}: {info}"
    );

    // Halfway between the two needs: int8 fits, fp32 does not; int8 runs under that limit.
    let (o, out) = embed(mapped + (fp32_need + int8_need) / 2, "tight.npy");
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("variant int8"), "{err}");
    assert!(
        err.contains("int8 in place of fp32") && err.contains("passed over: fp32 needs about"),
        "{err}"
    );
    assert!(err.contains("RLIMIT_DATA"), "{err}");
    assert_eq!(read_npy(&out).len(), 2);

    // Under half of int8's need nothing fits: a clear refusal naming each need and the limit.
    let (o, out) = embed(mapped + int8_need / 2, "none.npy");
    let err = fails(o);
    for words in [
        "not enough memory",
        "fits on the CPU",
        "int8 needs about",
        "fp32 needs about",
        "RLIMIT_DATA",
        "--memory-limit",
    ] {
        assert!(err.contains(words), "{words:?}: {err}");
    }
    assert!(!out.exists());

    // --memory-limit replaces what the process detects.
    let o = run(&["info", "--model", pkg, "--memory-limit", "100M"]);
    let info = ok(o);
    assert!(
        info.contains("memory available: 100.0 MiB (--memory-limit)")
            && info.contains("--variant auto on the CPU: none (not enough memory"),
        "{info}"
    );
    let info = ok(run(&["info", "--model", pkg, "--memory-limit", "none"]));
    assert!(
        info.contains("memory available: not checked")
            && info.contains("--variant auto on the CPU: fp32"),
        "{info}"
    );
}

/// A memory cgroup made for one test (v2 under the cgroup2 root where it has the memory
/// controller, else v1 under this process's memory cgroup), removed when dropped.
struct Cgroup {
    dir: PathBuf,
    limit_file: &'static str,
}

impl Cgroup {
    fn new() -> Result<Cgroup, String> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let name = format!("icl-embed-test-{}", std::process::id());
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let point = PathBuf::from(left.split(' ').nth(4).unwrap_or_default());
            let mut rest = right.split(' ');
            let (fstype, options) = (rest.next(), rest.nth(1).unwrap_or_default());
            let (parent, limit_file) = if fstype == Some("cgroup2") {
                let controllers =
                    std::fs::read_to_string(point.join("cgroup.controllers")).unwrap_or_default();
                if !controllers.split_whitespace().any(|c| c == "memory") {
                    continue;
                }
                // Children of the root may use the controller once the root hands it down.
                let _ = std::fs::write(point.join("cgroup.subtree_control"), "+memory");
                (point.clone(), "memory.max")
            } else if fstype == Some("cgroup") && options.split(',').any(|o| o == "memory") {
                let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                let path = own
                    .lines()
                    .find_map(|l| {
                        let mut p = l.splitn(3, ':');
                        let (_, c, path) = (p.next()?, p.next()?, p.next()?);
                        c.split(',')
                            .any(|c| c == "memory")
                            .then(|| path.to_string())
                    })
                    .unwrap_or_default();
                let parent = point.join(path.trim_start_matches('/'));
                (
                    if parent.is_dir() {
                        parent
                    } else {
                        point.clone()
                    },
                    "memory.limit_in_bytes",
                )
            } else {
                continue;
            };
            let dir = parent.join(&name);
            std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            let cgroup = Cgroup { dir, limit_file };
            if !cgroup.dir.join(limit_file).exists() {
                return Err(format!("{} has no {limit_file}", cgroup.dir.display()));
            }
            return Ok(cgroup);
        }
        Err("no cgroup file system with the memory controller is mounted".into())
    }

    fn set_limit(&self, bytes: u64) {
        let file = self.dir.join(self.limit_file);
        std::fs::write(&file, bytes.to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }

    /// The binary with `args`, started inside this cgroup.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
            .arg("sh")
            .arg(&self.dir)
            .arg(bin())
            .args(args)
            .output()
            .expect("cannot start sh")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes have exited; the kernel may take a moment to let the cgroup go.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("could not remove the test cgroup {}", self.dir.display());
    }
}

#[test]
fn a_cgroup_memory_limit_makes_auto_take_int8() {
    let Some(f) = fixtures() else { return };
    let cgroup = match Cgroup::new() {
        Ok(c) => c,
        Err(why) if std::env::var_os("ICL_REQUIRE_CGROUP").is_none() => {
            // Not silent: the reason is printed, and ICL_REQUIRE_CGROUP=1 makes it a failure.
            eprintln!(
                "skipped: cannot make a memory cgroup here ({why}); RLIMIT_DATA is tested above"
            );
            return;
        }
        Err(why) => panic!("ICL_REQUIRE_CGROUP is set but no memory cgroup could be made: {why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let pkg = smollm2_with_unfaithful_int8(&f.smollm2_pkg, dir.path());
    let pkg = pkg.to_str().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello\n").unwrap();
    let out = dir.path().join("out.npy");
    let args = [
        "embed",
        "--model",
        pkg,
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--threads",
        "2",
    ];

    cgroup.set_limit(3 << 29);
    let o = cgroup.run(&args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("variant fp32") && err.contains("cgroup v"),
        "{err}"
    );
    let fp32_need = size_after(&err, "needs about ");
    let held = size_after(&err, "less the ");
    let info = ok(run(&["info", "--model", pkg]));
    let int8_line = info
        .lines()
        .skip_while(|l| !l.starts_with("  variant int8"))
        .nth(1)
        .unwrap();
    let int8_need = size_after(int8_line, "on the CPU needs about ");

    cgroup.set_limit(held + (fp32_need + int8_need) / 2);
    let o = cgroup.run(&args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("variant int8") && err.contains("passed over: fp32 needs about"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}/{}", cgroup.dir.display(), cgroup.limit_file)),
        "{err}"
    );
    assert_eq!(read_npy(&out).len(), 1);
}
