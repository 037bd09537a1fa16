//! The runtime options `embed` and `serve` share: where and how the model runs and how inputs are
//! batched. Declared once, flattened into both commands.

use std::path::PathBuf;

use clap::Args;
use icl_embed::{Device, EmbedderOptions, MemoryLimit, Variant};

#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// cpu, cuda[:N], tensorrt[:N] or auto (TensorRT, CUDA, CPU: the first this machine can run;
    /// says which it chose).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// fp32, fp16, int8 (or another variant the package has, e.g. w8a8) or auto (fp16 on GPU; on
    /// the CPU a faithful fast int8, else fp32, else int8, whichever fits in memory; says why).
    #[arg(long, default_value = "auto")]
    pub variant: Variant,
    /// Memory `--variant auto` may plan for on the CPU: a size (24G, 512M, bytes), auto (the
    /// cgroup's limit, RLIMIT_AS/RLIMIT_DATA or the available memory, whichever is smallest) or
    /// none (do not check).
    #[arg(long, default_value = "auto")]
    pub memory_limit: MemoryLimit,
    /// Intra-op threads of the model (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Token budget of one batch, rows x padded length (default 512 on CPU, 16384 on GPU);
    /// `serve` batches requests together up to it.
    #[arg(long, alias = "max-batch-tokens")]
    pub batch_tokens: Option<usize>,
    /// Most rows in one batch.
    #[arg(long, alias = "max-batch-rows", default_value_t = 64)]
    pub max_batch: usize,
    /// ONNX Runtime library (default: ORT_DYLIB_PATH, the project's .venv, python3's onnxruntime,
    /// the system).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Cache directory (TensorRT engines, stamps of verified files); default
    /// $XDG_CACHE_HOME/icl-embed.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Compute every query in full instead of computing the few-shot prefix once and the queries
    /// on top of its key/value states (for comparison; the cache is on by default).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Keep ONNX Runtime's CPU memory arena at its largest batch's size instead of returning its
    /// free memory to the system after each batch (the default; its cost was within the noise of
    /// small requests, BENCHMARKS.md).
    #[arg(long)]
    pub keep_cpu_arena: bool,
}

impl RuntimeArgs {
    /// The embedder's options; `max_length` overrides the package's maximum lengths.
    pub fn options(&self, max_length: Option<usize>) -> EmbedderOptions {
        EmbedderOptions::default()
            .variant(self.variant.clone())
            .device(self.device)
            .threads(self.threads)
            .batch_tokens(self.batch_tokens)
            .max_rows(self.max_batch)
            .max_length(max_length)
            .ort_lib(self.ort_lib.clone())
            .cache_dir(self.cache_dir.clone())
            .prefix_cache(!self.no_prefix_cache)
            .memory_limit(self.memory_limit)
            .shrink_arena(!self.keep_cpu_arena)
    }
}
