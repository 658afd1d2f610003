//! OpenAI's API shapes: the request body both completion routes accept, its checks, errors in
//! OpenAI's JSON shape, and the response and stream-chunk bodies.

use crate::sample::{SamplerConfig, TokenLogprob};
use crate::tokenizer::Tokenizer;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

/// An error as OpenAI sends it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), param: None, code: None }
    }

    pub fn invalid(message: impl Into<String>, param: &str) -> ApiError {
        ApiError { param: Some(param.into()), ..ApiError::new(StatusCode::BAD_REQUEST, message) }
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

/// An engine's failure: 400 where the request was at fault, 503 where the engine is down (a
/// distributed engine whose rank failed), 500 where it failed otherwise.
impl From<crate::server::scheduler::Failure> for ApiError {
    fn from(f: crate::server::scheduler::Failure) -> ApiError {
        match (f.request, f.unavailable) {
            (true, _) => ApiError::new(StatusCode::BAD_REQUEST, f.message),
            (false, true) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, f.message).code("engine_unavailable"),
            (false, false) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, f.message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    /// Several prompts as token ids (lm-evaluation-harness' loglikelihood requests).
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The body of /v1/chat/completions and /v1/completions (unknown fields are ignored, as
/// OpenAI-compatible servers do; `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are
/// the usual extensions).
#[derive(Debug, Deserialize)]
pub struct Request {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<Prompt>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u64>,
    /// Chat: a bool; completions: the number of alternatives.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u64>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub ignore_eos: bool,
}

/// Parses a body: malformed JSON is a 400, a missing or mistyped field a 422 naming it.
pub fn parse(body: &[u8]) -> Result<Request, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}")).code("invalid_json"))?;
    if !value.is_object() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the body must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." { missing_field(e.inner()) } else { Some(path.clone()) };
        ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, message: format!("{}: {}", param.as_deref().unwrap_or("body"), e.inner()), param, code: Some("invalid_type") }
    })
}

fn missing_field(e: &serde_json::Error) -> Option<String> {
    let text = e.to_string();
    let rest = text.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}

const LIMIT_TOP_LOGPROBS: u64 = 20;

impl Request {
    pub fn stop_strings(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// `n`: one choice per request.
    pub fn check_common(&self) -> Result<(), ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(format!("n = {n}: this server returns one choice per request (n = 1)"), "n"));
        }
        if self.stop_strings().len() > 4 {
            return Err(ApiError::invalid("at most 4 stop sequences", "stop"));
        }
        // 0 only scores the prompt (completions with `echo`, as lm-evaluation-harness asks).
        if (self.max_tokens == Some(0) && !self.echo) || self.max_completion_tokens == Some(0) {
            return Err(ApiError::invalid("max_tokens must be at least 1 (0 only with echo)", "max_tokens"));
        }
        Ok(())
    }

    /// The request's sampling over the server's defaults (`base`), with a seed.
    pub fn sampler(&self, base: &SamplerConfig, vocab: usize, seed: u64) -> Result<SamplerConfig, ApiError> {
        let mut c = base.clone();
        c.temperature = self.temperature.unwrap_or(c.temperature);
        c.top_p = self.top_p.unwrap_or(c.top_p);
        c.top_k = self.top_k.map_or(c.top_k, |k| k as usize);
        c.min_p = self.min_p.unwrap_or(c.min_p);
        c.presence_penalty = self.presence_penalty.unwrap_or(c.presence_penalty);
        c.frequency_penalty = self.frequency_penalty.unwrap_or(c.frequency_penalty);
        c.repetition_penalty = self.repetition_penalty.unwrap_or(c.repetition_penalty);
        if let Some(bias) = &self.logit_bias {
            c.logit_bias = bias
                .iter()
                .map(|(id, &b)| id.parse::<u32>().map(|id| (id, b.clamp(-100.0, 100.0))).map_err(|_| ApiError::invalid(format!("logit_bias: `{id}` is not a token id"), "logit_bias")))
                .collect::<Result<_, _>>()?;
        }
        c.seed = self.seed.unwrap_or(seed);
        c.validate(vocab).map_err(|e| {
            let text = e.to_string();
            let param = text.split([' ', ':']).next().unwrap_or("").to_string();
            ApiError { param: Some(param), ..ApiError::new(StatusCode::BAD_REQUEST, text) }
        })?;
        Ok(c)
    }

    /// Alternatives per token the request wants, if any (chat: `logprobs: true` with
    /// `top_logprobs`; completions: `logprobs: N`).
    pub fn logprobs(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let n = match (&self.logprobs, chat) {
            (None | Some(Value::Null), _) => return Ok(None),
            (Some(Value::Bool(false)), true) => return Ok(None),
            (Some(Value::Bool(true)), true) => self.top_logprobs.unwrap_or(0),
            (Some(v), false) if v.is_u64() => v.as_u64().unwrap_or(0),
            (Some(_), true) => return Err(ApiError::invalid("logprobs must be true or false (top_logprobs gives the count)", "logprobs")),
            (Some(_), false) => return Err(ApiError::invalid("logprobs must be the number of alternatives (0 to 20)", "logprobs")),
        };
        if n > LIMIT_TOP_LOGPROBS {
            return Err(ApiError::invalid(format!("at most {LIMIT_TOP_LOGPROBS} alternatives per token, asked for {n}"), if chat { "top_logprobs" } else { "logprobs" }));
        }
        Ok(Some(n as usize))
    }
}

/// The chat messages as text, for the template.
pub fn messages(request: &Request) -> Result<Vec<crate::chat_template::Message>, ApiError> {
    let Some(messages) = &request.messages else {
        return Err(ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, ..ApiError::invalid("missing field `messages`", "messages") });
    };
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must hold at least one message", "messages"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::invalid(format!("messages[{i}].role `{}` is not system, user, assistant or tool", m.role), &format!("messages[{i}].role")));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text += t,
                            (kind, _) => return Err(ApiError::invalid(format!("messages[{i}].content[{j}]: `{kind}` parts are not supported (text only)"), &format!("messages[{i}].content"))),
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system" } else { &m.role };
            Ok(crate::chat_template::Message::new(role, &content))
        })
        .collect()
}

/// OpenAI's `usage`.
pub fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}})
}

fn bytes(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// A chat `logprobs.content` entry.
pub fn chat_logprob(tokenizer: &Tokenizer, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = tokenizer.token_text(id);
        json!({"token": token, "logprob": logprob, "bytes": bytes(&token)})
    };
    let mut e = entry(lp.token, lp.logprob);
    e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, l)| entry(id, l)).collect());
    e
}

/// Completions' `logprobs` object for tokens (None: the first prompt token, which has none);
/// `text_offset` counts bytes from `offset` (where the first token's text starts).
pub fn completion_logprobs(tokenizer: &Tokenizer, tokens: &[(u32, Option<&TokenLogprob>)], mut offset: usize) -> Value {
    let (mut texts, mut lps, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &(id, lp) in tokens {
        let text = tokenizer.token_text(id);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        lps.push(lp.map(|l| l.logprob));
        tops.push(lp.map(|l| {
            let map: serde_json::Map<String, Value> = l.top.iter().map(|&(t, v)| (tokenizer.token_text(t), json!(v))).collect();
            Value::Object(map)
        }));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}
