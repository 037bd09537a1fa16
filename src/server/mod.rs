//! `icl-embed serve`: an embedding server with OpenAI's (`/v1/embeddings`) and
//! text-embeddings-inference's (`/embed`) APIs, few-shot task presets, batching across requests
//! and the prefix cache, in text-embeddings-inference's shape: the handlers ([`api`]) validate and
//! tokenize (with the [`frontend`]), a semaphore bounds the requests in flight, requests wait in a queue ([`queue`]) from
//! which one batching task hands batches to the one thread that owns the model ([`worker`]), and
//! results return on one-shot channels. SIGTERM or SIGINT stops accepting connections, finishes
//! the requests in flight, and returns.

mod api;
mod config;
mod frontend;
mod metrics;
mod queue;
mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

pub use config::ServeArgs;

/// Loads the model, serves until a signal, and returns once every request in flight is answered.
pub fn run(args: ServeArgs) -> Result<()> {
    let started = Instant::now();
    let presets = config::read_tasks(args.tasks.as_deref())?;
    let (model, frontend) = worker::load(&args, &presets)?;
    let i = &frontend.info;
    eprintln!(
        "device {}, variant {}, {} task preset(s), prefix cache {}; loaded in {:.1} s",
        i.device,
        i.variant,
        presets.len(),
        if i.prefix_cache { "on" } else { "off" },
        started.elapsed().as_secs_f64()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, model, frontend))
}

async fn serve(args: ServeArgs, model: worker::Model, frontend: frontend::Frontend) -> Result<()> {
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let metrics = Arc::new(metrics::Metrics::default());
    let healthy = Arc::new(AtomicBool::new(true));
    let (queue_tx, queue_rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = mpsc::channel(1);
    let worker = {
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("icl-embed-worker".into())
            .spawn(move || worker::run(model, ready_tx, metrics))
            .context("cannot start the inference worker")?
    };
    let batcher = tokio::spawn(queue::batcher(
        queue_rx,
        ready_rx,
        frontend.info.max_batch_tokens,
        metrics.clone(),
        healthy.clone(),
    ));
    let limits = api::Limits {
        max_client_batch_size: args.max_client_batch_size.max(1),
        payload_limit: args.payload_limit,
        max_concurrent_requests: args.max_concurrent_requests.max(1),
    };
    let state = Arc::new(api::AppState {
        frontend: Arc::new(frontend),
        queue: queue_tx,
        permits: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
        metrics,
        limits,
        api_key: args.api_key.clone(),
        model_name: args.served_name(),
        healthy,
    });
    eprintln!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server failed")?;
    // The router and its queue sender are gone: the batching task hands out what is left and
    // ends, then the worker.
    batcher.await.context("the batching task failed")?;
    if worker.join().is_err() {
        anyhow::bail!("the inference worker panicked");
    }
    eprintln!("stopped: every request in flight was answered");
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    eprintln!("signal received: no new connections; finishing the requests in flight");
}
