//! `dsrun serve`: an OpenAI-compatible HTTP server (axum on tokio). Requests become jobs for
//! the engine thread (`scheduler`), which decodes up to `--parallel` sequences together;
//! replies come back as events, streamed as server-sent events or collected into one body.

pub mod metrics;
pub mod openai;
pub mod scheduler;

use crate::chat_template::ChatTemplate;
use crate::engine::Engine;
use crate::generate::{StopReason, Stopping};
use crate::sample::{SamplerConfig, TokenLogprob};
use crate::tokenizer::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openai::ApiError;
use scheduler::{Event, Failure, Job, Refused, Scheduler};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// How the server answers.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The name `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Requests to /v1/ must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Largest request body in bytes (413 beyond).
    pub body_limit: usize,
    /// Requests that may wait for a free sequence (503 beyond).
    pub queue: usize,
    /// Sampling when a request does not say (flags over generation_config.json).
    pub sampling: SamplerConfig,
}

/// What every request handler shares.
pub struct App {
    scheduler: Scheduler,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    options: ServerOptions,
    metrics: Arc<metrics::Metrics>,
    capacity: usize,
    vocab: usize,
    started: u64,
    requests: AtomicU64,
}

fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl App {
    /// Starts the engine thread for `engine` (its sequences are the batch).
    pub fn new(engine: Box<dyn Engine>, tokenizer: Tokenizer, template: Option<ChatTemplate>, options: ServerOptions) -> App {
        let (capacity, vocab) = (engine.capacity(), engine.config().vocab_size);
        let tokenizer = Arc::new(tokenizer);
        let metrics = Arc::new(metrics::Metrics::default());
        let scheduler = Scheduler::start(engine, tokenizer.clone(), metrics.clone(), options.queue);
        App { scheduler, tokenizer, template, options, metrics, capacity, vocab, started: unix_time(), requests: AtomicU64::new(0) }
    }

    /// The routes, with the body limit, the API key check and request metrics.
    pub fn router(self: Arc<Self>) -> Router {
        let limit = self.options.body_limit;
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics_text))
            .fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(self.clone(), guard))
            .layer(DefaultBodyLimit::max(limit))
            .with_state(self)
    }

    /// Stops the engine thread once the requests in flight are done.
    pub fn stop(&mut self) {
        self.scheduler.stop();
    }

    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}{:04x}", self.started, self.requests.fetch_add(1, Ordering::Relaxed))
    }

    /// The job for `request` over `prompt`: its sampling, its limits (the context checked),
    /// and the receiver of its events.
    fn submit(&self, request: &openai::Request, prompt: Vec<u32>, chat: bool) -> Result<UnboundedReceiver<Event>, ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::invalid("the prompt is empty", if chat { "messages" } else { "prompt" }));
        }
        let echo_scoring = !chat && request.echo;
        let logprobs = request.logprobs(chat)?;
        let room = self.capacity.saturating_sub(prompt.len());
        let asked = request.max_completion_tokens.or(request.max_tokens).map(|m| m as usize);
        let max_tokens = asked.unwrap_or(if chat { room } else { 16.min(room) });
        if prompt.len() + max_tokens > self.capacity || (room == 0 && !echo_scoring) {
            return Err(ApiError::invalid(
                format!(
                    "this model's context is {} tokens; the request needs {} ({} in the prompt, {max_tokens} to generate): shorten the prompt or lower max_tokens",
                    self.capacity,
                    prompt.len() + max_tokens,
                    prompt.len()
                ),
                if chat { "messages" } else { "prompt" },
            )
            .code("context_length_exceeded"));
        }
        let seed = crate::sample::clock_seed() ^ self.requests.load(Ordering::Relaxed);
        let sampler = request.sampler(&self.options.sampling, self.vocab, seed)?;
        let stopping = Stopping { max_tokens, stop: request.stop_strings(), ignore_eos: request.ignore_eos, logprobs };
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let job = Job { prompt, sampler, stopping, prompt_logprobs: if echo_scoring { logprobs } else { None }, events };
        match self.scheduler.submit(job) {
            Ok(()) => Ok(receiver),
            Err(Refused::Busy(n)) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the server is busy ({n} requests waiting): retry later")).code("server_busy")),
            Err(Refused::Stopped) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down").code("shutting_down")),
        }
    }
}

/// Binds nothing: serves `listener` until `shutdown` completes, then lets the requests in
/// flight finish (their streams included).
pub async fn serve(listener: tokio::net::TcpListener, app: Arc<App>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, app.router()).with_graceful_shutdown(shutdown).await
}

/// SIGINT or SIGTERM.
pub async fn interrupted() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// The API key check and request metrics around every route.
async fn guard(State(app): State<Arc<App>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = request.uri().path();
    let route = match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    };
    let response = match &app.options.api_key {
        Some(key) if path.starts_with("/v1/") && !authorized(&request, key) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key: send `Authorization: Bearer KEY`").code("invalid_api_key").into_response()
        }
        _ => next.run(request).await,
    };
    app.metrics.request(route, response.status().as_u16());
    response
}

fn authorized(request: &axum::extract::Request, key: &str) -> bool {
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|k| k.trim() == key)
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<openai::Request, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE { "the request body is larger than the server's limit (--body-limit)".to_string() } else { r.body_text() };
        ApiError::new(status, message)
    })?;
    let request = openai::parse(&bytes)?;
    request.check_common()?;
    Ok(request)
}

async fn chat_completions(State(app): State<Arc<App>>, raw: Result<Bytes, BytesRejection>) -> Response {
    chat(app, raw).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(app: Arc<App>, raw: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let request = body(raw)?;
    let messages = openai::messages(&request)?;
    let template = app.template.as_ref().ok_or_else(|| ApiError::invalid("this model has no chat template (tokenizer_config.json has no chat_template): use /v1/completions", "messages"))?;
    let prompt = template.tokens(&app.tokenizer, &messages, true).map_err(|e| ApiError::invalid(e.to_string(), "messages"))?;
    let receiver = app.submit(&request, prompt, true)?;
    let id = app.next_id("chatcmpl");
    let created = unix_time();
    let model = app.options.model_name.clone();
    let wants_logprobs = request.logprobs(true)?.is_some();
    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let head = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model});
        let tokenizer = app.tokenizer.clone();
        let chunk = move |choices: Value| {
            let mut c = head.clone();
            c["choices"] = choices;
            c
        };
        let first = chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]));
        return Ok(stream(receiver, vec![first], move |event| match event {
            Event::Token { text, logprob } => {
                let logprobs = logprob.map(|lp| json!({"content": [openai::chat_logprob(&tokenizer, &lp)]}));
                vec![chunk(json!([{"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null}]))]
            }
            Event::Done { reason, prompt_tokens, cached_tokens, completion_tokens } => {
                let mut out = vec![chunk(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason.finish_reason()}]))];
                if include_usage {
                    let mut last = chunk(json!([]));
                    last["usage"] = openai::usage(prompt_tokens, cached_tokens, completion_tokens);
                    out.push(last);
                }
                out
            }
            Event::PromptLogprobs(_) => vec![],
            Event::Failed(failure) => vec![ApiError::from(failure).body()],
        }));
    }
    let mut receiver = receiver;
    let reply = collect(&mut receiver).await?;
    let logprobs = wants_logprobs.then(|| json!({"content": reply.logprobs.iter().map(|lp| openai::chat_logprob(&app.tokenizer, lp)).collect::<Vec<_>>()}));
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text}, "logprobs": logprobs, "finish_reason": reply.reason.finish_reason()}],
        "usage": openai::usage(reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens),
    }))
    .into_response())
}

async fn completions(State(app): State<Arc<App>>, raw: Result<Bytes, BytesRejection>) -> Response {
    completion(app, raw).await.unwrap_or_else(IntoResponse::into_response)
}

/// Most prompts one /v1/completions request may carry (each is a choice).
const MAX_PROMPTS: usize = 1024;

/// The request's prompts as token ids, one per choice: a string, an array of strings, an array
/// of ids or an array of id arrays (lm-evaluation-harness sends the last).
fn prompts(app: &App, request: &openai::Request) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| app.tokenizer.encode(text).map_err(|e| ApiError::invalid(e.to_string(), "prompt"));
    let prompts = match &request.prompt {
        None => return Err(ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, ..ApiError::invalid("missing field `prompt`", "prompt") }),
        Some(openai::Prompt::Text(text)) => vec![encode(text)?],
        Some(openai::Prompt::Texts(texts)) => texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Some(openai::Prompt::Tokens(ids)) => vec![ids.clone()],
        Some(openai::Prompt::TokenLists(lists)) => lists.clone(),
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid(format!("{} prompts: a request takes 1 to {MAX_PROMPTS}", prompts.len()), "prompt"));
    }
    // The engine's own check, made before anything streams so that the answer is a 400.
    for ids in &prompts {
        crate::model::check_tokens(app.vocab, ids).map_err(|e| ApiError::invalid(e.to_string(), "prompt"))?;
    }
    Ok(prompts)
}

/// One prompt of a completion request on its way: its ids, its text when echoed, its events.
struct Pending {
    ids: Vec<u32>,
    text: String,
    receiver: UnboundedReceiver<Event>,
}

async fn completion(app: Arc<App>, raw: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let request = body(raw)?;
    let echo = request.echo;
    let logprobs_wanted = request.logprobs(false)?.is_some();
    let mut pending = Vec::new();
    // Every prompt is queued before any is answered, so the scheduler runs them together; a
    // refusal drops the ones queued (the scheduler skips jobs whose client is gone).
    for ids in prompts(&app, &request)? {
        let text = if echo { app.tokenizer.decode(&ids).map_err(|e| ApiError::invalid(e.to_string(), "prompt"))? } else { String::new() };
        let receiver = app.submit(&request, ids.clone(), false)?;
        pending.push(Pending { ids, text, receiver });
    }
    let id = app.next_id("cmpl");
    let created = unix_time();
    let model = app.options.model_name.clone();
    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let head = json!({"id": id, "object": "text_completion", "created": created, "model": model});
        let usage = Arc::new(std::sync::Mutex::new((0usize, 0usize, 0usize)));
        let streams: Vec<_> = pending.into_iter().enumerate().map(|(index, p)| completion_chunks(index, p, echo, logprobs_wanted, head.clone(), app.tokenizer.clone(), usage.clone())).collect();
        let last = include_usage.then(|| {
            let mut last = head.clone();
            last["choices"] = json!([]);
            (last, usage)
        });
        return Ok(stream_many(streams, last));
    }
    let replies = futures_util::future::join_all(pending.iter_mut().map(|p| collect(&mut p.receiver))).await;
    let (mut choices, mut totals) = (Vec::new(), (0, 0, 0));
    for (index, (p, reply)) in pending.iter().zip(replies).enumerate() {
        let reply = reply?;
        let logprobs = logprobs_wanted.then(|| {
            let mut tokens: Vec<(u32, Option<&TokenLogprob>)> = Vec::new();
            let mut offset = 0;
            if let Some(scored) = &reply.prompt_logprobs {
                tokens.extend(p.ids.iter().copied().zip(scored.iter().map(Option::as_ref)));
            } else {
                offset = p.text.len();
            }
            tokens.extend(reply.logprobs.iter().map(|lp| (lp.token, Some(lp))));
            openai::completion_logprobs(&app.tokenizer, &tokens, offset)
        });
        choices.push(json!({"text": p.text.clone() + &reply.text, "index": index, "logprobs": logprobs, "finish_reason": reply.reason.finish_reason()}));
        totals = (totals.0 + reply.prompt_tokens, totals.1 + reply.cached_tokens, totals.2 + reply.completion_tokens);
    }
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": openai::usage(totals.0, totals.1, totals.2),
    }))
    .into_response())
}

type Usage = Arc<std::sync::Mutex<(usize, usize, usize)>>;

/// Choice `index`'s stream chunks: the echoed prompt (with its scores when asked), each
/// token, and its finish; its usage is added to `usage` when it is done.
fn completion_chunks(
    index: usize,
    p: Pending,
    echo: bool,
    logprobs_wanted: bool,
    head: Value,
    tokenizer: Arc<Tokenizer>,
    usage: Usage,
) -> (UnboundedReceiver<Event>, Vec<Value>, Box<dyn FnMut(Event) -> Vec<Value> + Send>) {
    let chunk = move |text: &str, logprobs: Value, finish: Value| {
        let mut c = head.clone();
        c["choices"] = json!([{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]);
        c
    };
    let mut offset = p.text.len();
    let first = if echo && !logprobs_wanted { vec![chunk(&p.text, Value::Null, Value::Null)] } else { vec![] };
    let (prompt_ids, prompt_text) = (p.ids, p.text);
    let chunks = move |event| match event {
        Event::PromptLogprobs(scored) => {
            let tokens: Vec<(u32, Option<&TokenLogprob>)> = prompt_ids.iter().copied().zip(scored.iter().map(Option::as_ref)).collect();
            vec![chunk(&prompt_text, openai::completion_logprobs(&tokenizer, &tokens, 0), Value::Null)]
        }
        Event::Token { text, logprob } => {
            let logprobs = match &logprob {
                Some(lp) => openai::completion_logprobs(&tokenizer, &[(lp.token, Some(lp))], offset),
                None => Value::Null,
            };
            offset += text.len();
            vec![chunk(&text, logprobs, Value::Null)]
        }
        Event::Done { reason, prompt_tokens, cached_tokens, completion_tokens } => {
            if let Ok(mut u) = usage.lock() {
                *u = (u.0 + prompt_tokens, u.1 + cached_tokens, u.2 + completion_tokens);
            }
            vec![chunk("", Value::Null, json!(reason.finish_reason()))]
        }
        Event::Failed(failure) => vec![ApiError::from(failure).body()],
    };
    (p.receiver, first, Box::new(chunks))
}

/// A reply collected whole (non-streaming requests).
struct Reply {
    text: String,
    logprobs: Vec<TokenLogprob>,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    reason: StopReason,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
}

async fn collect(receiver: &mut UnboundedReceiver<Event>) -> Result<Reply, ApiError> {
    let mut reply = Reply { text: String::new(), logprobs: Vec::new(), prompt_logprobs: None, reason: StopReason::MaxTokens, prompt_tokens: 0, cached_tokens: 0, completion_tokens: 0 };
    while let Some(event) = receiver.recv().await {
        match event {
            Event::Token { text, logprob } => {
                reply.text += &text;
                reply.logprobs.extend(logprob);
            }
            Event::PromptLogprobs(scored) => reply.prompt_logprobs = Some(scored),
            Event::Done { reason, prompt_tokens, cached_tokens, completion_tokens } => {
                (reply.reason, reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens) = (reason, prompt_tokens, cached_tokens, completion_tokens);
                return Ok(reply);
            }
            Event::Failed(failure) => return Err(ApiError::from(failure)),
        }
    }
    Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine stopped before the reply was complete").code("shutting_down"))
}

/// Server-sent events: `first`, then each event's chunks as `data:` lines, then `[DONE]`.
fn stream(receiver: UnboundedReceiver<Event>, first: Vec<Value>, chunks: impl FnMut(Event) -> Vec<Value> + Send + 'static) -> Response {
    stream_many(vec![(receiver, first, Box::new(chunks))], None)
}

/// One choice's events until it is done or failed (a closed channel is a failure).
fn events(receiver: UnboundedReceiver<Event>) -> impl futures_util::Stream<Item = Event> {
    futures_util::stream::unfold((receiver, false), |(mut receiver, finished)| async move {
        if finished {
            return None;
        }
        Some(match receiver.recv().await {
            Some(event) => {
                let last = matches!(event, Event::Done { .. } | Event::Failed(_));
                (event, (receiver, last))
            }
            None => (Event::Failed(Failure { message: "the engine stopped before the reply was complete".into(), request: false, unavailable: true }), (receiver, true)),
        })
    })
}

/// Server-sent events of several choices as they come (each choice: `first`, then each
/// event's chunks), then `last` with the summed usage where asked, then `[DONE]`.
fn stream_many(choices: Vec<(UnboundedReceiver<Event>, Vec<Value>, Box<dyn FnMut(Event) -> Vec<Value> + Send>)>, last: Option<(Value, Usage)>) -> Response {
    use futures_util::stream::{self, StreamExt};
    let streams = choices.into_iter().map(|(receiver, first, mut chunks)| stream::iter(first).chain(events(receiver).flat_map(move |event| stream::iter(chunks(event)))).boxed());
    let tail = stream::once(async move {
        last.map(|(mut value, usage)| {
            let (prompt, cached, completion) = usage.lock().map_or((0, 0, 0), |u| *u);
            value["usage"] = openai::usage(prompt, cached, completion);
            value
        })
    })
    .filter_map(|v| async move { v });
    let body = stream::select_all(streams).chain(tail).map(|v| Ok::<_, std::convert::Infallible>(SseEvent::default().data(v.to_string())));
    let done = stream::once(async { Ok(SseEvent::default().data("[DONE]")) });
    Sse::new(body.chain(done)).keep_alive(KeepAlive::default()).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": app.options.model_name, "object": "model", "created": app.started, "owned_by": "dsrun", "max_model_len": app.capacity}]}))
}

/// 200 with the load while the engine runs; 503 with why once it is down (a distributed
/// engine that lost a rank), so a load balancer takes the server out.
async fn health(State(app): State<Arc<App>>) -> Response {
    let load = &app.scheduler.load;
    let (active, queued) = (load.active.load(Ordering::SeqCst), load.queued.load(Ordering::SeqCst));
    match load.down.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        None => Json(json!({"status": "ok", "active": active, "queued": queued})).into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "error": why, "active": active, "queued": queued}))).into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn not_found(request: axum::extract::Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {} {}: see /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics", request.method(), request.uri().path()))
        .code("unknown_url")
}
