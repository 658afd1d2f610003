//! Which routed experts the GPU holds under a budget (hybrid placement): the ones the router
//! picks most, by counts kept across runs in a small file, the rest computed on the host.
//!
//! The file is JSON (`{"version": 1, "layers": [{"tokens": N, "counts": [...]}, ...]}`, one
//! entry per MoE layer, the MTP layer's last): written with serde_json rather than a format of
//! our own, read back at the next load, and ignored with a warning when it does not parse or
//! does not fit the model (another checkpoint, another expert count).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How often the router picked each expert of each MoE layer, and where the counts are kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExpertCounts {
    version: u32,
    /// Per MoE layer.
    pub layers: Vec<LayerCounts>,
    /// The file they were read from and are written back to (None: kept in memory only).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// One MoE layer's counts: picks per expert over `tokens` tokens (a layer whose experts all
/// stayed on the GPU is never seen by the host, and counts none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerCounts {
    pub tokens: u64,
    pub counts: Vec<u64>,
}

/// Where a MoE layer's routed experts are computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerPlacement {
    /// Every one on the GPU (resident, or streamed).
    Gpu,
    /// Every one on the host.
    Host,
    /// These experts (ascending) on the GPU, the others on the host.
    Split(Vec<u32>),
}

impl ExpertCounts {
    const VERSION: u32 = 1;

    /// Empty counts for MoE layers of `experts` experts each, to be kept at `path`.
    pub fn new(experts: &[usize], path: Option<PathBuf>) -> ExpertCounts {
        ExpertCounts { version: Self::VERSION, layers: experts.iter().map(|&e| LayerCounts { tokens: 0, counts: vec![0; e] }).collect(), path }
    }

    /// The counts kept at `path` for a model whose MoE layers have `experts` experts each:
    /// empty ones where there is no file yet; an error naming the file where it does not
    /// parse or does not fit the model (the caller warns and starts afresh).
    pub fn load(path: &Path, experts: &[usize]) -> Result<ExpertCounts> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ExpertCounts::new(experts, Some(path.to_path_buf()))),
            Err(e) => return Err(Error::Invalid(format!("{}: {e}", path.display()))),
        };
        let bad = |why: String| Error::Invalid(format!("{}: {why}; ignored (it is rewritten from this run's counts)", path.display()));
        let mut counts: ExpertCounts = serde_json::from_str(&text).map_err(|e| bad(format!("not an expert-count file ({e})")))?;
        if counts.version != Self::VERSION {
            return Err(bad(format!("version {} (this dsrun writes {})", counts.version, Self::VERSION)));
        }
        let shape: Vec<usize> = counts.layers.iter().map(|l| l.counts.len()).collect();
        if shape != experts {
            return Err(bad(format!("counts for {} MoE layers of {:?} experts, the model has {} of {:?}", shape.len(), shape.first(), experts.len(), experts.first())));
        }
        counts.path = Some(path.to_path_buf());
        Ok(counts)
    }

    /// Writes the counts to their file (through a temporary file, so a crash leaves the old one).
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::Invalid(format!("{}: {e}", dir.display())))?;
        }
        let text = serde_json::to_string(self).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        let temporary = path.with_extension("json.partial");
        std::fs::write(&temporary, text).and_then(|_| std::fs::rename(&temporary, path)).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    /// Adds one token's picks in MoE layer `layer`.
    pub fn add(&mut self, layer: usize, picks: impl Iterator<Item = u32>) {
        if let Some(l) = self.layers.get_mut(layer) {
            l.tokens += 1;
            for e in picks {
                if let Some(c) = l.counts.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
    }

    /// Adds `other`'s counts (a run's) to these.
    pub fn merge(&mut self, other: &ExpertCounts) {
        for (l, o) in self.layers.iter_mut().zip(&other.layers) {
            l.tokens += o.tokens;
            l.counts.iter_mut().zip(&o.counts).for_each(|(c, o)| *c += o);
        }
    }

    /// The share of a layer's tokens that picked `expert`; a layer never seen counts as if every
    /// expert were picked alike (`k` of its experts a token).
    fn frequency(&self, layer: usize, expert: usize, experts: usize, k: usize) -> f64 {
        match self.layers.get(layer) {
            Some(l) if l.tokens > 0 => l.counts.get(expert).copied().unwrap_or(0) as f64 / l.tokens as f64,
            _ => k as f64 / experts as f64,
        }
    }

    /// Where each MoE layer's experts go when the GPU has room for `slots` of them beside the
    /// first `forced` layers' (all on the host): the most often picked ones on the GPU, ties to
    /// later layers, then to lower expert ids (without counts: whole layers from the last,
    /// and one layer split).
    pub fn place(&self, experts: &[usize], k: usize, forced: usize, slots: usize) -> Vec<LayerPlacement> {
        let mut ranked: Vec<(f64, usize, usize)> =
            experts.iter().enumerate().skip(forced).flat_map(|(l, &n)| (0..n).map(move |e| (l, e, n))).map(|(l, e, n)| (self.frequency(l, e, n, k), l, e)).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let mut on_gpu = vec![Vec::new(); experts.len()];
        for &(_, l, e) in ranked.iter().take(slots) {
            on_gpu[l].push(e as u32);
        }
        on_gpu
            .into_iter()
            .zip(experts)
            .map(|(mut gpu, &n)| match gpu.len() {
                0 => LayerPlacement::Host,
                g if g == n => LayerPlacement::Gpu,
                _ => {
                    gpu.sort_unstable();
                    LayerPlacement::Split(gpu)
                }
            })
            .collect()
    }
}

/// Where the counts of the checkpoint in `dir` are kept: under the user's cache directory
/// (`$XDG_CACHE_HOME`, else `~/.cache`), named by the checkpoint's full path (the checkpoint's
/// own directory may be read-only); None where neither is set.
pub fn counts_path(dir: &Path) -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let full = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let name: String = full.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    Some(cache.join("dsrun").join("expert-counts").join(format!("{}.json", name.trim_start_matches('_'))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_counts_whole_layers_from_the_last_stay_and_one_splits() {
        let c = ExpertCounts::new(&[4, 4, 4], None);
        let placed = c.place(&[4, 4, 4], 2, 0, 6);
        assert_eq!(placed, [LayerPlacement::Host, LayerPlacement::Split(vec![0, 1]), LayerPlacement::Gpu]);
        assert_eq!(c.place(&[4, 4, 4], 2, 1, 12), [LayerPlacement::Host, LayerPlacement::Gpu, LayerPlacement::Gpu], "forced layers stay on the host");
    }

    #[test]
    fn the_most_picked_experts_go_to_the_gpu() {
        let mut c = ExpertCounts::new(&[4, 4], None);
        for _ in 0..10 {
            c.add(0, [3, 1].into_iter());
            c.add(1, [2, 3].into_iter());
        }
        c.add(0, [0, 2].into_iter());
        // Shares of each layer's tokens: layer 1's 2 and 3 every token, layer 0's 1 and 3 10 of 11.
        assert_eq!(c.place(&[4, 4], 2, 0, 3), [LayerPlacement::Split(vec![1]), LayerPlacement::Split(vec![2, 3])]);
        assert_eq!(c.place(&[4, 4], 2, 0, 4), [LayerPlacement::Split(vec![1, 3]), LayerPlacement::Split(vec![2, 3])]);
    }

    #[test]
    fn counts_round_trip_and_a_bad_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/counts.json");
        let fresh = ExpertCounts::load(&path, &[3, 3]).unwrap();
        assert_eq!(fresh.layers.len(), 2);
        let mut c = fresh.clone();
        c.add(1, [2, 0].into_iter());
        c.save().unwrap();
        assert_eq!(ExpertCounts::load(&path, &[3, 3]).unwrap(), c);
        assert!(ExpertCounts::load(&path, &[3, 4]).unwrap_err().to_string().contains("the model has"));
        std::fs::write(&path, "{ not json").unwrap();
        let e = ExpertCounts::load(&path, &[3, 3]).unwrap_err().to_string();
        assert!(e.contains("counts.json") && e.contains("not an expert-count file"), "{e}");
    }
}
