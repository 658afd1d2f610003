//! `dsrun serve` over real HTTP on 127.0.0.1 (an ephemeral port), driven by a real client
//! (reqwest): OpenAI's shapes streaming and not, usage counts, stop strings, concurrent
//! streams decoded in one batch giving what each gets alone, disconnects, and every kind of
//! bad request answered with OpenAI's error shape while the server stays healthy. The
//! engine is the bundled model on whatever wgpu adapter there is (CI: lavapipe).

mod common;
use dsrun::backend::wgpu::context;
use dsrun::chat_template::{ChatTemplate, Message};
use dsrun::config::ModelConfig;
use dsrun::device::GpuChoice;
use dsrun::model::Model;
use dsrun::plan::budget::GpuOptions;
use dsrun::runtime::GpuModel;
use dsrun::server::{App, ServerOptions};
use dsrun::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

const CONTEXT: usize = 160;
const PARALLEL: usize = 4;

fn bundled() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights")
}

struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    client: reqwest::Client,
}

impl Server {
    async fn start(api_key: Option<&str>) -> Server {
        Self::start_with(api_key, false).await
    }

    /// `mtp`: speculative decoding with the bundled model's MTP layer.
    async fn start_with(api_key: Option<&str>, mtp: bool) -> Server {
        let dir = bundled();
        let model = Model::load(&dir).unwrap();
        let ctx = context::open(GpuChoice::Auto).expect("a wgpu adapter (on Debian: apt-get install mesa-vulkan-drivers)");
        let engine = GpuModel::with_options(ctx, &model, CONTEXT, &GpuOptions { sequences: PARALLEL, mtp, ..Default::default() }).unwrap();
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let tokenizer = Tokenizer::load(&dir, &config).unwrap();
        let template = ChatTemplate::load(&dir).unwrap();
        let options = ServerOptions { model_name: "test-model".into(), api_key: api_key.map(str::to_string), body_limit: 64 << 10, queue: 64, sampling: dsrun::sample::SamplerConfig::default() };
        let app = Arc::new(App::new(Box::new(engine), tokenizer, template, options));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dsrun::server::serve(listener, app, async {
            let _ = stopped.await;
        }));
        Server { base, stop: Some(stop), task, client: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.client.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self.client.post(format!("{}{path}", self.base)).header("content-type", "application/json").body(body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// A streamed request's `data:` payloads, in order (`[DONE]` included).
    async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        use futures_util::StreamExt;
        let r = self.client.post(format!("{}{path}", self.base)).json(body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let mut text = String::new();
        let mut bytes = r.bytes_stream();
        while let Some(chunk) = bytes.next().await {
            text += std::str::from_utf8(&chunk.unwrap()).unwrap();
        }
        text.split("\n\n").filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string)).collect()
    }

    async fn healthy(&self) {
        let (status, body) = self.get("/health").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"ok\""), "{body}");
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// The text of a streamed chat reply, and its finish reason.
fn chat_stream_text(events: &[String]) -> (String, String) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut finish = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(choice) = v["choices"].get(0) {
            text += choice["delta"]["content"].as_str().unwrap_or("");
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.into();
            }
        }
    }
    (text, finish)
}

fn completion_stream_text(events: &[String]) -> (String, String) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (mut text, mut finish) = (String::new(), String::new());
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        text += v["choices"][0]["text"].as_str().unwrap_or("");
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = f.into();
        }
    }
    (text, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_streaming_and_not() {
    let server = Server::start(None).await;
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe this module."}]);
    let body = json!({"model": "anything", "messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, reply) = server.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["model"], "test-model");
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    // usage.prompt_tokens is the template's token count.
    let dir = bundled();
    let tokenizer = Tokenizer::load(&dir, &ModelConfig::from_file(&dir.join("config.json")).unwrap()).unwrap();
    let template = ChatTemplate::load(&dir).unwrap().unwrap();
    let want = template.tokens(&tokenizer, &[Message::new("system", "Be brief."), Message::new("user", "Describe this module.")], true).unwrap();
    assert_eq!(reply["usage"]["prompt_tokens"], want.len());
    assert_eq!(reply["usage"]["completion_tokens"], 12);
    assert_eq!(reply["usage"]["total_tokens"], want.len() + 12);

    // The same request streamed gives the same text (greedy), then usage when asked for.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/chat/completions", &streamed).await;
    let (text, finish) = chat_stream_text(&events);
    assert_eq!((text.as_str(), finish.as_str()), (content.as_str(), "length"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    // The second time the prompt was in a sequence's cache.
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= want.len() as u64 - 1, "{usage}");

    // Completions, with a stop string from the text itself: cut there, never emitted.
    let body = json!({"prompt": "This module provides", "max_tokens": 24, "temperature": 0, "ignore_eos": true});
    let (_, full) = server.post("/v1/completions", &body).await;
    let full = full["choices"][0]["text"].as_str().unwrap().to_string();
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 4, "{full:?}");
    let stop = format!(" {}", words[3]);
    let at = full.find(&stop).unwrap();
    let mut stopped = body.clone();
    stopped["stop"] = json!([stop]);
    let (status, reply) = server.post("/v1/completions", &stopped).await;
    assert_eq!(status, 200);
    assert_eq!(reply["choices"][0]["text"], full[..at]);
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let (text, finish) = completion_stream_text(&server.stream("/v1/completions", &stopped).await);
    assert_eq!((text.as_str(), finish.as_str()), (&full[..at], "stop"));

    // Logprobs: the chosen token is the most likely one under greedy decoding.
    let (_, reply) = server.post("/v1/chat/completions", &json!({"messages": messages, "max_tokens": 3, "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2})).await;
    let content = reply["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for c in content {
        assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(c["top_logprobs"][0]["logprob"], c["logprob"], "{c}");
    }
    // Echo with logprobs scores the prompt (lm-evaluation-harness' loglikelihood).
    let (status, reply) = server.post("/v1/completions", &json!({"prompt": "This module provides", "max_tokens": 0, "echo": true, "logprobs": 1})).await;
    assert_eq!(status, 200, "{reply}");
    let lp = &reply["choices"][0]["logprobs"];
    assert_eq!(reply["choices"][0]["text"], "This module provides");
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["token_logprobs"].as_array().unwrap()[1..].iter().all(|l| l.as_f64().unwrap() < 0.0));
    assert_eq!(reply["usage"]["completion_tokens"], 0);

    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    assert!(models.contains("test-model"));
    server.shutdown().await;
}

/// Streamed completions of `bodies`, all sent at once; each task gives its text.
fn spawn_completions(server: &Arc<Server>, bodies: impl Iterator<Item = Value>) -> Vec<tokio::task::JoinHandle<String>> {
    bodies
        .map(|body| {
            let server = server.clone();
            tokio::spawn(async move { completion_stream_text(&server.stream("/v1/completions", &body).await).0 })
        })
        .collect()
}

fn metric(text: &str, name: &str) -> f64 {
    let line = text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')));
    line.unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}")).parse().unwrap()
}

/// lm-evaluation-harness' loglikelihood request, as its `local-completions` model sends it
/// (tokenized requests): a batch of id arrays, `echo`, `max_tokens` 1, `logprobs` 1,
/// temperature 0, a seed. Every choice, in order, scores each prompt token with the model's own
/// log-softmax at the position before it (computed here by the CPU reference): an off-by-one
/// or a prompt answered for another fails. Tolerance 1e-4 absolute: the GPU's and the CPU's
/// logits agree to 1e-5 of their scale (the kernel tolerance), a misaligned position is off by
/// whole nats. The one generated token is greedy: the last position's best.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lm_evaluation_harness_loglikelihood_batches() {
    let server = Server::start(None).await;
    let dir = bundled();
    let tokenizer = Tokenizer::load(&dir, &ModelConfig::from_file(&dir.join("config.json")).unwrap()).unwrap();
    let texts = ["Return the value of the", "This module provides functions for working with", "The file", "An error is raised if the argument is not a string"];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode(t).unwrap()).collect();
    let body = json!({"model": "test-model", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true});
    let (status, reply) = server.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{reply}");
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), prompts.len(), "{reply}");
    let model = Model::load(&dir).unwrap();
    let vocab = model.config.vocab_size;
    use dsrun::engine::Steps;
    let mut cpu = dsrun::engine::CpuEngine::new(model, CONTEXT);
    let log_softmax = |row: &[f32], token: u32| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let total: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
        row[token as usize] as f64 - max - total.ln()
    };
    for (i, (choice, prompt)) in choices.iter().zip(&prompts).enumerate() {
        assert_eq!(choice["index"], i, "{reply}");
        let lp = &choice["logprobs"];
        let scores = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(scores.len(), prompt.len() + 1, "prompt {i}: every prompt token and the generated one: {lp}");
        assert!(scores[0].is_null(), "the first token has no context");
        cpu.reset();
        let logits = cpu.forward(prompt, dsrun::model::Logits::All).unwrap();
        let row = |p: usize| &logits[p * vocab..(p + 1) * vocab];
        for p in 1..prompt.len() {
            let (got, want) = (scores[p].as_f64().unwrap(), log_softmax(row(p - 1), prompt[p]));
            assert!((got - want).abs() <= 1e-4, "prompt {i} position {p}: {got} vs the model's {want}");
        }
        let last = row(prompt.len() - 1);
        let greedy = dsrun::model::math::argmax(last) as u32;
        let (got, want) = (scores[prompt.len()].as_f64().unwrap(), log_softmax(last, greedy));
        assert!((got - want).abs() <= 1e-4, "prompt {i}: the generated token's {got} vs {want}");
        assert_eq!(lp["tokens"][prompt.len()].as_str().unwrap(), tokenizer.token_text(greedy), "prompt {i}: greedy");
        assert_eq!(lp["top_logprobs"][prompt.len()].as_object().unwrap().len(), 1);
        assert!(choice["text"].as_str().unwrap().starts_with(&tokenizer.decode(prompt).unwrap()), "prompt {i}: echoed text");
    }
    let n: usize = prompts.iter().map(Vec::len).sum();
    assert_eq!(reply["usage"]["prompt_tokens"], n, "{reply}");

    // When the token after the prompt is EOS (forced here by a bias), it is still reported:
    // the harness drops the last entry, which must not be a prompt token's.
    let eos = *tokenizer.eos_ids().first().expect("the bundled model has an EOS");
    let mut forced = body.clone();
    forced["prompt"] = json!(&prompts[..1]);
    forced["logit_bias"] = json!({eos.to_string(): 100});
    let (status, reply) = server.post("/v1/completions", &forced).await;
    assert_eq!(status, 200, "{reply}");
    let lp = &reply["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), prompts[0].len() + 1, "{lp}");
    assert_eq!(lp["tokens"][prompts[0].len()].as_str().unwrap(), tokenizer.token_text(eos), "{lp}");
    assert_eq!(reply["choices"][0]["finish_reason"], "stop", "{reply}");

    // Several text prompts, streamed: each choice's chunks carry its index, and the texts are
    // what each prompt gets alone.
    let alone: Vec<String> = {
        let mut out = Vec::new();
        for t in &texts[..2] {
            let (_, r) = server.post("/v1/completions", &json!({"prompt": t, "max_tokens": 5, "temperature": 0, "ignore_eos": true})).await;
            out.push(r["choices"][0]["text"].as_str().unwrap().to_string());
        }
        out
    };
    let streamed = json!({"prompt": &texts[..2], "max_tokens": 5, "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let events = server.stream("/v1/completions", &streamed).await;
    let mut got = vec![String::new(); 2];
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            got[c["index"].as_u64().unwrap() as usize] += c["text"].as_str().unwrap();
        }
    }
    assert_eq!(got, alone);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 10, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_streams_each_get_what_they_get_alone() {
    let server = Arc::new(Server::start(None).await);
    let prompts: Vec<String> = (0..8).map(|i| format!("Request {i}: this module {}", ["reads", "writes", "returns", "parses"][i % 4])).collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 16 + p.len() % 5, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(completion_stream_text(&server.stream("/v1/completions", &body(p)).await).0);
    }
    let steps_before = metric(&server.get("/metrics").await.1, "dsrun_decode_step_seconds_count");
    let tasks = spawn_completions(&server, prompts.iter().map(|p| body(p)));
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), alone[i], "request {i} decoded with others differs from alone");
    }
    let (_, metrics) = server.get("/metrics").await;
    let per_round: usize = prompts.iter().map(|p| 16 + p.len() % 5).sum();
    assert_eq!(metric(&metrics, "dsrun_generated_tokens_total") as usize, 2 * per_round, "every token of every request was generated and counted");
    // Together, one decode step served several sequences (each request's first token comes
    // from its prompt's step).
    let steps = metric(&metrics, "dsrun_decode_step_seconds_count") - steps_before;
    assert!(steps < 0.5 * (per_round - prompts.len()) as f64, "{steps} decode steps for {per_round} tokens: the requests were not batched");
    Arc::try_unwrap(server).ok().unwrap().shutdown().await;
}

/// Speculative decoding in the server's batches: eight concurrent greedy streams on a server
/// drafting with the bundled model's MTP layer (verify steps of several sequences, each with
/// its draft, then one MTP step for all) give what a plain server gives each alone; a prompt
/// scored with `echo` + `logprobs` and a sampled request work alongside; /metrics counts drafts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_batches_give_plain_decodings_tokens() {
    let plain = Server::start_with(None, false).await;
    let prompts: Vec<String> = (0..8).map(|i| format!("Request {i}: the function {}", ["reads", "writes", "returns", "parses"][i % 4])).collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 20 + p.len() % 7, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(completion_stream_text(&plain.stream("/v1/completions", &body(p)).await).0);
    }
    plain.shutdown().await;

    let server = Arc::new(Server::start_with(None, true).await);
    let tasks = spawn_completions(&server, prompts.iter().map(|p| body(p)));
    let (scored_body, sampled_body) =
        (json!({"prompt": "Return the value", "max_tokens": 4, "echo": true, "logprobs": 1, "temperature": 0}), json!({"prompt": "The module", "max_tokens": 12, "temperature": 0.8, "seed": 3}));
    let scored = server.post("/v1/completions", &scored_body);
    let sampled = server.post("/v1/completions", &sampled_body);
    let ((scored_status, scored), (sampled_status, sampled)) = tokio::join!(scored, sampled);
    assert_eq!(scored_status, 200, "{scored}");
    assert_eq!(sampled_status, 200, "{sampled}");
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), alone[i], "request {i}: speculative batches differ from plain decoding alone");
    }
    let (_, metrics) = server.get("/metrics").await;
    let (drafted, accepted) = (metric(&metrics, "dsrun_speculative_drafted_total"), metric(&metrics, "dsrun_speculative_accepted_total"));
    eprintln!("served with MTP drafts: {accepted} of {drafted} accepted");
    assert!(drafted > 0.0 && accepted > 0.0 && accepted <= drafted, "{metrics}");
    // Decode speed with speculation and without, both measured (plain probe steps).
    for speculation in ["mtp", "off"] {
        let rate = metric(&metrics, &format!("dsrun_decode_mean_tokens_per_second{{speculation=\"{speculation}\"}}"));
        let tokens = metric(&metrics, &format!("dsrun_decode_tokens_total{{speculation=\"{speculation}\"}}"));
        assert!(rate > 0.0 && tokens > 0.0, "speculation {speculation}: {metrics}");
    }
    Arc::try_unwrap(server).ok().unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_is_cancelled() {
    use futures_util::StreamExt;
    let server = Server::start(None).await;
    let body = json!({"prompt": "This module", "max_tokens": 150, "temperature": 0, "ignore_eos": true, "stream": true});
    let r = server.client.post(format!("{}/v1/completions", server.base)).json(&body).send().await.unwrap();
    let mut bytes = r.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        seen += bytes.next().await.unwrap().unwrap().iter().filter(|&&b| b == b'\n').count() / 2;
    }
    drop(bytes);
    // The sequence is dropped at the next token it cannot send.
    let mut cancelled = false;
    for _ in 0..200 {
        let (_, metrics) = server.get("/metrics").await;
        if metrics.lines().any(|l| l == "dsrun_cancelled_total 1") {
            cancelled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(cancelled, "the disconnected stream was not cancelled");
    server.healthy().await;
    let (status, _) = server.post("/v1/completions", &json!({"prompt": "ok", "max_tokens": 2})).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_stays_healthy() {
    let server = Server::start(None).await;
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>, &str)> = vec![
        (chat, b"{not json".to_vec(), 400, None, "not valid JSON"),
        (chat, b"[1, 2]".to_vec(), 400, None, "JSON object"),
        (chat, json!({"model": "x"}).to_string().into_bytes(), 422, Some("messages"), "messages"),
        (chat, json!({"messages": "hi"}).to_string().into_bytes(), 422, Some("messages"), "invalid type"),
        (chat, json!({"messages": user, "temperature": "hot"}).to_string().into_bytes(), 422, Some("temperature"), "invalid type"),
        (chat, json!({"messages": user, "max_tokens": -3}).to_string().into_bytes(), 422, Some("max_tokens"), "invalid value"),
        (chat, json!({"messages": []}).to_string().into_bytes(), 400, Some("messages"), "at least one"),
        (chat, json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string().into_bytes(), 400, Some("messages[0].role"), "wizard"),
        (chat, json!({"messages": user, "n": 3}).to_string().into_bytes(), 400, Some("n"), "n = 3"),
        (chat, json!({"messages": user, "temperature": -1}).to_string().into_bytes(), 400, Some("temperature"), "temperature"),
        (chat, json!({"messages": user, "top_logprobs": 50, "logprobs": true}).to_string().into_bytes(), 400, Some("top_logprobs"), "20"),
        (chat, json!({"messages": user, "logit_bias": {"99999": 1}}).to_string().into_bytes(), 400, Some("logit_bias"), "vocabulary"),
        (chat, json!({"messages": user, "max_tokens": 1000}).to_string().into_bytes(), 400, Some("messages"), "context is 160 tokens"),
        ("/v1/completions", json!({"prompt": "x ".repeat(400)}).to_string().into_bytes(), 400, Some("prompt"), "context is 160 tokens"),
        ("/v1/completions", json!({"max_tokens": 3}).to_string().into_bytes(), 422, Some("prompt"), "prompt"),
        ("/v1/completions", json!({"prompt": [1, 2, 999999]}).to_string().into_bytes(), 400, Some("prompt"), "vocabulary"),
        ("/v1/completions", json!({"prompt": [[1, 2], [3, 999999]]}).to_string().into_bytes(), 400, Some("prompt"), "vocabulary"),
        ("/v1/completions", json!({"prompt": []}).to_string().into_bytes(), 400, Some("prompt"), "1 to 1024"),
        (chat, vec![b' '; 100 << 10], 413, None, "limit"),
    ];
    for (path, body, status, param, message) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).to_string();
        let (got, reply) = server.post_raw(path, body).await;
        assert_eq!(got, status, "{path} {shown}: {reply}");
        let error = &reply["error"];
        assert!(error["message"].as_str().unwrap().contains(message), "{path} {shown}: {reply}");
        assert_eq!(error["param"].as_str(), param, "{path} {shown}: {reply}");
        assert!(error["type"].is_string() && error.get("code").is_some(), "{reply}");
        server.healthy().await;
    }
    let (status, body) = server.get("/v1/nothing").await;
    assert_eq!(status, 404);
    assert!(body.contains("\"error\""));
    let (status, reply) = server.post("/v1/completions", &json!({"prompt": "still fine", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{reply}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_required_when_set() {
    let server = Server::start(Some("sesame")).await;
    let body = json!({"prompt": "hi", "max_tokens": 1});
    let url = format!("{}/v1/completions", server.base);
    let r = server.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = server.client.post(&url).bearer_auth("wrong").json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = server.client.post(&url).bearer_auth("sesame").json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Health and metrics stay open to probes.
    server.healthy().await;
    server.shutdown().await;
}
