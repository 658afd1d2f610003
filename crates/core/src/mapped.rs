//! Checkpoints are memory-mapped: a file truncated or replaced while dsrun reads it makes the
//! next access of a vanished page raise SIGBUS, which would end the process with no word. A
//! handler turns it into a message naming the checkpoint directory and exit status 1. The
//! handler may only call async-signal-safe functions, so the message is built when a checkpoint
//! opens and the handler just writes it.

use std::sync::OnceLock;

static MESSAGE: OnceLock<Vec<u8>> = OnceLock::new();

/// Notes that `dir`'s files are mapped (the first checkpoint opened is the one named) and
/// installs the handler once.
pub fn note_mapped(dir: &std::path::Path) {
    let text = format!(
        "error: a memory-mapped file of the checkpoint in {} changed size while dsrun was reading it (SIGBUS): \
         do not modify, replace or delete checkpoint files while dsrun runs, then run again\n",
        dir.display()
    );
    if MESSAGE.set(text.into_bytes()).is_ok() {
        install();
    }
}

#[cfg(unix)]
fn install() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        if let Some(message) = MESSAGE.get() {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer lives forever.
            unsafe {
                libc::write(2, message.as_ptr().cast(), message.len());
            }
        }
        unsafe { libc::_exit(1) };
    }
    // SAFETY: a plain handler for one signal, installed once; it touches only static data.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

#[cfg(not(unix))]
fn install() {
    // Windows maps files without SIGBUS: a vanished page raises an exception the runtime reports.
}
