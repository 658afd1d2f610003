#!/usr/bin/env python3
"""Writes a random-weight DeepSeek-V3-shaped checkpoint for benchmarks (run by hand):

    /tmp/venv/bin/python tools/make_synthetic.py --out /tmp/v3-0.5b --dtype fp8

Default shape: ~0.58B parameters in V3 proportions (8 layers, the first dense; 64 routed experts
in 8 groups, 6 per token, one shared; MLA with q LoRA). Weights are scaled by 1/sqrt(fan_in) so
activations stay finite. FP8 matrices are e4m3 with 128x128 block scales, as DeepSeek publishes.
No tokenizer: use `dsrun logits` or a benchmark that feeds token ids. (`dsrun synth` will replace
this script.)
"""
import argparse, json, math, os
import torch
from safetensors.torch import save_file

def config(vocab=32000, hidden=1024, layers=8):
    return dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=vocab,
                hidden_size=hidden, intermediate_size=2816, moe_intermediate_size=352, num_hidden_layers=layers,
                first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384,
                kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64,
                n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4, norm_topk_prob=True,
                routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", hidden_act="silu",
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                tie_word_embeddings=False)

def fp8(w):
    rows, cols = w.shape
    gr, gc = math.ceil(rows / 128), math.ceil(cols / 128)
    padded = torch.zeros(gr * 128, gc * 128)
    padded[:rows, :cols] = w
    blocks = padded.view(gr, 128, gc, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view(gr * 128, gc * 128)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.float().contiguous()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["bf16", "fp8"], default="fp8")
    ap.add_argument("--layers", type=int, default=8, help="16 gives ~1.1B parameters")
    args = ap.parse_args()
    c = config(layers=args.layers)
    g = torch.Generator().manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    d, h = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    shard, index, n = {}, {}, 0

    def flush():
        nonlocal shard, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(args.out, name))
            index.update({k: name for k in shard})
            shard, n = {}, n + 1

    def mat(name, rows, cols, quantize=True):
        w = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
        if args.dtype == "fp8" and quantize:
            shard[name], shard[name + "_scale_inv"] = fp8(w)
        else:
            shard[name] = w.to(torch.bfloat16)

    def vec(name, n, value=1.0):
        shard[name] = (value + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    shard["model.embed_tokens.weight"] = torch.randn(c["vocab_size"], d, generator=g).to(torch.bfloat16)
    mat("lm_head.weight", c["vocab_size"], d, quantize=False)
    vec("model.norm.weight", d)
    flush()
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        vec(f"{p}.input_layernorm.weight", d); vec(f"{p}.post_attention_layernorm.weight", d)
        a = f"{p}.self_attn"
        mat(f"{a}.q_a_proj.weight", c["q_lora_rank"], d); vec(f"{a}.q_a_layernorm.weight", c["q_lora_rank"])
        mat(f"{a}.q_b_proj.weight", h * qk, c["q_lora_rank"])
        mat(f"{a}.kv_a_proj_with_mqa.weight", c["kv_lora_rank"] + c["qk_rope_head_dim"], d)
        vec(f"{a}.kv_a_layernorm.weight", c["kv_lora_rank"])
        mat(f"{a}.kv_b_proj.weight", h * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
        mat(f"{a}.o_proj.weight", d, h * c["v_head_dim"])
        def mlp(prefix, inter):
            mat(f"{prefix}.gate_proj.weight", inter, d); mat(f"{prefix}.up_proj.weight", inter, d)
            mat(f"{prefix}.down_proj.weight", d, inter)
        if i < c["first_k_dense_replace"]:
            mlp(f"{p}.mlp", c["intermediate_size"])
        else:
            shard[f"{p}.mlp.gate.weight"] = (torch.randn(c["n_routed_experts"], d, generator=g) / math.sqrt(d)).to(torch.bfloat16)
            shard[f"{p}.mlp.gate.e_score_correction_bias"] = 0.01 * torch.randn(c["n_routed_experts"], generator=g)
            for e in range(c["n_routed_experts"]):
                mlp(f"{p}.mlp.experts.{e}", c["moe_intermediate_size"])
            mlp(f"{p}.mlp.shared_experts", c["moe_intermediate_size"] * c["n_shared_experts"])
        flush()
    if args.dtype == "fp8":
        c["quantization_config"] = dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", weight_block_size=[128, 128])
    json.dump(c, open(os.path.join(args.out, "config.json"), "w"), indent=2)
    json.dump({"metadata": {}, "weight_map": index}, open(os.path.join(args.out, "model.safetensors.index.json"), "w"), indent=2)
    print("wrote", args.out)

if __name__ == "__main__":
    main()
