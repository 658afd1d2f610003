//! The core's progress reports as terminal bars (hidden where stderr is not a terminal).

use dsrun::util::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// A bar that appears when long work starts: loading weights, scanning or writing a checkpoint.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new() -> Bar {
        Bar(ProgressBar::hidden())
    }
}

impl Progress for Bar {
    fn start(&self, message: &str, total: u64, bytes: bool) {
        let template = if bytes { "{msg} {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}" } else { "{msg} {bar:40} {pos}/{len} matrices ({elapsed}, eta {eta})" };
        self.0.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.0.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
        self.0.set_length(total);
        self.0.set_position(0);
        self.0.set_message(message.to_string());
    }

    fn advance(&self, units: u64) {
        self.0.inc(units);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// A spinner naming the work in hand (benchmarks).
pub fn spinner(template: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner()));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
