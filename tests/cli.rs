//! The real binary on bad input (issue 3): each case gets a clear error naming the input, exit
//! status 2, no panic, and no output file that looks complete.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// A copy of a package that a test may damage.
fn copy_package(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_package(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn embed(pkg: &Path, input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<&str> = Vec::new();
    if !extra.contains(&"--device") {
        args.extend(["--device", "cpu"]);
    }
    args.extend(["--variant", "fp32", "-q"]);
    args.extend(extra);
    run(&embed_args(pkg, input, output, &args))
}

/// Runs a failing embed and checks that the error names `needle` and no output appeared.
fn embed_fails(pkg: &Path, input: &Path, extra: &[&str], needles: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    let err = fails(embed(pkg, input, &out, extra));
    for needle in needles {
        assert!(
            err.contains(needle),
            "error does not mention {needle:?}: {err}"
        );
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "a failed run left files behind"
    );
    err
}

#[test]
fn missing_package_directory() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"hello\n");
    let _ = f;
    embed_fails(
        Path::new("/nonexistent/pkg"),
        &input,
        &[],
        &["/nonexistent/pkg", "not a directory"],
    );
}

#[test]
fn package_without_manifest_or_with_a_broken_one() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"hello\n");
    let pkg = dir.path().join("pkg");
    copy_package(&f.tiny_pkg, &pkg);
    std::fs::remove_file(pkg.join("embedder.json")).unwrap();
    embed_fails(&pkg, &input, &[], &["embedder.json is missing"]);
    std::fs::write(pkg.join("embedder.json"), b"{\"format\": \"icl-embed/1\"").unwrap();
    embed_fails(&pkg, &input, &[], &["embedder.json is invalid"]);
}

#[test]
fn corrupted_or_truncated_weights_are_rejected() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"hello\n");
    let pkg = dir.path().join("pkg");
    copy_package(&f.tiny_pkg, &pkg);
    let data = pkg.join("fp32/model.onnx.data");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    embed_fails(
        &pkg,
        &input,
        &[],
        &["fp32/model.onnx.data is corrupted or incomplete"],
    );
    std::fs::remove_file(&data).unwrap();
    embed_fails(&pkg, &input, &[], &["fp32/model.onnx.data is missing"]);
}

#[test]
fn graph_inputs_that_disagree_with_the_manifest() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"hello\n");
    let pkg = dir.path().join("pkg");
    copy_package(&f.tiny_pkg, &pkg);
    let path = pkg.join("embedder.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let inputs = m["variants"]["fp32"]["inputs"].as_array_mut().unwrap();
    assert!(inputs.len() == 3, "the tiny graph takes position_ids");
    inputs.pop();
    std::fs::write(&path, serde_json::to_string(&m).unwrap()).unwrap();
    embed_fails(
        &pkg,
        &input,
        &[],
        &["the graph takes inputs", "the manifest says"],
    );
}

#[test]
fn missing_onnx_runtime_library() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"hello\n");
    embed_fails(
        &f.tiny_pkg,
        &input,
        &["--ort-lib", "/nonexistent/libonnxruntime.so"],
        &[
            "no usable ONNX Runtime library",
            "/nonexistent/libonnxruntime.so",
            "ORT_DYLIB_PATH",
        ],
    );
}

#[test]
fn gpu_providers_asked_for_by_name_fail_instead_of_falling_back() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"hello\n");
    for (device, name) in [
        ("cuda", "cuda:0"),
        ("cuda:1", "cuda:1"),
        ("tensorrt", "tensorrt:0"),
    ] {
        let err = embed_fails(
            &f.tiny_pkg,
            &input,
            &["--device", device],
            &["execution provider", name, "unavailable"],
        );
        assert!(err.contains("onnxruntime-gpu"), "{err}");
    }
    embed_fails(
        &f.tiny_pkg,
        &input,
        &["--device", "gpu"],
        &["--device", "not one of"],
    );
}

#[test]
fn auto_device_falls_back_to_the_cpu_and_says_so() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"hello\n");
    let out = dir.path().join("out.npy");
    let o = run(&[
        "embed",
        "--model",
        f.tiny_pkg.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("device cpu (auto), variant int8"), "{err}");
    assert!(
        err.contains("passed over") && err.contains("cuda:0"),
        "{err}"
    );
    assert_eq!(read_npy(&out).len(), 1);
}

#[test]
fn info_reports_cpu_and_the_gpu_providers_truthfully() {
    let Some(f) = fixtures() else { return };
    let text = ok(run(&["info", "--model", f.tiny_pkg.to_str().unwrap()]));
    assert!(text.contains("cpu: available"), "{text}");
    assert!(
        text.contains("variant fp32")
            && text.contains("variant int8")
            && text.contains("variant fp16"),
        "{text}"
    );
    // This machine's wheel is the CPU build of onnxruntime and there is no NVIDIA driver.
    assert!(
        text.contains("cuda: unavailable") && text.contains("tensorrt: unavailable"),
        "{text}"
    );
}

/// An empty input file is read like an empty shard: an output of no rows, no error.
#[test]
fn empty_input_file() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [("empty.txt", &b""[..]), ("blank.jsonl", &b"\n \n"[..])] {
        let input = write(dir.path(), name, bytes);
        let out = dir.path().join(format!("{name}.npy"));
        ok(embed(&f.tiny_pkg, &input, &out, &[]));
        assert!(read_npy(&out).is_empty(), "{name}");
        let out = dir.path().join(format!("{name}.out.jsonl"));
        ok(embed(&f.tiny_pkg, &input, &out, &[]));
        assert_eq!(std::fs::read(&out).unwrap(), b"", "{name}");
    }
}

#[test]
fn empty_strings_are_embedded_not_refused() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"\n\nword\n");
    let out = dir.path().join("out.npy");
    ok(embed(&f.tiny_pkg, &input, &out, &[]));
    let rows = read_npy(&out);
    assert_eq!(rows.len(), 3);
    assert!(
        cosine(&rows[0], &rows[1]) > 0.999999,
        "two empty texts differ"
    );
    assert!(rows.iter().all(|r| r.iter().all(|x| x.is_finite())));
}

#[test]
fn invalid_utf8_names_the_line() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "bad.txt",
        b"fine\nalso fine\nbroken \xff\xfe here\n",
    );
    embed_fails(
        &f.tiny_pkg,
        &input,
        &[],
        &["bad.txt, line 3", "invalid UTF-8"],
    );
}

#[test]
fn malformed_json_line_and_missing_field() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "in.jsonl",
        b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": oops}\n",
    );
    embed_fails(
        &f.tiny_pkg,
        &input,
        &[],
        &["in.jsonl, line 3", "malformed JSON"],
    );
    let input = write(
        dir.path(),
        "f.jsonl",
        b"{\"text\": \"a\"}\n{\"body\": \"b\"}\n",
    );
    embed_fails(
        &f.tiny_pkg,
        &input,
        &[],
        &["f.jsonl, line 2", "no field \"text\""],
    );
    let input = write(dir.path(), "g.jsonl", b"{\"body\": \"b\"}\n");
    let out = dir.path().join("g.npy");
    ok(embed(&f.tiny_pkg, &input, &out, &["--field", "body"]));
    assert_eq!(read_npy(&out).len(), 1);
}

#[test]
fn texts_far_over_the_max_length_are_truncated() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let long = "many words ".repeat(20_000);
    let input = write(
        dir.path(),
        "long.txt",
        format!("{long}\nshort\n").as_bytes(),
    );
    let ids = read_ids(&ok(run(&[
        "tokenize",
        "--model",
        f.tiny_pkg.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ])));
    assert_eq!(ids[0].len(), 512);
    assert_eq!(*ids[0].last().unwrap(), 2, "the </s> survives truncation");
    let out = dir.path().join("out.npy");
    ok(embed(&f.tiny_pkg, &input, &out, &[]));
    assert_eq!(read_npy(&out).len(), 2);
}

#[test]
fn examples_file_in_the_wrong_shape() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "q.txt", b"a question\n");
    let bad: [(&str, &[u8], &str); 5] = [
        ("num.json", b"42", "expected a JSON list"),
        ("strings.json", b"[\"a\", \"b\"]", "entry 1"),
        (
            "noresp.json",
            b"[{\"query\": \"q\"}]",
            "missing field `response`",
        ),
        (
            "typo.json",
            b"[{\"query\": \"q\", \"respons\": \"r\"}]",
            "unknown field `respons`",
        ),
        ("empty.json", b"[]", "holds no examples"),
    ];
    for (name, body, needle) in bad {
        let ex = write(dir.path(), name, body);
        embed_fails(
            &f.tiny_pkg,
            &input,
            &[
                "--queries",
                "--task",
                "t",
                "--examples",
                ex.to_str().unwrap(),
            ],
            &[name, needle],
        );
    }
    let ex = write(
        dir.path(),
        "noinstruct.json",
        b"[{\"query\": \"q\", \"response\": \"r\"}]",
    );
    embed_fails(
        &f.tiny_pkg,
        &input,
        &["--queries", "--examples", ex.to_str().unwrap()],
        &["example 1", "no task"],
    );
}

#[test]
fn bad_output_paths() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.txt", b"hello\n");
    let err = fails(embed(&f.tiny_pkg, &input, &dir.path().join("out.csv"), &[]));
    assert!(
        err.contains("out.csv") && err.contains(".npy or .jsonl"),
        "{err}"
    );
    let err = fails(embed(
        &f.tiny_pkg,
        &input,
        &dir.path().join("missing/out.npy"),
        &[],
    ));
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn a_failed_run_leaves_an_existing_output_untouched() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    std::fs::write(&out, b"previous results").unwrap();
    let input = write(dir.path(), "bad.jsonl", b"{\"text\": \"a\"}\nnot json\n");
    fails(embed(&f.tiny_pkg, &input, &out, &[]));
    assert_eq!(std::fs::read(&out).unwrap(), b"previous results");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "temporary files left behind"
    );
}

#[test]
fn task_without_queries_is_a_usage_error() {
    let Some(f) = fixtures() else { return };
    let o = run(&[
        "tokenize",
        "--model",
        f.tiny_pkg.to_str().unwrap(),
        "--input",
        "x.txt",
        "--task",
        "t",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--queries"), "{}", stderr(&o));
}

#[test]
fn stdin_input() {
    let Some(f) = fixtures() else { return };
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin())
        .args([
            "tokenize",
            "--model",
            f.tiny_pkg.to_str().unwrap(),
            "--input",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(read_ids(&ok(o)).len(), 2);
}

/// A Hugging Face cache laid out as the hub client lays it out: refs/main names a snapshot whose
/// files link to blobs.
fn hub_cache(home: &Path, repo: &str, package: Option<&Path>) {
    let folder = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), commit).unwrap();
    let snapshot = folder.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    let Some(package) = package else {
        std::fs::write(snapshot.join("config.json"), b"{}").unwrap();
        return;
    };
    let blobs = folder.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    for file in [
        "embedder.json",
        "tokenizer.json",
        "fp32/model.onnx",
        "fp32/model.onnx.data",
    ] {
        let blob = blobs.join(file.replace('/', "_"));
        std::fs::copy(package.join(file), &blob).unwrap();
        let link = snapshot.join(file);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, &link).unwrap();
    }
}

#[test]
fn a_hub_repo_id_works_offline_from_the_cache_and_says_when_there_is_no_package() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    hub_cache(&home, "icl-test/tiny", Some(&f.tiny_pkg));
    hub_cache(&home, "icl-test/plain-model", None);
    let input = write(dir.path(), "in.txt", b"hello\nworld\n");
    let run_env = |model: &str, out: &Path| {
        std::process::Command::new(bin())
            .args([
                "embed",
                "--model",
                model,
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args(["--device", "cpu", "--variant", "fp32", "-q"])
            .env("HF_HOME", &home)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let from_hub = dir.path().join("hub.npy");
    ok(run_env("icl-test/tiny", &from_hub));
    let from_dir = dir.path().join("dir.npy");
    ok(embed(&f.tiny_pkg, &input, &from_dir, &[]));
    assert_eq!(
        std::fs::read(&from_hub).unwrap(),
        std::fs::read(&from_dir).unwrap()
    );
    let err = fails(run_env("icl-test/plain-model", &dir.path().join("x.npy")));
    assert!(
        err.contains("icl-test/plain-model") && err.contains("holds no icl-embed package"),
        "{err}"
    );
    let err = fails(run_env("icl-test/absent", &dir.path().join("y.npy")));
    assert!(
        err.contains("icl-test/absent") && err.contains("not in the Hugging Face cache"),
        "{err}"
    );
    // The cached snapshot has no int8 files: asking for them offline names what is missing.
    let o = std::process::Command::new(bin())
        .args([
            "embed",
            "--model",
            "icl-test/tiny",
            "--input",
            input.to_str().unwrap(),
            "--output",
            dir.path().join("z.npy").to_str().unwrap(),
        ])
        .args(["--device", "cpu", "--variant", "int8"])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = fails(o);
    assert!(err.contains("int8/model.onnx"), "{err}");
}

/// Start-up does not read the weights once they were verified: a start compares each file's size
/// and time with its stamp. `icl-embed verify` hashes everything and names a damaged file; a start
/// after the file's time changed hashes it again and refuses it.
#[test]
fn verified_weights_are_not_hashed_at_start_and_verify_finds_damage() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let input = write(dir.path(), "in.txt", b"hello\n");
    let pkg = dir.path().join("pkg");
    copy_package(&f.tiny_pkg, &pkg);
    let with_cache = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .unwrap()
    };
    let embed_args_ = |out: &Path| {
        embed_args(
            &pkg,
            &input,
            out,
            &["--device", "cpu", "--variant", "fp32", "-q"],
        )
    };
    let args = embed_args_(&dir.path().join("a.npy"));
    ok(with_cache(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let report = ok(with_cache(&["verify", pkg.to_str().unwrap()]));
    assert!(
        report.contains("ok      fp32: fp32/model.onnx.data") && !report.contains("FAILED"),
        "{report}"
    );

    // Damage one byte in the middle of the weights, keeping the size and the time.
    let data = pkg.join("fp32/model.onnx.data");
    let mtime = std::fs::metadata(&data).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&data, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&data)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let args = embed_args_(&dir.path().join("b.npy"));
    ok(with_cache(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));

    let err = fails(with_cache(&["verify", pkg.to_str().unwrap()]));
    assert!(err.contains("1 of"), "{err}");
    let o = with_cache(&["verify", pkg.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        report.contains("FAILED  fp32: fp32/model.onnx.data")
            && report.contains("corrupted or incomplete"),
        "{report}"
    );
    // A new time: the next start hashes the file again and refuses it.
    std::fs::File::options()
        .write(true)
        .open(&data)
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    let args = embed_args_(&dir.path().join("c.npy"));
    let err = fails(with_cache(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(
        err.contains("fp32/model.onnx.data is corrupted or incomplete"),
        "{err}"
    );
}

/// The hub case of issue 12: a cached snapshot that fetched only int8 (the manifest lists every
/// variant) runs with the defaults, `--device auto --variant auto`, on this CPU machine.
#[test]
fn a_hub_snapshot_holding_only_int8_runs_with_auto() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf");
    let folder = home.join("hub").join("models--icl-test--int8");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), commit).unwrap();
    let snapshot = folder.join("snapshots").join(commit);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.tiny_pkg.join("embedder.json")).unwrap())
            .unwrap();
    assert!(
        manifest["variants"]["fp16"].is_object(),
        "the manifest lists fp16"
    );
    let mut files = vec!["embedder.json".to_string(), "tokenizer.json".to_string()];
    // Every file of the int8 variant (graph, data, start states): the keys of its sha256 map.
    let int8 = &manifest["variants"]["int8"];
    files.extend(int8["sha256"].as_object().unwrap().keys().cloned());
    assert!(files.len() >= 5, "{files:?}");
    for file in &files {
        let to = snapshot.join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f.tiny_pkg.join(file), to).unwrap();
    }
    let input = write(dir.path(), "in.txt", b"hello\nworld\n");
    let out = dir.path().join("out.npy");
    let o = std::process::Command::new(bin())
        .args(embed_args(Path::new("icl-test/int8"), &input, &out, &[]))
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("device cpu (auto), variant int8"), "{err}");
    assert_eq!(read_npy(&out).len(), 2);
}
