//! `dsrun chat`: a conversation in the terminal. Each turn renders the whole conversation
//! through the model's chat template; the part of it already in the latent cache (every
//! earlier turn's prompt) is kept, so a turn only runs what is new. Ctrl-C stops a reply and
//! stays; Ctrl-D (or /exit) leaves.

use crate::chat_template::{ChatTemplate, Message};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::{generate, Stats, StopReason, Stopping};
use crate::sample::Sampler;
use crate::tokenizer::Tokenizer;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Chat<'a> {
    pub engine: &'a mut dyn Engine,
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    /// Drafts per step of speculative decoding (0: off).
    pub draft: usize,
}

pub struct Settings {
    pub system: Option<String>,
    pub stopping: Stopping,
    /// Print speed after every reply.
    pub stats: bool,
}

/// The messages so far and the tokens sequence 0's cache holds.
#[derive(Default)]
pub struct Conversation {
    pub messages: Vec<Message>,
    cached: Vec<u32>,
}

impl Conversation {
    pub fn new(system: Option<&str>) -> Conversation {
        Conversation { messages: system.map(|s| vec![Message::new("system", s)]).unwrap_or_default(), cached: Vec::new() }
    }

    /// Replaces the system message (the cache is kept up to where the conversation differs).
    pub fn set_system(&mut self, text: &str) {
        self.messages.retain(|m| m.role != "system");
        self.messages.insert(0, Message::new("system", text));
    }

    /// Answers `user`, streaming the reply to `emit`; the reply (even a cancelled one) joins
    /// the conversation. Returns the stats and how many prompt tokens came from the cache.
    pub fn reply(&mut self, chat: &mut Chat, user: &str, sampler: Sampler, stopping: Stopping, mut emit: impl FnMut(&str) -> Result<()>, cancelled: &dyn Fn() -> bool) -> Result<(Stats, usize)> {
        self.messages.push(Message::new("user", user));
        let prompt = chat.template.tokens(chat.tokenizer, &self.messages, true)?;
        // Keep what the cache shares with the new prompt; at least its last token runs.
        let shared = self.cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count().min(prompt.len().saturating_sub(1));
        chat.engine.truncate(0, shared);
        self.cached.truncate(shared);
        let mut text = String::new();
        let result = generate(
            &mut *chat.engine,
            chat.tokenizer,
            &prompt[shared..],
            sampler,
            stopping,
            chat.draft,
            |piece| {
                text += piece;
                emit(piece)
            },
            cancelled,
        );
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                self.messages.pop();
                chat.engine.truncate(0, 0);
                self.cached.clear();
                return Err(e);
            }
        };
        self.cached = prompt;
        self.messages.push(Message::new("assistant", &text));
        Ok((stats, shared))
    }
}

const HELP: &str = "/reset        start a new conversation (keeps the system message)\n\
/system TEXT  set the system message\n\
/stats        print speed after each reply (toggle)\n\
/exit         leave (or Ctrl-D); Ctrl-C stops a reply";

/// Runs the chat until Ctrl-D or /exit. `sampler(turn)` gives each reply its sampler.
pub fn run(mut chat: Chat, settings: Settings, sampler: &dyn Fn(u64) -> Result<Sampler>) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    watch_interrupts(interrupted.clone());
    let mut editor = rustyline::DefaultEditor::new().map_err(|e| Error::Invalid(format!("cannot read the terminal: {e}")))?;
    let mut conversation = Conversation::new(settings.system.as_deref());
    let mut show_stats = settings.stats;
    let mut turn = 0u64;
    eprintln!("dsrun chat on {} ({} tokens of context). /help lists commands; Ctrl-D leaves.", chat.engine.device_name(), chat.engine.capacity());
    loop {
        let line = match editor.readline(">>> ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                eprintln!("(Ctrl-D or /exit leaves)");
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(Error::Invalid(format!("reading input: {e}"))),
        };
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(input);
        match input.split_once(' ').map_or((input, ""), |(c, rest)| (c, rest.trim())) {
            ("/exit" | "/quit", _) => break,
            ("/help", _) => {
                eprintln!("{HELP}");
                continue;
            }
            ("/reset", _) => {
                let system = conversation.messages.iter().find(|m| m.role == "system").map(|m| m.content.clone());
                conversation = Conversation { cached: std::mem::take(&mut conversation.cached), ..Conversation::new(system.as_deref()) };
                eprintln!("(new conversation)");
                continue;
            }
            ("/system", text) if !text.is_empty() => {
                conversation.set_system(text);
                eprintln!("(system message set)");
                continue;
            }
            ("/stats", _) => {
                show_stats = !show_stats;
                eprintln!("(stats {})", if show_stats { "on" } else { "off" });
                continue;
            }
            (command, _) if command.starts_with('/') => {
                eprintln!("unknown command {command}\n{HELP}");
                continue;
            }
            _ => {}
        }
        interrupted.store(false, Ordering::SeqCst);
        let mut stdout = std::io::stdout().lock();
        let emit = |text: &str| write!(stdout, "{text}").and_then(|_| stdout.flush()).map_err(|e| Error::io("stdout", e));
        let result = conversation.reply(&mut chat, input, sampler(turn)?, settings.stopping.clone(), emit, &|| interrupted.load(Ordering::SeqCst));
        turn += 1;
        println!();
        match result {
            Ok((stats, cached)) => {
                if stats.stop == StopReason::Cancelled || stats.stop == StopReason::ContextFull {
                    eprintln!("({})", stats.stop.describe(stats.generated_tokens, chat.engine.capacity()));
                }
                if show_stats {
                    eprintln!("({} | {cached} prompt tokens reused from the cache | {})", stats.summary(), stats.stop.describe(stats.generated_tokens, chat.engine.capacity()));
                }
            }
            // A turn that cannot run (the conversation outgrew the context) is reported; the chat goes on.
            Err(e) => eprintln!("error: {e} (/reset starts over)"),
        }
    }
    Ok(())
}

/// Ctrl-C sets `flag` instead of ending the process (the reply in progress stops).
fn watch_interrupts(flag: Arc<AtomicBool>) {
    let _ = std::thread::Builder::new().name("dsrun-ctrl-c".into()).spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async {
            while tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
            }
        });
    });
}
