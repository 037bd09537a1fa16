//! `icl-embed serve` (issue 14): the real binary on a loopback port, called over plain HTTP. Its
//! embeddings and token ids against the CLI's on the same inputs, every error case the issue lists,
//! many clients at once, and shutdown with requests in flight. The `openai` client is exercised by
//! tests/python/test_server.py.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const INSTRUCTION: &str =
    "Given a web search query, retrieve relevant passages that answer the query.";

/// A running server; killed when dropped.
struct Server {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `serve` on a free loopback port with the tiny package (fp32, CPU, one thread).
    fn start(pkg: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(bin())
            .args(["serve", "--model"])
            .arg(pkg)
            .args(["--host", "127.0.0.1", "--port", "0", "--variant", "fp32"])
            .args(["--device", "cpu", "--threads", "1"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start icl-embed serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = loop {
            let line = match lines.next() {
                Some(Ok(line)) => line,
                _ => {
                    let status = child.wait().unwrap();
                    panic!(
                        "serve exited ({status}) before listening: {}",
                        stderr.lock().unwrap()
                    );
                }
            };
            stderr.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(a) = line.strip_prefix("listening on http://") {
                break a.trim().to_string();
            }
            assert!(Instant::now() < deadline, "serve did not start");
        };
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Server {
            child,
            addr,
            stderr,
        }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_with(path, body, &[])
    }

    fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let (status, text) = http(
            &self.addr,
            "POST",
            path,
            headers,
            body.to_string().as_bytes(),
        );
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: status {status}, body is not JSON ({e}): {text}"));
        (status, value)
    }

    fn get(&self, path: &str) -> (u16, String) {
        http(&self.addr, "GET", path, &[], b"")
    }

    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to end by itself and returns its exit code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn request_head(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    len: usize,
) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// One HTTP/1.1 request on a new connection: (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .write_all(request_head(addr, method, path, headers, body.len()).as_bytes())
        .unwrap();
    stream.write_all(body).unwrap();
    read_response(stream)
}

fn read_response(mut stream: TcpStream) -> (u16, String) {
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).expect("response is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("no end of headers");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap_or_else(|| panic!("not a list: {r}"))
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// The `data[*].embedding` rows of an OpenAI response, checking `index` order.
fn openai_rows(v: &Value) -> Vec<Vec<f32>> {
    let data = v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data: {v}"));
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"].as_u64(), Some(i as u64), "{v}");
        assert_eq!(d["object"], "embedding");
    }
    rows(&Value::Array(
        data.iter().map(|d| d["embedding"].clone()).collect(),
    ))
}

fn decode_base64(s: &str) -> Vec<f32> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut bytes = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .expect("base64 character") as u32;
        bits = bits << 6 | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            bytes.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const DOCS: [&str; 5] = [
    "Paris is the capital and most populous city of France.",
    "The mitochondrion is the powerhouse of the cell.",
    "Crème brûlée: un dessert à base de crème et de sucre caramélisé.",
    "東京は日本の首都です。",
    "A short one.",
];

const QUERIES: [&str; 4] = [
    "what is the capital of france",
    "how do cells make energy",
    "best dessert recipe with caramel",
    "capital of japan",
];

/// A work directory with the three-example MSMARCO prefix as an examples file and as a tasks file.
struct Setup {
    dir: tempfile::TempDir,
    examples: Vec<Value>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<Value> = serde_json::from_str(
            &std::fs::read_to_string(data_dir().join("MTEB/MSMARCO.json")).unwrap(),
        )
        .unwrap();
        let examples: Vec<Value> = all.into_iter().take(3).collect();
        std::fs::write(
            dir.path().join("examples.json"),
            Value::Array(examples.clone()).to_string(),
        )
        .unwrap();
        let tasks = json!({
            "msmarco": {"instruction": INSTRUCTION, "examples": "examples.json"},
            "plain": {"instruction": "Retrieve semantically similar text."},
            "other": {"instruction": "Retrieve passages that answer the question.", "examples": "examples.json"},
        });
        std::fs::write(dir.path().join("tasks.json"), tasks.to_string()).unwrap();
        Setup { dir, examples }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tasks(&self) -> String {
        self.path("tasks.json").display().to_string()
    }

    fn write_lines(&self, name: &str, texts: &[&str]) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, texts.join("\n")).unwrap();
        path
    }

    /// The CLI's embeddings (fp32) of `texts`, as documents or as MSMARCO queries.
    fn cli_embed(&self, pkg: &Path, texts: &[&str], queries: bool) -> Vec<Vec<f32>> {
        let input = self.write_lines("in.txt", texts);
        let out = self.path("out.npy");
        let examples = self.path("examples.json").display().to_string();
        let mut extra = vec!["--variant", "fp32", "--device", "cpu", "--quiet"];
        if queries {
            extra.extend(["--queries", "--task", INSTRUCTION, "--examples", &examples]);
        }
        ok(run(&embed_args(pkg, &input, &out, &extra)));
        read_npy(&out)
    }

    fn cli_tokenize(&self, pkg: &Path, texts: &[&str], queries: bool) -> Vec<Vec<u32>> {
        let input = self.write_lines("in.txt", texts);
        let examples = self.path("examples.json").display().to_string();
        let extra: &[&str] = if queries {
            &["--queries", "--task", INSTRUCTION, "--examples", &examples]
        } else {
            &[]
        };
        tokenize_ids(pkg, &input, extra)
    }
}

fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: row counts");
    let c = got
        .iter()
        .zip(want)
        .map(|(a, b)| cosine(a, b))
        .fold(f64::INFINITY, f64::min);
    assert!(c >= 0.99999, "{what}: min cosine {c} against the CLI");
}

#[test]
fn embeddings_and_token_ids_equal_the_cli_on_every_route() {
    let Some(fx) = fixtures() else { return };
    let pkg = &fx.tiny_pkg;
    let setup = Setup::new();
    let docs_cli = setup.cli_embed(pkg, &DOCS, false);
    let queries_cli = setup.cli_embed(pkg, &QUERIES, true);
    let server = Server::start(pkg, &["--tasks", &setup.tasks()]);

    // OpenAI route: documents as floats and as base64, queries by preset and inline.
    let (status, v) = server.post("/v1/embeddings", &json!({"model": "x", "input": DOCS}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    let docs = openai_rows(&v);
    assert_close("/v1/embeddings documents", &docs, &docs_cli);
    let doc_ids = setup.cli_tokenize(pkg, &DOCS, false);
    let tokens: usize = doc_ids.iter().map(Vec::len).sum();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some(tokens as u64),
        "{v}"
    );
    assert_eq!(v["usage"]["total_tokens"].as_u64(), Some(tokens as u64));

    let (status, b) = server.post(
        "/v1/embeddings",
        &json!({"input": DOCS, "encoding_format": "base64"}),
    );
    assert_eq!(status, 200, "{b}");
    let decoded: Vec<Vec<f32>> = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| decode_base64(d["embedding"].as_str().unwrap()))
        .collect();
    assert_eq!(decoded, docs, "base64 and float differ");

    let (status, v) = server.post(
        "/v1/embeddings",
        &json!({"input": "Paris is the capital and most populous city of France."}),
    );
    assert_eq!(status, 200, "{v}");
    assert_close("a single string", &openai_rows(&v), &docs_cli[..1]);

    let (status, v) = server.post(
        "/v1/embeddings",
        &json!({"input": QUERIES, "task": "msmarco"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_close("queries by preset", &openai_rows(&v), &queries_cli);
    let inline = json!({"input": QUERIES, "instruction": INSTRUCTION, "examples": setup.examples});
    let (status, v) = server.post("/v1/embeddings", &inline);
    assert_eq!(status, 200, "{v}");
    assert_close("queries inline", &openai_rows(&v), &queries_cli);

    // TEI route.
    let (status, v) = server.post("/embed", &json!({"inputs": DOCS}));
    assert_eq!(status, 200, "{v}");
    assert_close("/embed documents", &rows(&v), &docs_cli);
    let (status, v) = server.post(
        "/embed",
        &json!({"inputs": QUERIES, "prompt_name": "msmarco"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_close("/embed queries", &rows(&v), &queries_cli);

    // Token ids: /tokenize equals `icl-embed tokenize`, and ids embed as their text does.
    let (status, v) = server.post("/tokenize", &json!({"inputs": DOCS}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(serde_json::from_value::<Vec<Vec<u32>>>(v).unwrap(), doc_ids);
    let (status, v) = server.post("/tokenize", &json!({"inputs": QUERIES, "task": "msmarco"}));
    assert_eq!(status, 200, "{v}");
    let query_ids = setup.cli_tokenize(pkg, &QUERIES, true);
    assert_eq!(
        serde_json::from_value::<Vec<Vec<u32>>>(v).unwrap(),
        query_ids
    );
    let (status, v) = server.post("/v1/embeddings", &json!({"input": query_ids}));
    assert_eq!(status, 200, "{v}");
    assert_close("query token ids", &openai_rows(&v), &queries_cli);
    let (status, v) = server.post("/v1/embeddings", &json!({"input": doc_ids[1]}));
    assert_eq!(status, 200, "{v}");
    assert_close("one list of token ids", &openai_rows(&v), &docs_cli[1..2]);

    // The preset's prefix was computed once and reused by the later query batches.
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    let hits = metric(&metrics, "icl_embed_prefix_cache_hits_total");
    let misses = metric(&metrics, "icl_embed_prefix_cache_misses_total");
    assert!(
        hits >= 1.0 && misses >= 1.0,
        "hits {hits}, misses {misses}:\n{metrics}"
    );
    assert!(metric(&metrics, "icl_embed_prefix_cache_bytes") > 0.0);
    assert!(
        metrics.contains("icl_embed_requests_total{route=\"/v1/embeddings\",status=\"200\"}"),
        "{metrics}"
    );
    let (status, info) = server.get("/info");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["variant"], "fp32");
    assert_eq!(info["tasks"], json!(["msmarco", "other", "plain"]));
    assert_eq!(server.get("/health").0, 200);
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Asserts the status and that the error names `field` (and `index`), in the route's shape.
fn refused(server: &Server, path: &str, body: Value, status: u16, field: &str, index: Option<u64>) {
    let headers = [("Authorization", "Bearer sesame")];
    let (got, v) = server.post_with(path, &body, &headers);
    assert_eq!(got, status, "{path} {body}: {v}");
    let e = if path.starts_with("/v1/") {
        &v["error"]
    } else {
        &v
    };
    assert_eq!(
        e["field"].as_str().or(e["param"].as_str()),
        Some(field),
        "{path} {body}: {v}"
    );
    assert_eq!(e["index"].as_u64(), index, "{path} {body}: {v}");
    let message = if path.starts_with("/v1/") {
        e["message"].as_str()
    } else {
        e["error"].as_str()
    };
    assert!(message.is_some_and(|m| m.starts_with(field)), "{v}");
}

#[test]
fn every_bad_request_gets_its_status_and_names_the_field() {
    let Some(fx) = fixtures() else { return };
    let setup = Setup::new();
    let server = Server::start(
        &fx.tiny_pkg,
        &[
            "--tasks",
            &setup.tasks(),
            "--api-key",
            "sesame",
            "--max-client-batch-size",
            "4",
            "--payload-limit",
            "20000",
        ],
    );
    let auth = [("Authorization", "Bearer sesame")];
    let good = json!({"input": ["a text"]});

    // 401 without or with a wrong key; /health needs none.
    let (s, v) = server.post("/v1/embeddings", &good);
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["type"], "authentication_error");
    let (s, _) = server.post_with(
        "/embed",
        &json!({"inputs": "x"}),
        &[("Authorization", "Bearer nope")],
    );
    assert_eq!(s, 401);
    assert_eq!(server.get("/info").0, 401);
    assert_eq!(server.get("/health").0, 200);

    // 400: empty inputs, and `dimensions`.
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": []}),
        400,
        "input",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": ""}),
        400,
        "input",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": ["ok", ""]}),
        400,
        "input",
        Some(1),
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": [[5, 6], []]}),
        400,
        "input",
        Some(1),
    );
    refused(
        &server,
        "/embed",
        json!({"inputs": []}),
        400,
        "inputs",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": "x", "dimensions": 8}),
        400,
        "dimensions",
        None,
    );

    // 413: a body over the payload limit, and /embed's over-long text without truncate.
    let big = json!({"input": "word ".repeat(5000)});
    let (s, v) = server.post_with("/v1/embeddings", &big, &auth);
    assert_eq!(s, 413, "{v}");
    let long = "word ".repeat(1500);
    refused(
        &server,
        "/embed",
        json!({"inputs": ["short", long]}),
        413,
        "inputs",
        Some(1),
    );
    let (s, v) = server.post_with(
        "/embed",
        &json!({"inputs": ["short", long], "truncate": true}),
        &auth,
    );
    assert_eq!(s, 200, "{v}");

    // 422: too many inputs, a bad input, bad token ids, unknown task, malformed examples, bad fields.
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": ["a", "b", "c", "d", "e"]}),
        422,
        "input",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": ["a", "b", 7]}),
        422,
        "input",
        Some(2),
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": [[1, 2], [3, 99999999]]}),
        422,
        "input",
        Some(1),
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": [1, -2]}),
        422,
        "input",
        Some(1),
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": [[1, 2]], "task": "msmarco"}),
        422,
        "input",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": "q", "task": "nope"}),
        422,
        "task",
        None,
    );
    refused(
        &server,
        "/embed",
        json!({"inputs": "q", "prompt_name": "nope"}),
        422,
        "prompt_name",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": "q", "task": "msmarco", "instruction": "x"}),
        422,
        "task",
        None,
    );
    let malformed = json!({"input": "q", "instruction": "Find.", "examples": [{"query": "a", "response": "b"}, {"query": "c"}]});
    refused(
        &server,
        "/v1/embeddings",
        malformed,
        422,
        "examples[1]",
        None,
    );
    let no_instruct = json!({"inputs": "q", "examples": [{"query": "a", "response": "b"}]});
    refused(
        &server,
        "/embed",
        no_instruct,
        422,
        "examples[0].instruct",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": "q", "encoding_format": "int8"}),
        422,
        "encoding_format",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": {"text": "q"}}),
        422,
        "input",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!({"input": "q", "model": 5}),
        422,
        "model",
        None,
    );
    refused(
        &server,
        "/embed",
        json!({"inputs": "q", "normalize": false}),
        422,
        "normalize",
        None,
    );
    refused(
        &server,
        "/embed",
        json!({"inputs": "q", "truncate": "yes"}),
        422,
        "truncate",
        None,
    );
    refused(
        &server,
        "/v1/embeddings",
        json!(["not", "an", "object"]),
        422,
        "body",
        None,
    );

    // Invalid JSON is a 400 too; an unknown route a 404 in JSON.
    let (s, body) = http(
        &server.addr,
        "POST",
        "/v1/embeddings",
        &auth,
        b"{\"input\": ",
    );
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("invalid JSON"), "{body}");
    let (s, body) = http(&server.addr, "GET", "/nope", &auth, b"");
    assert_eq!(s, 404, "{body}");

    // The server kept serving, and counted every answer.
    let (s, v) = server.post_with("/v1/embeddings", &good, &auth);
    assert_eq!(s, 200, "{v}");
    let (_, metrics) = http(&server.addr, "GET", "/metrics", &auth, b"");
    for status in [400, 401, 413, 422, 200] {
        assert!(
            metrics.contains(&format!("status=\"{status}\"}}")),
            "no {status} in:\n{metrics}"
        );
    }
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// Sends the head and half the body of a request; the rest is sent by [`finish`].
fn start_request(addr: &str, body: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = request_head(addr, "POST", "/v1/embeddings", &[], body.len());
    stream.write_all(head.as_bytes()).unwrap();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    stream.write_all(first).unwrap();
    stream.flush().unwrap();
    (stream, rest.to_vec())
}

fn finish((mut stream, rest): (TcpStream, Vec<u8>)) -> (u16, Value) {
    stream.write_all(&rest).unwrap();
    let (status, body) = read_response(stream);
    (status, serde_json::from_str(&body).unwrap())
}

/// A connection that sent `head` (and maybe the start of a body) and then waits.
fn stalled(addr: &str, head: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(head).unwrap();
    stream.flush().unwrap();
    stream
}

/// Reads what the server sends until it closes the connection (or `within` passes: a panic).
fn read_until_closed(mut stream: TcpStream, within: Duration) -> String {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("the server kept the connection open: {e}"));
    String::from_utf8_lossy(&raw).into_owned()
}

#[test]
fn slow_clients_cost_a_connection_not_a_slot_and_sigterm_finishes_what_is_in_flight() {
    let Some(fx) = fixtures() else { return };
    let setup = Setup::new();
    let docs_cli = setup.cli_embed(&fx.tiny_pkg, &DOCS, false);
    let mut server = Server::start(
        &fx.tiny_pkg,
        &[
            "--max-concurrent-requests",
            "2",
            "--header-read-timeout",
            "2",
            "--body-read-timeout",
            "6",
        ],
    );
    let started = Instant::now();
    // More stalled clients than slots: headers and "{" of a body that never comes, on both
    // routes, and two that never finish their headers.
    let mut bodies = Vec::new();
    for i in 0..5 {
        let path = ["/v1/embeddings", "/embed"][i % 2];
        let head = request_head(&server.addr, "POST", path, &[], 100) + "{";
        bodies.push(stalled(&server.addr, head.as_bytes()));
    }
    let heads: Vec<TcpStream> = (0..2)
        .map(|_| stalled(&server.addr, b"POST /embed HTTP/1.1\r\nHost: x\r\n"))
        .collect();
    // Two requests in flight, their bodies still arriving.
    let a = start_request(&server.addr, &json!({"input": DOCS[..2]}).to_string());
    let b = start_request(&server.addr, &json!({"input": DOCS[2..]}).to_string());
    std::thread::sleep(Duration::from_millis(300));
    // None of them holds a slot: well-behaved requests are answered.
    let (status, v) = server.post("/v1/embeddings", &json!({"input": "one more"}));
    assert_eq!(status, 200, "{v}");
    let (status, v) = server.post("/embed", &json!({"inputs": "one more"}));
    assert_eq!(status, 200, "{v}");
    // The partial headers are dropped after --header-read-timeout.
    for stream in heads {
        let text = read_until_closed(stream, Duration::from_secs(10));
        assert!(!text.contains(" 200 "), "{text}");
    }

    server.terminate();
    std::thread::sleep(Duration::from_millis(500));
    // No new connections are answered once the signal arrived...
    if let Ok(mut s) = TcpStream::connect(&server.addr) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(request_head(&server.addr, "GET", "/health", &[], 0).as_bytes());
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            buf.is_empty(),
            "answered after SIGTERM: {}",
            String::from_utf8_lossy(&buf)
        );
    }
    // ...but the two in flight complete, each with its own rows.
    let (status, v) = finish(a);
    assert_eq!(status, 200, "{v}");
    assert_close("in flight (a)", &openai_rows(&v), &docs_cli[..2]);
    let (status, v) = finish(b);
    assert_eq!(status, 200, "{v}");
    assert_close("in flight (b)", &openai_rows(&v), &docs_cli[2..]);
    // The stalled bodies are answered 408 after --body-read-timeout, in their route's shape.
    for (i, stream) in bodies.into_iter().enumerate() {
        let text = read_until_closed(stream, Duration::from_secs(15));
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        let field = [
            "\"message\":\"body: not received",
            "\"error\":\"body: not received",
        ][i % 2];
        assert!(text.contains(field), "{text}");
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        server.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        server.log()
    );
    assert!(server.log().contains("stopped"), "{}", server.log());
}

#[test]
fn over_the_concurrency_limit_is_429_in_each_route_shape() {
    let Some(fx) = fixtures() else { return };
    let server = Server::start(&fx.tiny_pkg, &["--max-concurrent-requests", "1"]);
    let inputs: Vec<String> = (0..32)
        .map(|i| format!("{} ({i})", DOCS[i % DOCS.len()].repeat(4)))
        .collect();
    // Bursts of simultaneous requests on one slot until each route has answered 429 (the tiny
    // model is fast, so a burst may pass without one).
    let mut seen = [false; 2];
    for _ in 0..20 {
        let statuses: Vec<(usize, u16, Value)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let server = &server;
                    let inputs = &inputs;
                    scope.spawn(move || {
                        let route = i % 2;
                        let (s, v) = match route {
                            0 => server.post("/v1/embeddings", &json!({"input": inputs})),
                            _ => server.post("/embed", &json!({"inputs": inputs})),
                        };
                        (route, s, v)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (route, status, v) in statuses {
            assert!(status == 200 || status == 429, "{status}: {v}");
            if status == 429 {
                seen[route] = true;
                match route {
                    0 => assert_eq!(v["error"]["type"], "rate_limit_error", "{v}"),
                    _ => assert_eq!(v["error_type"], "overloaded", "{v}"),
                }
            }
        }
        if seen == [true, true] {
            break;
        }
    }
    assert!(seen.iter().any(|&s| s), "no burst was answered 429");
}

#[test]
fn open_connections_are_bounded_and_a_waiting_client_is_served_when_one_closes() {
    let Some(fx) = fixtures() else { return };
    let server = Server::start(
        &fx.tiny_pkg,
        &["--max-connections", "3", "--body-read-timeout", "2"],
    );
    let head = request_head(&server.addr, "POST", "/embed", &[], 100) + "{";
    let held: Vec<TcpStream> = (0..3)
        .map(|_| stalled(&server.addr, head.as_bytes()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // A fourth client waits in the backlog (not refused) until the stalled ones time out.
    let t = Instant::now();
    let (status, v) = server.post("/embed", &json!({"inputs": "hello"}));
    assert_eq!(status, 200, "{v}");
    let waited = t.elapsed();
    assert!(
        waited > Duration::from_millis(1000) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    for stream in held {
        let text = read_until_closed(stream, Duration::from_secs(10));
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
}

#[test]
fn sigterm_exits_within_the_grace_period_whatever_clients_do() {
    let Some(fx) = fixtures() else { return };
    let mut server = Server::start(
        &fx.tiny_pkg,
        &[
            "--shutdown-grace",
            "1",
            "--header-read-timeout",
            "60",
            "--body-read-timeout",
            "60",
        ],
    );
    let head = request_head(&server.addr, "POST", "/embed", &[], 100) + "{";
    let _body = stalled(&server.addr, head.as_bytes());
    let _head = stalled(&server.addr, b"POST /embed HTTP/1.1\r\nHost: x\r\n");
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    server.terminate();
    assert_eq!(
        server.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        server.log()
    );
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert!(server.log().contains("grace period"), "{}", server.log());
}

#[test]
fn oversized_prompts_and_protocol_edges_are_refused_clearly() {
    let Some(fx) = fixtures() else { return };
    // The tiny package records no attention window: the default --max-prompt-tokens bounds it.
    let server = Server::start(&fx.tiny_pkg, &[]);
    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["max_prompt_tokens"], 8192, "{info}");
    let examples: Vec<Value> = (0..1000)
        .map(|i| {
            json!({"query": format!("what is the capital of country number {i} in the list"),
                   "response": format!("The capital of country {i} is a city with a long name and history.")})
        })
        .collect();
    for (path, field) in [("/v1/embeddings", "input"), ("/embed", "inputs")] {
        let t = Instant::now();
        let body = json!({field: "a query", "instruction": INSTRUCTION, "examples": examples});
        let (status, v) = server.post(path, &body);
        assert_eq!(status, 413, "{v}");
        let text = v.to_string();
        assert!(
            text.contains("8192") && text.contains("--max-prompt-tokens"),
            "{v}"
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
    // A prompt under the bound is embedded.
    let body = json!({"input": "a query", "instruction": INSTRUCTION, "examples": examples[..3]});
    let (status, v) = server.post("/v1/embeddings", &body);
    assert_eq!(status, 200, "{v}");
    // The bound counts prefix and query: with it set between a short query's prompt and a long
    // one's, the short is embedded, the long refused (its index named), documents untouched.
    let long = DOCS.join(" ");
    let tokenize = |text: &str| {
        let body = json!({"inputs": text, "instruction": INSTRUCTION, "examples": examples[..3]});
        let (status, v) = server.post("/tokenize", &body);
        assert_eq!(status, 200, "{v}");
        v[0].as_array().unwrap().len()
    };
    let (short_len, long_len) = (tokenize("a query"), tokenize(&long));
    assert!(long_len > short_len + 10, "{short_len} {long_len}");
    let bound = (short_len + 5).to_string();
    let lowered = Server::start(&fx.tiny_pkg, &["--max-prompt-tokens", &bound]);
    let ask = |text: &str| {
        let body = json!({"inputs": ["a query", text], "truncate": true, "instruction": INSTRUCTION,
                          "examples": examples[..3]});
        lowered.post("/embed", &body)
    };
    assert_eq!(ask("another query").0, 200);
    let (status, v) = ask(&long);
    assert_eq!(status, 413, "{v}");
    assert_eq!(
        (v["field"].as_str(), v["index"].as_u64()),
        (Some("inputs"), Some(1)),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains(&bound), "{v}");
    let (status, v) = lowered.post("/embed", &json!({"inputs": long}));
    assert_eq!(status, 200, "{v}");
    drop(lowered);

    // task and prompt_name that disagree: 422 naming both.
    let body = json!({"inputs": "q", "task": "a", "prompt_name": "b"});
    let (status, v) = server.post("/embed", &body);
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["field"], "task", "{v}");
    assert!(v["error"].as_str().unwrap().contains("prompt_name"), "{v}");
    // 405 with a JSON body in the route's shape.
    let (status, text) = server.get("/v1/embeddings");
    assert_eq!(status, 405, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], 405, "{v}");
    let (status, text) = server.get("/embed");
    assert_eq!(status, 405, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error_type"], "validation", "{v}");
    // Invalid JSON is TEI's "validation", an empty input its "empty".
    let (status, text) = http(&server.addr, "POST", "/embed", &[], b"{oops");
    assert_eq!(status, 400, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error_type"], "validation", "{v}");
    let (status, v) = server.post("/embed", &json!({"inputs": ""}));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error_type"], "empty", "{v}");
    // Expect: 100-continue with a Content-Length over --payload-limit: 413, no 100 Continue.
    let head = format!(
        "POST /embed HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 99000000000\r\nExpect: 100-continue\r\n\r\n",
        server.addr
    );
    let stream = stalled(&server.addr, head.as_bytes());
    let text = read_until_closed(stream, Duration::from_secs(10));
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(text.contains("--payload-limit"), "{text}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[test]
fn many_concurrent_clients_each_get_their_own_results() {
    let Some(fx) = fixtures() else { return };
    let setup = Setup::new();
    // 24 distinct documents and 24 distinct queries; each client sends its own few.
    let docs: Vec<String> = (0..24)
        .map(|i| format!("Passage {i}: {} ({} of 24).", DOCS[i % DOCS.len()], i + 1))
        .collect();
    let queries: Vec<String> = (0..24)
        .map(|i| format!("{} number {i}", QUERIES[i % QUERIES.len()]))
        .collect();
    let doc_refs: Vec<&str> = docs.iter().map(String::as_str).collect();
    let query_refs: Vec<&str> = queries.iter().map(String::as_str).collect();
    let docs_cli = setup.cli_embed(&fx.tiny_pkg, &doc_refs, false);
    let queries_cli = setup.cli_embed(&fx.tiny_pkg, &query_refs, true);
    let server = Server::start(&fx.tiny_pkg, &["--tasks", &setup.tasks()]);
    let addr = server.addr.clone();
    let clients: Vec<_> = (0..12)
        .map(|c| {
            let addr = addr.clone();
            let (docs, queries) = (docs.clone(), queries.clone());
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for round in 0..2 {
                    let k = c * 2 + round;
                    let (body, which) = match (c + round) % 2 {
                        0 => (json!({"input": [&docs[k]]}), "docs"),
                        _ => (
                            json!({"inputs": [&queries[k]], "task": "msmarco"}),
                            "queries",
                        ),
                    };
                    let path = if which == "docs" {
                        "/v1/embeddings"
                    } else {
                        "/embed"
                    };
                    let (status, text) =
                        http(&addr, "POST", path, &[], body.to_string().as_bytes());
                    assert_eq!(status, 200, "{text}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    let row = if which == "docs" {
                        openai_rows(&v)
                    } else {
                        rows(&v)
                    };
                    got.push((which, k, row.into_iter().next().unwrap()));
                }
                got
            })
        })
        .collect();
    for client in clients {
        for (which, k, row) in client.join().unwrap() {
            let all = if which == "docs" {
                &docs_cli
            } else {
                &queries_cli
            };
            let best = (0..all.len())
                .max_by(|&a, &b| cosine(&row, &all[a]).total_cmp(&cosine(&row, &all[b])))
                .unwrap();
            assert_eq!(best, k, "{which} {k}: closest to row {best}");
            assert!(cosine(&row, &all[k]) >= 0.99999, "{which} {k}");
        }
    }
}

#[test]
fn several_tasks_keep_their_prefix_states_within_the_byte_bound() {
    let Some(fx) = fixtures() else { return };
    let setup = Setup::new();
    let run = |extra: &[&str]| {
        let mut args = vec!["--tasks", &*setup.tasks()]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Server::start(&fx.tiny_pkg, &refs);
        let mut rows = Vec::new();
        // One request at a time, so each is its own batch: two tasks, alternating.
        for task in ["msmarco", "other", "msmarco", "other"] {
            let (status, v) = server.post("/embed", &json!({"inputs": QUERIES, "task": task}));
            assert_eq!(status, 200, "{v}");
            rows.push(self::rows(&v));
        }
        let (_, m) = server.get("/metrics");
        let counts = (
            metric(&m, "icl_embed_prefix_cache_hits_total"),
            metric(&m, "icl_embed_prefix_cache_misses_total"),
            metric(&m, "icl_embed_prefix_cache_bytes"),
        );
        (rows, counts)
    };
    // Room for both: each prefix is computed once and found again.
    let (kept, (hits, misses, bytes)) = run(&[]);
    assert_eq!((hits, misses), (2.0, 2.0));
    assert!(bytes > 0.0);
    // Room for neither: computed for every batch, nothing kept, the same embeddings.
    let (alone, (hits, misses, bytes)) = run(&["--prefix-cache-bytes", "1"]);
    assert_eq!((hits, misses, bytes), (0.0, 4.0, 0.0));
    for (a, b) in kept.iter().zip(&alone) {
        assert_close("prefix kept vs computed each time", a, b);
    }
    // The two tasks' prefixes differ, so do their embeddings.
    assert!(cosine(&kept[0][0], &kept[1][0]) < 0.99999);
}

/// A field of `/proc/PID/status` in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}

/// A few-shot request whose prompt is about 7,000 tokens of the tiny package (under the default
/// --max-prompt-tokens, 8192): ONNX Runtime needs about 2.9 GB for it.
fn large_prompt() -> Value {
    let examples: Vec<Value> = (0..125)
        .map(|i| {
            json!({"query": format!("what is the capital of country number {i} in the list"),
                   "response": format!("The capital of country {i} is a city with a long name and history.")})
        })
        .collect();
    json!({"inputs": "a query", "instruction": INSTRUCTION, "examples": examples})
}

#[test]
fn memory_returns_after_a_large_prompt_and_an_allocation_failure_fails_only_its_request() {
    // Issue 24: ONNX Runtime's CPU arena kept a large request's peak for good, and a request that
    // cannot be allocated must fail alone.
    let Some(fx) = fixtures() else { return };
    let small = json!({"inputs": ["Paris is the capital of France.", "Rome is in Italy."]});
    let (status, tokens) = Server::start(&fx.tiny_pkg, &[]).post("/tokenize", &large_prompt());
    assert_eq!(status, 200, "{tokens}");
    let n = tokens[0].as_array().unwrap().len();
    assert!((6000..8192).contains(&n), "{n} tokens");
    let large = |extra: &[&str]| {
        let server = Server::start(&fx.tiny_pkg, extra);
        let pid = server.child.id();
        for _ in 0..4 {
            assert_eq!(server.post("/embed", &small).0, 200);
        }
        let before = status_mib(pid, "VmRSS");
        let (status, v) = server.post("/embed", &large_prompt());
        assert_eq!(status, 200, "{v}");
        let (after, peak) = (status_mib(pid, "VmRSS"), status_mib(pid, "VmHWM"));
        (server, before, after, peak)
    };
    // The default hands the arena's memory back when the run ends.
    let (server, before, after, peak) = large(&[]);
    eprintln!("default: VmRSS {before:.0} MiB before, {after:.0} after, peak {peak:.0}");
    assert!(
        peak > before + 1000.0,
        "the request needed little memory: {peak:.0} MiB peak"
    );
    assert!(
        after < before + 100.0,
        "{before:.0} MiB before, {after:.0} after"
    );
    assert_eq!(server.post("/embed", &small).0, 200);
    drop(server);
    // --keep-cpu-arena keeps it: what the default is measured against.
    let (kept, before, after, _) = large(&["--keep-cpu-arena"]);
    eprintln!("--keep-cpu-arena: VmRSS {before:.0} MiB before, {after:.0} after");
    assert!(
        after > before + 1000.0,
        "{before:.0} MiB before, {after:.0} after"
    );
    drop(kept);

    // The same request with the process's data segment bounded to what it holds plus 512 MiB
    // (prlimit on the running server): ONNX Runtime cannot allocate it. That request gets a JSON
    // 500 naming the failure; requests before and after it are answered, and its memory is back.
    let server = Server::start(&fx.tiny_pkg, &[]);
    let pid = server.child.id();
    assert_eq!(server.post("/embed", &small).0, 200);
    let limit = ((status_mib(pid, "VmData") + 512.0) * 1024.0 * 1024.0) as u64;
    let set = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--data={limit}:")])
        .status()
        .expect("prlimit (util-linux) is needed to bound the server's memory");
    assert!(set.success(), "prlimit failed");
    let before = status_mib(pid, "VmRSS");
    let (status, v) = server.post("/embed", &large_prompt());
    assert_eq!(status, 500, "{v}");
    let message = v["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(message.contains("alloc"), "{v}");
    let after = status_mib(pid, "VmRSS");
    eprintln!(
        "under RLIMIT_DATA: VmRSS {before:.0} MiB before the failed request, {after:.0} after; {v}"
    );
    assert!(
        after < before + 100.0,
        "{before:.0} MiB before, {after:.0} after"
    );
    for _ in 0..3 {
        let (status, v) = server.post("/embed", &small);
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(server.get("/health").0, 200);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// Issue 27: a format 2 `instruct` package ([`instruct_package`]): `dimensions` on both embedding
/// routes (the first N components, renormalised; outside the package's range refused with 400),
/// the default task as the preset `"query"` (TEI's `prompt_name`), on the prefix cache, equal to
/// the CLI's `embed --queries` without `--task`; `/info` tells the procedure and the range.
#[test]
fn an_instruct_package_serves_shortened_vectors_and_its_default_task() {
    let Some(fx) = fixtures() else { return };
    let setup = Setup::new();
    let pkg = instruct_package(&fx.tiny_pkg, setup.dir.path());
    let input = setup.write_lines("in.txt", &QUERIES);
    let out = setup.path("queries.npy");
    let cli_args = [
        "--variant",
        "fp32",
        "--device",
        "cpu",
        "--quiet",
        "--queries",
    ];
    ok(run(&embed_args(&pkg, &input, &out, &cli_args)));
    let queries_cli = read_npy(&out);
    let server = Server::start(&pkg, &[]);

    let (status, full) = server.post("/v1/embeddings", &json!({"input": DOCS}));
    assert_eq!(status, 200, "{full}");
    let full = openai_rows(&full);
    let n = INSTRUCT_MIN_DIMENSIONS;
    let short_cli: Vec<Vec<f32>> = full
        .iter()
        .map(|r| {
            let norm = r[..n].iter().map(|x| x * x).sum::<f32>().sqrt();
            r[..n].iter().map(|x| x / norm).collect()
        })
        .collect();
    let (status, v) = server.post("/v1/embeddings", &json!({"input": DOCS, "dimensions": n}));
    assert_eq!(status, 200, "{v}");
    assert!(openai_rows(&v).iter().all(|r| r.len() == n));
    assert_close("openai dimensions", &openai_rows(&v), &short_cli);
    let (status, v) = server.post("/embed", &json!({"inputs": DOCS, "dimensions": n}));
    assert_eq!(status, 200, "{v}");
    assert_close("tei dimensions", &rows(&v), &short_cli);

    let hidden = full[0].len();
    for (path, bad) in [("/v1/embeddings", n - 1), ("/embed", hidden + 1)] {
        let body = match path {
            "/embed" => json!({"inputs": "x", "dimensions": bad}),
            _ => json!({"input": "x", "dimensions": bad}),
        };
        let (status, v) = server.post(path, &body);
        assert_eq!(status, 400, "{v}");
        assert!(v.to_string().contains(&format!("{n}..={hidden}")), "{v}");
    }
    let (status, v) = server.post("/embed", &json!({"inputs": "x", "dimensions": "8"}));
    assert_eq!(status, 400, "{v}");

    let (status, v) = server.post(
        "/embed",
        &json!({"inputs": QUERIES, "prompt_name": "query"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_close("default task", &rows(&v), &queries_cli);
    let (status, v) = server.post(
        "/v1/embeddings",
        &json!({"input": QUERIES, "task": "query"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_close("default task, openai", &openai_rows(&v), &queries_cli);
    let (_, metrics) = server.get("/metrics");
    assert!(
        metric(&metrics, "icl_embed_prefix_cache_hits_total") >= 1.0,
        "{metrics}"
    );

    let (_, info) = server.get("/info");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["procedure"], "instruct");
    assert_eq!(info["default_task"], INSTRUCT_DEFAULT_TASK);
    assert_eq!(info["dimensions"], json!(n));
    assert_eq!(info["tasks"], json!(["query"]));
}
