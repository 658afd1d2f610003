//! The GPU memory budget (`--gpu-mem`) and how it divides between resident data and the
//! routed-expert slot cache.

use crate::error::{Error, Result};
use crate::quant::QuantTarget;
use crate::util::human_bytes;

/// `--gpu-mem`: what dsrun may keep on the GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuMem {
    /// A safe share of the adapter's reported device memory (everything, where it reports none).
    Auto,
    /// At most this many bytes.
    Bytes(u64),
    /// Everything but the routed experts, plus this share (0..=1) of the routed experts' bytes.
    ExpertShare(f64),
}

impl std::fmt::Display for GpuMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuMem::Auto => write!(f, "auto"),
            GpuMem::Bytes(b) => write!(f, "{}", human_bytes(*b)),
            GpuMem::ExpertShare(share) => write!(f, "{}% of routed experts", share * 100.0),
        }
    }
}

/// The share of the adapter's device-local memory `auto` takes: the rest is left to the
/// driver, the display and other programs.
pub const AUTO_SHARE: f64 = 0.8;

impl std::str::FromStr for GpuMem {
    type Err = String;

    /// `auto`; bytes with an optional unit (`12G`, `512MiB`, `3GB`, `1000000`; K/M/G/T and
    /// KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000); or `N%`, a share of the
    /// routed experts kept resident.
    fn from_str(s: &str) -> std::result::Result<GpuMem, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(GpuMem::Auto);
        }
        if let Some(percent) = s.strip_suffix('%') {
            let p: f64 = percent.trim().parse().map_err(|_| format!("`{s}`: expected a percentage like 25%"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("`{s}`: the share of routed experts must be in (0, 100]%"));
            }
            return Ok(GpuMem::ExpertShare(p / 100.0));
        }
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let value: f64 = number.parse().map_err(|_| format!("`{s}`: expected auto, a size like 8G or 512MiB, or a share like 25%"))?;
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kib" => 1024.0,
            "m" | "mib" => 1024f64.powi(2),
            "g" | "gib" => 1024f64.powi(3),
            "t" | "tib" => 1024f64.powi(4),
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            other => return Err(format!("`{s}`: unknown unit `{other}` (use K, M, G, T, KiB.., KB..)")),
        };
        let bytes = value * scale;
        if !(bytes >= 1.0) {
            return Err(format!("`{s}`: the budget must be at least one byte"));
        }
        Ok(GpuMem::Bytes(bytes as u64))
    }
}

/// How a GPU engine is built: weight format, memory budget and expert-cache policy.
#[derive(Debug, Clone)]
pub struct GpuOptions {
    pub quant: QuantTarget,
    pub gpu_mem: GpuMem,
    pub eviction: Eviction,
    /// Predict the next MoE layer's experts and upload them ahead of need (decode steps).
    pub prefetch: Prefetch,
    /// Sequences decoded together, each with its own region of the latent caches
    /// (`serve --parallel`); the context is per sequence.
    pub sequences: usize,
    /// How the latent caches store their values (`--kv-cache`).
    pub kv_cache: crate::plan::layout::CacheFormat,
    /// Load the checkpoint's MTP layer for speculative decoding (`--speculative mtp`).
    pub mtp: bool,
    /// How matmuls multiply (`--math`).
    pub math: Math,
    /// The first this many MoE layers compute their routed experts on the CPU, from host memory
    /// (`--n-cpu-moe N`; `usize::MAX`, `--cpu-moe`: every one, the MTP layer's too). Only where
    /// a GPU backend runs the rest.
    pub cpu_moe: usize,
    /// Where routed experts that do not fit `gpu_mem` go (`--expert-placement`).
    pub placement: ExpertPlacement,
    /// Whether a prompt chunk's most used host experts are uploaded to the GPU for the chunk
    /// (`--upload-prompt-experts`).
    pub prompt_uploads: PromptUploads,
    /// How often the router picked each expert in earlier runs: under a budget the GPU holds
    /// the most picked ones (hybrid placement); None: as if alike.
    pub expert_counts: Option<std::sync::Arc<crate::plan::placement::ExpertCounts>>,
    /// This device's share of the routed experts, where the model is divided among devices
    /// (expert parallelism, `--devices`): the plan holds only these and all-reduces the
    /// partial sums.
    pub shard: Option<std::sync::Arc<crate::plan::shard::ExpertShard>>,
}

/// Where routed experts that do not fit the GPU budget are computed (`--expert-placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertPlacement {
    /// On the CPU, from host memory: the GPU keeps as many experts as fit, those the router
    /// picks most (counted across runs; without counts whole layers from the last, one layer
    /// split), and only hidden rows, the router's choice and the routed sum cross the link.
    #[default]
    Auto,
    /// Streamed through a GPU slot cache as the router asks for them.
    Stream,
    /// Every routed expert on the CPU, whatever fits (`--cpu-moe`).
    Cpu,
}

crate::util::choices!(ExpertPlacement {
    Auto => "auto": "the GPU keeps the experts the router picks most that fit --gpu-mem, the CPU computes the rest",
    Stream => "stream": "what does not fit --gpu-mem streams through a GPU slot cache",
    Cpu => "cpu": "every routed expert runs on the CPU (as --cpu-moe)",
});

/// Whether a prompt chunk's experts that the host would compute for many of its tokens are
/// uploaded to the GPU for the chunk instead (`--upload-prompt-experts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptUploads {
    /// Where uploading an expert takes less time than the host computing its tokens, by the
    /// expert's bytes, the link's measured rate and the host's; off on software adapters (the
    /// "GPU" is the host's cores).
    #[default]
    Auto,
    /// Every expert two or more of the chunk's tokens use, the most used first (tests).
    On,
    Off,
}

crate::util::choices!(PromptUploads {
    Auto => "auto": "where the upload beats the CPU by the measured rates; off on software adapters",
    On => "on": "the chunk's experts used by two or more of its tokens, the most used first",
    Off => "off": "the CPU computes every host expert",
});

impl PromptUploads {
    /// Whether uploads may happen on a device; `software`: the "GPU" is the CPU.
    pub fn enabled(self, software: bool) -> bool {
        match self {
            PromptUploads::Auto => !software,
            PromptUploads::On => true,
            PromptUploads::Off => false,
        }
    }
}

impl GpuOptions {
    /// MoE layers (of `moe_layers`, the MTP layer's counted last) whose routed experts
    /// `--cpu-moe`, `--n-cpu-moe` and `--expert-placement cpu` place on the CPU.
    pub fn forced_cpu_layers(&self, moe_layers: usize) -> usize {
        match self.placement {
            ExpertPlacement::Cpu => moe_layers,
            _ => self.cpu_moe.min(moe_layers),
        }
    }
}

/// How the backends' matmuls multiply (`--math`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Math {
    /// f32 products of the stored weights and f32 activations, within the reference's tolerance.
    #[default]
    Exact,
    /// Reduced-precision activations where a backend has a faster kernel for them: int8
    /// activations for q8 and q4 weights on the CPU (as llama.cpp's Q8_0 and Q4_0 do), f16
    /// arithmetic on wgpu adapters with SHADER_F16. Held to quality floors, not to the
    /// reference's tolerance.
    Fast,
}

crate::util::choices!(Math {
    Exact => "exact": "f32 activations and products (within the reference's tolerance)",
    Fast => "fast": "reduced-precision activations where a kernel has them: int8 for q8/q4 weights on the CPU, f16 on GPUs with SHADER_F16",
});

/// Whether expert streaming guesses and uploads the next layer's experts ahead of need.
/// Which cached expert gives way when another must be uploaded (`--expert-eviction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// Least recently used.
    #[default]
    Lru,
    /// Least frequently used (uses counted since the expert was last loaded, halved every
    /// `slots` loads so old popularity fades), ties to the least recently used.
    Lfu,
}

crate::util::choices!(Eviction {
    Lru => "lru": "least recently used",
    Lfu => "lfu": "least frequently used, ties to the least recently used",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// On, except on software adapters: there the "GPU" is the CPU, so an early copy competes
    /// with the compute it should hide behind, and wrong guesses only add copies (measured on
    /// lavapipe: no decode gain within run-to-run noise, 35% more bytes copied).
    #[default]
    Auto,
    On,
    Off,
}

crate::util::choices!(Prefetch {
    Auto => "auto": "on, except on software adapters",
    On => "on": "guess the next MoE layer's experts and upload them early",
    Off => "off": "upload experts when the router asks",
});

impl Prefetch {
    /// Whether it is on for a device; `software`: the "GPU" is the CPU (a software adapter,
    /// the CUDA emulator).
    pub fn enabled(self, software: bool) -> bool {
        match self {
            Prefetch::Auto => !software,
            Prefetch::On => true,
            Prefetch::Off => false,
        }
    }
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            quant: QuantTarget::Keep,
            gpu_mem: GpuMem::Auto,
            eviction: Eviction::Lru,
            prefetch: Prefetch::Auto,
            sequences: 1,
            kv_cache: crate::plan::layout::CacheFormat::F32,
            mtp: false,
            math: Math::Exact,
            cpu_moe: 0,
            placement: ExpertPlacement::Auto,
            prompt_uploads: PromptUploads::Auto,
            expert_counts: None,
            shard: None,
        }
    }
}

impl GpuOptions {
    pub fn with_quant(quant: QuantTarget) -> Self {
        GpuOptions { quant, ..Default::default() }
    }
}

/// Bytes a model needs on the GPU, split into what always stays and the routed experts
/// (made by `plan::build` from the plan's weights and buffers).
#[derive(Debug, Clone, Copy)]
pub struct MemoryPlan {
    /// Every weight but the routed experts, the latent KV cache, activations and scratch.
    pub resident: u64,
    /// One routed expert (gate, up, down and their scales) as one cache slot holds it.
    pub expert_bytes: u64,
    /// Routed experts over all MoE layers.
    pub experts: u64,
    /// Experts one token uses per MoE layer: the fewest slots that can run a layer.
    pub top_k: u64,
}

impl MemoryPlan {
    pub fn all_resident(&self) -> u64 {
        self.resident + self.experts * self.expert_bytes
    }

    /// The smallest workable budget: resident data plus one layer's top-k experts.
    pub fn minimum(&self) -> u64 {
        self.resident + self.top_k.min(self.experts) * self.expert_bytes
    }

    /// The budget in bytes that `gpu_mem` names on an adapter with `device_memory` bytes
    /// (None: unknown).
    pub fn budget(&self, gpu_mem: GpuMem, device_memory: Option<u64>) -> u64 {
        match gpu_mem {
            GpuMem::Bytes(b) => b,
            GpuMem::ExpertShare(share) => self.resident + (self.experts as f64 * share).ceil() as u64 * self.expert_bytes,
            GpuMem::Auto => device_memory.map_or(u64::MAX, |m| (m as f64 * AUTO_SHARE) as u64),
        }
    }

    /// Expert cache slots for `budget`: None when every expert fits (no streaming), else the
    /// slot count; an error naming the minimum when even one layer's experts do not fit.
    pub fn slots(&self, budget: u64) -> Result<Option<usize>> {
        if self.experts == 0 || budget >= self.all_resident() {
            return Ok(None);
        }
        if budget < self.minimum() {
            return Err(Error::Invalid(format!(
                "--gpu-mem {} ({budget} bytes) is below this model's minimum of {} bytes ({}): {} stay resident \
                 (weights other than routed experts, latent KV cache, activations) plus {} routed experts of {} \
                 each for one layer; raise --gpu-mem, lower --ctx, or use a smaller --quant",
                human_bytes(budget),
                self.minimum(),
                human_bytes(self.minimum()),
                human_bytes(self.resident),
                self.top_k,
                human_bytes(self.expert_bytes),
            )));
        }
        Ok(Some(((budget - self.resident) / self.expert_bytes) as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_shares_and_auto() {
        let p = |s: &str| s.parse::<GpuMem>();
        assert_eq!(p("auto"), Ok(GpuMem::Auto));
        assert_eq!(p("1000"), Ok(GpuMem::Bytes(1000)));
        assert_eq!(p("8G"), Ok(GpuMem::Bytes(8 << 30)));
        assert_eq!(p("512MiB"), Ok(GpuMem::Bytes(512 << 20)));
        assert_eq!(p("3GB"), Ok(GpuMem::Bytes(3_000_000_000)));
        assert_eq!(p("1.5k"), Ok(GpuMem::Bytes(1536)));
        assert_eq!(p("25%"), Ok(GpuMem::ExpertShare(0.25)));
        for bad in ["", "lots", "8Q", "-1G", "0", "0%", "150%", "G"] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn plan() -> MemoryPlan {
        MemoryPlan { resident: 1000, expert_bytes: 100, experts: 40, top_k: 4 }
    }

    #[test]
    fn everything_fitting_means_no_streaming() {
        assert_eq!(plan().slots(5000).unwrap(), None);
        assert_eq!(plan().slots(plan().all_resident()).unwrap(), None);
        assert_eq!(plan().slots(plan().budget(GpuMem::Auto, None)).unwrap(), None);
    }

    #[test]
    fn slots_fill_what_is_left_after_resident_data() {
        assert_eq!(plan().slots(4999).unwrap(), Some(39));
        assert_eq!(plan().slots(1400).unwrap(), Some(4));
        assert_eq!(plan().slots(plan().budget(GpuMem::ExpertShare(0.25), None)).unwrap(), Some(10));
        assert_eq!(plan().budget(GpuMem::Auto, Some(10_000)), 8000);
    }

    #[test]
    fn below_the_minimum_is_refused_with_the_minimum_named() {
        let e = plan().slots(1399).unwrap_err().to_string();
        assert!(e.contains("minimum of 1400 bytes"), "{e}");
    }
}
