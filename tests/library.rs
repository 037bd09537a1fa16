//! The library API as a server uses it (issue 11): tokenize, plan under a token budget, pad, run a
//! batch on a prefix's states, pool; and what it refuses (rows without tokens, rows longer than
//! the model's attention window), with error kinds a caller can tell apart. Plus `auto` on this
//! CPU with a package that holds (or has fetched) only int8 (issue 12).

mod common;

use std::path::Path;

use common::*;
use icl_embed::{
    engine::batch, engine::plan, BatchLimits, Device, Embedder, EmbedderOptions, Encoder, Error,
    Model, ModelOptions, Package, Variant,
};

fn options(variant: Variant) -> EmbedderOptions {
    EmbedderOptions::default()
        .variant(variant)
        .device(Device::Cpu)
        .threads(Some(2))
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

fn edit_manifest(pkg: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = pkg.join("embedder.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

fn sci_fact() -> (String, Vec<icl_embed::Example>) {
    let task = "Given a scientific claim, retrieve documents that support or refute the claim";
    let examples = icl_embed::read_examples(&data_dir().join("MTEB/SciFact.json")).unwrap();
    (task.to_string(), examples)
}

/// The server's path (encoder -> ids -> plan -> pad -> forward on a prefix) gives the vectors
/// `embed_queries` gives, and the prefix's states have the size its shape says.
#[test]
fn a_batch_run_by_hand_on_a_prefix_equals_embed_queries() {
    let Some(f) = fixtures() else { return };
    let (task, examples) = sci_fact();
    let texts = [
        "Aspirin lowers the risk of colorectal cancer.",
        "Vitamin D deficiency is linked to MS.",
        "what causes tides",
    ];
    let mut embedder = Embedder::new(&f.tiny_pkg, &options(Variant::Fp32)).unwrap();
    let prompt = embedder.query_prompt(Some(&task), &examples).unwrap();
    let want = embedder.embed_queries(&prompt, &texts).unwrap();
    assert_eq!(embedder.prefix_stats().cached, texts.len());

    let encoder = Encoder::open(&f.tiny_pkg).unwrap();
    let package = encoder.package().clone();
    let mut model = Model::load(
        &package,
        &ModelOptions::default()
            .variant(Variant::Fp32)
            .threads(Some(2)),
        &mut |_| Ok(()),
    )
    .unwrap();
    let prompt = encoder.query_prompt(Some(&task), &examples, None).unwrap();
    let ids = encoder.queries(&prompt, &texts).unwrap();
    let shared = prompt
        .shared_prefix()
        .expect("examples make a shared prefix");
    let prefix = model.prefix(shared).unwrap();
    let a = &package.manifest.architecture;
    assert_eq!(
        prefix.bytes(),
        a.layers * 2 * a.kv_heads * shared.len() * a.head_dim * 4,
        "fp32 states: layers x (key, value) x kv_heads x tokens x head_dim x 4 bytes"
    );
    let limits = BatchLimits::new(64, 2);
    let plan = plan::plan(&ids, Some(shared), limits);
    assert!(plan.len() >= 2, "the budget splits three rows: {plan:?}");
    let mut got = ndarray::Array2::<f32>::zeros((texts.len(), model.hidden()));
    for rows in plan {
        let suffixes: Vec<Vec<u32>> = rows
            .iter()
            .map(|&r| ids[r][shared.len()..].to_vec())
            .collect();
        let mut b = batch::pad(
            &suffixes,
            &(0..rows.len()).collect::<Vec<_>>(),
            encoder.pad_id(),
        );
        b.offset_positions(shared.len());
        let v = model.forward(&b, Some(&prefix)).unwrap();
        for (k, &r) in rows.iter().enumerate() {
            got.row_mut(r).assign(&v.row(k));
        }
    }
    assert!(min_cosine(&got, &want) >= 0.99999);
    for row in got.rows() {
        let norm: f32 = row.dot(&row).sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised rows: {norm}");
    }
}

#[test]
fn a_row_without_tokens_is_refused_as_an_input_error() {
    let Some(f) = fixtures() else { return };
    let mut embedder = Embedder::new(&f.tiny_pkg, &options(Variant::Fp32)).unwrap();
    let (_, model) = embedder.parts_mut();
    let empty = batch::pad(&[vec![1, 2], vec![]], &[0, 1], 0);
    let err = model.forward(&empty, None).unwrap_err();
    assert!(err.is_input(), "{err:?}");
    assert!(err.to_string().contains("no tokens"), "{err}");
}

/// A manifest that records an attention window: rows (prefix included) longer than it are refused
/// with an error naming the window; shorter ones run.
#[test]
fn rows_longer_than_the_sliding_window_are_refused() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    copy_dir(&f.tiny_pkg, &pkg);
    edit_manifest(&pkg, |m| m["architecture"]["sliding_window"] = 24.into());
    let mut embedder = Embedder::new(&pkg, &options(Variant::Fp32)).unwrap();
    assert_eq!(embedder.model().max_tokens(), Some(24));
    let short = embedder.embed_documents(&["a short text"]).unwrap();
    assert_eq!(short.nrows(), 1);
    let long = "a long text of many words that goes on and on ".repeat(10);
    let err = embedder
        .embed_documents(&["a short text", &long])
        .unwrap_err();
    assert!(err.is_input(), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("24-token attention window") && msg.contains("sliding_window"),
        "{msg}"
    );
    // A few-shot prefix is longer than the window by itself.
    let (task, examples) = sci_fact();
    let prompt = embedder.query_prompt(Some(&task), &examples).unwrap();
    let err = embedder.embed_queries(&prompt, &["q"]).unwrap_err();
    assert!(err.to_string().contains("attention window"), "{err}");
    // Packages without the field have no limit.
    let embedder = Embedder::new(&f.tiny_pkg, &options(Variant::Fp32)).unwrap();
    assert_eq!(embedder.model().max_tokens(), None);
}

/// A graph whose output disagrees with the manifest is the package's fault, not the input's.
#[test]
fn a_graph_output_of_the_wrong_width_is_a_graph_error() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("pkg");
    copy_dir(&f.tiny_pkg, &pkg);
    edit_manifest(&pkg, |m| {
        let h = m["architecture"]["hidden"].as_u64().unwrap();
        m["architecture"]["hidden"] = (h + 1).into();
    });
    let mut embedder = Embedder::new(&pkg, &options(Variant::Fp32)).unwrap();
    let err = embedder.embed_documents(&["hello"]).unwrap_err();
    assert!(matches!(err, Error::Graph { .. }), "{err:?}");
    assert!(!err.is_input());
    assert!(err.to_string().contains("output shape"), "{err}");
}

/// `--device auto` on this CPU machine with a package whose only runnable variant is int8: the
/// manifest may list fp32 and fp16 (a hub snapshot that fetched only int8) or only int8. The device
/// is decided first, so the absent graphs are never opened.
#[test]
fn auto_runs_int8_on_this_cpu_when_only_int8_is_present() {
    let Some(f) = fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fetched_only = dir.path().join("fetched");
    copy_dir(&f.tiny_pkg, &fetched_only);
    let package = Package::open(&fetched_only).unwrap();
    for name in package.variant_names() {
        if name != "int8" {
            for file in package.variant_files(name).unwrap() {
                std::fs::remove_file(fetched_only.join(file)).unwrap();
            }
        }
    }
    let int8_only = dir.path().join("int8-only");
    copy_dir(&fetched_only, &int8_only);
    edit_manifest(&int8_only, |m| {
        let v = m["variants"].as_object_mut().unwrap();
        v.retain(|k, _| k == "int8");
    });
    let want = Embedder::new(&f.tiny_pkg, &options(Variant::Int8))
        .unwrap()
        .embed_documents(&["hello world"])
        .unwrap();
    for pkg in [&fetched_only, &int8_only] {
        let auto = EmbedderOptions::default()
            .variant(Variant::Auto)
            .device(Device::Auto)
            .threads(Some(2));
        let mut embedder = Embedder::new(pkg, &auto).unwrap();
        assert_eq!(embedder.model().device(), Device::Cpu);
        assert_eq!(embedder.model().variant(), "int8");
        let got = embedder.embed_documents(&["hello world"]).unwrap();
        assert_eq!(got, want, "{}", pkg.display());
    }
}

/// What a server shares between threads: the encoder and prompts (handlers tokenize), and the
/// model with its prefix states (moved into the one thread that runs batches).
#[test]
fn the_types_a_server_shares_are_send_and_sync_where_it_needs() {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<Encoder>();
    sync::<Encoder>();
    send::<icl_embed::QueryPrompt>();
    sync::<icl_embed::QueryPrompt>();
    send::<Model>();
    send::<icl_embed::Prefix>();
    send::<icl_embed::PrefixStore>();
    send::<Embedder>();
    send::<Error>();
    sync::<Error>();
}
