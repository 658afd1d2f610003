//! One error type for the library: every variant names what was wrong and, where it helps,
//! what to do about it. Input problems are errors, never panics.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A config.json key is missing, has the wrong type, or a value dsrun does not support:
    /// `key` names it ("config.json" for the file as a whole), `why` says what is wrong.
    #[error("config.json: {why}")]
    Config { key: String, why: String },

    /// A safetensors file that cannot be trusted: truncated, bad header, overlapping data.
    #[error("{path}: corrupt safetensors file: {reason}")]
    CorruptCheckpoint { path: PathBuf, reason: String },

    #[error("tensor `{name}` is missing from the checkpoint{hint}")]
    MissingTensor { name: String, hint: String },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    WrongShape { name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("tensor `{name}`: dtype {found} is not supported here (expected {expected})")]
    WrongDtype { name: String, expected: String, found: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// No device of the kind asked for: no adapter, no driver, a build without the backend.
    /// The message says what to install or use instead.
    #[error("{0}")]
    NoDevice(String),

    /// A device or driver call failed.
    #[error("{device}: {what} failed: {reason}")]
    Device { device: String, what: String, reason: String },

    /// The device cannot hold what the model asks of it (a buffer beyond its binding limit, its
    /// memory exhausted); the message says what to lower.
    #[error("{device}: {what}")]
    DeviceLimit { device: String, what: String },

    /// The device or its compiler rejected dsrun's kernels.
    #[error("{device} rejected the kernels: {reason}")]
    Kernel { device: String, reason: String },

    /// A request that cannot be served as asked (bad settings, a budget below the minimum).
    #[error("{0}")]
    Invalid(String),

    /// More tokens than the sequence's context has room for.
    #[error("{tokens} tokens do not fit in the context: {cached} already cached, room for {room} (raise --ctx)")]
    ContextFull { tokens: usize, cached: usize, room: usize },

    /// A token id beyond the model's vocabulary.
    #[error(
        "token id {token} is out of range: the vocabulary has {vocab} tokens (config.json's vocab_size; where the ids come from \
         tokenizer.json, the tokenizer and the model disagree: a tokenizer from another checkpoint?)"
    )]
    TokenOutOfRange { token: u32, vocab: usize },

    /// A sequence index the engine does not hold.
    #[error("sequence {seq} does not exist: the engine holds {sequences}")]
    UnknownSequence { seq: usize, sequences: usize },

    /// Speculative decoding asked of an engine without the MTP layer.
    #[error("this engine has no MTP layer loaded (--speculative off, or the checkpoint has none)")]
    NoMtp,

    /// The model produced NaN or an infinity: its weights, not the request, are at fault.
    /// A rank of a distributed engine failed, left or stopped answering: the whole job ends
    /// (every rank sees this, naming the rank at fault). A server answers 503.
    #[error("rank {rank} of {world}: {reason}")]
    Rank { rank: usize, world: usize, reason: String },

    /// Not a failure: what opening an engine returns on a rank other than 0 of a multi-process
    /// job once it has followed rank 0's steps to the job's end (the command exits with 0).
    #[error("this rank followed rank 0 until it ended the job")]
    Followed,

    #[error(
        "the logits at position {position} are not finite (NaN or infinity): the checkpoint holds non-finite weights \
         or an activation overflowed (`dsrun check --model DIR` scans every weight)"
    )]
    NonFiniteLogits { position: usize },
}

impl Error {
    /// Whether the request is at fault (its tokens, its length, its settings), so that the
    /// caller can fix it: a server answers these with 4xx, everything else with 5xx.
    pub fn is_request_error(&self) -> bool {
        matches!(self, Error::Invalid(_) | Error::ContextFull { .. } | Error::TokenOutOfRange { .. } | Error::UnknownSequence { .. } | Error::NoMtp)
    }

    /// A config error about `key`.
    pub fn config(key: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Config { key: key.into(), why: why.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A failed device call: `device` named, `what` was being done, and why it failed.
    pub fn device(device: impl Into<String>, what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Device { device: device.into(), what: what.into(), reason: reason.to_string() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
