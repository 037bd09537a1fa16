//! `icl-embed serve`: an embedding server with OpenAI's (`/v1/embeddings`) and
//! text-embeddings-inference's (`/embed`) APIs, few-shot task presets, batching across requests
//! and the prefix cache, in text-embeddings-inference's shape: the handlers ([`api`]) validate and
//! tokenize (with the [`frontend`]), a semaphore bounds the requests in flight, requests wait in a queue ([`queue`]) from
//! which one batching task hands batches to the one thread that owns the model ([`worker`]), and
//! results return on one-shot channels. Connections are bounded (`--max-connections`) and their
//! headers and bodies read under time limits before a request takes a concurrency slot, so a slow
//! client costs a connection, never a slot. SIGTERM or SIGINT stops accepting connections, finishes
//! the requests in flight, and returns, at the latest when `--shutdown-grace` ends.

mod api;
mod config;
mod frontend;
mod metrics;
mod queue;
mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let result = runtime.block_on(serve(args, model, frontend));
    // Past the grace period, handlers may still wait on the worker: leave them.
    runtime.shutdown_background();
    result
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
        body_read_timeout: args.body_read_timeout,
    };
    let state = Arc::new(api::AppState {
        frontend: Arc::new(frontend),
        queue: queue_tx,
        permits: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
        metrics: metrics.clone(),
        limits,
        api_key: args.api_key.clone(),
        model_name: args.served_name(),
        healthy,
    });
    let app = api::router(state);
    let limits = ConnLimits {
        max_connections: args.max_connections.max(1),
        header_read_timeout: args.header_read_timeout,
        grace: args.shutdown_grace,
    };
    eprintln!("listening on http://{}", listener.local_addr()?);
    let deadline = accept_loop(listener, app, limits, metrics).await;
    // The connections are closed and their tasks gone: the queue's sender is dropped once the
    // handlers still running answer, then the batching task hands out what is left and ends,
    // then the worker. Past the grace period the process does not wait for them.
    match tokio::time::timeout_at(deadline, batcher).await {
        Ok(done) => done.context("the batching task failed")?,
        Err(_) => {
            eprintln!("stopped at the end of the grace period, before the queue had drained");
            return Ok(());
        }
    }
    while !worker.is_finished() {
        if Instant::now() >= deadline.into_std() {
            eprintln!("stopped at the end of the grace period, with a batch still running");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if worker.join().is_err() {
        anyhow::bail!("the inference worker panicked");
    }
    eprintln!("stopped: every request in flight was answered");
    Ok(())
}

/// How connections are bounded (`--max-connections`, `--header-read-timeout`,
/// `--shutdown-grace`).
#[derive(Clone, Copy)]
struct ConnLimits {
    max_connections: usize,
    header_read_timeout: Duration,
    grace: Duration,
}

/// Accepts connections until a signal, at most `max_connections` open at once (past that the
/// listener is left unpolled and the kernel's backlog holds the rest), each served by hyper with a
/// header read timeout. On a signal: stops accepting, asks every connection to close after its
/// current response, and aborts the ones still open when the grace period ends. Returns the
/// grace period's deadline.
async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnLimits,
    metrics: Arc<metrics::Metrics>,
) -> tokio::time::Instant {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let slot = tokio::select! {
            _ = &mut signal => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, _) = tokio::select! {
            _ = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        while connections.try_join_next().is_some() {}
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let metrics = metrics.clone();
        connections.spawn(async move {
            let _slot = slot;
            metrics.connection_opened();
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {},
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            metrics.connection_closed();
        });
    }
    let deadline = tokio::time::Instant::now() + limits.grace;
    drop(listener);
    let _ = stop_tx.send(true);
    let open = connections.len();
    let drained = tokio::time::timeout_at(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        eprintln!(
            "the grace period ({:.1} s) ended: closing {} of {open} connection(s)",
            limits.grace.as_secs_f64(),
            connections.len()
        );
        connections.shutdown().await;
    }
    deadline
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
