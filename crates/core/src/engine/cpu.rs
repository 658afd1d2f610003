//! The f32 CPU reference as an engine: one latent cache per sequence, a step's spans run one
//! after the other (it is the oracle batched GPU steps are tested against).

use super::{check_step, DraftSource, Engine, MtpState, Output, Pass, Step, Want};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{math, KvCache, Logits, Model};

pub struct CpuEngine {
    pub model: Model,
    pub caches: Vec<KvCache>,
    /// Speculative decoding with the MTP layer (`with_mtp`).
    mtp: Option<CpuMtp>,
    /// The last step's output.
    logits: Vec<f32>,
    ids: Vec<u32>,
}

/// The MTP layer on the CPU: a cache per sequence, the last kept step's hidden states and the
/// last draft's output.
struct CpuMtp {
    state: MtpState,
    caches: Vec<KvCache>,
    /// `[rows, hidden]` of the last kept main step, in its row order.
    hidden: Vec<f32>,
    /// `[hidden]`: the last draft row's output (a chained draft's input).
    drafted: Vec<f32>,
}

impl CpuEngine {
    pub fn new(model: Model, capacity: usize) -> Self {
        Self::with_sequences(model, capacity, 1)
    }

    pub fn with_sequences(model: Model, capacity: usize, sequences: usize) -> Self {
        let caches = (0..sequences.max(1)).map(|_| model.new_cache(capacity)).collect();
        CpuEngine { model, caches, mtp: None, logits: Vec::new(), ids: Vec::new() }
    }

    /// Also drafts with the checkpoint's MTP layer (an error where it has none).
    pub fn with_mtp(mut self) -> Result<Self> {
        let capacity = self.capacity();
        let caches = (0..self.caches.len()).map(|_| self.model.new_mtp_cache(capacity)).collect::<Option<Vec<_>>>();
        let caches = caches.ok_or(Error::NoMtp)?;
        self.mtp = Some(CpuMtp { state: MtpState::new(caches.len()), caches, hidden: Vec::new(), drafted: Vec::new() });
        Ok(self)
    }

    /// Hands back the rows of one span's logits (`rows`: every row of it) that `want` asks for.
    fn emit(&mut self, logits: &[f32], want: Want) {
        let vocab = self.model.config.vocab_size;
        let (Want::Logits(which) | Want::Ids(which)) = want else { return };
        let rows = match which {
            Logits::All => logits,
            Logits::Last => &logits[logits.len() - vocab..],
        };
        match want {
            Want::Ids(_) => self.ids.extend(rows.chunks(vocab).map(|r| math::argmax(r) as u32)),
            _ => self.logits.extend_from_slice(rows),
        }
    }

    fn main_step(&mut self, step: &Step) -> Result<()> {
        let keep = step.pass == Pass::MainKeepingHidden;
        if keep {
            let m = self.mtp.as_mut().ok_or(Error::NoMtp)?;
            m.state.check_keep(step.spans)?;
            m.hidden.clear();
        }
        for span in step.spans {
            let cache = &mut self.caches[span.seq];
            if keep {
                let (logits, hidden) = self.model.forward_hidden(cache, span.tokens)?;
                self.mtp.as_mut().expect("checked above").hidden.extend(hidden);
                self.emit(&logits, step.want);
            } else {
                let which = match step.want {
                    Want::Logits(w) | Want::Ids(w) => w,
                    Want::Nothing => Logits::Last,
                };
                let logits = self.model.forward(cache, span.tokens, which)?;
                self.emit(&logits, step.want);
            }
        }
        if keep {
            let m = self.mtp.as_mut().expect("checked above");
            m.state.keep(step.spans.iter().map(|s| (s.seq, s.position, s.tokens.len())));
        }
        Ok(())
    }

    fn draft_step(&mut self, step: &Step) -> Result<()> {
        let m = self.mtp.as_mut().ok_or(Error::NoMtp)?;
        let caches = &self.caches;
        let sources = m.state.draft_sources(step, |s| caches[s].len())?;
        let d = self.model.config.hidden_size;
        let mut outputs = Vec::with_capacity(step.spans.len());
        for (span, source) in step.spans.iter().zip(&sources) {
            let n = span.tokens.len();
            let hidden = match *source {
                DraftSource::Kept { row } => &m.hidden[row * d..(row + n) * d],
                DraftSource::Chained => &m.drafted[..],
            };
            let cache = &mut m.caches[span.seq];
            cache.truncate(span.position);
            let (logits, out) = self.model.mtp_forward(cache, span.tokens, hidden)?;
            outputs.push((logits, out[(n - 1) * d..].to_vec()));
        }
        m.state.drafted(step.spans, &sources, true);
        for (logits, out) in outputs {
            self.mtp.as_mut().expect("checked above").drafted = out;
            self.emit(&logits, step.want);
        }
        Ok(())
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }
    fn sequences(&self) -> usize {
        self.caches.len()
    }
    fn capacity(&self) -> usize {
        self.caches[0].capacity()
    }
    fn seq_len(&self, seq: usize) -> usize {
        self.caches.get(seq).map_or(0, KvCache::len)
    }
    fn truncate(&mut self, seq: usize, len: usize) {
        if let Some(cache) = self.caches.get_mut(seq) {
            cache.truncate(len);
        }
        if let Some(m) = &mut self.mtp {
            m.state.truncate(seq, len);
        }
    }
    fn step(&mut self, step: &Step) -> Result<Output<'_>> {
        check_step(step, &self.model.config, self.caches.len(), self.capacity(), usize::MAX, |s| self.caches[s].len())?;
        self.logits.clear();
        self.ids.clear();
        match step.pass {
            Pass::Main | Pass::MainKeepingHidden => self.main_step(step)?,
            Pass::Draft => self.draft_step(step)?,
        }
        Ok(Output { logits: &self.logits, ids: &self.ids })
    }
    fn device_name(&self) -> String {
        "cpu (f32 reference)".into()
    }
    fn mtp_len(&self, seq: usize) -> Option<usize> {
        self.mtp.as_ref().map(|m| m.state.len(seq))
    }
}
