//! The MTP layer's bookkeeping, kept the same way by every engine that drafts: how far the
//! layer has come on each sequence, which rows of the last kept main step hold hidden states,
//! and whether a chained draft may follow. The hidden states themselves live where the engine
//! computes (host vectors, a device buffer); this says which of them a draft step reads.

use super::{Span, Step};
use crate::error::{Error, Result};

/// A span of the last kept main step: sequence, first position, rows, and its first row in
/// that step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Kept {
    pub seq: usize,
    pub first: usize,
    pub rows: usize,
    pub row: usize,
}

/// Where a draft step's span reads its input hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DraftSource {
    /// Rows of the last kept main step, from this row on (a catch-up).
    Kept { row: usize },
    /// The output of the last draft (a chained draft).
    Chained,
}

#[derive(Debug, Clone)]
pub(crate) struct MtpState {
    /// Per sequence: positions whose MTP cache rows come from the main model's hidden states.
    lens: Vec<usize>,
    /// Per sequence: chained drafts beyond `lens` (dropped by the next catch-up or truncate).
    chained: Vec<usize>,
    /// The spans of the last kept main step (or of its last chunk), in its row order; a draft
    /// step reads them (and consumes them: a device reuses their rows for its output).
    pub kept: Vec<Kept>,
    /// The sequence of the last draft step, when it had one span (its output is a chained
    /// draft's input).
    drafted: Option<usize>,
}

impl MtpState {
    pub fn new(sequences: usize) -> MtpState {
        MtpState { lens: vec![0; sequences], chained: vec![0; sequences], kept: Vec::new(), drafted: None }
    }

    pub fn len(&self, seq: usize) -> usize {
        self.lens.get(seq).copied().unwrap_or(0)
    }

    pub fn truncate(&mut self, seq: usize, len: usize) {
        if let Some(l) = self.lens.get_mut(seq) {
            *l = len.min(*l);
            self.chained[seq] = 0;
            if self.drafted == Some(seq) {
                self.drafted = None;
            }
        }
    }

    /// Before a kept main step: the MTP layer holds every position of each sequence it runs.
    pub fn check_keep(&self, spans: &[Span]) -> Result<()> {
        for span in spans {
            if self.lens[span.seq] != span.position {
                return Err(Error::Invalid(format!(
                    "sequence {}: the MTP layer has run {} of its {} positions (their hidden states are gone); truncate it to a common length first",
                    span.seq, self.lens[span.seq], span.position
                )));
            }
        }
        Ok(())
    }

    /// After a kept main step: these spans' rows hold hidden states (`(seq, first, rows)` in
    /// row order).
    pub fn keep(&mut self, spans: impl IntoIterator<Item = (usize, usize, usize)>) {
        self.kept.clear();
        let mut row = 0;
        for (seq, first, rows) in spans {
            self.kept.push(Kept { seq, first, rows, row });
            row += rows;
        }
        self.drafted = None;
    }

    /// Where each span of a draft step reads its hidden states, or why it cannot run: a
    /// catch-up runs from the MTP layer's length to the main model's (`seq_len`) over rows the
    /// last kept step holds; a chained draft is one token at the position after the last
    /// draft of a one-span draft step.
    pub fn draft_sources(&self, step: &Step, seq_len: impl Fn(usize) -> usize) -> Result<Vec<DraftSource>> {
        let chainable = step.spans.len() == 1;
        step.spans
            .iter()
            .map(|span| {
                let (seq, main) = (span.seq, seq_len(span.seq));
                let (len, chained) = (self.lens[seq], self.chained[seq]);
                if chainable && self.drafted == Some(seq) && len == main && span.position == len + chained && span.tokens.len() == 1 {
                    return Ok(DraftSource::Chained);
                }
                let end = span.position + span.tokens.len();
                match self.kept.iter().find(|k| k.seq == seq) {
                    Some(k) if span.position == len && k.first == len && end == main && end <= k.first + k.rows => Ok(DraftSource::Kept { row: k.row }),
                    _ => Err(Error::Invalid(format!(
                        "sequence {seq}: a draft at positions {}..{end} needs the hidden states of positions {len}..{main} from the last kept main step, one next token for each (or one token chained on the last draft, at position {})",
                        span.position,
                        len + chained
                    ))),
                }
            })
            .collect()
    }

    /// After a draft step with these sources: catch-ups bring the layer up to the main model,
    /// chained drafts go beyond it; the kept rows are consumed. `chainable`: the engine kept
    /// the last row's output where a chained draft reads it (a step of one span).
    pub fn drafted(&mut self, spans: &[Span], sources: &[DraftSource], chainable: bool) {
        for (span, source) in spans.iter().zip(sources) {
            match source {
                DraftSource::Kept { .. } => {
                    self.lens[span.seq] = span.position + span.tokens.len();
                    self.chained[span.seq] = 0;
                }
                DraftSource::Chained => self.chained[span.seq] += 1,
            }
        }
        self.kept.clear();
        self.drafted = (chainable && spans.len() == 1).then(|| spans[0].seq);
    }
}
