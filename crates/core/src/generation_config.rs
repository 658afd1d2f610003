//! `generation_config.json`: the checkpoint's own EOS ids and sampling defaults (temperature,
//! top-p, top-k, min-p, repetition penalty; `do_sample: false` means greedy). Flags override
//! them; dsrun's built-in defaults fill what neither gives.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// The defaults in `dir` (none when the file is absent).
    pub fn load(dir: &Path) -> Result<GenerationDefaults> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(GenerationDefaults::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.clone(), source })?;
        let bad = |key: &str| Error::Tokenizer(format!("{}: `{key}` has the wrong type", path.display()));
        let float = |key: &str| -> Result<Option<f32>> {
            match value.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(|f| Some(f as f32)).ok_or_else(|| bad(key)),
            }
        };
        let eos = crate::config::parse_eos(value.get("eos_token_id")).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(GenerationDefaults {
            eos_token_ids: eos,
            do_sample: match value.get("do_sample") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_bool().ok_or_else(|| bad("do_sample"))?),
            },
            temperature: float("temperature")?,
            top_p: float("top_p")?,
            top_k: match value.get("top_k") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| bad("top_k"))? as usize),
            },
            min_p: float("min_p")?,
            repetition_penalty: float("repetition_penalty")?,
        })
    }
}

/// dsrun's own defaults where the checkpoint gives none (llama.cpp's).
pub const TEMPERATURE: f32 = 0.8;
pub const TOP_K: usize = 40;
pub const TOP_P: f32 = 0.95;
pub const MIN_P: f32 = 0.05;

impl GenerationDefaults {
    /// Sampling as the checkpoint asks for it, dsrun's defaults filling the gaps.
    pub fn sampler_config(&self, seed: u64) -> crate::sample::SamplerConfig {
        let greedy = self.do_sample == Some(false);
        crate::sample::SamplerConfig {
            temperature: if greedy { 0.0 } else { self.temperature.unwrap_or(TEMPERATURE) },
            top_k: self.top_k.unwrap_or(TOP_K),
            top_p: self.top_p.unwrap_or(TOP_P),
            min_p: self.min_p.unwrap_or(MIN_P),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_eos_and_sampling_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [1, 7], "do_sample": true, "temperature": 0.6, "top_p": 0.95}"#).unwrap();
        let d = GenerationDefaults::load(dir.path()).unwrap();
        assert_eq!(d.eos_token_ids, vec![1, 7]);
        assert_eq!((d.do_sample, d.temperature, d.top_p, d.top_k), (Some(true), Some(0.6), Some(0.95), None));
        std::fs::write(dir.path().join("generation_config.json"), r#"{"temperature": "hot"}"#).unwrap();
        let e = GenerationDefaults::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("generation_config.json") && e.contains("temperature"), "{e}");
        assert_eq!(GenerationDefaults::load(&dir.path().join("none")).unwrap(), GenerationDefaults::default());
    }
}
