//! Shared helpers for the integration tests: the fixtures that `tests/fixtures.sh` builds (stand-in
//! packages and FlagEmbedding's outputs), running the real binary, and reading its outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Paths exported by `tests/fixtures.sh`.
pub struct Fixtures {
    pub tiny_pkg: PathBuf,
    pub tiny_legacy_pkg: PathBuf,
    pub smollm2_pkg: PathBuf,
    pub golden_tiny: PathBuf,
    pub golden_tiny_legacy: PathBuf,
    pub golden_smollm2: PathBuf,
    /// Issue 27's packages and their references' outputs (Qwen3-Embedding's and e5-mistral's
    /// stand-ins), optional until every fixtures script makes them: see [`Fixtures::qwen3_tiny`].
    pub qwen3_tiny_pkg: Option<PathBuf>,
    pub golden_qwen3_tiny: Option<PathBuf>,
    pub e5_tiny_pkg: Option<PathBuf>,
    pub golden_e5_tiny: Option<PathBuf>,
}

impl Fixtures {
    /// The Qwen3-Embedding stand-in and its golden dir (sentence-transformers' outputs).
    pub fn qwen3_tiny(&self) -> Option<(PathBuf, PathBuf)> {
        optional_pair(
            (&self.qwen3_tiny_pkg, &self.golden_qwen3_tiny),
            "ICL_QWEN3_TINY_PKG and ICL_GOLDEN_QWEN3_TINY",
        )
    }

    /// The e5-mistral stand-in and its golden dir (the model card's transformers code).
    pub fn e5_tiny(&self) -> Option<(PathBuf, PathBuf)> {
        optional_pair(
            (&self.e5_tiny_pkg, &self.golden_e5_tiny),
            "ICL_E5_TINY_PKG and ICL_GOLDEN_E5_TINY",
        )
    }
}

/// A package and its golden dir when both variables are set; else `None` with a printed reason,
/// or a failure under `ICL_REQUIRE_FIXTURES=1`.
fn optional_pair(
    (pkg, golden): (&Option<PathBuf>, &Option<PathBuf>),
    vars: &str,
) -> Option<(PathBuf, PathBuf)> {
    match (pkg, golden) {
        (Some(p), Some(g)) => Some((p.clone(), g.clone())),
        _ if std::env::var_os("ICL_REQUIRE_FIXTURES").is_some() => {
            panic!("ICL_REQUIRE_FIXTURES is set but {vars} are missing (run tests/fixtures.sh)")
        }
        _ => {
            eprintln!("skipped: {vars} are not set (tests/fixtures.sh makes them)");
            None
        }
    }
}

/// The fixtures, or `None` with a printed reason when `tests/run.sh` did not prepare them (plain
/// `cargo test`). Under `ICL_REQUIRE_FIXTURES=1` (tests/run.sh, CI) their absence is a failure.
pub fn fixtures() -> Option<Fixtures> {
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let all = (|| {
        Some(Fixtures {
            tiny_pkg: var("ICL_TINY_PKG")?,
            tiny_legacy_pkg: var("ICL_TINY_LEGACY_PKG")?,
            smollm2_pkg: var("ICL_SMOLLM2_PKG")?,
            golden_tiny: var("ICL_GOLDEN_TINY")?,
            golden_tiny_legacy: var("ICL_GOLDEN_TINY_LEGACY")?,
            golden_smollm2: var("ICL_GOLDEN_SMOLLM2")?,
            qwen3_tiny_pkg: var("ICL_QWEN3_TINY_PKG"),
            golden_qwen3_tiny: var("ICL_GOLDEN_QWEN3_TINY"),
            e5_tiny_pkg: var("ICL_E5_TINY_PKG"),
            golden_e5_tiny: var("ICL_GOLDEN_E5_TINY"),
        })
    })();
    if all.is_none() {
        if std::env::var_os("ICL_REQUIRE_FIXTURES").is_some() {
            panic!("ICL_REQUIRE_FIXTURES is set but the fixture variables are missing (run tests/run.sh)");
        }
        eprintln!("skipped: fixtures not prepared; run `bash tests/run.sh` (it builds the stand-in packages and reference outputs)");
    }
    all
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_icl-embed")
}

/// Runs the binary with `args`.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("cannot start icl-embed")
}

/// `embed --model PKG --input INPUT --output OUTPUT` followed by `extra`.
pub fn embed_args(pkg: &Path, input: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "embed".into(),
        "--model".into(),
        pkg.display().to_string(),
        "--input".into(),
        input.display().to_string(),
        "--output".into(),
        output.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "icl-embed failed: {}", stderr(&o));
    String::from_utf8(o.stdout).expect("stdout is UTF-8")
}

/// Asserts a clean failure (exit 2, an `error:` line, no panic) and returns stderr.
pub fn fails(o: Output) -> String {
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2, got {:?}; stderr: {err}",
        o.status.code()
    );
    assert!(
        err.starts_with("error:") || err.contains("\nerror:") || err.contains("error:"),
        "no error line: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

/// A float32 2-D `.npy` file as rows.
pub fn read_npy(path: &Path) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{} is not .npy", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let dims: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(
        data.len(),
        dims[0] * dims[1],
        "{}: data does not match shape",
        path.display()
    );
    data.chunks(dims[1]).map(<[f32]>::to_vec).collect()
}

/// Rows of a JSON-lines embedding output (`{"index": i, ..., "embedding": [...]}`), checking that
/// the indices count up from 0; each row with its whole JSON object.
pub fn read_jsonl_embeddings(path: &Path) -> Vec<(serde_json::Value, Vec<f32>)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(
                v["index"].as_u64(),
                Some(i as u64),
                "{}: row {i}",
                path.display()
            );
            let e = v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (v, e)
        })
        .collect()
}

/// `{"index": i, "ids": [...]}` lines.
/// The final ids `icl-embed tokenize` prints for `input` with the package `pkg` and `extra` options.
pub fn tokenize_ids(pkg: &Path, input: &Path, extra: &[&str]) -> Vec<Vec<u32>> {
    let mut args = vec![
        "tokenize".to_string(),
        "--model".into(),
        pkg.display().to_string(),
        "--input".into(),
        input.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    read_ids(&ok(run(&args)))
}

pub fn read_ids(text: &str) -> Vec<Vec<u32>> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["index"].as_u64(), Some(i as u64));
            v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Rows of vectors: a `.npy` read back, or the library's `Array2`.
pub trait Rows {
    fn to_rows(&self) -> Vec<Vec<f32>>;
}

impl Rows for Vec<Vec<f32>> {
    fn to_rows(&self) -> Vec<Vec<f32>> {
        self.clone()
    }
}

impl Rows for ndarray::Array2<f32> {
    fn to_rows(&self) -> Vec<Vec<f32>> {
        self.rows().into_iter().map(|r| r.to_vec()).collect()
    }
}

/// Row-wise cosines of two equally long lists; panics on a length mismatch.
pub fn cosines(a: &impl Rows, b: &impl Rows) -> Vec<f64> {
    let (a, b) = (a.to_rows(), b.to_rows());
    assert_eq!(a.len(), b.len(), "different row counts");
    a.iter().zip(&b).map(|(x, y)| cosine(x, y)).collect()
}

pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// One entry of the parity set's `cases.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Case {
    pub name: String,
    pub input: String,
    pub queries: bool,
    pub task: Option<String>,
    pub examples: Option<String>,
    pub max_length: Option<usize>,
    pub count: usize,
}

pub fn cases(golden: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(golden.join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The text arguments (`--model ... --input ... [--queries ...]`) of a case.
pub fn case_args(pkg: &Path, golden: &Path, case: &Case) -> Vec<String> {
    let mut args = vec![
        "--model".into(),
        pkg.display().to_string(),
        "--input".into(),
        golden.join(&case.input).display().to_string(),
    ];
    if case.queries {
        args.push("--queries".into());
    }
    if let Some(task) = &case.task {
        args.extend(["--task".into(), task.clone()]);
    }
    if let Some(ex) = &case.examples {
        args.extend(["--examples".into(), golden.join(ex).display().to_string()]);
    }
    if let Some(n) = case.max_length {
        args.extend(["--max-length".into(), n.to_string()]);
    }
    args
}

/// The instruction template, default task and shortest shortened vectors of [`instruct_package`].
pub const INSTRUCT_TEMPLATE: &str = "Instruct: {task}\nQuery: {query}";
pub const INSTRUCT_DEFAULT_TASK: &str =
    "Given a web search query, retrieve relevant passages that answer the query";
pub const INSTRUCT_MIN_DIMENSIONS: usize = 8;

/// `pkg` as a format 2 package with the `instruct` prompt procedure (issue 27): a directory in
/// `dir` whose files link to `pkg`'s, and whose manifest is `pkg`'s with the prompt
/// [`INSTRUCT_TEMPLATE`], the default task [`INSTRUCT_DEFAULT_TASK`] and shortened vectors from
/// [`INSTRUCT_MIN_DIMENSIONS`]. The manifest is not among the hashed files, and the tokenizer and
/// graphs are `pkg`'s own, so their sha256 still match.
pub fn instruct_package(pkg: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("instruct-pkg");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(pkg).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "embedder.json" {
            std::os::unix::fs::symlink(entry.path(), out.join(entry.file_name())).unwrap();
        }
    }
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pkg.join("embedder.json")).unwrap()).unwrap();
    manifest["format"] = "icl-embed/2".into();
    manifest["source"]["family"] = "e5-mistral".into();
    manifest["prompt"] = serde_json::json!({
        "procedure": "instruct",
        "query": INSTRUCT_TEMPLATE,
        "default_task": INSTRUCT_DEFAULT_TASK,
    });
    manifest["dimensions"] = serde_json::json!({"min": INSTRUCT_MIN_DIMENSIONS});
    std::fs::write(out.join("embedder.json"), manifest.to_string()).unwrap();
    out
}

/// Runs `embed` for a case and returns the rows.
pub fn embed_case(
    pkg: &Path,
    golden: &Path,
    case: &Case,
    extra: &[&str],
    out_dir: &Path,
) -> Vec<Vec<f32>> {
    let out = out_dir.join(format!("{}.npy", case.name));
    let mut args = vec!["embed".to_string()];
    args.extend(case_args(pkg, golden, case));
    args.extend([
        "--output".into(),
        out.display().to_string(),
        "--quiet".into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    ok(run(&args));
    read_npy(&out)
}

// --- the shared data and the library, for the prefix-cache and int8 quality tests ---------------

use icl_embed::{Device, Embedder, EmbedderOptions, Example};
use std::collections::BTreeMap;

/// A CPU embedder with 2 threads.
pub fn embedder(pkg: &Path, variant: &str, prefix_cache: bool) -> Embedder {
    let options = EmbedderOptions::default()
        .variant(variant.parse().unwrap())
        .device(Device::Cpu)
        .threads(Some(2))
        .prefix_cache(prefix_cache);
    Embedder::new(pkg, &options).unwrap()
}

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/flagembedding-icl-examples")
}

/// A task: its instruction, its first three examples (the prefix; SummEval, STS22 and
/// MindSmallReranking have fewer) and the queries to embed: its example queries, those not in the
/// prefix first.
pub struct Task {
    pub name: String,
    pub instruction: String,
    pub prefix: Vec<Example>,
    pub queries: Vec<String>,
}

/// Every MTEB task file of tests/data/flagembedding-icl-examples.
pub fn mteb_tasks() -> Vec<Task> {
    let table: BTreeMap<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mteb_instructions.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir().join("MTEB"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 50,
        "expected the MTEB example sets, found {}",
        files.len()
    );
    files
        .iter()
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let task = table
                .get(&name)
                .and_then(|v| v.as_str())
                .unwrap_or_else(|| {
                    panic!("no instruction for {name} in tests/data/mteb_instructions.json")
                })
                .to_string();
            let examples = icl_embed::read_examples(path).unwrap();
            assert!(!examples.is_empty(), "{name}: no examples");
            let queries = examples.iter().rev().map(|e| e.query.clone()).collect();
            Task {
                name,
                instruction: task,
                prefix: examples.into_iter().take(3).collect(),
                queries,
            }
        })
        .collect()
}

pub fn min_cosine(a: &impl Rows, b: &impl Rows) -> f64 {
    min(&cosines(a, b))
}
