//! A plan as text (`dsrun inspect --plan`): its memory plan, buffers, weights and every op of a
//! step with what it reads and writes.

use super::*;
use crate::util::human_bytes;
use std::fmt::Write;

impl Plan<'_> {
    fn b(&self, id: BufferId) -> &str {
        &self.buffers[id.0].name
    }

    fn w(&self, id: WeightId) -> String {
        format!("w{} {}", id.0, self.weights[id.0].name)
    }

    /// One op: its name, what it reads, what it writes, and its shape where it has one.
    pub fn describe_op(&self, op: &Op) -> String {
        let rows = |r: &Rows| if *r == Rows::Last { " (last token)" } else { "" };
        let detail = match op {
            Op::Embed { table, tokens, out } => format!("{}[{}] -> {}", self.w(*table), self.b(*tokens), self.b(*out)),
            Op::RmsNorm { dim, eps, x, weight, out, rows: r } => {
                format!("{} * {} -> {}, dim {dim}, eps {eps:e}{}", self.b(*x), self.b(*weight), self.b(*out), rows(r))
            }
            Op::Matmul { w, x, y, rows: r, accumulate } => {
                format!("{} . {} {} {}{}", self.w(*w), self.b(*x), if *accumulate { "+=>" } else { "->" }, self.b(*y), rows(r))
            }
            Op::SiluMul { width, gate, up } => format!("silu({}) * {} -> {}, width {width}", self.b(*gate), self.b(*up), self.b(*gate)),
            Op::LatentStore { kv, norm, cache, .. } => format!("norm({}, {}) + rope -> {}", self.b(*kv), self.b(*norm), self.b(*cache)),
            Op::RopeQ { q, .. } => format!("rope({})", self.b(*q)),
            Op::QAbsorb { kv_b, q, q_lat, mla } => format!("{}ᵀ . {} -> {}, {} heads", self.w(*kv_b), self.b(*q), self.b(*q_lat), mla.heads),
            Op::Attention { q, q_lat, cache, scratch, o_lat, mla, sparse, .. } => format!(
                "{} {} over {}{} (scratch {}) -> {}, {} heads, latent {}+{}",
                self.b(*q),
                self.b(*q_lat),
                self.b(*cache),
                sparse.map_or(String::new(), |(selected, topk)| format!(" at {} (top {topk})", self.b(selected))),
                self.b(*scratch),
                self.b(*o_lat),
                mla.heads,
                mla.lora,
                mla.rope
            ),
            Op::IndexerPrepare { keys, queries, cache, .. } => format!("layernorm + rope({}) -> {}, rope({})", self.b(*keys), self.b(*cache), self.b(*queries)),
            Op::IndexerScores { queries, weights, cache, scores, shape, .. } => {
                format!("{} . {} by {} -> {}, {} heads of {}", self.b(*queries), self.b(*cache), self.b(*weights), self.b(*scores), shape.heads, shape.dim)
            }
            Op::IndexerTopK { scores, selected, shape, .. } => format!("top {} of {} -> {}", shape.topk, self.b(*scores), self.b(*selected)),
            Op::VUp { kv_b, o_lat, o, .. } => format!("{} . {} -> {}", self.w(*kv_b), self.b(*o_lat), self.b(*o)),
            Op::Router { params, experts, logits, bias, ids, weights, rows: r } => format!(
                "{}{} -> {}, {}: {experts} experts, top {}{}",
                self.b(*logits),
                bias.map_or(String::new(), |b| format!(" + {}", self.b(b))),
                self.b(*ids),
                self.b(*weights),
                params.top_k,
                rows(r)
            ),
            Op::GroupExperts { k, experts, ids, .. } => format!("{} by expert: {k} per token of {experts}", self.b(*ids)),
            Op::ExpertMatmul { matrix, weights, k, x, y, ids, grouped } => {
                let weights = match weights {
                    ExpertWeights::Stack(w) => format!("resident {}", self.w(*w)),
                    ExpertWeights::Pools => "the expert cache's pools".to_string(),
                };
                let grouped = if *grouped { ", grouped" } else { "" };
                format!("{matrix:?} of {} . {} -> {}, {k} per token by {}{grouped}", weights, self.b(*x), self.b(*y), self.b(*ids))
            }
            Op::Streamed { layer, predicts_next, ops } => {
                let inner: Vec<String> = ops.iter().map(|op| self.describe_op(op)).collect();
                format!(
                    "streamed (MoE layer {layer}: the step stops for the router's choice{}), then per round:\n                      {}",
                    if *predicts_next { "; next layer guessed" } else { "" },
                    inner.join("\n                      ")
                )
            }
            Op::HostExperts { layer, x, ids, weights, routed, gpu_weights, overlap, ops, .. } => {
                let inner: Vec<String> = ops.iter().map(|op| self.describe_host_op(op)).collect();
                let split = gpu_weights.map_or(String::new(), |w| format!(", split: the GPU's slots listed, their weights in {}", self.b(w)));
                format!(
                    "on the host (MoE layer {layer}: {}, {}, {} to the host; {} back{split}; the next {overlap} op(s) run on the GPU meanwhile):\n                      {}",
                    self.b(*x),
                    self.b(*ids),
                    self.b(*weights),
                    self.b(*routed),
                    inner.join("\n                      ")
                )
            }
            Op::ShardExperts { layer, ids, weights, local_weights, routed, listed, overlap, host_ops, .. } => format!(
                "rank's experts (MoE layer {layer}: the step stops for {} and {} (rank 0's), lists this rank's slots with their weights in {}; \
                 the next {listed} op(s) when any is listed, {} more always{}; then {} is all-reduced over the ranks)",
                self.b(*ids),
                self.b(*weights),
                self.b(*local_weights),
                overlap - listed,
                if host_ops.is_empty() { String::new() } else { format!("; the rank's other experts on its host's CPU ({} ops), their sum added", host_ops.len()) },
                self.b(*routed)
            ),
            Op::MoeCombine { expert_out, weights, shared, h, .. } => {
                format!("{} . {}{} +=> {}", self.b(*weights), self.b(*expert_out), shared.map_or(String::new(), |s| format!(" + {}", self.b(s))), self.b(*h))
            }
            Op::Argmax { logits, ids, .. } => format!("{} -> {}", self.b(*logits), self.b(*ids)),
        };
        format!("{:<15}{detail}", op.name())
    }

    /// An op the host runs: its expert stacks are the host's (`HostPlan::weights`).
    fn describe_host_op(&self, op: &Op) -> String {
        match (op, &self.host) {
            (Op::ExpertMatmul { matrix, weights: ExpertWeights::Stack(w), k, x, y, ids, .. }, Some(host)) => {
                format!("{:<15}{matrix:?} of host {} . {} -> {}, {k} per token by {}", op.name(), host.weights[w.0].name, self.b(*x), self.b(*y), self.b(*ids))
            }
            _ => self.describe_op(op),
        }
    }

    /// What this rank holds and moves per decoded token, where the plan is one rank's share
    /// of a divided model.
    pub fn rank_traffic(&self) -> Option<shard::RankTraffic> {
        let sp = self.shard.as_ref()?;
        let embed = self.body.iter().find_map(|op| if let Op::Embed { table, .. } = op { Some(&self.weights[table.0]) } else { None });
        let embed_bytes = embed.map_or(0, |w| w.device_bytes(self.quant));
        let embed_rows = embed.map_or(1, |w| w.stack[0].rows.max(1) as u64);
        Some(shard::RankTraffic {
            rank: sp.shard.rank,
            world: sp.shard.world,
            experts: sp.slots.len() as u64,
            total_experts: sp.total_experts,
            expert_bytes: self.memory.expert_bytes,
            other_weight_bytes: self.resident_weight_bytes(),
            embed_bytes,
            embed_row_bytes: embed_bytes / embed_rows,
            moe_layers: sp.shard.owned.len(),
            top_k: sp.top_k,
            hidden: sp.hidden,
        })
    }

    /// The whole plan as text.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let m = &self.memory;
        let _ = writeln!(s, "plan       {} tokens per step, context {} tokens, weights {}", self.max_chunk, self.capacity, format!("{:?}", self.quant).to_lowercase());
        let _ = writeln!(
            s,
            "memory     resident {} (weights {}, activations {}, latent caches {}, scratch {}, constants {}); \
             routed experts {} x {}",
            human_bytes(m.resident),
            human_bytes(self.resident_weight_bytes()),
            human_bytes(self.buffer_bytes(BufferKind::Activation)),
            human_bytes(self.buffer_bytes(BufferKind::Cache)),
            human_bytes(self.buffer_bytes(BufferKind::Scratch)),
            human_bytes(self.buffer_bytes(BufferKind::Constant)),
            m.experts,
            human_bytes(m.expert_bytes),
        );
        let _ = match &self.streaming {
            None => writeln!(s, "experts    all resident ({} of budget {})", human_bytes(m.all_resident()), budget_text(self.budget)),
            Some(st) => writeln!(
                s,
                "experts    streamed: {} slots in {} pool(s), {} eviction, prefetch {}; budget {}, minimum {}",
                st.slots,
                st.pools.len(),
                format!("{:?}", st.eviction).to_lowercase(),
                if st.guess_ids.is_some() { "on" } else { "off" },
                human_bytes(self.budget),
                human_bytes(m.minimum())
            ),
        };
        if let Some(t) = self.rank_traffic() {
            let _ = writeln!(s, "divided    {}", t.describe());
        }
        if let Some(host) = &self.host {
            let bytes: u64 = host.weights.iter().map(|w| w.device_bytes(self.quant)).sum();
            let _ = writeln!(s, "host       routed experts of the first {} MoE layer(s) on the CPU: {} from host memory", host.layers, human_bytes(bytes));
        }
        let _ = writeln!(s, "buffers    (32-bit words)");
        for b in &self.buffers {
            let kind = format!("{:?}", b.kind).to_lowercase();
            let _ = writeln!(s, "           {:<28} {kind:<10} {:>12}", b.name, b.words);
        }
        let _ = writeln!(s, "weights");
        for (i, w) in self.weights.iter().enumerate() {
            let first = w.stack[0];
            let dtype = if w.convert && self.quant != QuantTarget::Keep { format!("{:?}", self.quant).to_lowercase() } else { first.dtype.name().to_string() };
            let stack = if w.stack.len() > 1 { format!(" x {}", w.stack.len()) } else { String::new() };
            let chunks = if w.chunked { ", row chunks allowed" } else { "" };
            let _ = writeln!(s, "           w{i:<4} {:<56} {dtype:<8} [{}, {}]{stack} {}{chunks}", w.name, first.rows, first.cols, human_bytes(w.device_bytes(self.quant)));
        }
        let section = |s: &mut String, title: &str, ops: &[Op]| {
            let _ = writeln!(s, "{title} ({} ops)", ops.len());
            for (i, op) in ops.iter().enumerate() {
                let _ = writeln!(s, "    {i:>4}   {}", self.describe_op(op));
            }
        };
        section(&mut s, "body", &self.body);
        section(&mut s, "head, last token", &self.head_last);
        section(&mut s, "head, every token", &self.head_all);
        section(&mut s, "greedy", std::slice::from_ref(&self.argmax));
        if let Some(m) = &self.mtp {
            section(&mut s, "mtp: keep hidden states, after a main step", &m.keep_hidden);
            section(&mut s, "mtp: draft step", &m.body);
            section(&mut s, "mtp: draft head, last token", &m.head_last);
            section(&mut s, "mtp: draft head, every token", &m.head_all);
        }
        s
    }
}

fn budget_text(budget: u64) -> String {
    if budget == u64::MAX {
        "unbounded: the device reports no memory size".into()
    } else {
        human_bytes(budget)
    }
}
