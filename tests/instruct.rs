//! The `instruct` prompt procedure, the default task and shortened vectors of format 2 packages
//! (issue 27), through the real binary and the library, on the tiny stand-in rewritten as such a
//! package ([`instruct_package`]: e5-mistral's template, a default task, `dimensions` from 8). The
//! real Qwen3-Embedding and e5-mistral stand-ins are checked against their references in
//! tests/parity.rs.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;

const TASK: &str = "Given a claim, find documents that refute the claim";
const QUERIES: [&str; 4] = [
    "what is the capital of France?",
    "how do vaccines work",
    "Query: a query that repeats the template's words",
    "1990s films about space",
];

/// The tiny stand-in (format 1) and its instruct rewrite, in a temporary directory.
struct Packages {
    _dir: tempfile::TempDir,
    tiny: PathBuf,
    instruct: PathBuf,
}

fn packages() -> Option<Packages> {
    let f = fixtures()?;
    let dir = tempfile::tempdir().unwrap();
    let instruct = instruct_package(&f.tiny_pkg, dir.path());
    Some(Packages {
        tiny: f.tiny_pkg,
        instruct,
        _dir: dir,
    })
}

fn hidden(pkg: &Path) -> usize {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pkg.join("embedder.json")).unwrap()).unwrap();
    m["architecture"]["hidden"].as_u64().unwrap() as usize
}

/// `texts` as a JSON-lines input file (the template's newline stays inside one record).
fn jsonl(dir: &Path, name: &str, texts: &[String]) -> PathBuf {
    let path = dir.join(name);
    let lines: Vec<String> = texts
        .iter()
        .map(|t| json!({"text": t}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn queries_file(dir: &Path) -> PathBuf {
    let texts: Vec<String> = QUERIES.iter().map(|q| q.to_string()).collect();
    jsonl(dir, "queries.jsonl", &texts)
}

#[test]
fn a_query_is_one_encoding_of_the_filled_template_with_special_tokens() {
    let Some(p) = packages() else { return };
    let dir = tempfile::tempdir().unwrap();
    let queries = tokenize_ids(
        &p.instruct,
        &queries_file(dir.path()),
        &["--queries", "--task", TASK],
    );
    // The filled template embedded as a document: prepend + its ids + append, one encoding.
    let filled: Vec<String> = QUERIES
        .iter()
        .map(|q| format!("Instruct: {TASK}\nQuery: {q}"))
        .collect();
    let documents = tokenize_ids(
        &p.instruct,
        &jsonl(dir.path(), "filled.jsonl", &filled),
        &[],
    );
    assert_eq!(queries, documents);
    let encoder = icl_embed::Encoder::open(&p.instruct).unwrap();
    let mut want = vec![1];
    want.extend(encoder.tokenizer().encode_plain(&filled[0]).unwrap());
    want.push(2);
    assert_eq!(queries[0], want);
}

#[test]
fn queries_without_a_task_take_the_default_task() {
    let Some(p) = packages() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = queries_file(dir.path());
    let default = tokenize_ids(&p.instruct, &input, &["--queries"]);
    let given = tokenize_ids(
        &p.instruct,
        &input,
        &["--queries", "--task", INSTRUCT_DEFAULT_TASK],
    );
    assert_eq!(default, given);
    let other = tokenize_ids(&p.instruct, &input, &["--queries", "--task", TASK]);
    assert_ne!(default, other);
}

#[test]
fn a_long_query_is_cut_to_max_length_keeping_the_end_token() {
    let Some(p) = packages() else { return };
    let dir = tempfile::tempdir().unwrap();
    let long = vec!["word ".repeat(400)];
    let input = jsonl(dir.path(), "long.jsonl", &long);
    let ids = tokenize_ids(&p.instruct, &input, &["--queries", "--max-length", "40"]);
    assert_eq!(ids[0].len(), 40);
    assert_eq!((ids[0][0], ids[0][39]), (1, 2), "{:?}", ids[0]);
    let full = tokenize_ids(&p.instruct, &input, &["--queries", "--max-length", "4000"]);
    assert_eq!(ids[0][..39], full[0][..39]);
}

#[test]
fn few_shot_examples_are_refused_with_a_clear_message() {
    let Some(p) = packages() else { return };
    let dir = tempfile::tempdir().unwrap();
    let examples = dir.path().join("examples.json");
    std::fs::write(&examples, r#"[{"query": "q", "response": "r"}]"#).unwrap();
    let input = queries_file(dir.path());
    for command in ["tokenize", "embed"] {
        let mut args = vec![
            command.to_string(),
            "--model".into(),
            p.instruct.display().to_string(),
            "--input".into(),
            input.display().to_string(),
            "--queries".into(),
            "--examples".into(),
            examples.display().to_string(),
        ];
        if command == "embed" {
            args.extend([
                "--output".into(),
                dir.path().join("o.npy").display().to_string(),
            ]);
        }
        let err = fails(run(&args));
        assert!(
            err.contains("prompt procedure `instruct` takes no few-shot examples"),
            "{command}: {err}"
        );
    }
}

fn embed(pkg: &Path, input: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = embed_args(pkg, input, out, &["--variant", "fp32", "--device", "cpu"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = run(&args);
    let err = stderr(&o);
    ok(o);
    err
}

/// The first `n` components of each row, renormalised.
fn first(rows: &[Vec<f32>], n: usize) -> Vec<Vec<f32>> {
    rows.iter()
        .map(|r| {
            let norm = r[..n].iter().map(|x| x * x).sum::<f32>().sqrt();
            r[..n].iter().map(|x| x / norm).collect()
        })
        .collect()
}

#[test]
fn dimensions_give_the_first_components_renormalised() {
    let Some(p) = packages() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = queries_file(dir.path());
    let full_out = dir.path().join("full.npy");
    embed(&p.instruct, &input, &full_out, &["--queries"]);
    let full = read_npy(&full_out);
    assert_eq!(full[0].len(), hidden(&p.instruct));
    for n in [INSTRUCT_MIN_DIMENSIONS, 16, hidden(&p.instruct)] {
        let out = dir.path().join(format!("short-{n}.npy"));
        embed(
            &p.instruct,
            &input,
            &out,
            &["--queries", "--dimensions", &n.to_string()],
        );
        let short = read_npy(&out);
        assert!(short.iter().all(|r| r.len() == n), "{n} columns");
        let m = min(&cosines(&short, &first(&full, n)));
        assert!(m >= 0.99999, "--dimensions {n}: min cosine {m}");
        for r in &short {
            let norm: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "unit length: {norm}");
        }
    }
    let out = dir.path().join("short.jsonl");
    embed(&p.instruct, &input, &out, &["--dimensions", "8"]);
    let rows = read_jsonl_embeddings(&out);
    assert!(rows.iter().all(|(_, e)| e.len() == 8));
}

#[test]
fn dimensions_outside_the_package_range_are_refused_naming_the_option() {
    let Some(p) = packages() else { return };
    let dir = tempfile::tempdir().unwrap();
    let input = queries_file(dir.path());
    let out = dir.path().join("o.npy");
    let err = fails(run(&embed_args(
        &p.tiny,
        &input,
        &out,
        &["--dimensions", "8"],
    )));
    assert!(
        err.contains("--dimensions: not supported: the model is not trained for shortened vectors"),
        "{err}"
    );
    let h = hidden(&p.instruct);
    for n in [INSTRUCT_MIN_DIMENSIONS - 1, h + 1] {
        let err = fails(run(&embed_args(
            &p.instruct,
            &input,
            &out,
            &["--dimensions", &n.to_string()],
        )));
        let range = format!("{INSTRUCT_MIN_DIMENSIONS}..={h}");
        assert!(
            err.contains("--dimensions: ") && err.contains(&range),
            "{n}: {err}"
        );
    }
    assert!(!out.exists());
}

#[test]
fn info_shows_the_procedure_default_task_and_dimensions() {
    let Some(p) = packages() else { return };
    let text = ok(run(&["info", "--model", &p.instruct.display().to_string()]));
    assert!(
        text.contains("format: icl-embed/2, family e5-mistral"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "prompt: procedure instruct, default task {INSTRUCT_DEFAULT_TASK:?}"
        )),
        "{text}"
    );
    let range = format!(
        "--dimensions {INSTRUCT_MIN_DIMENSIONS}..={}",
        hidden(&p.instruct)
    );
    assert!(text.contains(&range), "{text}");
    let text = ok(run(&["info", "--model", &p.tiny.display().to_string()]));
    assert!(
        text.contains("prompt: procedure flagembedding-icl, no default task"),
        "{text}"
    );
    assert!(text.contains("shortened vectors: none"), "{text}");
}

#[test]
fn the_instruction_prefix_is_cached_and_changes_no_vector() {
    let Some(p) = packages() else { return };
    let mut cached = embedder(&p.instruct, "fp32", true);
    let mut full = embedder(&p.instruct, "fp32", false);
    for task in [None, Some(TASK)] {
        let prompt = cached.query_prompt(task, &[]).unwrap();
        let prefix = prompt.shared_prefix().expect("the instruction is shared");
        let ids = cached.encoder().queries(&prompt, &QUERIES).unwrap();
        assert!(ids.iter().all(|r| r.starts_with(prefix)));
        let a = cached.embed_queries(&prompt, &QUERIES).unwrap();
        let b = full.embed_queries(&prompt, &QUERIES).unwrap();
        let m = min_cosine(&a, &b);
        assert!(m >= 0.99999, "{task:?}: cached vs full min cosine {m}");
    }
    let stats = cached.prefix_stats();
    assert_eq!(
        (stats.prefixes, stats.cached),
        (2, 2 * QUERIES.len()),
        "{stats:?}"
    );
    assert_eq!(stats.fallback, 0, "{stats:?}");
    // The command line reports it.
    let dir = tempfile::tempdir().unwrap();
    let err = embed(
        &p.instruct,
        &queries_file(dir.path()),
        &dir.path().join("q.npy"),
        &["--queries"],
    );
    assert!(
        err.contains(&format!(
            "prefix cache: {}-token prefix computed 1 time(s)",
            {
                let prompt = cached.query_prompt(None, &[]).unwrap();
                prompt.shared_prefix().unwrap().len()
            }
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{} queries on top of it, 0 computed in full",
            QUERIES.len()
        )),
        "{err}"
    );
}

#[test]
fn the_library_shortens_vectors_when_asked() {
    let Some(p) = packages() else { return };
    let options = icl_embed::EmbedderOptions::default()
        .variant(icl_embed::Variant::Fp32)
        .threads(Some(2))
        .dimensions(Some(INSTRUCT_MIN_DIMENSIONS));
    let mut short = icl_embed::Embedder::new(&p.instruct, &options).unwrap();
    assert_eq!(short.width(), INSTRUCT_MIN_DIMENSIONS);
    let mut whole = embedder(&p.instruct, "fp32", true);
    let docs = [
        "Paris is the capital of France.",
        "Vaccines train the immune system.",
    ];
    let a = short.embed_documents(&docs).unwrap();
    let b = whole.embed_documents(&docs).unwrap();
    assert_eq!(a.ncols(), INSTRUCT_MIN_DIMENSIONS);
    let m = min_cosine(&a, &icl_embed::shorten(&b, INSTRUCT_MIN_DIMENSIONS));
    assert!(m >= 0.99999, "{m}");
    let err = icl_embed::Embedder::new(&p.tiny, &options)
        .err()
        .expect("refused");
    assert!(
        err.to_string().starts_with("dimensions: not supported"),
        "{err}"
    );
}
