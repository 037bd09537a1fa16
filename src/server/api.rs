//! The HTTP side: routes, the OpenAI and text-embeddings-inference (TEI) request and response
//! types, validation and errors. Handlers only check and translate: a request becomes token ids
//! (tokenized on the blocking pool) and an [`Entry`] in the queue, and the rows that come back
//! become the route's response. Nothing here sees the model.
//!
//! Errors carry the field and the input's index. OpenAI routes answer OpenAI's error shape
//! (`{"error": {"message", "type", "param", "index", "code"}}`), the others TEI's
//! (`{"error", "error_type", "field", "index"}`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::config::{ExampleText, TaskText};
use super::frontend::{Frontend, Prompt, Refusal};
use super::metrics::Metrics;
use super::queue::Entry;

/// Limits from the command line that the handlers enforce.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_client_batch_size: usize,
    pub payload_limit: usize,
    pub max_concurrent_requests: usize,
    pub body_read_timeout: std::time::Duration,
}

/// What every handler shares.
pub struct AppState {
    pub frontend: Arc<Frontend>,
    pub queue: mpsc::UnboundedSender<Entry>,
    pub permits: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub model_name: String,
    pub healthy: Arc<AtomicBool>,
}

type Shared = Arc<AppState>;

/// The routes. `/health` answers without a key (probes); the embedding routes and `/tokenize`
/// read the whole body (bounded in bytes and time) before they take a slot of the concurrency
/// semaphore, so a slow client never holds one.
pub fn router(state: Shared) -> Router {
    let work = Router::new()
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/embed", post(tei_embed))
        .route("/tokenize", post(tokenize))
        .route_layer(DefaultBodyLimit::max(state.limits.payload_limit))
        .route_layer(middleware::from_fn_with_state(state.clone(), concurrency))
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body));
    Router::new()
        .merge(work)
        .route("/v1/models", get(models))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(catch_panic))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

// --- errors ----------------------------------------------------------------------------------

/// A refused or failed request.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    /// OpenAI's error type; TEI's `error_type` is derived from the status.
    kind: &'static str,
    field: Option<String>,
    index: Option<usize>,
    message: String,
    /// TEI's `error_type` where the status does not say it ("empty" for an empty input).
    tei_type: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            field: None,
            index: None,
            message: message.into(),
            tei_type: None,
        }
    }

    /// A bad field (422), `index` being the input's when the fault is in one input.
    fn field(field: impl Into<String>, index: Option<usize>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            index,
            ..ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                message,
            )
        }
    }

    fn with_status(mut self, status: StatusCode) -> ApiError {
        self.status = status;
        self
    }

    fn refusal(r: Refusal) -> ApiError {
        let status = match r.too_large {
            true => StatusCode::PAYLOAD_TOO_LARGE,
            false => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::field(r.field, r.index, r.message).with_status(status)
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// A request the model could not embed: the caller's input (422) or the server's fault (500),
    /// by the error's kind.
    fn failed(error: &icl_embed::Error) -> ApiError {
        let message = format!("inference failed: {}", chain(error));
        match error.is_input() {
            true => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                message,
            ),
            false => ApiError::internal(message),
        }
    }

    /// `input[3]: why`, or the message alone.
    fn text(&self) -> String {
        match (&self.field, self.index) {
            (Some(f), Some(i)) => format!("{f}[{i}]: {}", self.message),
            (Some(f), None) => format!("{f}: {}", self.message),
            _ => self.message.clone(),
        }
    }

    fn openai(self) -> Response {
        let body = json!({"error": {
            "message": self.text(),
            "type": self.kind,
            "param": self.field,
            "index": self.index,
            "code": self.status.as_u16(),
        }});
        (self.status, Json(body)).into_response()
    }

    fn tei(self) -> Response {
        let error_type = self.tei_type.unwrap_or(match self.status {
            StatusCode::TOO_MANY_REQUESTS => "overloaded",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::PAYLOAD_TOO_LARGE => "payload",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::SERVICE_UNAVAILABLE => "unhealthy",
            s if s.is_server_error() => "backend",
            _ => "validation",
        });
        let body = json!({
            "error": self.text(),
            "error_type": error_type,
            "field": self.field,
            "index": self.index,
        });
        (self.status, Json(body)).into_response()
    }

    /// In the shape of the route at `path`.
    fn for_path(self, path: &str) -> Response {
        match path.starts_with("/v1/") {
            true => self.openai(),
            false => self.tei(),
        }
    }
}

// --- middleware --------------------------------------------------------------------------------

/// Counts every answer by route and status.
async fn count(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let response = next.run(req).await;
    s.metrics.request(&route, response.status().as_u16());
    response
}

/// A handler that panics answers 500 in JSON instead of dropping the connection; the server goes
/// on (a panicking batch is the engine's to catch: it fails that batch's rows only).
async fn catch_panic(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    match tokio::spawn(next.run(req)).await {
        Ok(response) => response,
        Err(e) => ApiError::internal(format!("the request failed: {e}")).for_path(&path),
    }
}

/// 401 unless `Authorization: Bearer KEY` matches `--api-key`.
async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
            let e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                match given {
                    None => "missing \"Authorization: Bearer <key>\" header",
                    Some(_) => "wrong API key",
                },
            );
            return e.for_path(req.uri().path());
        }
    }
    next.run(req).await
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the whole body before the request goes on (to the concurrency slot and the handler):
/// 413 when `Content-Length` or the bytes sent pass `--payload-limit` (answered before the body
/// is read, so `Expect: 100-continue` gets no 100 Continue), 408 when the body takes longer than
/// `--body-read-timeout`, 400 when the client breaks off. The connection is then closed with
/// the body unread.
async fn read_body(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let limit = s.limits.payload_limit;
    let too_large = |what: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("body: {what}, over the server's --payload-limit of {limit} bytes"),
        )
        .for_path(&path)
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        return too_large(format!("Content-Length {n}"));
    }
    let (parts, body) = req.into_parts();
    let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit));
    let bytes = match tokio::time::timeout(s.limits.body_read_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large("more bytes".into())
        }
        Ok(Err(e)) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("body: cannot read it: {e}"),
            )
            .for_path(&path)
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "body: not received within the server's --body-read-timeout of {} s",
                    s.limits.body_read_timeout.as_secs_f64()
                ),
            )
            .for_path(&path)
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// 429 when `--max-concurrent-requests` requests are already being handled.
async fn concurrency(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let Ok(permit) = s.permits.clone().try_acquire_owned() else {
        let e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "too many requests in flight (--max-concurrent-requests {}); retry later",
                s.limits.max_concurrent_requests
            ),
        );
        return e.for_path(req.uri().path());
    };
    let response = next.run(req).await;
    drop(permit);
    response
}

/// An error and its sources, "a: b: c".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

// --- request parsing -----------------------------------------------------------------------------

/// The inputs of a request: texts, or final token ids.
enum Inputs {
    Texts(Vec<String>),
    Ids(Vec<Vec<u32>>),
}

impl Inputs {
    fn len(&self) -> usize {
        match self {
            Inputs::Texts(t) => t.len(),
            Inputs::Ids(i) => i.len(),
        }
    }
}

/// The body as a JSON object: 413 over the payload limit, 400 for invalid JSON, 422 for another
/// JSON value.
fn object(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let kind = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            _ => "server_error",
        };
        ApiError::new(status, kind, format!("body: {}", r.body_text()))
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::field("body", None, "expected a JSON object")),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("body: invalid JSON: {e}"),
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn empty(field: &str, index: Option<usize>, what: &str) -> ApiError {
    ApiError {
        tei_type: Some("empty"),
        ..ApiError::field(field, index, what).with_status(StatusCode::BAD_REQUEST)
    }
}

/// A string field, absent or null being `None`.
fn opt_str(map: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(ApiError::field(
            field,
            None,
            format!("expected a string, found {}", kind_of(v)),
        )),
    }
}

fn opt_bool(map: &Map<String, Value>, field: &str, default: bool) -> Result<bool, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::field(
            field,
            None,
            format!("expected true or false, found {}", kind_of(v)),
        )),
    }
}

/// A token id, checked against the vocabulary.
fn token_id(v: &Value, vocab: usize) -> Option<u32> {
    v.as_u64()
        .filter(|&n| (n as usize) < vocab)
        .map(|n| n as u32)
}

/// `input` as OpenAI has it: a string, a list of strings, a list of token ids, or a list of lists
/// of token ids. Empty strings and lists are refused (400) as OpenAI refuses them.
fn parse_inputs(
    v: Option<&Value>,
    field: &str,
    frontend: &Frontend,
    ids_allowed: bool,
) -> Result<Inputs, ApiError> {
    let info = &frontend.info;
    parse_inputs_with(v, field, info.vocab, info.max_document_tokens, ids_allowed)
}

/// [`parse_inputs`] against a vocabulary of `vocab` ids and rows of at most `max_ids`.
fn parse_inputs_with(
    v: Option<&Value>,
    field: &str,
    vocab: usize,
    max_ids: usize,
    ids_allowed: bool,
) -> Result<Inputs, ApiError> {
    let ids = IdRules {
        field,
        vocab,
        max_ids,
    };
    let expected = match ids_allowed {
        true => "a string, a list of strings, a list of token ids or a list of lists of token ids",
        false => "a string or a list of strings",
    };
    let unexpected = |index: Option<usize>, v: &Value| {
        ApiError::field(
            field,
            index,
            format!("expected {expected}, found {}", kind_of(v)),
        )
    };
    match v {
        None | Some(Value::Null) => Err(ApiError::field(
            field,
            None,
            format!("required: {expected}"),
        )),
        Some(Value::String(s)) if s.is_empty() => Err(empty(field, None, "an empty string")),
        Some(Value::String(s)) => Ok(Inputs::Texts(vec![s.clone()])),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(empty(field, None, "an empty list of inputs"))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => texts(items, field).map(Inputs::Texts),
            Value::Number(_) if ids_allowed => Ok(Inputs::Ids(vec![ids.row(0, items, false)?])),
            Value::Array(_) if ids_allowed => ids.rows(items).map(Inputs::Ids),
            other => Err(unexpected(Some(0), other)),
        },
        Some(other) => Err(unexpected(None, other)),
    }
}

/// A list of strings, none empty.
fn texts(items: &[Value], field: &str) -> Result<Vec<String>, ApiError> {
    let mut texts = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) if s.is_empty() => {
                return Err(empty(field, Some(i), "an empty string"))
            }
            Value::String(s) => texts.push(s.clone()),
            other => {
                return Err(ApiError::field(
                    field,
                    Some(i),
                    format!(
                        "expected a string like the first input, found {}",
                        kind_of(other)
                    ),
                ))
            }
        }
    }
    Ok(texts)
}

/// What token ids given as input must be: ids of the vocabulary, at least one and at most the
/// model's document length a row.
struct IdRules<'a> {
    field: &'a str,
    vocab: usize,
    max_ids: usize,
}

impl IdRules<'_> {
    /// A list of lists of token ids.
    fn rows(&self, items: &[Value]) -> Result<Vec<Vec<u32>>, ApiError> {
        let mut rows = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Value::Array(ids) = item else {
                return Err(ApiError::field(
                    self.field,
                    Some(i),
                    format!(
                        "expected a list of token ids like the first input, found {}",
                        kind_of(item)
                    ),
                ));
            };
            rows.push(self.row(i, ids, true)?);
        }
        Ok(rows)
    }

    /// Row `i`, a list of token ids; `nested`: the row is one of a list of rows (a bad id then
    /// names its position in the row).
    fn row(&self, i: usize, ids: &[Value], nested: bool) -> Result<Vec<u32>, ApiError> {
        let mut row = Vec::with_capacity(ids.len());
        for (j, id) in ids.iter().enumerate() {
            let bad = || match nested {
                true => self.bad_id(i, Some(j), id),
                false => self.bad_id(j, None, id),
            };
            row.push(token_id(id, self.vocab).ok_or_else(bad)?);
        }
        match row.len() {
            0 => Err(empty(self.field, Some(i), "an empty list of token ids")),
            n if n > self.max_ids => Err(ApiError::field(
                self.field,
                Some(i),
                format!("{n} token ids, more than the model's {}", self.max_ids),
            )),
            _ => Ok(row),
        }
    }

    fn bad_id(&self, i: usize, j: Option<usize>, v: &Value) -> ApiError {
        let at = j.map(|j| format!(" (position {j})")).unwrap_or_default();
        ApiError::field(
            self.field,
            Some(i),
            format!(
                "{v} is not a token id{at}: expected a whole number below the vocabulary size {}",
                self.vocab
            ),
        )
    }
}

/// The few-shot extension: `task` (or TEI's `prompt_name`) names a preset of `--tasks`;
/// `instruction` and `examples` give one inline. Neither: the inputs are documents.
enum TaskChoice {
    Documents,
    Preset(Arc<Prompt>),
    Inline(TaskText),
}

/// Where [`parse_task`] looks up presets: the [`Frontend`] (or nothing, in tests).
trait Presets {
    fn preset(&self, name: &str) -> Option<Arc<Prompt>>;
    fn preset_names(&self) -> Vec<String>;
}

impl Presets for Frontend {
    fn preset(&self, name: &str) -> Option<Arc<Prompt>> {
        Frontend::preset(self, name)
    }

    fn preset_names(&self) -> Vec<String> {
        Frontend::preset_names(self)
    }
}

fn parse_task(map: &Map<String, Value>, frontend: &impl Presets) -> Result<TaskChoice, ApiError> {
    if let (Some(task), Some(name)) = (opt_str(map, "task")?, opt_str(map, "prompt_name")?) {
        if task != name {
            return Err(ApiError::field(
                "task",
                None,
                format!("{task:?} conflicts with \"prompt_name\": {name:?}; give one of them"),
            ));
        }
    }
    let mut preset = None;
    for field in ["task", "prompt_name"] {
        if let Some(name) = opt_str(map, field)? {
            let prompt = frontend.preset(&name).ok_or_else(|| {
                let known = frontend.preset_names();
                let known = match known.is_empty() {
                    true => "the server has no presets (start it with --tasks)".to_string(),
                    false => format!("known: {}", known.join(", ")),
                };
                ApiError::field(field, None, format!("unknown task {name:?}; {known}"))
            })?;
            preset = Some((field, prompt));
        }
    }
    let instruction = opt_str(map, "instruction")?;
    let examples = match map.get("examples") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let e: ExampleText = serde_json::from_value(item.clone()).map_err(|e| {
                    ApiError::field(
                        format!("examples[{i}]"),
                        None,
                        format!("expected {{\"instruct\"?: string, \"query\": string, \"response\": string}}: {e}"),
                    )
                })?;
                out.push(e);
            }
            out
        }
        Some(v) => {
            return Err(ApiError::field(
                "examples",
                None,
                format!("expected a list of examples, found {}", kind_of(v)),
            ))
        }
    };
    match preset {
        Some((field, _)) if instruction.is_some() || !examples.is_empty() => Err(ApiError::field(
            field,
            None,
            "give either a task preset or an inline instruction and examples, not both",
        )),
        Some((_, prompt)) => Ok(TaskChoice::Preset(prompt)),
        None if instruction.is_none() && examples.is_empty() => Ok(TaskChoice::Documents),
        None => Ok(TaskChoice::Inline(TaskText {
            instruction,
            examples,
        })),
    }
}

/// Token ids of the request's inputs (tokenized off the async threads), with the prompt they were
/// built with.
async fn token_ids(
    s: &AppState,
    inputs: Inputs,
    task: TaskChoice,
    truncate: bool,
    field: &'static str,
) -> Result<(Option<Arc<Prompt>>, Vec<Vec<u32>>), ApiError> {
    if inputs.len() > s.limits.max_client_batch_size {
        return Err(ApiError::field(
            field,
            None,
            format!(
                "{} inputs, more than the server's --max-client-batch-size {}",
                inputs.len(),
                s.limits.max_client_batch_size
            ),
        ));
    }
    let texts = match inputs {
        Inputs::Ids(ids) => {
            return match task {
                TaskChoice::Documents => Ok((None, ids)),
                _ => Err(ApiError::field(
                    field,
                    None,
                    "token ids are final ids (as /tokenize returns them) and take no task; send text with a task",
                )),
            };
        }
        Inputs::Texts(texts) => texts,
    };
    let frontend = s.frontend.clone();
    tokio::task::spawn_blocking(move || {
        let prompt = match task {
            TaskChoice::Documents => None,
            TaskChoice::Preset(p) => Some(p),
            TaskChoice::Inline(t) => frontend.prompt(&t, "").map_err(ApiError::refusal)?,
        };
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let ids = frontend
            .token_ids(prompt.as_deref(), &refs, truncate, field)
            .map_err(|r| {
                let e = ApiError::refusal(r);
                match e.index.is_some() && !truncate {
                    true => e.with_status(StatusCode::PAYLOAD_TOO_LARGE),
                    false => e,
                }
            })?;
        Ok((prompt, ids))
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenization failed: {e}")))?
}

/// Queues the rows and waits for their embeddings.
async fn embed(
    s: &AppState,
    prompt: Option<Arc<Prompt>>,
    ids: Vec<Vec<u32>>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let unavailable = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the inference worker is not running",
        )
    };
    let (tx, rx) = oneshot::channel();
    let entry = Entry {
        prompt,
        ids,
        enqueued: Instant::now(),
        reply: tx,
    };
    s.queue.send(entry).map_err(|_| unavailable())?;
    match rx.await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(error)) => Err(ApiError::failed(&error)),
        Err(_) => Err(unavailable()),
    }
}

// --- routes --------------------------------------------------------------------------------------

#[derive(Serialize)]
struct OpenAiResponse {
    object: &'static str,
    data: Vec<OpenAiEmbedding>,
    model: String,
    usage: Usage,
}

#[derive(Serialize)]
struct OpenAiEmbedding {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Float(Vec<f32>),
    /// Little-endian float32 bytes, as the `openai` client decodes them.
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// `POST /v1/embeddings`: OpenAI's schema (`dimensions` where the package allows shortened
/// vectors), plus `task` / `instruction` / `examples`. Texts are truncated as the reference
/// truncates them.
async fn openai_embeddings(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    openai_inner(&s, body)
        .await
        .unwrap_or_else(ApiError::openai)
}

async fn openai_inner(
    s: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let map = object(body)?;
    let dimensions = parse_dimensions(&map, &s.frontend)?;
    opt_str(&map, "model")?;
    opt_str(&map, "user")?;
    let base64 = match opt_str(&map, "encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::field(
                "encoding_format",
                None,
                format!("{other:?}: expected \"float\" or \"base64\""),
            ))
        }
    };
    let inputs = parse_inputs(map.get("input"), "input", &s.frontend, true)?;
    let task = parse_task(&map, s.frontend.as_ref())?;
    let (prompt, ids) = token_ids(s, inputs, task, true, "input").await?;
    let tokens = ids.iter().map(Vec::len).sum();
    let rows = shortened(embed(s, prompt, ids).await?, dimensions);
    let data = rows
        .into_iter()
        .enumerate()
        .map(|(index, v)| OpenAiEmbedding {
            object: "embedding",
            index,
            embedding: match base64 {
                true => EmbeddingValue::Base64(encode_base64(&v)),
                false => EmbeddingValue::Float(v),
            },
        })
        .collect();
    Ok(Json(OpenAiResponse {
        object: "list",
        data,
        model: s.model_name.clone(),
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
    .into_response())
}

/// `dimensions` (OpenAI's and TEI's field): `None` when absent or null, else a length the package
/// allows for shortened vectors ([`icl_embed::Manifest::check_dimensions`]); refused with 400.
fn parse_dimensions(
    map: &Map<String, Value>,
    frontend: &Frontend,
) -> Result<Option<usize>, ApiError> {
    let refuse = |message: String| {
        ApiError::field("dimensions", None, message).with_status(StatusCode::BAD_REQUEST)
    };
    let n = match map.get("dimensions") {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| refuse(format!("expected a positive integer, found {}", kind_of(v))))?,
    };
    match frontend.manifest().check_dimensions(n, "dimensions") {
        Ok(()) => Ok(Some(n)),
        Err(icl_embed::Error::Input { reason, .. }) => Err(refuse(reason)),
        Err(e) => Err(refuse(e.to_string())),
    }
}

/// The rows shortened to `dimensions` components, renormalised ([`icl_embed::shorten_row`]).
fn shortened(mut rows: Vec<Vec<f32>>, dimensions: Option<usize>) -> Vec<Vec<f32>> {
    if let Some(n) = dimensions {
        rows.iter_mut()
            .for_each(|row| icl_embed::shorten_row(row, n));
    }
    rows
}

fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `POST /embed`: TEI's schema (`inputs`, `normalize`, `truncate`, `truncation_direction`,
/// `prompt_name` naming a preset, `dimensions`), plus `task` / `instruction` / `examples`; answers
/// `[[f32]]`. As in TEI, a text over the limit without `"truncate": true` is refused with 413.
async fn tei_embed(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    match tei_inner(&s, body).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => e.tei(),
    }
}

async fn tei_inner(
    s: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let map = object(body)?;
    if !opt_bool(&map, "normalize", true)? {
        return Err(ApiError::field(
            "normalize",
            None,
            "false is not supported: the package's embeddings are normalised by the model's definition",
        ));
    }
    let truncate = opt_bool(&map, "truncate", false)?;
    check_direction(&map)?;
    let dimensions = parse_dimensions(&map, &s.frontend)?;
    let inputs = parse_inputs(map.get("inputs"), "inputs", &s.frontend, false)?;
    let task = parse_task(&map, s.frontend.as_ref())?;
    let (prompt, ids) = token_ids(s, inputs, task, truncate, "inputs").await?;
    Ok(shortened(embed(s, prompt, ids).await?, dimensions))
}

fn check_direction(map: &Map<String, Value>) -> Result<(), ApiError> {
    match opt_str(map, "truncation_direction")?.as_deref() {
        None | Some("right") | Some("Right") => Ok(()),
        Some(other) => Err(ApiError::field(
            "truncation_direction",
            None,
            format!("{other:?}: only \"right\" (the reference's) is supported"),
        )),
    }
}

/// `POST /tokenize`: the final token ids of each input (`[[id]]`), exactly what `icl-embed
/// tokenize` prints and the embedding routes embed; takes `/embed`'s fields, truncating by default.
async fn tokenize(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let map = object(body)?;
        let truncate = opt_bool(&map, "truncate", true)?;
        check_direction(&map)?;
        let inputs = parse_inputs(map.get("inputs"), "inputs", &s.frontend, false)?;
        let task = parse_task(&map, s.frontend.as_ref())?;
        let (_, ids) = token_ids(&s, inputs, task, truncate, "inputs").await?;
        Ok::<_, ApiError>(ids)
    };
    match result.await {
        Ok(ids) => Json(ids).into_response(),
        Err(e) => e.tei(),
    }
}

/// `GET /health`: 200 while the inference worker runs, else 503. Serves as liveness and readiness
/// probe (the server listens only once the model is loaded).
async fn health(State(s): State<Shared>) -> Response {
    match s.healthy.load(Ordering::SeqCst) {
        true => Json(json!({"status": "ok"})).into_response(),
        false => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the inference worker stopped",
        )
        .tei(),
    }
}

/// `GET /info`: the package, variant, device, prompt, limits and task presets.
async fn info(State(s): State<Shared>) -> Response {
    let i = &s.frontend.info;
    let m = s.frontend.manifest();
    Json(json!({
        "model_id": s.model_name,
        "version": env!("CARGO_PKG_VERSION"),
        "package": i.package,
        "variant": i.variant,
        "device": i.device,
        "hidden": i.hidden,
        "dimensions": m.dimensions.map(|d| d.min),
        "procedure": m.prompt.procedure.name(),
        "default_task": m.prompt.default_task,
        "vocab": i.vocab,
        "max_input_length": i.max_document_tokens,
        "max_query_length": i.max_query_tokens,
        "max_batch_tokens": i.max_batch_tokens,
        "max_batch_rows": i.max_batch_rows,
        "max_prompt_tokens": i.max_prompt_tokens,
        "max_concurrent_requests": s.limits.max_concurrent_requests,
        "max_client_batch_size": s.limits.max_client_batch_size,
        "payload_limit": s.limits.payload_limit,
        "prefix_cache": i.prefix_cache,
        "prefix_cache_bytes": i.prefix_cache_bytes,
        "tasks": s.frontend.preset_names(),
    }))
    .into_response()
}

/// `GET /v1/models`: the one model, for OpenAI clients that list models.
async fn models(State(s): State<Shared>) -> Response {
    Json(json!({"object": "list", "data": [
        {"id": s.model_name, "object": "model", "created": 0, "owned_by": "icl-embed"}
    ]}))
    .into_response()
}

/// `GET /metrics`: Prometheus' text format.
async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// A route that exists, called with another method: 405 in the route's error shape.
async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!(
            "{} is not allowed on {} (routes: POST /v1/embeddings, /embed, /tokenize; GET /health, /info, /metrics, /v1/models)",
            req.method(),
            req.uri().path()
        ),
    )
    .for_path(req.uri().path())
}

async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no route {} {} (see /info; routes: POST /v1/embeddings, /embed, /tokenize; GET /health, /info, /metrics, /v1/models)",
            req.method(),
            req.uri().path()
        ),
    )
    .for_path(req.uri().path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field_and_the_index() {
        let e = ApiError::field("input", Some(3), "an empty string");
        assert_eq!(e.text(), "input[3]: an empty string");
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            ApiError::field("dimensions", None, "no").text(),
            "dimensions: no"
        );
    }

    #[test]
    fn base64_is_little_endian_float32() {
        let s = encode_base64(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(bytes[..4], 1.0f32.to_le_bytes());
        assert_eq!(bytes[4..], (-2.5f32).to_le_bytes());
    }

    /// No presets: every named task is unknown.
    impl Presets for () {
        fn preset(&self, _: &str) -> Option<Arc<Prompt>> {
            None
        }

        fn preset_names(&self) -> Vec<String> {
            Vec::new()
        }
    }

    /// A small deterministic generator (xorshift64*), so the fuzz below needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn value(&mut self, depth: u32) -> Value {
            let kinds = if depth == 0 { 6 } else { 8 };
            match self.below(kinds) {
                0 => Value::Null,
                1 => Value::Bool(self.below(2) == 0),
                2 => json!([0, 1, 99, 100, u32::MAX as u64 + 1, u64::MAX][self.below(6) as usize]),
                3 => json!([-1.0, 0.5, 1e300, -0.0][self.below(4) as usize]),
                4 => json!(["", "x", "é\u{0}\u{10FFFF}", "query", " "][self.below(5) as usize]),
                5 => json!(-(self.below(1000) as i64)),
                6 => {
                    let n = self.below(5);
                    Value::Array((0..n).map(|_| self.value(depth - 1)).collect())
                }
                _ => Value::Object(self.object(depth - 1)),
            }
        }

        fn object(&mut self, depth: u32) -> Map<String, Value> {
            const KEYS: &[&str] = &[
                "input",
                "inputs",
                "task",
                "prompt_name",
                "instruction",
                "examples",
                "query",
                "response",
                "instruct",
                "truncate",
                "normalize",
                "truncation_direction",
                "model",
            ];
            let n = self.below(6);
            (0..n)
                .map(|_| {
                    let key = KEYS[self.below(KEYS.len() as u64) as usize].to_string();
                    (key, self.value(depth))
                })
                .collect()
        }
    }

    /// Random JSON (and random bytes) through the request parsing: every outcome is a value or
    /// an error with a 4xx status, never a panic. 20,000 cases, well under a second.
    #[test]
    fn request_parsing_never_panics_on_random_json() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..20_000 {
            let map = rng.object(3);
            for (field, ids) in [("input", true), ("inputs", false)] {
                let vocab = 1 + rng.below(200) as usize;
                let max_ids = rng.below(10) as usize;
                match parse_inputs_with(map.get(field), field, vocab, max_ids, ids) {
                    Ok(Inputs::Ids(rows)) => assert!(rows.iter().all(|r| !r.is_empty()
                        && r.len() <= max_ids
                        && r.iter().all(|&i| (i as usize) < vocab))),
                    Ok(Inputs::Texts(t)) => {
                        assert!(!t.is_empty() && t.iter().all(|t| !t.is_empty()))
                    }
                    Err(e) => assert!(e.status.is_client_error(), "case {case}: {e:?}"),
                }
            }
            if let Err(e) = parse_task(&map, &()) {
                assert!(e.status.is_client_error(), "case {case}: {e:?}");
            }
            for field in ["truncate", "normalize"] {
                if let Err(e) = opt_bool(&map, field, true) {
                    assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
                }
            }
            let _ = check_direction(&map);
            // The body as bytes: whole, cut short, or with a byte flipped.
            let mut bytes = serde_json::to_vec(&Value::Object(map)).unwrap();
            match rng.below(3) {
                0 => bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize),
                1 => {
                    let i = rng.below(bytes.len() as u64) as usize;
                    bytes[i] = rng.next() as u8;
                }
                _ => {}
            }
            if let Err(e) = object(Ok(Bytes::from(bytes))) {
                assert!(e.status.is_client_error(), "case {case}: {e:?}");
            }
        }
    }

    #[test]
    fn keys_compare_whole() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
    }
}
