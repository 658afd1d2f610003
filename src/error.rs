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

    /// A config.json key is missing, has the wrong type, or a value dsrun does not support.
    #[error("config.json: {0}")]
    Config(String),

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

    /// A request that cannot be served as asked (bad token id, prompt too long, unsupported device).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
