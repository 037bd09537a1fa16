//! The model package: `embedder.json` (formats `icl-embed/1` and `icl-embed/2`, described in
//! `export/FORMAT.md`) and the files it names. Opening checks the manifest and the tokenizer; the files of a variant are
//! checked when that variant is chosen ([`Package::check_variant`]), and only that variant's.
//!
//! Checksums: a variant's weights are 8 to 28 GB at full size, so they are hashed when a package is
//! first used after being written or downloaded, and by `icl-embed verify`, not at every start. A
//! verified file gets a stamp (its size, modification time and the sha256 it matched) in the cache
//! directory ([`Stamps`]); a later start compares size and time only, and hashes again when either
//! changed (a truncated, replaced or rewritten file) or when the manifest names another sha256.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The manifest format new packages are written in: format 1 plus the prompt procedure, the
/// default task and shortened vectors (export/FORMAT.md).
pub const FORMAT: &str = "icl-embed/2";
/// The first format (bge-en-icl packages made before format 2), still read: its prompt is
/// `flagembedding-icl`, without a default task or shortened vectors.
pub const FORMAT_1: &str = "icl-embed/1";
/// Every manifest format this runtime reads.
pub const FORMATS: [&str; 2] = [FORMAT_1, FORMAT];
/// The manifest's file name inside a package.
pub const MANIFEST_FILE: &str = "embedder.json";

/// `embedder.json`, as written by `python -m export`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    #[serde(default)]
    pub source: serde_json::Value,
    pub architecture: Architecture,
    pub pooling: String,
    pub normalize: bool,
    #[serde(default = "right")]
    pub padding_side: String,
    pub prompt: PromptTemplate,
    /// Shortened vectors (format 2): `None` where the model is not trained for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<Dimensions>,
    pub special_tokens: SpecialTokens,
    pub max_length: MaxLength,
    pub clean_up_tokenization_spaces: bool,
    pub tokenizer: TokenizerFile,
    pub variants: BTreeMap<String, VariantSpec>,
}

fn right() -> String {
    "right".to_string()
}

/// Shape facts of the exported network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Architecture {
    pub layers: usize,
    pub hidden: usize,
    #[serde(default)]
    pub intermediate: Option<usize>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Mistral's attention window (`sliding_window` in the model's configuration; 4096 for
    /// bge-en-icl): a token attends only to the last this many. The graphs attend to every earlier
    /// token, so rows longer than this are refused rather than embedded differently from the
    /// reference. Absent (or null) when the model has no window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

/// How a query becomes token ids (`prompt.procedure`; format 1 has only the first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Procedure {
    /// bge-en-icl's (export/REFERENCE.md section 2): few-shot prefix, the query text truncated,
    /// decoded and encoded again, a suffix.
    #[default]
    #[serde(rename = "flagembedding-icl")]
    FlagEmbeddingIcl,
    /// Qwen3-Embedding's and e5-mistral's: the instruction template filled with the task and the
    /// query, tokenized once with special tokens and truncated to the limit; no examples.
    Instruct,
}

impl Procedure {
    /// The name the manifest uses.
    pub fn name(self) -> &'static str {
        match self {
            Procedure::FlagEmbeddingIcl => "flagembedding-icl",
            Procedure::Instruct => "instruct",
        }
    }
}

/// The query prompt: its procedure and templates, with placeholders `{task}`, `{query}`, and in
/// the few-shot templates `{instruct}`, `{response}`. The few-shot fields (`example`,
/// `example_separator`, `suffix`) belong to `flagembedding-icl` and are empty for `instruct`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptTemplate {
    #[serde(default)]
    pub procedure: Procedure,
    pub query: String,
    /// The task used for queries when the caller gives none (format 2); without one such a query
    /// is its raw text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_task: Option<String>,
    #[serde(default)]
    pub example: String,
    #[serde(default)]
    pub example_separator: String,
    #[serde(default)]
    pub suffix: String,
}

/// Shortened vectors a Matryoshka-trained model allows: the first N components of the pooled
/// vector, renormalised, for `min <= N <= hidden`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dimensions {
    pub min: usize,
}

/// Token ids the tokenizer adds around a text, and the padding id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub prepend: Vec<u32>,
    pub append: Vec<u32>,
    pub pad_id: u32,
    /// Added tokens the prompt uses by name (bge-en-icl's `<instruct>`, `<query>`, `<response>`);
    /// `null` or absent when the family has none (Qwen3-Embedding, e5-mistral).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub added: BTreeMap<String, u32>,
}

fn null_as_empty<'de, D>(d: D) -> std::result::Result<BTreeMap<String, u32>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<BTreeMap<String, u32>>::deserialize(d)?.unwrap_or_default())
}

/// Default maximum lengths, in tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaxLength {
    pub query: usize,
    pub document: usize,
}

/// The tokenizer file and its checksum.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerFile {
    pub file: String,
    pub sha256: String,
}

/// One precision of the graph, as the manifest describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantSpec {
    pub file: String,
    pub data: Option<String>,
    pub dtype: String,
    pub inputs: Vec<String>,
    pub output: String,
    #[serde(default = "float32")]
    pub output_dtype: String,
    pub sha256: BTreeMap<String, String>,
    #[serde(default)]
    pub quantization: serde_json::Value,
    #[serde(default)]
    pub parity: serde_json::Value,
    /// Present when the graph takes a prefix's key/value states (`past.*`) and returns its own
    /// (`present.*`); packages without it run without the prefix cache.
    #[serde(default)]
    pub prefix_cache: Option<PrefixCacheSpec>,
    /// Present when the variant runs every input that begins with the same ids (bge-en-icl's `<s>`)
    /// on top of their key/value states, computed in fp32 by the exporter (export/FORMAT.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_states: Option<StartStatesSpec>,
}

/// The ids every input begins with, and the graph (no inputs; outputs named like the `past.*`
/// inputs) that holds their key/value states.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartStatesSpec {
    pub ids: Vec<u32>,
    pub file: String,
}

impl VariantSpec {
    /// The variant's files, relative to the package: the graph, its external data, its start states.
    pub fn files(&self) -> Vec<String> {
        std::iter::once(self.file.clone())
            .chain(self.data.clone())
            .chain(self.start_states.as_ref().map(|s| s.file.clone()))
            .collect()
    }

    /// The int8 kernel class the exporter recorded (`quantization.kernel`): `"u8s8"` (per-token
    /// uint8 activations x int8 weights, `MatMulIntegerToFloat`: faster than fp32 on x86-64, fastest
    /// with VNNI), `"u8s7"` (the same with 7-bit weights: as fast with VNNI, and exact without it on
    /// the same kernel, where 8-bit weights need the slower u8 x u8 one), `"matmulnbits-int8"`
    /// (block-wise int8 x int8, `MatMulNBits` at accuracy level 4, llama.cpp q8_0-like: faster
    /// than fp32, slower than `"u8s8"`) or `"matmulnbits-fp32"` (weight-only, fp32 compute:
    /// slower than fp32). Packages from before the field: derived from `method` /
    /// `accuracy_level`; `None` for fp32/fp16.
    pub fn int8_kernel(&self) -> Option<String> {
        let q = &self.quantization;
        if let Some(k) = q.get("kernel").and_then(|k| k.as_str()) {
            return Some(k.to_string());
        }
        match q.get("method").and_then(|m| m.as_str())? {
            "matmulnbits" if q.get("accuracy_level").and_then(|a| a.as_u64()) == Some(1) => {
                Some("matmulnbits-fp32".into())
            }
            "w8a8" => Some("u8s8".into()),
            other => Some(other.to_string()),
        }
    }

    /// The block size along K of a block-wise recipe (`quantization.block_size`); `None` for
    /// the others.
    pub fn block_size(&self) -> Option<u64> {
        self.quantization.get("block_size")?.as_u64()
    }

    /// Whether the recipe met the exporter's fidelity thresholds on its calibration texts
    /// (`quantization.selection.faithful`); `None` when the package does not say.
    pub fn int8_faithful(&self) -> Option<bool> {
        self.quantization
            .get("selection")?
            .get("faithful")?
            .as_bool()
    }

    /// `quantization.recipe` and the chosen recipe's calibration figures, in words.
    pub fn int8_summary(&self) -> String {
        let q = &self.quantization;
        let recipe = q
            .get("recipe")
            .and_then(|r| r.as_str())
            .unwrap_or("unnamed");
        let chosen = q
            .get("selection")
            .and_then(|s| s.get("tried"))
            .and_then(|t| t.as_array())
            .and_then(|t| {
                t.iter()
                    .find(|r| r.get("recipe").and_then(|n| n.as_str()) == Some(recipe))
            });
        match chosen {
            Some(r) => format!(
                "recipe {recipe}, min cosine {} / mean {} against fp32 on {} calibration texts",
                r.get("min_cosine").unwrap_or(&serde_json::Value::Null),
                r.get("mean_cosine").unwrap_or(&serde_json::Value::Null),
                r.get("texts").unwrap_or(&serde_json::Value::Null)
            ),
            None => format!("recipe {recipe}"),
        }
    }
}

/// Names and dtype of the prefix-state inputs and outputs; `{layer}` stands for the layer index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefixCacheSpec {
    pub past_key: String,
    pub past_value: String,
    pub present_key: String,
    pub present_value: String,
    /// `float32` or `float16`.
    pub dtype: String,
}

impl PrefixCacheSpec {
    /// (input, output) names for every layer, key then value.
    pub fn names(&self, layers: usize) -> Vec<(String, String)> {
        (0..layers)
            .flat_map(|i| {
                let l = i.to_string();
                [
                    (
                        self.past_key.replace("{layer}", &l),
                        self.present_key.replace("{layer}", &l),
                    ),
                    (
                        self.past_value.replace("{layer}", &l),
                        self.present_value.replace("{layer}", &l),
                    ),
                ]
            })
            .collect()
    }
}

fn float32() -> String {
    "float32".to_string()
}

impl Manifest {
    /// Refuses format 2's fields in a format 1 manifest: they would be read as format 2 and the
    /// package is not what its format says.
    fn check_format_2_fields(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT_1 {
            return Ok(());
        }
        let found = [
            (
                self.prompt.procedure != Procedure::FlagEmbeddingIcl,
                "prompt.procedure",
            ),
            (self.prompt.default_task.is_some(), "prompt.default_task"),
            (self.dimensions.is_some(), "dimensions"),
        ];
        match found.iter().find(|(set, _)| *set) {
            Some((_, field)) => Err(format!(
                "{field} is a field of format {FORMAT:?}, but the manifest says {FORMAT_1:?}"
            )),
            None => Ok(()),
        }
    }

    fn check_dimensions_spec(&self) -> std::result::Result<(), String> {
        let hidden = self.architecture.hidden;
        match self.dimensions {
            Some(d) if d.min == 0 || d.min > hidden => Err(format!(
                "dimensions.min is {}, outside 1..={hidden} (architecture.hidden)",
                d.min
            )),
            _ => Ok(()),
        }
    }

    /// Checks a request for vectors shortened to `n` components (`what` names the option in the
    /// error: `--dimensions`, `dimensions`): the manifest must allow shortened vectors (`dimensions`)
    /// and `n` lie in `min..=hidden`. The one place this is decided, for the CLI, the server and
    /// the APIs.
    pub fn check_dimensions(&self, n: usize, what: &str) -> Result<()> {
        let hidden = self.architecture.hidden;
        match self.dimensions {
            None => Err(Error::input(
                what,
                "not supported: the model is not trained for shortened vectors (its package allows none); leave it out",
            )),
            Some(d) if n < d.min || n > hidden => Err(Error::input(
                what,
                format!(
                    "{n} is outside {}..={hidden}, the shortened vectors this model allows",
                    d.min
                ),
            )),
            Some(_) => Ok(()),
        }
    }
}

impl PromptTemplate {
    /// The templates' consistency with the procedure: every query template takes `{query}`;
    /// `instruct` has no few-shot templates; `flagembedding-icl` has an example template.
    fn check(&self) -> std::result::Result<(), String> {
        if !self.query.contains("{query}") {
            return Err(format!(
                "prompt.query {:?} has no {{query}} placeholder",
                self.query
            ));
        }
        let few_shot = [
            ("prompt.example", &self.example),
            ("prompt.example_separator", &self.example_separator),
            ("prompt.suffix", &self.suffix),
        ];
        match self.procedure {
            Procedure::Instruct => match few_shot.iter().find(|(_, v)| !v.is_empty()) {
                Some((field, _)) => Err(format!(
                    "{field} is set, but the prompt procedure \"instruct\" takes no few-shot examples or suffix"
                )),
                None => Ok(()),
            },
            Procedure::FlagEmbeddingIcl if !self.example.contains("{query}") => Err(format!(
                "prompt.example {:?} has no {{query}} placeholder (procedure \"flagembedding-icl\")",
                self.example
            )),
            Procedure::FlagEmbeddingIcl => Ok(()),
        }
    }
}

/// The input names a graph may take; `input_ids` and `attention_mask` are required.
pub const GRAPH_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "position_ids"];

/// A package directory whose manifest has been read and checked.
#[derive(Debug, Clone)]
pub struct Package {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// sha256 of `embedder.json`, which pins every file of the package.
    pub manifest_sha256: String,
    /// A snapshot of a Hugging Face Hub repository, which fetches a variant's files when that
    /// variant is chosen; `false` for a directory, where a variant whose files are absent cannot
    /// run ([`Package::variant_available`]).
    pub from_hub: bool,
}

impl Package {
    /// Reads `dir/embedder.json` and checks the manifest's own consistency and the tokenizer file.
    /// Variant files are checked by [`Package::check_variant`], when one is chosen.
    pub fn open(dir: impl AsRef<Path>) -> Result<Package> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::package(
                &dir,
                "not a directory (expected a model package made by `python -m export`)",
            ));
        }
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            let hint = if has_partial_marker(&dir) {
                " (an unfinished export: run the export again)"
            } else {
                ""
            };
            return Err(Error::package(
                &dir,
                format!("{MANIFEST_FILE} is missing{hint}"),
            ));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(&path, "cannot read the manifest", e))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|source| Error::Manifest {
            path: dir.clone(),
            source,
        })?;
        let manifest_sha256 = Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let package = Package {
            dir,
            manifest,
            manifest_sha256,
            from_hub: false,
        };
        package.check_manifest()?;
        package.check_file(
            &package.manifest.tokenizer.file,
            Some(&package.manifest.tokenizer.sha256),
        )?;
        Ok(package)
    }

    fn check_manifest(&self) -> Result<()> {
        let m = &self.manifest;
        let fail = |reason: String| Err(Error::package(&self.dir, reason));
        if !FORMATS.contains(&m.format.as_str()) {
            return fail(format!(
                "manifest format is {:?}, this runtime reads {}",
                m.format,
                FORMATS.map(|f| format!("{f:?}")).join(" and ")
            ));
        }
        m.check_format_2_fields()
            .and_then(|()| m.prompt.check())
            .and_then(|()| m.check_dimensions_spec())
            .or_else(fail)?;
        if m.pooling != "last_token" {
            return fail(format!(
                "pooling {:?} is not supported (only last_token)",
                m.pooling
            ));
        }
        if m.padding_side != "right" {
            return fail(format!(
                "padding side {:?} is not supported (only right)",
                m.padding_side
            ));
        }
        if m.variants.is_empty() {
            return fail("the manifest lists no variants".into());
        }
        if m.architecture.hidden == 0 {
            return fail("architecture.hidden is 0".into());
        }
        for (name, v) in &m.variants {
            for required in ["input_ids", "attention_mask"] {
                if !v.inputs.iter().any(|i| i == required) {
                    return fail(format!("variant {name} does not take {required}"));
                }
            }
            if let Some(other) = v
                .inputs
                .iter()
                .find(|i| !GRAPH_INPUTS.contains(&i.as_str()))
            {
                return fail(format!("variant {name} takes an unknown input {other:?}"));
            }
        }
        Ok(())
    }

    /// The variant called `name` as the manifest describes it; its files are not looked at.
    pub fn spec(&self, name: &str) -> Result<&VariantSpec> {
        self.manifest.variants.get(name).ok_or_else(|| {
            Error::package(
                &self.dir,
                format!(
                    "has no variant {name:?} (it has {})",
                    self.variant_names().join(", ")
                ),
            )
        })
    }

    /// Whether the package has variant `name` and can open it: its files are all present, or the
    /// package comes from the hub, which fetches them when the variant is chosen.
    pub fn variant_available(&self, name: &str) -> bool {
        self.manifest
            .variants
            .get(name)
            .is_some_and(|v| self.from_hub || self.missing_file(v).is_none())
    }

    /// The first file of `spec` (relative to the package) that is not in the package directory.
    pub fn missing_file(&self, spec: &VariantSpec) -> Option<String> {
        spec.files().into_iter().find(|f| !self.path(f).is_file())
    }

    /// The files of variant `name`, relative to the package ([`VariantSpec::files`]).
    pub fn variant_files(&self, name: &str) -> Result<Vec<String>> {
        Ok(self.spec(name)?.files())
    }

    /// The variant called `name`, with its files checked: present, and matching their sha256
    /// (hashed only when `stamps` holds no stamp for the file's current size and time).
    pub fn check_variant(&self, name: &str, stamps: &Stamps) -> Result<&VariantSpec> {
        let variant = self.spec(name)?;
        for file in self.variant_files(name)? {
            let want = self.sha256_of(&file, variant)?;
            let path = self.checked_path(&file)?;
            if !stamps.fresh(&path, want) {
                self.hash_and_compare(&file, &path, want)?;
                stamps.record(&path, want);
            }
        }
        Ok(variant)
    }

    /// Hashes every file of every variant whose files are present (all of them with `all`) and
    /// stamps those that match; returns (file, outcome) per file, the outcome `Ok(())` or the
    /// error naming what is wrong. What `icl-embed verify` runs.
    pub fn verify(&self, stamps: &Stamps, all: bool) -> Vec<(String, Result<()>)> {
        let mut out = Vec::new();
        for (name, variant) in &self.manifest.variants {
            let files = variant.files();
            if !all && !files.iter().all(|f| self.path(f).exists()) {
                continue;
            }
            for file in files {
                let result = self.sha256_of(&file, variant).and_then(|want| {
                    let path = self.checked_path(&file)?;
                    self.hash_and_compare(&file, &path, want)?;
                    stamps.record(&path, want);
                    Ok(())
                });
                out.push((format!("{name}: {file}"), result));
            }
        }
        out
    }

    fn sha256_of<'a>(&self, file: &str, variant: &'a VariantSpec) -> Result<&'a str> {
        variant.sha256.get(file).map(String::as_str).ok_or_else(|| {
            Error::package(&self.dir, format!("the manifest has no sha256 for {file}"))
        })
    }

    /// Variant names, in the manifest's order.
    pub fn variant_names(&self) -> Vec<&str> {
        self.manifest.variants.keys().map(String::as_str).collect()
    }

    /// Absolute path of a file named relative to the package.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn check_file(&self, file: &str, sha256: Option<&str>) -> Result<()> {
        let path = self.checked_path(file)?;
        let Some(want) = sha256 else {
            return Err(Error::package(
                &self.dir,
                format!("the manifest has no sha256 for {file}"),
            ));
        };
        self.hash_and_compare(file, &path, want)
    }

    /// The path of `file`, which must lie inside the package and exist.
    fn checked_path(&self, file: &str) -> Result<PathBuf> {
        let path = self.path(file);
        if Path::new(file).is_absolute() || file.split(['/', '\\']).any(|c| c == "..") {
            return Err(Error::package(
                &self.dir,
                format!("manifest names a file outside the package: {file}"),
            ));
        }
        if !path.is_file() {
            return Err(Error::package(&self.dir, format!("{file} is missing")));
        }
        Ok(path)
    }

    fn hash_and_compare(&self, file: &str, path: &Path, want: &str) -> Result<()> {
        let got = sha256_file(path)?;
        if !got.eq_ignore_ascii_case(want) {
            return Err(Error::package(
                &self.dir,
                format!(
                    "{file} is corrupted or incomplete: sha256 {got}, the manifest says {want}"
                ),
            ));
        }
        Ok(())
    }
}

/// Stamps of verified files, one small JSON file per package file under `DIR/verified/` (named
/// by the sha256 of the file's canonical path): the size and modification time the file had when
/// its sha256 was checked, and that sha256. A missing or unwritable directory only means files are
/// hashed again next time.
#[derive(Debug, Clone)]
pub struct Stamps {
    dir: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

impl Stamps {
    /// Stamps kept under `dir/verified`.
    pub fn new(dir: impl Into<PathBuf>) -> Stamps {
        Stamps {
            dir: Some(dir.into().join("verified")),
        }
    }

    /// No stamps: every check hashes.
    pub fn none() -> Stamps {
        Stamps { dir: None }
    }

    fn current(path: &Path, sha256: &str) -> Option<(PathBuf, Stamp)> {
        let canonical = path.canonicalize().ok()?;
        let meta = std::fs::metadata(&canonical).ok()?;
        let mtime_ns = meta
            .modified()
            .ok()?
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_nanos();
        let key = hex(&Sha256::digest(canonical.as_os_str().as_encoded_bytes()));
        let stamp = Stamp {
            path: canonical,
            size: meta.len(),
            mtime_ns,
            sha256: sha256.to_ascii_lowercase(),
        };
        Some((PathBuf::from(format!("{key}.json")), stamp))
    }

    /// Whether `path` was verified against `sha256` and has not changed size or time since.
    fn fresh(&self, path: &Path, sha256: &str) -> bool {
        let (Some(dir), Some((name, now))) = (&self.dir, Self::current(path, sha256)) else {
            return false;
        };
        std::fs::read(dir.join(name))
            .ok()
            .and_then(|b| serde_json::from_slice::<Stamp>(&b).ok())
            .is_some_and(|old| old == now)
    }

    /// Records that `path` matched `sha256` as it is now (best effort).
    fn record(&self, path: &Path, sha256: &str) {
        let (Some(dir), Some((name, now))) = (&self.dir, Self::current(path, sha256)) else {
            return;
        };
        let Ok(bytes) = serde_json::to_vec(&now) else {
            return;
        };
        let tmp = dir.join(format!(".{}.{}", name.display(), std::process::id()));
        let _ = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, bytes))
            .and_then(|_| std::fs::rename(&tmp, dir.join(&name)));
        let _ = std::fs::remove_file(&tmp);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn has_partial_marker(dir: &Path) -> bool {
    dir.join(".partial").exists()
        || dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".partial"))
}

/// Hex sha256 of a file, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::io(path, "cannot read", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A manifest as the exporter writes it, in `format`, with `prompt` and `extra` fields.
    fn manifest(format: &str, prompt: serde_json::Value, extra: serde_json::Value) -> Manifest {
        let mut m = json!({
            "format": format,
            "architecture": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16,
                             "vocab": 1000},
            "pooling": "last_token", "normalize": true, "padding_side": "right",
            "prompt": prompt,
            "special_tokens": {"prepend": [1], "append": [2], "pad_id": 0},
            "max_length": {"query": 512, "document": 512},
            "clean_up_tokenization_spaces": false,
            "tokenizer": {"file": "tokenizer.json", "sha256": "00"},
            "variants": {"fp32": {"file": "fp32/model.onnx", "data": null, "dtype": "float32",
                                  "inputs": ["input_ids", "attention_mask"], "output": "h",
                                  "sha256": {}}},
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            m[k] = v.clone();
        }
        serde_json::from_value(m).unwrap()
    }

    fn bge_prompt() -> serde_json::Value {
        json!({"query": "<instruct>{task}\n<query>{query}",
               "example": "<instruct>{instruct}\n<query>{query}\n<response>{response}",
               "example_separator": "\n\n", "suffix": "\n<response>"})
    }

    fn instruct_prompt() -> serde_json::Value {
        json!({"procedure": "instruct", "query": "Instruct: {task}\nQuery:{query}",
               "default_task": "Given a web search query, retrieve relevant passages"})
    }

    fn check(m: Manifest) -> Result<()> {
        let package = Package {
            dir: PathBuf::from("pkg"),
            manifest: m,
            manifest_sha256: String::new(),
            from_hub: false,
        };
        package.check_manifest()
    }

    #[test]
    fn format_1_reads_as_before() {
        let m = manifest(FORMAT_1, bge_prompt(), json!({}));
        assert_eq!(m.prompt.procedure, Procedure::FlagEmbeddingIcl);
        assert_eq!(
            (m.prompt.default_task.as_deref(), m.dimensions),
            (None, None)
        );
        assert_eq!(m.prompt.suffix, "\n<response>");
        check(m.clone()).unwrap();
        let err = m.check_dimensions(32, "--dimensions").unwrap_err();
        assert!(err.is_input(), "{err}");
        assert!(
            err.to_string().starts_with("--dimensions: not supported"),
            "{err}"
        );
    }

    #[test]
    fn format_2_reads_procedure_default_task_and_dimensions() {
        let m = manifest(
            FORMAT,
            instruct_prompt(),
            json!({"dimensions": {"min": 32}}),
        );
        assert_eq!(m.prompt.procedure, Procedure::Instruct);
        assert_eq!(
            m.prompt.default_task.as_deref(),
            Some("Given a web search query, retrieve relevant passages")
        );
        assert_eq!(m.dimensions, Some(Dimensions { min: 32 }));
        assert_eq!(
            (m.prompt.example.as_str(), m.prompt.suffix.as_str()),
            ("", "")
        );
        check(m.clone()).unwrap();
        m.check_dimensions(32, "dimensions").unwrap();
        m.check_dimensions(64, "dimensions").unwrap();
        for n in [31, 65, 0] {
            let err = m.check_dimensions(n, "dimensions").unwrap_err().to_string();
            assert!(
                err.contains("dimensions: ") && err.contains("32..=64"),
                "{err}"
            );
        }
        let bge = manifest(FORMAT, bge_prompt(), json!({"dimensions": null}));
        check(bge).unwrap();
    }

    #[test]
    fn inconsistent_manifests_are_package_errors_naming_the_field() {
        let mut no_query = instruct_prompt();
        no_query["query"] = json!("Instruct: {task}");
        let mut with_suffix = instruct_prompt();
        with_suffix["suffix"] = json!("\n<response>");
        let cases = [
            (manifest(FORMAT, no_query, json!({})), "prompt.query"),
            (manifest(FORMAT, with_suffix, json!({})), "prompt.suffix"),
            (
                manifest(FORMAT_1, instruct_prompt(), json!({})),
                "prompt.procedure",
            ),
            (
                manifest(FORMAT_1, bge_prompt(), json!({"dimensions": {"min": 8}})),
                "dimensions",
            ),
            (
                manifest(
                    FORMAT,
                    instruct_prompt(),
                    json!({"dimensions": {"min": 65}}),
                ),
                "dimensions.min",
            ),
            (
                manifest("icl-embed/3", bge_prompt(), json!({})),
                "\"icl-embed/1\" and \"icl-embed/2\"",
            ),
        ];
        for (m, field) in cases {
            let err = check(m).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn unknown_procedure_is_refused_when_read() {
        let m = json!({"procedure": "pooled", "query": "{query}"});
        let err = serde_json::from_value::<PromptTemplate>(m).unwrap_err();
        assert!(err.to_string().contains("instruct"), "{err}");
    }
}
