//! Counters and histograms of the server, rendered in Prometheus' text format for `GET /metrics`.
//! A handful of series updated a few times per request: one mutex, no metrics crate.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

const SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const TOKENS: &[f64] = &[
    16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0,
];

#[derive(Debug)]
struct Inner {
    /// (route, status code) -> requests answered.
    requests: BTreeMap<(String, u16), u64>,
    queue_size: u64,
    batch_rows: Histogram,
    batch_tokens: Histogram,
    queue_seconds: Histogram,
    inference_seconds: Histogram,
    prefix_hits: u64,
    prefix_misses: u64,
    prefix_bytes: u64,
    failed_batches: u64,
    /// Client connections open.
    connections: u64,
}

/// The server's metrics, shared by the handlers, the batching task and the worker.
#[derive(Debug)]
pub struct Metrics(Mutex<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Metrics(Mutex::new(Inner {
            requests: BTreeMap::new(),
            queue_size: 0,
            batch_rows: Histogram::new(ROWS),
            batch_tokens: Histogram::new(TOKENS),
            queue_seconds: Histogram::new(SECONDS),
            inference_seconds: Histogram::new(SECONDS),
            prefix_hits: 0,
            prefix_misses: 0,
            prefix_bytes: 0,
            failed_batches: 0,
            connections: 0,
        }))
    }
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic elsewhere while holding the lock leaves plain counters behind: keep using them.
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut inner)
    }

    pub fn connection_opened(&self) {
        self.with(|m| m.connections += 1);
    }

    pub fn connection_closed(&self) {
        self.with(|m| m.connections = m.connections.saturating_sub(1));
    }

    pub fn request(&self, route: &str, status: u16) {
        self.with(|m| *m.requests.entry((route.to_string(), status)).or_default() += 1);
    }

    pub fn queue_size(&self, entries: usize) {
        self.with(|m| m.queue_size = entries as u64);
    }

    pub fn queued(&self, waited: Duration) {
        self.with(|m| m.queue_seconds.observe(waited.as_secs_f64()));
    }

    /// One model run of `rows` rows and `tokens` real tokens.
    pub fn batch(&self, rows: usize, tokens: usize, took: Duration, ok: bool) {
        self.with(|m| {
            m.batch_rows.observe(rows as f64);
            m.batch_tokens.observe(tokens as f64);
            m.inference_seconds.observe(took.as_secs_f64());
            if !ok {
                m.failed_batches += 1;
            }
        });
    }

    /// A batch on a few-shot prefix found its states kept (`hit`) or computed them.
    pub fn prefix(&self, hit: bool, bytes_kept: usize) {
        self.with(|m| {
            if hit {
                m.prefix_hits += 1;
            } else {
                m.prefix_misses += 1;
            }
            m.prefix_bytes = bytes_kept as u64;
        });
    }

    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            out.push_str("# HELP icl_embed_requests_total Requests answered, by route and HTTP status.\n# TYPE icl_embed_requests_total counter\n");
            for ((route, status), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "icl_embed_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
            let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            };
            gauge(
                &mut out,
                "icl_embed_open_connections",
                "gauge",
                "Client connections open (bounded by --max-connections).",
                m.connections,
            );
            gauge(
                &mut out,
                "icl_embed_queue_size",
                "gauge",
                "Requests waiting for the model.",
                m.queue_size,
            );
            m.batch_rows
                .render(&mut out, "icl_embed_batch_rows", "Rows per model run.");
            m.batch_tokens.render(
                &mut out,
                "icl_embed_batch_tokens",
                "Real tokens per model run (after a cached prefix).",
            );
            m.queue_seconds.render(
                &mut out,
                "icl_embed_queue_duration_seconds",
                "Time a request waited before its batch started.",
            );
            m.inference_seconds.render(
                &mut out,
                "icl_embed_inference_duration_seconds",
                "Time of one model run.",
            );
            gauge(
                &mut out,
                "icl_embed_failed_batches_total",
                "counter",
                "Model runs that failed (their requests got an error).",
                m.failed_batches,
            );
            gauge(
                &mut out,
                "icl_embed_prefix_cache_hits_total",
                "counter",
                "Batches on a few-shot prefix whose key/value states were kept.",
                m.prefix_hits,
            );
            gauge(
                &mut out,
                "icl_embed_prefix_cache_misses_total",
                "counter",
                "Batches on a few-shot prefix whose states had to be computed.",
                m.prefix_misses,
            );
            gauge(
                &mut out,
                "icl_embed_prefix_cache_bytes",
                "gauge",
                "Bytes of prefix key/value states kept.",
                m.prefix_bytes,
            );
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_render_in_prometheus_text() {
        let m = Metrics::default();
        m.batch(3, 100, Duration::from_millis(20), true);
        m.batch(40, 3000, Duration::from_millis(200), false);
        m.request("/embed", 200);
        m.request("/embed", 200);
        m.request("/embed", 429);
        let text = m.render();
        assert!(
            text.contains("icl_embed_batch_rows_bucket{le=\"4\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("icl_embed_batch_rows_bucket{le=\"64\"} 2\n"));
        assert!(text.contains("icl_embed_batch_rows_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("icl_embed_batch_tokens_sum 3100\n"));
        assert!(text.contains("icl_embed_requests_total{route=\"/embed\",status=\"200\"} 2\n"));
        assert!(text.contains("icl_embed_requests_total{route=\"/embed\",status=\"429\"} 1\n"));
        assert!(text.contains("icl_embed_failed_batches_total 1\n"));
    }
}
