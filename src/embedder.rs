//! The glue: a package's tokenizer and prompt procedure ([`Encoder`], no ONNX Runtime needed) and
//! an ONNX Runtime session that turns token ids into normalised embeddings ([`Embedder`]).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorElementType, ValueType};

use crate::batch::{self, Batch};
use crate::error::{Error, Result};
use crate::manifest::{Package, Variant};
use crate::pooling;
use crate::prompt::Example;
use crate::runtime::{self, Device, SessionSettings, TensorRtSettings};
use crate::tokenize::{QueryPrompt, TextTokenizer};

/// Tokenization of a package: final token ids for documents and queries, exactly as the
/// reference computes them.
pub struct Encoder {
    pub package: Package,
    pub tokenizer: TextTokenizer,
}

impl Encoder {
    /// Opens and checks the package at `dir` and loads its tokenizer.
    pub fn open(dir: impl AsRef<Path>) -> Result<Encoder> {
        let package = Package::open(dir)?;
        let m = &package.manifest;
        let tokenizer = TextTokenizer::from_file(
            &package.path(&m.tokenizer.file),
            &m.special_tokens,
            m.clean_up_tokenization_spaces,
        )?;
        Ok(Encoder { package, tokenizer })
    }

    /// Final ids of documents; `max_length` defaults to the manifest's.
    pub fn documents(&self, texts: &[&str], max_length: Option<usize>) -> Result<Vec<Vec<u32>>> {
        self.tokenizer.documents(
            texts,
            max_length.unwrap_or(self.package.manifest.max_length.document),
        )
    }

    /// The query prompt for a task and its few-shot examples.
    pub fn query_prompt(
        &self,
        task: Option<&str>,
        examples: &[Example],
        max_length: Option<usize>,
    ) -> Result<QueryPrompt> {
        let m = &self.package.manifest;
        QueryPrompt::new(
            &self.tokenizer,
            &m.prompt,
            task,
            examples,
            max_length.unwrap_or(m.max_length.query),
        )
    }

    /// Final ids of queries with an optional task instruction and few-shot examples.
    pub fn queries(
        &self,
        task: Option<&str>,
        examples: &[Example],
        texts: &[&str],
        max_length: Option<usize>,
    ) -> Result<Vec<Vec<u32>>> {
        self.query_prompt(task, examples, max_length)?
            .ids(&self.tokenizer, texts)
    }
}

/// How to build an [`Embedder`].
#[derive(Debug, Clone)]
pub struct EmbedderOptions {
    /// `fp32`, `fp16`, `int8` (or any variant the package has), or `auto`: fp16 on GPU providers,
    /// int8 on the CPU, fp32 when the preferred one is absent.
    pub variant: String,
    pub device: Device,
    /// Intra-op threads; ONNX Runtime's default (one per core) when `None`.
    pub threads: Option<usize>,
    /// Token budget of one batch (rows x padded length); see [`EmbedderOptions::default_batch_tokens`].
    pub batch_tokens: Option<usize>,
    /// Most rows in one batch.
    pub max_rows: usize,
    /// Overrides the manifest's maximum lengths.
    pub max_length: Option<usize>,
    /// ONNX Runtime library to load instead of searching.
    pub ort_lib: Option<PathBuf>,
    /// Where TensorRT keeps engines and timing caches.
    pub cache_dir: Option<PathBuf>,
}

impl Default for EmbedderOptions {
    fn default() -> Self {
        EmbedderOptions {
            variant: "auto".into(),
            device: Device::Cpu,
            threads: None,
            batch_tokens: None,
            max_rows: 64,
            max_length: None,
            ort_lib: None,
            cache_dir: None,
        }
    }
}

impl EmbedderOptions {
    /// 4096 tokens on the CPU (larger batches add memory, not speed), 16384 on a GPU.
    pub fn default_batch_tokens(device: Device) -> usize {
        if device.is_gpu() {
            16384
        } else {
            4096
        }
    }
}

/// Embeds documents and few-shot queries with one model package.
///
/// ```no_run
/// use icl_embed::{Embedder, EmbedderOptions, Example};
///
/// let mut embedder = Embedder::new("models/bge-en-icl", &EmbedderOptions::default())?;
/// let docs = embedder.embed_documents(&["Paris is the capital of France."])?;
/// let examples = [Example { instruct: None, query: "capital of Italy".into(), response: "Rome is the capital of Italy.".into() }];
/// let queries = embedder.embed_queries(
///     Some("Given a question, retrieve passages that answer it"),
///     &examples,
///     &["what is the capital of France?"],
/// )?;
/// let score: f32 = docs[0].iter().zip(&queries[0]).map(|(a, b)| a * b).sum();
/// assert!(score.abs() <= 1.0001);
/// # Ok::<(), icl_embed::Error>(())
/// ```
pub struct Embedder {
    pub encoder: Encoder,
    session: Session,
    variant: String,
    device: Device,
    inputs: Vec<String>,
    output: String,
    hidden: usize,
    batch_tokens: usize,
    max_rows: usize,
    max_length: Option<usize>,
    notes: Vec<String>,
}

impl Embedder {
    /// Loads the package at `dir`, ONNX Runtime and one variant's session.
    pub fn new(dir: impl AsRef<Path>, options: &EmbedderOptions) -> Result<Embedder> {
        let encoder = Encoder::open(dir)?;
        runtime::environment(options.ort_lib.as_deref())?;
        let candidates = match options.device {
            Device::Auto => vec![Device::TensorRt(0), Device::Cuda(0), Device::Cpu],
            d => vec![d],
        };
        let mut notes = Vec::new();
        for device in candidates {
            let name = choose_variant(&encoder.package, &options.variant, device)?;
            let variant = encoder.package.variant(&name)?.clone();
            if options.device == Device::Auto && device.is_gpu() {
                if !runtime::provider_compiled_in(device)? {
                    notes.push(format!("{device}: not in this ONNX Runtime library"));
                    continue;
                }
                if !runtime::cuda_driver_present() {
                    notes.push(format!("{device}: no NVIDIA driver"));
                    continue;
                }
            }
            let settings = session_settings(options, device);
            match runtime::session(
                &encoder.package.path(&variant.file),
                &variant.inputs,
                device,
                &settings,
            ) {
                Ok(session) => {
                    let (inputs, output) =
                        check_graph(&encoder.package, &name, &variant, &session)?;
                    let hidden = encoder.package.manifest.architecture.hidden;
                    return Ok(Embedder {
                        encoder,
                        session,
                        variant: name,
                        device,
                        inputs,
                        output,
                        hidden,
                        batch_tokens: options
                            .batch_tokens
                            .unwrap_or(EmbedderOptions::default_batch_tokens(device)),
                        max_rows: options.max_rows.max(1),
                        max_length: options.max_length,
                        notes,
                    });
                }
                Err(e) if options.device == Device::Auto && device != Device::Cpu => {
                    notes.push(format!("{device}: {e}"))
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Provider {
            provider: "auto".into(),
            reason: notes.join("; "),
        })
    }

    /// The variant that runs.
    pub fn variant(&self) -> &str {
        &self.variant
    }

    /// The device that runs it.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The batch limits in force: (token budget, most rows).
    pub fn batch_limits(&self) -> (usize, usize) {
        (self.batch_tokens, self.max_rows)
    }

    /// Why `auto` passed over the providers it did not choose.
    pub fn fallback_notes(&self) -> &[String] {
        &self.notes
    }

    /// Embeddings of documents, in input order, L2-normalised.
    pub fn embed_documents(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = self.encoder.documents(texts, self.max_length)?;
        self.embed_ids(&ids, &mut |_, _| {})
    }

    /// Embeddings of queries with an optional task instruction and few-shot examples.
    pub fn embed_queries(
        &mut self,
        task: Option<&str>,
        examples: &[Example],
        texts: &[&str],
    ) -> Result<Vec<Vec<f32>>> {
        let ids = self
            .encoder
            .queries(task, examples, texts, self.max_length)?;
        self.embed_ids(&ids, &mut |_, _| {})
    }

    /// Embeddings of already tokenized inputs, in input order. `progress` hears (rows, tokens) after
    /// each batch.
    pub fn embed_ids(
        &mut self,
        ids: &[Vec<u32>],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
        let pad_id = self.encoder.package.manifest.special_tokens.pad_id;
        let mut out = vec![Vec::new(); ids.len()];
        for rows in batch::plan(&lengths, self.batch_tokens, self.max_rows) {
            let batch = batch::pad(ids, &rows, pad_id);
            let vectors = self.embed_batch(&batch)?;
            for (row, v) in batch.rows.iter().zip(vectors) {
                out[*row] = v;
            }
            progress(batch.rows.len(), batch.tokens());
        }
        Ok(out)
    }

    /// Normalised embeddings of one padded batch, row by row.
    pub fn embed_batch(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        let shape = [batch.rows.len(), batch.seq];
        let mut feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(self.inputs.len());
        for name in &self.inputs {
            let data = match name.as_str() {
                "input_ids" => &batch.input_ids,
                "attention_mask" => &batch.attention_mask,
                _ => &batch.position_ids,
            };
            let tensor = Tensor::from_array((shape, data.clone()))
                .map_err(Error::runtime(format!("cannot build input {name}")))?;
            feed.push((Cow::Owned(name.clone()), tensor.into()));
        }
        let outputs = self.session.run(feed).map_err(Error::runtime(format!(
            "inference failed on a batch of {} x {}",
            shape[0], shape[1]
        )))?;
        let value = &outputs[self.output.as_str()];
        let expect = [shape[0] as i64, shape[1] as i64, self.hidden as i64];
        let mut rows = match value.dtype().tensor_type() {
            Some(TensorElementType::Float32) => {
                let (s, data) = value
                    .try_extract_tensor::<f32>()
                    .map_err(Error::runtime("cannot read the output"))?;
                check_output_shape(&s[..], &expect)?;
                pooling::last_token(data, batch.seq, self.hidden, &batch.lengths)
            }
            Some(TensorElementType::Float16) => {
                let (s, data) = value
                    .try_extract_tensor::<half::f16>()
                    .map_err(Error::runtime("cannot read the output"))?;
                check_output_shape(&s[..], &expect)?;
                pooling::last_token(data, batch.seq, self.hidden, &batch.lengths)
            }
            other => {
                return Err(Error::input(
                    "graph output",
                    format!("unsupported element type {other:?}"),
                ))
            }
        };
        for v in &mut rows {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::input(
                    "graph output",
                    format!(
                        "non-finite values in the embeddings ({} variant)",
                        self.variant
                    ),
                ));
            }
            if self.encoder.package.manifest.normalize {
                pooling::normalize(v);
            }
        }
        Ok(rows)
    }
}

fn check_output_shape(got: &[i64], want: &[i64; 3]) -> Result<()> {
    if got != want {
        return Err(Error::input(
            "graph output",
            format!("shape {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}

/// Resolves `auto` to the variant preferred on `device`.
pub fn choose_variant(package: &Package, requested: &str, device: Device) -> Result<String> {
    if requested != "auto" {
        package
            .variant_names()
            .iter()
            .find(|n| **n == requested)
            .ok_or_else(|| {
                Error::package(
                    &package.dir,
                    format!(
                        "has no variant {requested:?} (it has {})",
                        package.variant_names().join(", ")
                    ),
                )
            })?;
        return Ok(requested.to_string());
    }
    let preferred: &[&str] = if device.is_gpu() {
        &["fp16", "fp32"]
    } else {
        &["int8", "fp32"]
    };
    preferred
        .iter()
        .find(|p| package.manifest.variants.contains_key(**p))
        .map(|p| p.to_string())
        .or_else(|| package.variant_names().first().map(|s| s.to_string()))
        .ok_or_else(|| Error::package(&package.dir, "has no variants"))
}

fn session_settings(options: &EmbedderOptions, device: Device) -> SessionSettings {
    let batch_tokens = options
        .batch_tokens
        .unwrap_or(EmbedderOptions::default_batch_tokens(device));
    let cache_dir = options
        .cache_dir
        .clone()
        .unwrap_or_else(default_cache_dir)
        .join("tensorrt");
    SessionSettings {
        threads: options.threads,
        tensorrt: TensorRtSettings {
            max_batch: options.max_rows.max(1),
            opt_batch: options.max_rows.clamp(1, 16),
            max_seq: batch_tokens.clamp(512, 4096),
            opt_seq: 512,
            cache_dir,
        },
    }
}

/// `$XDG_CACHE_HOME/icl-embed`, else `~/.cache/icl-embed`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("icl-embed")
}

/// Checks the session's inputs and outputs against the manifest; returns the input names in graph
/// order and the output name.
fn check_graph(
    package: &Package,
    name: &str,
    variant: &Variant,
    session: &Session,
) -> Result<(Vec<String>, String)> {
    let graph_inputs: Vec<String> = session
        .inputs()
        .iter()
        .map(|i| i.name().to_string())
        .collect();
    let mut a = graph_inputs.clone();
    let mut b = variant.inputs.clone();
    a.sort();
    b.sort();
    if a != b {
        return Err(Error::package(
            &package.dir,
            format!(
                "variant {name}: the graph takes inputs {graph_inputs:?}, the manifest says {:?}",
                variant.inputs
            ),
        ));
    }
    for input in session.inputs() {
        if let ValueType::Tensor { ty, .. } = input.dtype() {
            if *ty != TensorElementType::Int64 {
                return Err(Error::package(
                    &package.dir,
                    format!(
                        "variant {name}: input {} is {ty:?}, expected int64",
                        input.name()
                    ),
                ));
            }
        }
    }
    if !session.outputs().iter().any(|o| o.name() == variant.output) {
        let have: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        return Err(Error::package(
            &package.dir,
            format!(
                "variant {name}: the graph has no output {:?} (it has {have:?})",
                variant.output
            ),
        ));
    }
    Ok((graph_inputs, variant.output.clone()))
}

/// One run's work for [`crate::stream::run`]: documents, or queries under one prompt (prefix and
/// limits computed once for the whole run).
pub struct EmbedJob<'a> {
    pub embedder: &'a mut Embedder,
    pub prompt: Option<QueryPrompt>,
}

impl crate::stream::BatchEmbedder for EmbedJob<'_> {
    fn token_ids(&mut self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        match &self.prompt {
            Some(prompt) => prompt.ids(&self.embedder.encoder.tokenizer, texts),
            None => self
                .embedder
                .encoder
                .documents(texts, self.embedder.max_length),
        }
    }

    fn embed(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        self.embedder.embed_batch(batch)
    }

    fn pad_id(&self) -> u32 {
        self.embedder.encoder.package.manifest.special_tokens.pad_id
    }

    fn hidden(&self) -> usize {
        self.embedder.hidden
    }
}
