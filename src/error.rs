//! The library's one error type. Messages are lowercase and name the input that is wrong; the
//! underlying cause stays reachable through `source()` (never flattened into the message), so the
//! CLI can print the whole chain and a server can tell a bad request ([`Error::Input`]) from a
//! fault of the package or the graph.

use std::path::PathBuf;

/// Everything that can go wrong while loading a package or embedding text. New kinds may be added,
/// so a `match` needs a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file of the package or an input could not be read or written.
    #[error("{}: {action}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The model package is missing, incomplete or inconsistent.
    #[error("model package {}: {reason}", path.display())]
    Package { path: PathBuf, reason: String },
    /// `embedder.json` is not valid JSON or does not have the expected fields.
    #[error("model package {}: embedder.json is invalid", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The tokenizer file could not be loaded or used.
    #[error("tokenizer: {context}")]
    Tokenizer {
        context: String,
        #[source]
        source: tokenizers::Error,
    },
    /// No ONNX Runtime shared library could be found or loaded.
    #[error("no usable ONNX Runtime library found; tried:\n  {}\nfix: pass --ort-lib PATH, set ORT_DYLIB_PATH, or `pip install onnxruntime` (CPU) / `onnxruntime-gpu` (CUDA, TensorRT)", tried.join("\n  "))]
    OrtLibrary { tried: Vec<String> },
    /// An execution provider that was asked for explicitly cannot run.
    #[error("execution provider {provider} is unavailable: {reason}")]
    Provider {
        provider: String,
        reason: String,
        #[source]
        source: Option<ort::Error>,
    },
    /// ONNX Runtime reported an error.
    #[error("onnx runtime: {context}")]
    Runtime {
        context: String,
        #[source]
        source: ort::Error,
    },
    /// The graph returned something the package's contract rules out (a wrong shape or dtype,
    /// non-finite values): a fault of the package or the runtime, not of the input.
    #[error("graph of variant {variant}: {reason}")]
    Graph { variant: String, reason: String },
    /// The Hugging Face Hub could not provide a package.
    #[error("model {spec}: {reason}")]
    Hub {
        spec: String,
        reason: String,
        #[source]
        source: Option<hf_hub::api::sync::ApiError>,
    },
    /// No variant fits in the memory this process may use (`--variant auto` on the CPU).
    #[error("not enough memory: {reason}")]
    Memory { reason: String },
    /// A text, example or option given by the user is unusable.
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },
    /// The files a corpus run keeps beside its output (run state, partial rows) are unreadable or
    /// disagree with each other: left by another version, edited, or damaged.
    #[error("{}: {reason}", path.display())]
    RunState { path: PathBuf, reason: String },
    /// A fault of icl-embed itself (a broken invariant, a panic while running a batch): a bug to
    /// report, never the caller's input.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }

    pub(crate) fn package(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Package {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn input(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Input {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn run_state(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::RunState {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn internal(what: impl Into<String>) -> Self {
        Error::Internal(what.into())
    }

    pub(crate) fn graph(variant: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Graph {
            variant: variant.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tokenizer(context: impl Into<String>) -> impl FnOnce(tokenizers::Error) -> Self {
        let context = context.into();
        move |source| Error::Tokenizer { context, source }
    }

    pub(crate) fn runtime(context: impl Into<String>) -> impl FnOnce(ort::Error) -> Self {
        let context = context.into();
        move |source| Error::Runtime { context, source }
    }

    /// Whether the error is the caller's input (a bad text, example or option) rather than the
    /// package, the runtime or the machine: a server answers these with 400, the others with 500.
    pub fn is_input(&self) -> bool {
        matches!(self, Error::Input { .. })
    }
}
