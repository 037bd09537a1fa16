//! The int8 variant's fidelity (issues 4 and 13): on `smollm2` (real weights), its embeddings against the
//! fp32 variant's over every text of tests/data: all passages (MTEB example responses, AIR-Bench
//! `pos` fields, long documents truncated at 512 tokens) and all queries with a few-shot prefix (each
//! MTEB task's example queries under its instruction and its first three examples; the AIR-Bench
//! queries under MSMARCO's). Goal: min cosine >= 0.99, mean >= 0.999.
//!
//! smollm2's tokenizer adds no BOS, so a one-word passage is two tokens (the word, then
//! `<|im_end|>`), the word taking the attention-sink role with huge activations: the hardest inputs
//! for any 8-bit recipe (the weight-only int8 gives 0.967 on "calendar"; per-token w8a8 with 64
//! outlier channels -0.397 on one of them). The 33 one- and two-token passages are reported apart
//! but held to the same 0.99 floor; no input here pools position 0 (every passage ends with
//! `<|im_end|>`).
//!
//! The fixture's smollm2 int8 is what the exporter chooses for it (tests/fixtures.sh passes no
//! `--int8-recipes`): the fastest recipe that meets min 0.99 / mean 0.999 on its calibration texts,
//! which include 35 one- and two-word texts (export/int8/calibrate.py).

mod common;

use common::*;

fn load_jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn int8_matches_fp32_on_every_shared_text_smollm2() {
    let Some(f) = fixtures() else { return };
    let tasks = mteb_tasks();
    let mut passages: Vec<String> = Vec::new();
    for path in std::fs::read_dir(data_dir().join("MTEB")).unwrap() {
        let path = path.unwrap().path();
        passages.extend(
            icl_embed::read_examples(&path)
                .unwrap()
                .into_iter()
                .map(|e| e.response),
        );
    }
    let mut air_queries: Vec<String> = Vec::new();
    for dir in ["qa", "long-doc"] {
        let mut files: Vec<_> = std::fs::read_dir(data_dir().join("AIR-Bench").join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for path in files {
            for row in load_jsonl(&path) {
                passages.push(row["pos"].as_str().unwrap().to_string());
                air_queries.push(row["query"].as_str().unwrap().to_string());
            }
        }
    }
    passages.sort();
    let msmarco = tasks
        .iter()
        .find(|t| t.name == "MSMARCO")
        .expect("MSMARCO examples");

    let mut all: Vec<f64> = Vec::new();
    let mut fp32 = embedder(&f.smollm2_pkg, "fp32", true);
    let mut int8 = embedder(&f.smollm2_pkg, "int8", true);
    let texts: Vec<&str> = passages.iter().map(String::as_str).collect();
    let lengths: Vec<usize> = fp32
        .encoder()
        .documents(&texts, None)
        .unwrap()
        .iter()
        .map(Vec::len)
        .collect();
    let passage_cos = cosines(
        &fp32.embed_documents(&texts).unwrap(),
        &int8.embed_documents(&texts).unwrap(),
    );
    let tiny: Vec<f64> = passage_cos
        .iter()
        .zip(&lengths)
        .filter(|(_, &n)| n <= 2)
        .map(|(c, _)| *c)
        .collect();
    let mut longer: Vec<f64> = passage_cos
        .iter()
        .zip(&lengths)
        .filter(|(_, &n)| n > 2)
        .map(|(c, _)| *c)
        .collect();
    all.extend(&passage_cos);
    let mut query_count = 0;
    let mut groups: Vec<(&str, &[icl_embed::Example], Vec<&str>)> = tasks
        .iter()
        .map(|t| {
            (
                t.instruction.as_str(),
                &t.prefix[..],
                t.queries.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    groups.push((
        &msmarco.instruction,
        &msmarco.prefix[..],
        air_queries.iter().map(String::as_str).collect(),
    ));
    for (task, prefix, queries) in groups {
        let prompt = fp32.query_prompt(Some(task), prefix).unwrap();
        let a = fp32.embed_queries(&prompt, &queries).unwrap();
        let b = int8.embed_queries(&prompt, &queries).unwrap();
        let c = cosines(&a, &b);
        longer.extend(&c);
        all.extend(c);
        query_count += queries.len();
    }
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let (worst, worst_longer, worst_tiny) = (min(&all), min(&longer), min(&tiny));
    eprintln!(
        "smollm2 int8 vs fp32: {} passages, {query_count} few-shot queries; min cosine {worst:.5}, mean {mean:.6}; \
         over the {} inputs of more than 2 tokens min {worst_longer:.5}; the {} of 1-2 tokens min {worst_tiny:.5}",
        passages.len(),
        longer.len(),
        tiny.len()
    );
    assert!(
        passages.len() >= 250 && query_count >= 250,
        "the whole shared set"
    );
    assert!(
        tiny.len() <= 40,
        "{} passages of at most two tokens",
        tiny.len()
    );
    assert!(
        lengths.iter().all(|&n| n >= 2),
        "a passage pooled at position 0"
    );
    assert!(mean >= 0.999, "mean cosine {mean:.6} < 0.999");
    assert!(
        worst_longer >= 0.99,
        "min cosine {worst_longer:.5} < 0.99 over inputs of more than two tokens"
    );
    assert!(
        worst_tiny >= 0.99,
        "min cosine {worst_tiny:.5} < 0.99 on one- and two-token inputs"
    );
}
