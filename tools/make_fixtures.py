#!/usr/bin/env python3
"""Builds tiny DeepSeek-V2/V3 checkpoints and their golden logits from Hugging Face transformers.

Run by hand (never in CI), from the repository root:

    python -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers safetensors numpy
    /tmp/venv/bin/python tools/make_fixtures.py               # rewrites tests/fixtures/
    /tmp/venv/bin/python tools/make_fixtures.py --out /tmp/x --seed 7 --scale 2   # other sizes/seeds

Each fixture directory holds a checkpoint in the published layout (config.json, safetensors with
per-expert names, FP8 weights with `weight_scale_inv` where the family is FP8) and
`golden.safetensors` with `tokens` (I64 [n]) and `logits` (F32 [n, vocab]): transformers' float32
logits for those tokens, with weights exactly as stored (bf16/f16 rounded, FP8 dequantised).

transformers v5 keeps routed experts fused (`experts.gate_up_proj`, `experts.down_proj`); the
checkpoint is written under the published names and fused only to load the reference model.
"""

import argparse
import json
import math
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file

N_TOKENS = 24

# Each family: config.json contents (sizes multiplied by --scale where marked) and storage choices.
FAMILIES = {
    # V3: sigmoid router, noaux_tc over 4 groups, correction bias, bf16 weights, an MTP layer on disk.
    "v3_noaux": dict(
        storage="bf16",
        mtp=True,
        config=dict(
            model_type="deepseek_v3", vocab_size=320, hidden_size=64, intermediate_size=112,
            moe_intermediate_size=40, num_hidden_layers=3, first_k_dense_replace=1,
            num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
            routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
            rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
            num_nextn_predict_layers=1,
        ),
    ),
    # V3 with YaRN in the published `rope_scaling` form; f32 weights; 3 MoE layers.
    "v3_yarn": dict(
        storage="f32",
        config=dict(
            model_type="deepseek_v3", vocab_size=256, hidden_size=48, intermediate_size=96,
            moe_intermediate_size=24, num_hidden_layers=4, first_k_dense_replace=1,
            num_attention_heads=3, q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=12,
            qk_rope_head_dim=16, v_head_dim=12, n_routed_experts=12, n_shared_experts=1,
            num_experts_per_tok=3, n_group=3, topk_group=2, norm_topk_prob=True,
            routed_scaling_factor=1.7, scoring_func="sigmoid", topk_method="noaux_tc",
            rms_norm_eps=1e-6, rope_theta=100.0, max_position_embeddings=2048,
            rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=256,
                              beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.8),
        ),
    ),
    # V3 FP8 e4m3 with 128x128 block scales; dims not multiples of 128; sharded with an index;
    # an MTP layer (FP8 like the rest, eh_proj too: its halves split inside a scale block).
    "v3_fp8": dict(
        storage="fp8",
        mtp=True,
        shards=3,
        config=dict(
            model_type="deepseek_v3", vocab_size=288, hidden_size=200, intermediate_size=264,
            moe_intermediate_size=136, num_hidden_layers=3, first_k_dense_replace=1,
            num_attention_heads=2, q_lora_rank=136, kv_lora_rank=160, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=40, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
            rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
            num_nextn_predict_layers=1,
            quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                     weight_block_size=[128, 128]),
        ),
    ),
    # V2-Lite: no q_lora, softmax + greedy, two shared experts, YaRN in transformers v5's
    # `rope_parameters` form with V2-Lite's mscales.
    "v2_lite": dict(
        storage="bf16",
        config=dict(
            model_type="deepseek_v2", vocab_size=300, hidden_size=56, intermediate_size=120,
            moe_intermediate_size=28, num_hidden_layers=3, first_k_dense_replace=1,
            num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=10, n_shared_experts=2,
            num_experts_per_tok=3, n_group=1, topk_group=1, norm_topk_prob=False,
            routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy",
            rms_norm_eps=1e-6, max_position_embeddings=2048,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                 original_max_position_embeddings=512, beta_fast=32, beta_slow=1,
                                 mscale=0.707, mscale_all_dim=0.707),
        ),
    ),
    # V2: q_lora, softmax + group_limited_greedy over 4 groups, routed scaling, f16 weights.
    "v2_glg": dict(
        storage="f16",
        config=dict(
            model_type="deepseek_v2", vocab_size=272, hidden_size=64, intermediate_size=128,
            moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
            num_attention_heads=4, q_lora_rank=40, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=2,
            num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=False,
            routed_scaling_factor=3.0, scoring_func="softmax", topk_method="group_limited_greedy",
            rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
        ),
    ),
    # V3.2: DeepSeek Sparse Attention, a lightning indexer choosing 5 of up to 24 positions per
    # query (so the selection matters in prefill and decode); bf16.
    "v32": dict(
        storage="bf16",
        config=dict(
            model_type="deepseek_v32", vocab_size=304, hidden_size=64, intermediate_size=112,
            moe_intermediate_size=40, num_hidden_layers=3, first_k_dense_replace=1,
            num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
            routed_scaling_factor=2.5, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=4096, index_n_heads=4, index_head_dim=16, index_topk=5,
        ),
    ),
}

SCALED_KEYS = ["hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank"]


def scaled_config(base, scale):
    cfg = dict(base)
    for key in SCALED_KEYS:
        if cfg.get(key) is not None:
            cfg[key] = int(round(cfg[key] * scale))
    # transformers' V2 config insists on this although MLA never splits the hidden size by heads.
    heads = cfg["num_attention_heads"]
    cfg["hidden_size"] = max(heads, cfg["hidden_size"] // heads * heads)
    cfg.setdefault("hidden_act", "silu")
    # Unused by MLA, but transformers divides heads by it.
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    cfg.setdefault("tie_word_embeddings", False)
    cfg.setdefault("bos_token_id", 0)
    cfg.setdefault("eos_token_id", 1)
    cfg["architectures"] = [{"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}.get(cfg["model_type"], "DeepseekV2ForCausalLM")]
    return cfg


def is_moe(cfg, layer):
    return layer >= cfg["first_k_dense_replace"]


def published_shapes(cfg, layer_count, mtp=False):
    """(name, shape, kind) of every tensor in the published layout; kind is 'matrix', 'norm', 'bias' or 'embed'.
    With `mtp`, the last layer is the MTP layer and its own tensors follow (the main model ignores them)."""
    d, v, h = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    out = [("model.embed_tokens.weight", (v, d), "embed"), ("model.norm.weight", (d,), "norm"),
           ("lm_head.weight", (v, d), "embed")]
    for i in range(layer_count):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (d,), "norm"), (f"{p}.post_attention_layernorm.weight", (d,), "norm")]
        a = f"{p}.self_attn"
        if cfg["q_lora_rank"] is None:
            out.append((f"{a}.q_proj.weight", (h * qk, d), "matrix"))
        else:
            r = cfg["q_lora_rank"]
            out += [(f"{a}.q_a_proj.weight", (r, d), "matrix"), (f"{a}.q_a_layernorm.weight", (r,), "norm"),
                    (f"{a}.q_b_proj.weight", (h * qk, r), "matrix")]
        lora = cfg["kv_lora_rank"]
        out += [
            (f"{a}.kv_a_proj_with_mqa.weight", (lora + cfg["qk_rope_head_dim"], d), "matrix"),
            (f"{a}.kv_a_layernorm.weight", (lora,), "norm"),
            (f"{a}.kv_b_proj.weight", (h * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), lora), "matrix"),
            (f"{a}.o_proj.weight", (d, h * cfg["v_head_dim"]), "matrix"),
        ]
        if cfg["model_type"] == "deepseek_v32":
            ih, idim, r = cfg["index_n_heads"], cfg["index_head_dim"], cfg["q_lora_rank"]
            out += [(f"{a}.indexer.wq_b.weight", (ih * idim, r), "matrix"), (f"{a}.indexer.wk.weight", (idim, d), "matrix"),
                    (f"{a}.indexer.k_norm.weight", (idim,), "norm"), (f"{a}.indexer.k_norm.bias", (idim,), "bias"),
                    (f"{a}.indexer.weights_proj.weight", (ih, d), "matrix")]

        def mlp(prefix, inter):
            return [(f"{prefix}.gate_proj.weight", (inter, d), "matrix"), (f"{prefix}.up_proj.weight", (inter, d), "matrix"),
                    (f"{prefix}.down_proj.weight", (d, inter), "matrix")]

        if is_moe(cfg, i):
            e, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            out.append((f"{p}.mlp.gate.weight", (e, d), "router"))
            if cfg.get("topk_method", "noaux_tc") == "noaux_tc":
                out.append((f"{p}.mlp.gate.e_score_correction_bias", (e,), "bias"))
            for j in range(e):
                out += mlp(f"{p}.mlp.experts.{j}", inter)
            if cfg["n_shared_experts"]:
                out += mlp(f"{p}.mlp.shared_experts", inter * cfg["n_shared_experts"])
        else:
            out += mlp(f"{p}.mlp", cfg["intermediate_size"])
    if mtp:
        p = f"model.layers.{layer_count - 1}"
        out += [(f"{p}.enorm.weight", (d,), "norm"), (f"{p}.hnorm.weight", (d,), "norm"),
                (f"{p}.eh_proj.weight", (d, 2 * d), "matrix"), (f"{p}.shared_head.norm.weight", (d,), "norm"),
                (f"{p}.shared_head.head.weight", (v, d), "embed")]
    return out


def random_tensor(shape, kind, gen):
    if kind == "norm":  # far from all-ones so a missed or misplaced norm shows
        return 1.0 + 0.3 * torch.randn(shape, generator=gen)
    if kind == "bias":  # large enough to change choices, sometimes pushing scores negative
        return 0.15 * torch.randn(shape, generator=gen)
    if kind == "embed":
        return torch.randn(shape, generator=gen)
    if kind == "router":
        return 2.0 * torch.randn(shape, generator=gen) / math.sqrt(shape[1])
    return torch.randn(shape, generator=gen) / math.sqrt(shape[1])


def quantize_fp8(w, block):
    """Block-quantises to e4m3: returns (codes, scale grid) with W ≈ codes * scale per block."""
    rows, cols = w.shape
    gr, gc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    scales = torch.empty(gr, gc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(gr):
        for j in range(gc):
            blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scales[i, j] = s
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (blk / s).to(torch.float8_e4m3fn)
    return q, scales


def dequantize_fp8(q, scales, block):
    expanded = scales.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * expanded[: q.shape[0], : q.shape[1]]


def build(name, family, out_dir, seed, scale):
    cfg = scaled_config(family["config"], scale)
    gen = torch.Generator().manual_seed(seed)
    storage = family["storage"]
    n_layers = cfg["num_hidden_layers"]
    layer_count = n_layers + (1 if family.get("mtp") else 0)

    stored, reference = {}, {}  # published tensors as written / their exact f32 values
    for tname, shape, kind in published_shapes(cfg, layer_count, family.get("mtp", False)):
        w = random_tensor(shape, kind, gen)
        if kind == "bias":
            stored[tname] = w.float()
        elif kind == "matrix" and storage == "fp8":
            block = cfg["quantization_config"]["weight_block_size"]
            q, s = quantize_fp8(w, block)
            stored[tname], stored[tname + "_scale_inv"] = q, s
            w = dequantize_fp8(q, s, block)
        elif storage in ("bf16", "fp8"):  # FP8 checkpoints keep embeddings, norms and router in bf16
            stored[tname] = w.to(torch.bfloat16)
        elif storage == "f16":
            stored[tname] = w.to(torch.float16)
        else:
            stored[tname] = w.float()
        if kind != "bias":
            w = stored[tname].float() if not (kind == "matrix" and storage == "fp8") else w
        reference[tname] = w.float()
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(path, stored, family.get("shards", 1))

    tokens = torch.randint(0, cfg["vocab_size"], (N_TOKENS,), generator=gen)
    logits = reference_logits(path, cfg, reference, tokens)
    save_file({"tokens": tokens.to(torch.int64), "logits": logits.contiguous()}, os.path.join(path, "golden.safetensors"))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{name}: {size / 1e6:.2f} MB, logits max |.| {logits.abs().max():.3f}")


def write_safetensors(path, tensors, shards):
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    per = math.ceil(len(names) / shards)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * per:(s + 1) * per]
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(path, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def reference_logits(path, cfg, reference, tokens):
    model = reference_model(path, cfg, reference)
    with torch.no_grad():
        return model(tokens[None, :]).logits[0].float()


def reference_model(path, cfg, reference):
    """transformers' float32 model for the config in `path`, with `reference`'s exact values."""
    hf_config = transformers.AutoConfig.from_pretrained(path)
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = "eager"  # the plain per-expert loop, for any shape
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    state = {}
    for key in model.state_dict():
        if key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
            prefix = key.rsplit(".", 1)[0]
            experts = range(cfg["n_routed_experts"])
            if key.endswith("gate_up_proj"):
                state[key] = torch.stack([torch.cat([reference[f"{prefix}.{e}.gate_proj.weight"],
                                                     reference[f"{prefix}.{e}.up_proj.weight"]]) for e in experts])
            else:
                state[key] = torch.stack([reference[f"{prefix}.{e}.down_proj.weight"] for e in experts])
        else:
            state[key] = reference[key]
    model.load_state_dict(state, strict=True)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply hidden/intermediate/lora sizes")
    ap.add_argument("--only", nargs="*", help="family names to build")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for i, (name, family) in enumerate(FAMILIES.items()):
        if args.only and name not in args.only:
            continue
        build(name, family, args.out, args.seed * 100 + i, args.scale)


if __name__ == "__main__":
    main()
