//! `icl_embed._icl_embed`: the compiled half of the `icl_embed` Python package. The public classes
//! and their documentation are in `python/icl_embed/__init__.py`, which wraps these; this module
//! converts arguments, releases the GIL while the engine runs, hands results to numpy without
//! copying them, and turns the crate's errors into Python exceptions of the same kind.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use icl_embed::{Device, EmbedderOptions, Error, MemoryLimit, Variant};
use numpy::{IntoPyArray, PyArray2};
use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

create_exception!(
    _icl_embed,
    IclEmbedError,
    PyRuntimeError,
    "Base class of icl-embed's own errors (bad input is a ValueError instead)."
);
create_exception!(
    _icl_embed,
    PackageError,
    IclEmbedError,
    "The model package is missing, incomplete, damaged or inconsistent."
);
create_exception!(
    _icl_embed,
    RuntimeUnavailableError,
    IclEmbedError,
    "ONNX Runtime, or the execution provider asked for, cannot be loaded or started."
);

/// The crate's error as the Python exception of its kind, with its causes in the message.
fn to_py(e: Error) -> PyErr {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    match e {
        Error::Input { .. } => PyValueError::new_err(message),
        Error::Memory { .. } => PyMemoryError::new_err(message),
        Error::Package { .. }
        | Error::Manifest { .. }
        | Error::Tokenizer { .. }
        | Error::Graph { .. }
        | Error::Hub { .. }
        | Error::Io { .. } => PackageError::new_err(message),
        Error::OrtLibrary { .. } | Error::Provider { .. } => {
            RuntimeUnavailableError::new_err(message)
        }
        _ => IclEmbedError::new_err(message),
    }
}

/// Runs `f` with the GIL released, a panic becoming an `IclEmbedError` instead of crossing into
/// Python.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|panic| {
            let what = icl_embed::engine::run::panic_message(panic.as_ref());
            IclEmbedError::new_err(format!(
                "internal error (please report it): a panic: {what}"
            ))
        })?
        .map_err(to_py)
}

/// Texts from a Python sequence, each named by its position when it is not a `str`.
fn texts(what: &str, items: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if items.is_instance_of::<PyString>() {
        return Ok(vec![items.extract()?]);
    }
    let mut out = Vec::new();
    for (i, item) in items.try_iter()?.enumerate() {
        let item = item?;
        let text = item.cast::<PyString>().map_err(|_| {
            let kind = item
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            PyValueError::new_err(format!("{what}[{i}]: expected str, got {kind}"))
        })?;
        out.push(text.to_str()?.to_owned());
    }
    Ok(out)
}

fn refs(texts: &[String]) -> Vec<&str> {
    texts.iter().map(String::as_str).collect()
}

/// One few-shot example (see `icl_embed.Example`).
#[pyclass(module = "icl_embed", name = "Example", frozen, eq, from_py_object)]
#[derive(Clone, PartialEq)]
struct PyExample {
    #[pyo3(get)]
    query: String,
    #[pyo3(get)]
    response: String,
    #[pyo3(get)]
    instruct: Option<String>,
}

#[pymethods]
impl PyExample {
    #[new]
    #[pyo3(signature = (query, response, instruct=None))]
    fn new(query: String, response: String, instruct: Option<String>) -> Self {
        PyExample {
            query,
            response,
            instruct,
        }
    }

    fn __repr__(&self) -> String {
        match &self.instruct {
            Some(i) => format!(
                "Example(query={:?}, response={:?}, instruct={i:?})",
                self.query, self.response
            ),
            None => format!(
                "Example(query={:?}, response={:?})",
                self.query, self.response
            ),
        }
    }
}

impl PyExample {
    fn to_rust(&self) -> icl_embed::Example {
        let mut e = icl_embed::Example::new(&self.query, &self.response);
        e.instruct = self.instruct.clone();
        e
    }
}

/// Examples from a Python iterable of `Example` or mappings with `query`, `response` and an
/// optional `instruct` (the examples files' layout).
fn examples(items: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<icl_embed::Example>> {
    let Some(items) = items.filter(|i| !i.is_none()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (i, item) in items.try_iter()?.enumerate() {
        let item = item?;
        if let Ok(e) = item.cast::<PyExample>() {
            out.push(e.get().to_rust());
            continue;
        }
        let Ok(d) = item.cast::<PyDict>() else {
            return Err(PyValueError::new_err(format!(
                "examples[{i}]: expected an Example or a dict with 'query' and 'response'"
            )));
        };
        let field = |name: &str| -> PyResult<Option<String>> {
            match d.get_item(name)? {
                None => Ok(None),
                Some(v) if v.is_none() && name == "instruct" => Ok(None),
                Some(v) => v.extract::<String>().map(Some).map_err(|_| {
                    PyValueError::new_err(format!("examples[{i}]['{name}']: expected str"))
                }),
            }
        };
        for key in d.keys() {
            let key: String = key.extract().unwrap_or_default();
            if !["query", "response", "instruct"].contains(&key.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "examples[{i}]: unknown field {key:?} (expected query, response, instruct)"
                )));
            }
        }
        let need = |name: &str| {
            field(name)?
                .ok_or_else(|| PyValueError::new_err(format!("examples[{i}]: missing '{name}'")))
        };
        let mut e = icl_embed::Example::new(need("query")?, need("response")?);
        e.instruct = field("instruct")?;
        out.push(e);
    }
    Ok(out)
}

/// A query prompt made by `Embedder.query_prompt` or `Encoder.query_prompt`: the task in effect
/// (the caller's, else the package's default task) and its few-shot examples, tokenized once. It
/// belongs to the package that made it.
#[pyclass(module = "icl_embed", name = "QueryPrompt", frozen)]
struct PyQueryPrompt {
    prompt: icl_embed::QueryPrompt,
    /// The package directory that made it: a prompt is token ids of one tokenizer.
    package: PathBuf,
    #[pyo3(get)]
    task: Option<String>,
    #[pyo3(get)]
    examples: usize,
}

#[pymethods]
impl PyQueryPrompt {
    /// Ids every query of this prompt starts with (the few-shot prefix, or an `instruct` prompt's
    /// instruction), or None when nothing is shared.
    #[getter]
    fn prefix_ids(&self) -> Option<Vec<u32>> {
        self.prompt.shared_prefix().map(<[u32]>::to_vec)
    }

    fn __repr__(&self) -> String {
        format!(
            "QueryPrompt(task={:?}, examples={}, prefix_tokens={})",
            self.task,
            self.examples,
            self.prompt.shared_prefix().map_or(0, <[u32]>::len)
        )
    }
}

impl PyQueryPrompt {
    fn made(prompt: icl_embed::QueryPrompt, package: PathBuf, examples: usize) -> Self {
        PyQueryPrompt {
            task: prompt.task().map(str::to_string),
            prompt,
            package,
            examples,
        }
    }

    fn check(&self, package: &std::path::Path) -> PyResult<&icl_embed::QueryPrompt> {
        if self.package != package {
            return Err(PyValueError::new_err(format!(
                "prompt: made for the package {}, not {}; make it with this embedder's query_prompt()",
                self.package.display(),
                package.display()
            )));
        }
        Ok(&self.prompt)
    }
}

/// Tokenization of a package, without ONNX Runtime (see `icl_embed.Encoder`).
#[pyclass(module = "icl_embed", name = "Encoder", frozen)]
struct PyEncoder {
    encoder: icl_embed::Encoder,
}

#[pymethods]
impl PyEncoder {
    #[new]
    fn new(py: Python<'_>, model: PathBuf) -> PyResult<Self> {
        let encoder = detached(py, move || icl_embed::Encoder::open(&model))?;
        Ok(PyEncoder { encoder })
    }

    #[pyo3(signature = (texts, max_length=None))]
    fn documents(
        &self,
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        max_length: Option<usize>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let texts = self::texts("texts", texts)?;
        detached(py, || self.encoder.documents(&refs(&texts), max_length))
    }

    #[pyo3(signature = (task=None, examples=None, max_length=None))]
    fn query_prompt(
        &self,
        py: Python<'_>,
        task: Option<String>,
        examples: Option<&Bound<'_, PyAny>>,
        max_length: Option<usize>,
    ) -> PyResult<PyQueryPrompt> {
        let examples = self::examples(examples)?;
        let n = examples.len();
        let prompt = detached(py, || {
            self.encoder
                .query_prompt(task.as_deref(), &examples, max_length)
        })?;
        Ok(PyQueryPrompt::made(
            prompt,
            self.encoder.package().dir.clone(),
            n,
        ))
    }

    fn queries(
        &self,
        py: Python<'_>,
        prompt: &PyQueryPrompt,
        texts: &Bound<'_, PyAny>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let prompt = prompt.check(&self.encoder.package().dir)?;
        let texts = self::texts("texts", texts)?;
        detached(py, || self.encoder.queries(prompt, &refs(&texts)))
    }

    #[getter]
    fn model(&self) -> PathBuf {
        self.encoder.package().dir.clone()
    }
}

/// What an `Embedder` runs (see `icl_embed.Info`).
#[pyclass(module = "icl_embed", name = "Info", frozen, get_all)]
#[derive(Clone)]
struct PyInfo {
    model: PathBuf,
    device: String,
    variant: String,
    variant_reason: String,
    hidden_size: usize,
    max_length_documents: usize,
    max_length_queries: usize,
    window: Option<usize>,
    prefix_cache: bool,
    threads: Option<usize>,
    onnxruntime: Option<PathBuf>,
    /// The shortest shortened vectors the package allows (`dimensions=`), or None.
    dimensions: Option<usize>,
    /// The prompt procedure: "flagembedding-icl" or "instruct".
    procedure: String,
    /// The task queries take when none is given, or None.
    default_task: Option<String>,
}

#[pymethods]
impl PyInfo {
    fn __repr__(&self) -> String {
        format!(
            "Info(model={:?}, device={:?}, variant={:?} ({}), hidden_size={}, max_length documents/queries={}/{}, window={}, prefix_cache={}, procedure={}, dimensions={})",
            self.model.display().to_string(),
            self.device,
            self.variant,
            self.variant_reason,
            self.hidden_size,
            self.max_length_documents,
            self.max_length_queries,
            self.window.map_or("none".into(), |w| w.to_string()),
            self.prefix_cache,
            self.procedure,
            self.dimensions
                .map_or("none".into(), |d| format!("{d}..={}", self.hidden_size)),
        )
    }
}

/// Embeds documents and few-shot queries with one package (see `icl_embed.Embedder`).
#[pyclass(module = "icl_embed", name = "Embedder", frozen)]
struct PyEmbedder {
    /// One call at a time per embedder: the model's session and the prefix store are its state.
    /// Locked only with the GIL released, so a waiting thread never holds the GIL.
    embedder: Mutex<icl_embed::Embedder>,
    info: PyInfo,
}

fn lock(m: &Mutex<icl_embed::Embedder>) -> MutexGuard<'_, icl_embed::Embedder> {
    // A panic inside a call is caught per batch by the engine; its state stays usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn parse<T: std::str::FromStr<Err = Error>>(what: &str, value: &str) -> PyResult<T> {
    value.parse().map_err(|e: Error| match e {
        Error::Input { reason, .. } => PyValueError::new_err(format!("{what}: {reason}")),
        other => to_py(other),
    })
}

#[pymethods]
impl PyEmbedder {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (model, variant, device, threads, batch_tokens, max_batch, max_length, prefix_cache, cache_dir, ort_lib, memory_limit))]
    fn new(
        py: Python<'_>,
        model: PathBuf,
        variant: &str,
        device: &str,
        threads: Option<usize>,
        batch_tokens: Option<usize>,
        max_batch: usize,
        max_length: Option<usize>,
        prefix_cache: bool,
        cache_dir: Option<PathBuf>,
        ort_lib: Option<PathBuf>,
        memory_limit: &str,
    ) -> PyResult<Self> {
        let variant: Variant = parse("variant", variant)?;
        let memory_limit: MemoryLimit = parse("memory_limit", memory_limit)?;
        let device: Device = parse("device", device)?;
        for (what, value) in [
            ("threads", threads),
            ("batch_tokens", batch_tokens),
            ("max_length", max_length),
            ("max_batch", Some(max_batch)),
        ] {
            if value == Some(0) {
                return Err(PyValueError::new_err(format!("{what}: must be at least 1")));
            }
        }
        let options = EmbedderOptions::default()
            .variant(variant.clone())
            .device(device)
            .threads(threads)
            .batch_tokens(batch_tokens)
            .max_rows(max_batch)
            .max_length(max_length)
            .prefix_cache(prefix_cache)
            .cache_dir(cache_dir)
            .ort_lib(ort_lib)
            .memory_limit(memory_limit);
        let embedder = detached(py, || icl_embed::Embedder::new(&model, &options))?;
        let info = describe(&embedder, &variant, threads, max_length, prefix_cache);
        Ok(PyEmbedder {
            embedder: Mutex::new(embedder),
            info,
        })
    }

    #[pyo3(signature = (texts, dimensions=None))]
    fn embed_documents<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        dimensions: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let texts = self::texts("texts", texts)?;
        let vectors = detached(py, || {
            let mut embedder = lock(&self.embedder);
            embedder.encoder().check_dimensions(dimensions)?;
            Ok(shortened(
                embedder.embed_documents(&refs(&texts))?,
                dimensions,
            ))
        })?;
        Ok(vectors.into_pyarray(py))
    }

    #[pyo3(signature = (task=None, examples=None))]
    fn query_prompt(
        &self,
        py: Python<'_>,
        task: Option<String>,
        examples: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyQueryPrompt> {
        let examples = self::examples(examples)?;
        let n = examples.len();
        let prompt = detached(py, || {
            lock(&self.embedder).query_prompt(task.as_deref(), &examples)
        })?;
        Ok(PyQueryPrompt::made(prompt, self.info.model.clone(), n))
    }

    #[pyo3(signature = (prompt, texts, dimensions=None))]
    fn embed_queries<'py>(
        &self,
        py: Python<'py>,
        prompt: &PyQueryPrompt,
        texts: &Bound<'py, PyAny>,
        dimensions: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let prompt = prompt.check(&self.info.model)?;
        let texts = self::texts("texts", texts)?;
        let vectors = detached(py, || {
            let mut embedder = lock(&self.embedder);
            embedder.encoder().check_dimensions(dimensions)?;
            Ok(shortened(
                embedder.embed_queries(prompt, &refs(&texts))?,
                dimensions,
            ))
        })?;
        Ok(vectors.into_pyarray(py))
    }

    #[getter]
    fn info(&self) -> PyInfo {
        self.info.clone()
    }

    /// What the prefix cache did so far, as a dict.
    #[getter]
    fn prefix_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py.detach(|| lock(&self.embedder).prefix_stats().clone());
        let d = PyDict::new(py);
        d.set_item("prefixes", s.prefixes)?;
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("prefix_tokens", s.prefix_tokens)?;
        d.set_item("state_bytes", s.state_bytes)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("cached_rows", s.cached)?;
        d.set_item("full_rows", s.fallback)?;
        Ok(d)
    }
}

/// `vectors` shortened to `dimensions` components, renormalised (all of them with `None`).
fn shortened(vectors: ndarray::Array2<f32>, dimensions: Option<usize>) -> ndarray::Array2<f32> {
    match dimensions {
        Some(n) => icl_embed::shorten(&vectors, n),
        None => vectors,
    }
}

/// The `Info` of a loaded embedder: what runs, and why this variant.
fn describe(
    e: &icl_embed::Embedder,
    asked: &Variant,
    threads: Option<usize>,
    max_length: Option<usize>,
    prefix_cache: bool,
) -> PyInfo {
    let package = e.encoder().package();
    let m = &package.manifest;
    let model = e.model();
    let mut reason = match (asked, model.variant_reason()) {
        (Variant::Auto, Some(why)) => format!("auto: {why}"),
        (Variant::Auto, None) => "auto: fp16 preferred on a GPU, else fp32".to_string(),
        _ => "asked for".to_string(),
    };
    if let Some(warning) = model.memory_warning() {
        reason.push_str(&format!("; {warning}"));
    }
    if !model.notes().is_empty() {
        reason.push_str(&format!(
            "; devices passed over: {}",
            model.notes().join("; ")
        ));
    }
    PyInfo {
        model: package.dir.clone(),
        device: model.device().to_string(),
        variant: model.variant().to_string(),
        variant_reason: reason,
        hidden_size: model.hidden(),
        max_length_documents: max_length.unwrap_or(m.max_length.document),
        max_length_queries: max_length.unwrap_or(m.max_length.query),
        window: model.max_tokens(),
        prefix_cache: prefix_cache && model.supports_prefix(),
        threads,
        onnxruntime: icl_embed::backend::runtime::loaded_library().map(PathBuf::from),
        dimensions: m.dimensions.map(|d| d.min),
        procedure: m.prompt.procedure.name().to_string(),
        default_task: m.prompt.default_task.clone(),
    }
}

#[pymodule]
fn _icl_embed(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEmbedder>()?;
    m.add_class::<PyEncoder>()?;
    m.add_class::<PyExample>()?;
    m.add_class::<PyQueryPrompt>()?;
    m.add_class::<PyInfo>()?;
    let py = m.py();
    m.add("IclEmbedError", py.get_type::<IclEmbedError>())?;
    m.add("PackageError", py.get_type::<PackageError>())?;
    m.add(
        "RuntimeUnavailableError",
        py.get_type::<RuntimeUnavailableError>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
