//! A model divided among ranks, as one engine: rank 0 (the [`Leader`]) owns the tokenizer,
//! sampler and server like any engine's caller; before each step it broadcasts the step (and
//! each truncation) to the other ranks, which run it on their own devices in [`follow`]. The
//! MoE layers' partial sums meet in the communicator inside the step.
//!
//! Ranks are threads of this process (several adapters or devices: [`Leader::in_process`]) or
//! processes (`RANK`/`WORLD_SIZE`: rank 0 wraps its engine with [`Leader::new`], the others call
//! `follow`). A rank that fails ends the job: the others' collectives end with an error naming
//! it, and the leader refuses every later step with it (a server answers 503).

use super::comm::{Communicator, InProcess};
use crate::config::ModelConfig;
use crate::engine::{check_step, Engine, Output, Pass, Span, Step, Want};
use crate::error::{Error, Result};
use crate::model::Logits;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Message tags broadcast from rank 0.
const END: u8 = 0;
const STEP: u8 = 1;
const TRUNCATE: u8 = 2;

pub struct Leader<E: Engine> {
    engine: E,
    comm: Arc<dyn Communicator>,
    /// Ranks that are threads of this process.
    threads: Vec<JoinHandle<Result<()>>>,
    message: Vec<u8>,
    /// Why the job ended, once a rank failed: every later step fails with it.
    ended: Option<(usize, String)>,
}

impl<E: Engine> Leader<E> {
    /// Rank 0's `engine` (loaded with `comm`), whose steps the other ranks follow.
    pub fn new(engine: E, comm: Arc<dyn Communicator>) -> Leader<E> {
        Leader { engine, comm, threads: Vec::new(), message: Vec::new(), ended: None }
    }

    /// `world` ranks as threads of this process: `open(rank, comm)` loads each rank's engine
    /// (in rank order, on this thread); ranks 1.. then follow on their own threads.
    pub fn in_process(world: usize, open: impl Fn(usize, Arc<dyn Communicator>) -> Result<E>) -> Result<Leader<E>>
    where
        E: 'static,
    {
        let comms: Vec<Arc<dyn Communicator>> = InProcess::group(world).into_iter().map(|c| Arc::new(c) as Arc<dyn Communicator>).collect();
        let mut engines = Vec::with_capacity(world);
        for (rank, comm) in comms.iter().enumerate() {
            engines.push(open(rank, comm.clone()).map_err(|e| match e {
                e @ Error::Rank { .. } => e,
                e => Error::Rank { rank, world, reason: format!("loading: {e}") },
            })?);
        }
        let mut engines = engines.into_iter();
        let engine = engines.next().ok_or_else(|| Error::Invalid("a job of no ranks".into()))?;
        let mut leader = Leader::new(engine, comms[0].clone());
        for (mut engine, comm) in engines.zip(comms.into_iter().skip(1)) {
            let rank = comm.rank();
            let thread = std::thread::Builder::new().name(format!("dsrun rank {rank}")).spawn(move || follow(&mut engine, &*comm));
            leader.threads.push(thread.map_err(|e| Error::Invalid(format!("starting rank {rank}'s thread: {e}")))?);
        }
        Ok(leader)
    }

    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    fn check_alive(&self) -> Result<()> {
        match &self.ended {
            Some((rank, reason)) => Err(Error::Rank { rank: *rank, world: self.comm.world(), reason: format!("{reason} (the distributed engine has stopped; restart it)") }),
            None => Ok(()),
        }
    }
}

/// Ends the job on a failure that is not the request's: the other ranks stop waiting, and
/// `ended` keeps why.
fn fail(comm: &dyn Communicator, ended: &mut Option<(usize, String)>, e: Error) -> Error {
    if e.is_request_error() {
        return e;
    }
    let (rank, reason) = match &e {
        Error::Rank { rank, reason, .. } => (*rank, reason.clone()),
        e => (0, e.to_string()),
    };
    comm.abort(&reason);
    *ended = Some((rank, reason));
    e
}

impl<E: Engine> Engine for Leader<E> {
    fn config(&self) -> &ModelConfig {
        self.engine.config()
    }

    fn sequences(&self) -> usize {
        self.engine.sequences()
    }

    fn capacity(&self) -> usize {
        self.engine.capacity()
    }

    fn seq_len(&self, seq: usize) -> usize {
        self.engine.seq_len(seq)
    }

    fn truncate(&mut self, seq: usize, len: usize) {
        if self.ended.is_some() {
            return;
        }
        self.message.clear();
        self.message.push(TRUNCATE);
        self.message.extend_from_slice(&(seq as u64).to_le_bytes());
        self.message.extend_from_slice(&(len as u64).to_le_bytes());
        match self.comm.broadcast(&mut self.message) {
            Ok(()) => self.engine.truncate(seq, len),
            Err(e) => {
                log::error!("{e}");
                fail(&*self.comm, &mut self.ended, e);
            }
        }
    }

    fn step(&mut self, step: &Step) -> Result<Output<'_>> {
        self.check_alive()?;
        // A step every rank would refuse is refused here, before the others see it.
        let e = &self.engine;
        if step.pass != Pass::Draft {
            check_step(step, e.config(), e.sequences(), e.capacity(), e.max_step_rows(), |s| e.seq_len(s))?;
        }
        encode(step, &mut self.message);
        if let Err(e) = self.comm.broadcast(&mut self.message) {
            return Err(fail(&*self.comm, &mut self.ended, e));
        }
        self.engine.step(step).map_err(|e| fail(&*self.comm, &mut self.ended, e))
    }

    fn device_name(&self) -> String {
        format!("{} (rank 0 of {}, {})", self.engine.device_name(), self.comm.world(), self.comm.describe())
    }

    fn max_step_rows(&self) -> usize {
        self.engine.max_step_rows()
    }

    fn mtp_len(&self, seq: usize) -> Option<usize> {
        self.engine.mtp_len(seq)
    }

    fn counters(&self) -> Option<String> {
        self.engine.counters()
    }

    fn reset_counters(&mut self) {
        self.engine.reset_counters()
    }

    fn expert_cache_hit_rate(&self) -> Option<f64> {
        self.engine.expert_cache_hit_rate()
    }
}

impl<E: Engine> Drop for Leader<E> {
    /// Tells the other ranks the job is over, and waits for this process's rank threads.
    fn drop(&mut self) {
        if self.ended.is_none() {
            let _ = self.comm.broadcast(&mut vec![END]);
        }
        for thread in self.threads.drain(..) {
            match thread.join() {
                Ok(Err(e)) if self.ended.is_none() => log::error!("{e}"),
                Err(_) => log::error!("a rank's thread panicked"),
                _ => {}
            }
        }
    }
}

/// A rank other than 0: runs every step rank 0 broadcasts on `engine` until rank 0 ends the
/// job (Ok) or a rank fails (the error, after telling the others).
pub fn follow(engine: &mut dyn Engine, comm: &dyn Communicator) -> Result<()> {
    let mut message = Vec::new();
    let mut tokens = Vec::new();
    let mut spans = Vec::new();
    loop {
        comm.broadcast(&mut message)?;
        let result = match message.first() {
            Some(&END) => return Ok(()),
            Some(&TRUNCATE) if message.len() == 17 => {
                let word = |i: usize| u64::from_le_bytes(message[i..i + 8].try_into().expect("8 bytes")) as usize;
                engine.truncate(word(1), word(9));
                Ok(())
            }
            Some(&STEP) => match decode(&message, &mut tokens, &mut spans) {
                Ok((pass, want)) => {
                    let spans: Vec<Span> = spans.iter().map(|&(seq, position, start, len)| Span { seq, position, tokens: &tokens[start..start + len] }).collect();
                    engine.step(&Step { pass, spans: &spans, want }).map(|_| ())
                }
                Err(e) => Err(e),
            },
            _ => Err(Error::Rank { rank: 0, world: comm.world(), reason: format!("sent a message this rank does not understand ({} bytes): run the same dsrun on every rank", message.len()) }),
        };
        match result {
            // Rank 0 met the same refusal (the ranks hold the same state) and answered it.
            Err(e) if e.is_request_error() => log::debug!("rank {}: a refused step: {e}", comm.rank()),
            Err(e) => {
                let reason = match &e {
                    Error::Rank { .. } => return Err(e),
                    e => e.to_string(),
                };
                comm.abort(&reason);
                return Err(Error::Rank { rank: comm.rank(), world: comm.world(), reason });
            }
            Ok(()) => {}
        }
    }
}

fn encode(step: &Step, out: &mut Vec<u8>) {
    out.clear();
    out.push(STEP);
    out.push(match step.pass {
        Pass::Main => 0,
        Pass::MainKeepingHidden => 1,
        Pass::Draft => 2,
    });
    let (kind, which) = match step.want {
        Want::Nothing => (0, Logits::Last),
        Want::Logits(w) => (1, w),
        Want::Ids(w) => (2, w),
    };
    out.extend([kind, u8::from(which == Logits::All)]);
    out.extend_from_slice(&(step.spans.len() as u32).to_le_bytes());
    for s in step.spans {
        for v in [s.seq as u32, s.position as u32, s.tokens.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend(s.tokens.iter().flat_map(|t| t.to_le_bytes()));
    }
}

/// A step message into its pass, want, tokens and spans (seq, position, first token, tokens).
fn decode(message: &[u8], tokens: &mut Vec<u32>, spans: &mut Vec<(usize, usize, usize, usize)>) -> Result<(Pass, Want)> {
    let bad = || Error::Rank { rank: 0, world: 0, reason: "sent a malformed step".into() };
    let mut words = message.get(8..).ok_or_else(bad)?.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let pass = match message[1] {
        0 => Pass::Main,
        1 => Pass::MainKeepingHidden,
        2 => Pass::Draft,
        _ => return Err(bad()),
    };
    let which = if message[3] == 1 { Logits::All } else { Logits::Last };
    let want = match message[2] {
        0 => Want::Nothing,
        1 => Want::Logits(which),
        2 => Want::Ids(which),
        _ => return Err(bad()),
    };
    let count = u32::from_le_bytes(message[4..8].try_into().map_err(|_| bad())?) as usize;
    tokens.clear();
    spans.clear();
    for _ in 0..count {
        let (seq, position, len) = (words.next().ok_or_else(bad)?, words.next().ok_or_else(bad)?, words.next().ok_or_else(bad)?);
        let start = tokens.len();
        for _ in 0..len {
            tokens.push(words.next().ok_or_else(bad)? as u32);
        }
        spans.push((seq, position, start, len));
    }
    Ok((pass, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip() {
        let (a, b) = ([1u32, 2, 3], [7u32]);
        let spans = [Span { seq: 2, position: 5, tokens: &a }, Span { seq: 0, position: 9, tokens: &b }];
        let step = Step { pass: Pass::MainKeepingHidden, spans: &spans, want: Want::Ids(Logits::All) };
        let mut message = Vec::new();
        encode(&step, &mut message);
        let (mut tokens, mut decoded) = (Vec::new(), Vec::new());
        let (pass, want) = decode(&message, &mut tokens, &mut decoded).unwrap();
        assert_eq!((pass, want), (Pass::MainKeepingHidden, Want::Ids(Logits::All)));
        assert_eq!(decoded, [(2, 5, 0, 3), (0, 9, 3, 1)]);
        assert_eq!(tokens, [1, 2, 3, 7]);
        assert!(decode(&message[..message.len() - 2], &mut tokens, &mut decoded).is_err());
    }
}
