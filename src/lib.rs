//! The `dsrun` program's library: its OpenAI-compatible server and its terminal chat, over
//! `dsrun-core` (re-exported whole: `dsrun::engine::Engine` is the core's). Programs that embed
//! dsrun without a command line or a web server depend on `dsrun-core` alone.

pub use dsrun_core::*;

pub mod chat;
pub mod server;
