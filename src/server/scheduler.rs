//! Continuous batching: one thread owns the engine and its sequences. Each turn it takes in new
//! requests (a free sequence each, preferring the one whose cache already holds the longest
//! prefix of the prompt), drops those whose client went away, runs one chunk of one waiting
//! prompt, and then one decode step with a token of every decoding sequence together, so a
//! long prompt never stalls the running streams for more than a chunk.

use super::metrics::Metrics;
use crate::engine::{Engine, Steps};
use crate::generate::{Generation, StopReason, Stopping};
use crate::model::Logits;
use crate::sample::{logprobs, Dist, Sampler, SamplerConfig, TokenLogprob};
use crate::speculative::{self, Lane, SpecStats};
use crate::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Prompt tokens prefilled per turn: the longest pause a new prompt adds to running streams.
pub const PREFILL_CHUNK: usize = 64;

/// One request for the engine.
pub struct Job {
    pub prompt: Vec<u32>,
    pub sampler: SamplerConfig,
    pub stopping: Stopping,
    /// Also report the prompt tokens' log-probabilities, with this many alternatives
    /// (`echo` with `logprobs` on /v1/completions).
    pub prompt_logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

/// What the engine thread tells a request, in order: maybe its prompt's log-probabilities,
/// tokens, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    Token { text: String, logprob: Option<TokenLogprob> },
    Done { reason: StopReason, prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize },
    Failed(Failure),
}

/// Why a reply failed, and whether the request was at fault (a 4xx) or the engine (a 5xx);
/// `unavailable`: the engine is down (a rank of a distributed engine failed: a 503).
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    pub request: bool,
    pub unavailable: bool,
}

impl From<&crate::error::Error> for Failure {
    fn from(e: &crate::error::Error) -> Failure {
        Failure { message: e.to_string(), request: e.is_request_error(), unavailable: matches!(e, crate::error::Error::Rank { .. }) }
    }
}

/// The queue into the engine thread and what it reports about its load.
pub struct Scheduler {
    jobs: Option<SyncSender<Job>>,
    pub load: Arc<Load>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
pub struct Load {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    /// Why the engine is down (a distributed engine lost a rank), once it is: /health says so.
    pub down: std::sync::Mutex<Option<String>>,
}

/// Why a job was not taken.
#[derive(Debug)]
pub enum Refused {
    Busy(usize),
    Stopped,
}

impl Scheduler {
    /// Starts the engine thread; at most `queue` requests wait beyond the engine's sequences.
    pub fn start(engine: Box<dyn Engine>, tokenizer: Arc<Tokenizer>, metrics: Arc<Metrics>, queue: usize) -> Scheduler {
        let (jobs, inbox) = std::sync::mpsc::sync_channel(queue);
        let load = Arc::new(Load::default());
        let thread_load = load.clone();
        let thread = std::thread::Builder::new().name("dsrun-engine".into()).spawn(move || Worker::new(engine, tokenizer, metrics, thread_load).run(inbox)).expect("spawning the engine thread");
        Scheduler { jobs: Some(jobs), load, thread: Some(thread) }
    }

    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let jobs = self.jobs.as_ref().ok_or(Refused::Stopped)?;
        self.load.queued.fetch_add(1, Ordering::SeqCst);
        match jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.load.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => Refused::Busy(self.load.queued.load(Ordering::SeqCst)),
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }

    /// Lets the requests in flight finish, then stops the engine thread.
    pub fn stop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sequence of the engine and what its cache holds.
#[derive(Default)]
struct Slot {
    /// The tokens in this sequence's latent cache, in order.
    cached: Vec<u32>,
    active: Option<Active>,
}

struct Active {
    events: UnboundedSender<Event>,
    prompt: Vec<u32>,
    /// Prompt tokens reused from the cache.
    reused: usize,
    prompt_logprobs: Option<usize>,
    generation: Generation,
    /// The token to run at the next decode step (None while the prompt is prefilled).
    next: Option<u32>,
    /// Speculative decoding: the MTP layer's draft for the token after `next`, and the
    /// distribution it was drawn from.
    draft: Option<(u32, Dist)>,
}

struct Worker {
    engine: Box<dyn Engine>,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<Metrics>,
    load: Arc<Load>,
    slots: Vec<Slot>,
    waiting: VecDeque<Job>,
    /// Round-robin over prompts being prefilled.
    prefill_turn: usize,
    /// The engine drafts with its MTP layer: decode steps verify a draft per sequence.
    speculate: bool,
    spec: SpecStats,
}

impl Worker {
    fn new(engine: Box<dyn Engine>, tokenizer: Arc<Tokenizer>, metrics: Arc<Metrics>, load: Arc<Load>) -> Worker {
        let slots = (0..engine.sequences()).map(|_| Slot::default()).collect();
        let speculate = engine.has_mtp();
        Worker { engine, tokenizer, metrics, load, slots, waiting: VecDeque::new(), prefill_turn: 0, speculate, spec: SpecStats::default() }
    }

    fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.active.is_some()).count()
    }

    fn run(mut self, inbox: Receiver<Job>) {
        let mut open = true;
        while open || self.active() > 0 || !self.waiting.is_empty() {
            // Wait for work when there is none; else take what has arrived.
            if open && self.active() == 0 && self.waiting.is_empty() {
                match inbox.recv_timeout(Duration::from_millis(200)) {
                    Ok(job) => self.waiting.push_back(job),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
            }
            while open {
                match inbox.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            self.admit();
            self.drop_cancelled();
            self.prefill_one_chunk();
            self.decode_step();
            self.report();
        }
    }

    /// Gives waiting jobs free sequences, the one with the longest cached prefix first.
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            if job.events.is_closed() {
                self.waiting.pop_front();
                self.load.queued.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let shared = |s: &Slot| s.cached.iter().zip(&job.prompt).take_while(|(a, b)| a == b).count();
            let Some((seq, common)) = (0..self.slots.len()).filter(|&i| self.slots[i].active.is_none()).map(|i| (i, shared(&self.slots[i]))).max_by_key(|&(_, n)| n) else {
                return;
            };
            let job = self.waiting.pop_front().expect("a waiting job");
            self.load.queued.fetch_sub(1, Ordering::SeqCst);
            // At least the last prompt token runs (its logits choose the first token), and
            // scoring the prompt needs every position's logits.
            let mut reused = if job.prompt_logprobs.is_some() { 0 } else { common.min(job.prompt.len() - 1) };
            if self.speculate {
                // Only positions the MTP layer has run too (a finished reply's last verify step
                // is not drafted from).
                reused = reused.min(self.engine.mtp_len(seq).unwrap_or(0));
            }
            let sampler = match Sampler::new(job.sampler, self.engine.config().vocab_size) {
                Ok(s) => s,
                Err(e) => {
                    let _ = job.events.send(Event::Failed((&e).into()));
                    continue;
                }
            };
            self.engine.truncate(seq, reused);
            let slot = &mut self.slots[seq];
            slot.cached.truncate(reused);
            self.metrics.prefix_hit(reused);
            slot.active = Some(Active {
                events: job.events,
                generation: Generation::new(&job.prompt, sampler, job.stopping),
                prompt: job.prompt,
                reused,
                prompt_logprobs: job.prompt_logprobs,
                next: None,
                draft: None,
            });
        }
    }

    fn drop_cancelled(&mut self) {
        for slot in &mut self.slots {
            if slot.active.as_ref().is_some_and(|a| a.events.is_closed()) {
                slot.active = None;
                self.metrics.cancelled();
            }
        }
    }

    /// One chunk of one prompt still being prefilled (the whole prompt when its
    /// log-probabilities are wanted); the last chunk also chooses the first token.
    fn prefill_one_chunk(&mut self) {
        let waiting: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].active.as_ref().is_some_and(|a| a.next.is_none())).collect();
        let Some(&seq) = waiting.iter().find(|&&i| i >= self.prefill_turn).or(waiting.first()) else {
            return;
        };
        self.prefill_turn = seq + 1;
        let slot = &mut self.slots[seq];
        let active = slot.active.as_mut().expect("an active slot");
        let done = slot.cached.len();
        let started = Instant::now();
        let speculate = self.speculate;
        let result = if let Some(top) = active.prompt_logprobs {
            // Scoring: every position's logits, in the engine's own chunks.
            let scored = if speculate { self.engine.forward_keep(seq, &active.prompt[done..], Logits::All) } else { self.engine.forward_seq(seq, &active.prompt[done..], Logits::All) };
            scored.map(|logits| {
                let vocab = self.engine.config().vocab_size;
                let mut scored = vec![None];
                scored.extend(active.prompt[1..].iter().enumerate().map(|(i, &t)| Some(logprobs(&logits[i * vocab..(i + 1) * vocab], t, top))));
                let _ = active.events.send(Event::PromptLogprobs(scored));
                let last = logits[(active.prompt.len() - 1) * vocab..].to_vec();
                (active.prompt.len() - done, Some(last), None)
            })
        } else {
            let end = (done + PREFILL_CHUNK).min(active.prompt.len());
            let chunk = &active.prompt[done..end];
            if speculate {
                // Each chunk keeps its hidden states, and the MTP layer runs over them at once
                // (the next chunk's step would overwrite them); the last chunk's wait for the
                // first token.
                self.engine.forward_keep(seq, chunk, Logits::Last).and_then(|logits| {
                    if end < active.prompt.len() {
                        self.engine.draft(seq, &active.prompt[done + 1..end + 1])?;
                    }
                    Ok((chunk.len(), Some(logits), None))
                })
            } else if end < active.prompt.len() {
                self.engine.prefill_seq(seq, chunk).map(|()| (chunk.len(), None, None))
            } else if active.generation.wants_logits() {
                self.engine.forward_seq(seq, chunk, Logits::Last).map(|l| (chunk.len(), Some(l), None))
            } else {
                self.engine.greedy_seq(seq, chunk).map(|id| (chunk.len(), None, Some(id)))
            }
        };
        self.metrics.prompt_step(started.elapsed().as_secs_f64());
        match result {
            Err(e) => self.fail(seq, &e),
            Ok((ran, logits, id)) => {
                let slot = &mut self.slots[seq];
                let active = slot.active.as_ref().expect("an active slot");
                slot.cached.extend_from_slice(&active.prompt[done..done + ran]);
                self.metrics.prompt_tokens(ran);
                if slot.cached.len() == active.prompt.len() {
                    let active = slot.active.as_mut().expect("an active slot");
                    let token = id.unwrap_or_else(|| active.generation.choose(logits.as_deref().expect("logits when no id")));
                    self.accept(seq, token, logits.as_deref());
                    if speculate {
                        self.first_draft(seq, token);
                    }
                }
            }
        }
    }

    /// After a prompt: the MTP layer catches up with its last chunk, paired with the first
    /// token, and draws the first draft.
    fn first_draft(&mut self, seq: usize, first: u32) {
        let Some(active) = self.slots[seq].active.as_mut() else {
            return;
        };
        let Some(from) = self.engine.mtp_len(seq) else {
            return;
        };
        let mut next = active.prompt[from + 1..].to_vec();
        next.push(first);
        let max_new = active.generation.remaining();
        let mut lane = Lane { seq, last: first, max_new, draft: 1, sampler: active.generation.sampler(), pending: &mut active.draft };
        if let Err(e) = speculative::start(&mut *self.engine, &mut lane, &next) {
            self.fail(seq, &e);
        }
    }

    /// Speculative decode step: one round (`speculative::round`) over every decoding sequence,
    /// a draft each while the step has room, then each sequence's tokens taken in order.
    fn speculative_step(&mut self) {
        let probe = self.spec.probe_due();
        let mut lanes: Vec<Lane> = Vec::new();
        for (seq, slot) in self.slots.iter_mut().enumerate() {
            let Some(active) = slot.active.as_mut() else { continue };
            let Some(last) = active.next else { continue };
            let max_new = active.generation.remaining();
            lanes.push(Lane { seq, last, max_new, draft: 1, sampler: active.generation.sampler(), pending: &mut active.draft });
        }
        let fed: Vec<(usize, u32)> = lanes.iter().map(|l| (l.seq, l.last)).collect();
        let result = speculative::round(&mut *self.engine, &mut lanes, probe, &mut self.spec);
        drop(lanes);
        let rounds = match result {
            Err(e) => return fed.iter().for_each(|&(seq, _)| self.fail(seq, &e)),
            Ok(r) => r,
        };
        match rounds.plain {
            true => self.metrics.decode_step(rounds.emitted, rounds.verify_seconds, false, &self.spec.plain),
            false => self.metrics.decode_step(rounds.emitted, rounds.seconds, true, &self.spec.speculating),
        }
        for (&(seq, last), round) in fed.iter().zip(rounds.lanes) {
            self.metrics.speculative(round.drafted, round.accepted, &self.spec);
            // The tokens now in the cache: the one fed and the accepted drafts.
            self.slots[seq].cached.push(last);
            self.slots[seq].cached.extend_from_slice(&round.tokens[..round.accepted]);
            for (token, logits) in round.tokens.iter().zip(&round.logits) {
                if self.slots[seq].active.is_some() {
                    self.accept(seq, *token, Some(logits));
                }
            }
        }
    }

    /// One token of every decoding sequence, in one engine step.
    fn decode_step(&mut self) {
        let batch: Vec<(usize, u32)> = (0..self.slots.len()).filter_map(|i| Some((i, self.slots[i].active.as_ref()?.next?))).collect();
        if batch.is_empty() {
            return;
        }
        if self.speculate {
            return self.speculative_step();
        }
        let wants_logits = batch.iter().any(|&(i, _)| self.slots[i].active.as_ref().is_some_and(|a| a.generation.wants_logits()));
        let started = Instant::now();
        let result = if wants_logits { self.engine.decode_batch(&batch).map(|l| (Some(l), None)) } else { self.engine.decode_batch_greedy(&batch).map(|ids| (None, Some(ids))) };
        let seconds = started.elapsed().as_secs_f64();
        self.spec.plain.record(batch.len(), seconds);
        self.metrics.decode_step(batch.len(), seconds, false, &self.spec.plain);
        let vocab = self.engine.config().vocab_size;
        match result {
            Err(e) => batch.iter().for_each(|&(seq, _)| self.fail(seq, &e)),
            Ok((logits, ids)) => {
                for (row, &(seq, fed)) in batch.iter().enumerate() {
                    self.slots[seq].cached.push(fed);
                    let row_logits = logits.as_ref().map(|l| &l[row * vocab..(row + 1) * vocab]);
                    let active = self.slots[seq].active.as_mut().expect("a decoding slot");
                    let token = match (&ids, row_logits) {
                        (Some(ids), _) => ids[row],
                        (None, Some(l)) if active.generation.wants_logits() => active.generation.choose(l),
                        (None, Some(l)) => crate::model::math::argmax(l) as u32,
                        (None, None) => unreachable!("a step returns ids or logits"),
                    };
                    self.accept(seq, token, row_logits);
                }
            }
        }
    }

    /// The sequence's next token: sent as text, and fed at the next step unless the reply ends.
    fn accept(&mut self, seq: usize, token: u32, logits: Option<&[f32]>) {
        let capacity = self.engine.capacity();
        let slot = &mut self.slots[seq];
        let active = slot.active.as_mut().expect("an active slot");
        let before = active.generation.generated;
        let emitted = match active.generation.push(&self.tokenizer, token, logits) {
            Ok(e) => e,
            Err(e) => return self.fail(seq, &e),
        };
        if !emitted.text.is_empty() || emitted.logprob.is_some() {
            let _ = active.events.send(Event::Token { text: emitted.text, logprob: emitted.logprob });
        }
        // An EOS that ends the reply is not a generated token.
        self.metrics.generated(active.generation.generated - before);
        let full = slot.cached.len() >= capacity;
        if !active.generation.done() && !full {
            active.next = Some(token);
            return;
        }
        let reason = if full { StopReason::ContextFull } else { StopReason::MaxTokens };
        let tail = active.generation.finish(&self.tokenizer, reason);
        let active = slot.active.take().expect("an active slot");
        match tail {
            Err(e) => {
                let _ = active.events.send(Event::Failed((&e).into()));
            }
            Ok(tail) => {
                if !tail.is_empty() {
                    let _ = active.events.send(Event::Token { text: tail, logprob: None });
                }
                let _ = active.events.send(Event::Done {
                    reason: active.generation.stop.clone().unwrap_or_default(),
                    prompt_tokens: active.prompt.len(),
                    cached_tokens: active.reused,
                    completion_tokens: active.generation.generated,
                });
            }
        }
    }

    fn fail(&mut self, seq: usize, error: &crate::error::Error) {
        if let crate::error::Error::Rank { .. } = error {
            *self.load.down.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        }
        if let Some(active) = self.slots[seq].active.take() {
            let _ = active.events.send(Event::Failed(error.into()));
        }
        // What the cache holds is unknown after a failed step.
        self.slots[seq].cached.clear();
        self.engine.truncate(seq, 0);
    }

    fn report(&mut self) {
        let active = self.active();
        self.load.active.store(active, Ordering::SeqCst);
        self.metrics.load(self.load.queued.load(Ordering::SeqCst), active, self.engine.expert_cache_hit_rate());
    }
}
