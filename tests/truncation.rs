//! Issue 24: long texts are cut before tokenizing (src/text/cut.rs). The ids must equal those of
//! tokenizing the whole text and truncating afterwards, the reference's way, for documents and
//! queries, on both SentencePiece layouts of the tiny stand-in and smollm2's byte-level BPE, on real
//! long text and on texts built to defeat the cut: no whitespace, one huge word, many spaces,
//! unicode and byte fallback, special tokens and words straddling the first cut.

mod common;

use common::*;
use icl_embed::{Encoder, Example};
use std::path::Path;

/// Every passage and query of the AIR-Bench long-doc examples and the MTEB example sets, joined
/// with blank lines: a few hundred KB of real text.
fn real_text() -> String {
    let mut parts = Vec::new();
    let dir = data_dir().join("AIR-Bench/long-doc");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for key in ["query", "pos"] {
                if let Some(s) = v[key].as_str() {
                    parts.push(s.to_string());
                }
            }
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(data_dir().join("MTEB"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for f in files {
        for e in icl_embed::read_examples(&f).unwrap() {
            parts.push(e.query);
            parts.push(e.response);
        }
    }
    parts.join("\n\n")
}

/// (name, text) pairs, each tens to hundreds of KB.
fn texts() -> Vec<(String, String)> {
    let real = real_text();
    assert!(
        real.len() > 100_000,
        "only {} bytes of real text",
        real.len()
    );
    let head: String = real.chars().take(50_000).collect();
    let mut out = vec![
        ("real".to_string(), real.clone()),
        (
            "no whitespace".into(),
            real.chars().filter(|c| !c.is_whitespace()).take(80_000).collect(),
        ),
        (
            "one huge word first".into(),
            format!("{}{}", "abcdefghij".repeat(5_000), head),
        ),
        (
            "words then a huge word".into(),
            format!("{}{}", &head[..2000], "xyz".repeat(30_000)),
        ),
        (
            "many spaces".into(),
            head.split(' ')
                .enumerate()
                .map(|(i, w)| format!("{w}{}", " ".repeat(i % 7)))
                .collect(),
        ),
        (
            "whitespace runs".into(),
            head.replace(' ', " \t ").replace("\n", "\n\n\r\n   "),
        ),
        (
            "unicode".into(),
            "Größe naïve café — 東京は日本の首都です。 😀👍🏽 ∑x² ▁lit▁eral▁ \u{00a0}nbsp\u{2003}em 一二三四五六七八九十 "
                .repeat(1_500),
        ),
        (
            "code without spaces".into(),
            "https://example.com/a_b/c?d=e&f=g;x.y(z[0]){'s':'t'}it's'll're've'd'm\"q\"<a>b</a>"
                .repeat(1_200),
        ),
        ("digits".into(), "12345 678.90 3.14159e10 0x1F ".repeat(4_000)),
        (
            "special tokens".into(),
            head.replace(". ", ". <s> <instruct></s>x<query> <|im_end|> "),
        ),
        (
            "cjk without spaces".into(),
            "東京は日本の首都です。人口は約千四百万人で、世界最大級の都市圏を形成している。".repeat(2_000),
        ),
    ];
    // Long words and space runs placed across the points where the first cut falls (4096 bytes,
    // and 8 bytes per kept token for the lengths tested).
    for at in [4096usize, 8192, 1998 * 8] {
        for shift in [0usize, 1, 2, 3, 5] {
            let mut t = head.clone();
            let mut pos = (at + shift).saturating_sub(8).min(t.len());
            while !t.is_char_boundary(pos) {
                pos -= 1;
            }
            let insert = if shift % 2 == 0 {
                "Pneumonoultramicroscopicsilicovolcanoconiosis".to_string()
            } else {
                format!("x{}y", " ".repeat(shift))
            };
            t.insert_str(pos, &insert);
            out.push((format!("straddle {at}+{shift}"), t));
        }
    }
    out
}

/// Kept-token counts: tiny ones, the usual 512, and counts whose first piece is too short, so the
/// piece grows.
const MAX_LENGTHS: [usize; 7] = [8, 33, 200, 512, 700, 2000, 6000];

fn check_documents(pkg: &Path, texts: &[(String, String)]) {
    let encoder = Encoder::open(pkg).unwrap();
    let tok = encoder.tokenizer();
    for (name, text) in texts {
        let full = tok.encode_plain(text).unwrap();
        for max_length in MAX_LENGTHS {
            let want = tok.wrap(&full, max_length);
            let got = encoder
                .documents(&[text.as_str()], Some(max_length))
                .unwrap();
            assert_eq!(
                got[0],
                want,
                "{}: document {name:?}, max_length {max_length}",
                pkg.display()
            );
        }
        // Several texts at once, in one batch.
        let batch = encoder
            .documents(&[text.as_str(), "short", text.as_str()], Some(512))
            .unwrap();
        assert_eq!(batch[0], tok.wrap(&full, 512), "{name:?} in a batch");
        assert_eq!(batch[2], batch[0]);
    }
}

/// The reference procedure for queries from the ids of the whole query text (what the code did
/// before).
fn reference_query(encoder: &Encoder, prompt: &icl_embed::QueryPrompt, ids: &[u32]) -> Vec<u32> {
    let tok = encoder.tokenizer();
    let suffix = &encoder.package().manifest.prompt.suffix;
    let decoded = tok.decode(&ids[..ids.len().min(prompt.text_max)]).unwrap();
    let full = tok
        .encode_plain(&format!("{}{decoded}{suffix}", prompt.prefix))
        .unwrap();
    tok.wrap(&full, prompt.total_max)
}

fn check_queries(pkg: &Path, texts: &[(String, String)]) {
    let encoder = Encoder::open(pkg).unwrap();
    let template = &encoder.package().manifest.prompt;
    let examples = [
        Example::new("capital of Italy", "Rome is the capital of Italy."),
        Example::new("largest ocean", "The Pacific is the largest ocean."),
    ];
    let task = "Given a question, retrieve passages that answer it";
    for (with_task, with_examples) in [(true, true), (false, false)] {
        let task = with_task.then_some(task);
        let ex: &[Example] = if with_examples { &examples } else { &[] };
        let prompts: Vec<_> = [40usize, 512, 2000]
            .iter()
            .map(|&n| (n, encoder.query_prompt(task, ex, Some(n)).unwrap()))
            .collect();
        for (name, text) in texts {
            let ids = encoder
                .tokenizer()
                .encode_plain(&template.query_text(task, text))
                .unwrap();
            for (max_length, prompt) in &prompts {
                let got = encoder.queries(prompt, &[text.as_str()]).unwrap();
                assert_eq!(
                    got[0],
                    reference_query(&encoder, prompt, &ids),
                    "{}: query {name:?}, task {with_task}, examples {with_examples}, max_length {max_length}",
                    pkg.display()
                );
            }
        }
    }
}

/// The rule itself, without the slack of keeping fewer ids than a piece yields: at many cut points
/// of every text, the ids of the piece are exactly the leading ids of the whole text.
fn check_cuts(pkg: &Path, texts: &[(String, String)]) {
    let encoder = Encoder::open(pkg).unwrap();
    let tok = encoder.tokenizer();
    let mut cuts = 0;
    for (name, text) in texts {
        let full = tok.encode_plain(text).unwrap();
        let mut limits: Vec<usize> = (1..40).map(|i| i * 511).collect();
        limits.extend((4080..4110).chain(8180..8200).chain(15980..15990));
        let mut seen = std::collections::HashSet::new();
        for limit in limits {
            let Some(cut) = tok.safe_cut(text, limit) else {
                continue;
            };
            assert!(cut <= limit && cut > 0);
            if !seen.insert(cut) {
                continue;
            }
            cuts += 1;
            let piece = tok.encode_plain(&text[..cut]).unwrap();
            assert!(
                full.starts_with(&piece),
                "{}: {name:?} cut at byte {cut} ({:?}|{:?}) changes the ids before it",
                pkg.display(),
                &text[cut.saturating_sub(12)..cut],
                text[cut..].chars().take(12).collect::<String>()
            );
        }
    }
    assert!(cuts > 500, "only {cuts} cuts tried");
}

fn check(pkg: &Path, rule: &str) {
    let encoder = Encoder::open(pkg).unwrap();
    // The fixtures must really be cut, or the comparisons below prove nothing about cutting.
    assert_eq!(encoder.tokenizer().cut_rule(), rule, "{}", pkg.display());
    let texts = texts();
    check_cuts(pkg, &texts);
    check_documents(pkg, &texts);
    check_queries(pkg, &texts);
}

#[test]
fn cut_documents_and_queries_equal_whole_tokenization_converted() {
    let Some(f) = fixtures() else { return };
    check(&f.tiny_pkg, "pairs");
}

#[test]
fn cut_documents_and_queries_equal_whole_tokenization_legacy() {
    let Some(f) = fixtures() else { return };
    check(&f.tiny_legacy_pkg, "pairs");
}

#[test]
fn cut_documents_and_queries_equal_whole_tokenization_smollm2() {
    let Some(f) = fixtures() else { return };
    check(&f.smollm2_pkg, "whitespace");
}

/// Peak RSS in KiB of `icl-embed tokenize` on `input`, through `/usr/bin/time -f %M`.
fn tokenize_peak_kib(pkg: &Path, input: &Path) -> u64 {
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(bin())
        .args(["tokenize", "--model"])
        .arg(pkg)
        .arg("--input")
        .arg(input)
        .stdout(std::process::Stdio::null())
        .output()
        .expect("/usr/bin/time (Debian's package `time`) runs the binary to measure its peak RSS");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .trim()
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Issue 24: the memory of tokenizing a 20 MB line follows what is kept. Before the cut, a 50 MB
/// line took 3.7 to 5 GB (BENCHMARKS.md, "Long inputs"); now it costs its own bytes held twice
/// over a short line's peak. The bound, short line + 4 x the input, leaves room for that and fails
/// by far on whole tokenization (about 75 bytes of peak per byte of text).
#[test]
fn a_long_line_costs_about_what_a_short_one_does() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let real = real_text().replace(['\n', '\r'], " ");
    let long: String = real.repeat(20_000_000 / real.len() + 1);
    let (short_path, long_path) = (dir.path().join("short.txt"), dir.path().join("long.txt"));
    let short: String = real.chars().take(3000).collect();
    std::fs::write(&short_path, format!("{short}\n")).unwrap();
    std::fs::write(&long_path, format!("{long}\n")).unwrap();
    for pkg in [&f.tiny_pkg, &f.smollm2_pkg] {
        let short = tokenize_peak_kib(pkg, &short_path);
        let big = tokenize_peak_kib(pkg, &long_path);
        let bound = short + 4 * long.len() as u64 / 1024;
        eprintln!(
            "{}: peak {short} KiB on 3 kB, {big} KiB on {} MB (bound {bound})",
            pkg.display(),
            long.len() / 1_000_000
        );
        assert!(big <= bound, "{} KiB > {bound} KiB", big);
    }
}
