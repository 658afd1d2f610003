//! `/metrics`: Prometheus text through the `metrics` crate, recorded into this server's own
//! recorder (not a process-wide one, so several servers in one process keep apart).

use metrics::{counter, gauge, histogram, with_local_recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let m = Metrics { recorder, handle };
        m.describe();
        m
    }
}

impl Metrics {
    fn describe(&self) {
        with_local_recorder(&self.recorder, || {
            metrics::describe_counter!("dsrun_requests_total", "HTTP requests by route and status");
            metrics::describe_counter!("dsrun_prompt_tokens_total", "Prompt tokens run through the model");
            metrics::describe_counter!("dsrun_prompt_cached_tokens_total", "Prompt tokens reused from a sequence's cache (prefix reuse)");
            metrics::describe_counter!("dsrun_generated_tokens_total", "Tokens generated");
            metrics::describe_counter!("dsrun_cancelled_total", "Sequences cancelled because their client went away");
            metrics::describe_gauge!("dsrun_queue_depth", "Requests waiting for a free sequence");
            metrics::describe_gauge!("dsrun_active_sequences", "Sequences being prefilled or decoded");
            metrics::describe_gauge!("dsrun_decode_tokens_per_second", "Tokens per second of the last decode step, all sequences together");
            metrics::describe_gauge!("dsrun_expert_cache_hit_rate", "Share of routed-expert lookups the device cache served (expert streaming)");
            metrics::describe_histogram!("dsrun_decode_step_seconds", "Seconds per decode step");
            metrics::describe_counter!("dsrun_decode_tokens_total", "Tokens emitted by decode steps, by speculation (mtp: steps that drafted; off: plain steps, including speculation's plain probes)");
            metrics::describe_gauge!("dsrun_decode_mean_tokens_per_second", "Decode tokens per second since the server started, with speculation (mtp) and without (off), both measured");
            metrics::describe_counter!("dsrun_speculative_drafted_total", "Tokens the MTP layer drafted (speculative decoding)");
            metrics::describe_counter!("dsrun_speculative_accepted_total", "Drafted tokens the main model accepted");
            metrics::describe_counter!("dsrun_speculative_steps_total", "Sequence verify steps of speculative decoding (each emits the accepted drafts and one more token)");
            metrics::describe_gauge!("dsrun_speculative_acceptance", "Share of drafted tokens accepted, since the server started");
            metrics::describe_histogram!("dsrun_prompt_step_seconds", "Seconds per prompt chunk");
        });
        // Present from the start, so scrapers see every series before the first request.
        self.prompt_tokens(0);
        self.generated(0);
        self.prefix_hit(0);
        self.load(0, 0, None);
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }

    pub fn request(&self, route: &'static str, status: u16) {
        with_local_recorder(&self.recorder, || counter!("dsrun_requests_total", "route" => route, "status" => status.to_string()).increment(1));
    }

    pub fn prompt_tokens(&self, n: usize) {
        with_local_recorder(&self.recorder, || counter!("dsrun_prompt_tokens_total").increment(n as u64));
    }

    pub fn prefix_hit(&self, n: usize) {
        with_local_recorder(&self.recorder, || counter!("dsrun_prompt_cached_tokens_total").increment(n as u64));
    }

    pub fn generated(&self, n: usize) {
        with_local_recorder(&self.recorder, || counter!("dsrun_generated_tokens_total").increment(n as u64));
    }

    pub fn cancelled(&self) {
        with_local_recorder(&self.recorder, || counter!("dsrun_cancelled_total").increment(1));
    }

    /// One decode step of `tokens` in `seconds`, speculating (it drafted) or plain; `total`
    /// the server's running counters of that kind of step.
    pub fn decode_step(&self, tokens: usize, seconds: f64, speculating: bool, total: &crate::speculative::DecodeRate) {
        let speculation = if speculating { "mtp" } else { "off" };
        with_local_recorder(&self.recorder, || {
            histogram!("dsrun_decode_step_seconds").record(seconds);
            counter!("dsrun_decode_tokens_total", "speculation" => speculation).increment(tokens as u64);
            if seconds > 0.0 {
                gauge!("dsrun_decode_tokens_per_second").set(tokens as f64 / seconds);
            }
            if let Some(rate) = total.tokens_per_second() {
                gauge!("dsrun_decode_mean_tokens_per_second", "speculation" => speculation).set(rate);
            }
        });
    }

    /// One sequence's speculative verify: `drafted` drafts, `accepted` kept; `total` the
    /// server's running counters.
    pub fn speculative(&self, drafted: usize, accepted: usize, total: &crate::speculative::SpecStats) {
        with_local_recorder(&self.recorder, || {
            counter!("dsrun_speculative_drafted_total").increment(drafted as u64);
            counter!("dsrun_speculative_accepted_total").increment(accepted as u64);
            counter!("dsrun_speculative_steps_total").increment(1);
            gauge!("dsrun_speculative_acceptance").set(total.acceptance());
        });
    }

    pub fn prompt_step(&self, seconds: f64) {
        with_local_recorder(&self.recorder, || histogram!("dsrun_prompt_step_seconds").record(seconds));
    }

    pub fn load(&self, queued: usize, active: usize, expert_hit_rate: Option<f64>) {
        with_local_recorder(&self.recorder, || {
            gauge!("dsrun_queue_depth").set(queued as f64);
            gauge!("dsrun_active_sequences").set(active as f64);
            if let Some(rate) = expert_hit_rate {
                gauge!("dsrun_expert_cache_hit_rate").set(rate);
            }
        });
    }
}
