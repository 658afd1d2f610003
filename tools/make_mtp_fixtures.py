#!/usr/bin/env python3
"""Golden draft logits of the MTP (multi-token prediction) layer for fixtures that have one.

Run by hand (never in CI), after tools/make_fixtures.py, from the repository root:

    /tmp/venv/bin/python tools/make_mtp_fixtures.py            # every fixture with an MTP layer
    /tmp/venv/bin/python tools/make_mtp_fixtures.py --dir tests/fixtures/v3_noaux

transformers has no MTP module, so this writes its forward in torch on top of transformers'
own pieces, as vLLM's deepseek_mtp.py and SGLang's deepseek_nextn.py do (tensor names, the
order of the concatenation: the embedding first, then the main model's hidden state after its
final norm):

    x = eh_proj @ concat(enorm(embed(t[i+1])), hnorm(h[i]))
    logits[i+2] = shared_head.head(shared_head.norm(DecoderLayer(x)))

The decoder layer is transformers' own: a one-layer DeepseekV3 model whose layer 0 holds the
MTP layer's weights (MoE where dsrun's `is_moe_layer(num_hidden_layers)` says so), whose
final norm is `shared_head.norm` and whose lm_head is `shared_head.head`, fed `x` as
`inputs_embeds` at positions 0..n-2. Writes `golden_mtp.safetensors` beside `golden.safetensors`:
`tokens` (I64 [n]), `hidden` (F32 [n-1, hidden]: the main model's normalised hidden states) and
`mtp_logits` (F32 [n-1, vocab]: row i drafts token i+2 from h[i] and tokens[i+1]).
"""

import argparse
import json
import os

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import make_fixtures


def stored_tensors(path):
    """Every tensor of the checkpoint as its exact f32 value (FP8 dequantised by its block scales)."""
    files = [f for f in os.listdir(path) if f.startswith("model") and f.endswith(".safetensors")]
    raw = {}
    for f in files:
        with safe_open(os.path.join(path, f), "pt") as st:
            for k in st.keys():
                raw[k] = st.get_tensor(k)
    cfg = json.load(open(os.path.join(path, "config.json")))
    block = (cfg.get("quantization_config") or {}).get("weight_block_size", [128, 128])
    values = {}
    for k, t in raw.items():
        if k.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            values[k] = make_fixtures.dequantize_fp8(t, raw[k + "_scale_inv"], block)
        else:
            values[k] = t.float()
    return cfg, values


def is_moe_layer(cfg, layer):
    return cfg.get("n_routed_experts", 0) > 0 and layer >= cfg.get("first_k_dense_replace", 0) \
        and layer % cfg.get("moe_layer_freq", 1) == 0


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def build(path):
    cfg, ref = stored_tensors(path)
    n_layers = cfg["num_hidden_layers"]
    p = f"model.layers.{n_layers}"
    if f"{p}.eh_proj.weight" not in ref:
        return False
    tokens = load_file(os.path.join(path, "golden.safetensors"))["tokens"]
    main = {k: v for k, v in ref.items() if not k.startswith(p + ".")}
    model = make_fixtures.reference_model(path, cfg, main)
    with torch.no_grad():
        hidden = model.model(tokens[None, :]).last_hidden_state[0].float()

    # The MTP layer as a one-layer model of the same family.
    mtp_cfg = dict(cfg, num_hidden_layers=1, num_nextn_predict_layers=0,
                   first_k_dense_replace=0 if is_moe_layer(cfg, n_layers) else 1, moe_layer_freq=1)
    layer = {k.replace(p + ".", "model.layers.0."): v for k, v in ref.items() if k.startswith(p + ".")}
    layer["model.norm.weight"] = ref[f"{p}.shared_head.norm.weight"]
    layer["lm_head.weight"] = ref.get(f"{p}.shared_head.head.weight", ref.get("lm_head.weight"))
    layer["model.embed_tokens.weight"] = ref.get(f"{p}.embed_tokens.weight", ref["model.embed_tokens.weight"])
    for extra in ["enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"]:
        layer.pop(f"model.layers.0.{extra}.weight", None)
    tmp = path + ".mtp_tmp"
    os.makedirs(tmp, exist_ok=True)
    json.dump(mtp_cfg, open(os.path.join(tmp, "config.json"), "w"))
    mtp_model = make_fixtures.reference_model(tmp, mtp_cfg, layer)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)

    eps = cfg["rms_norm_eps"]
    embed = ref.get(f"{p}.embed_tokens.weight", ref["model.embed_tokens.weight"])
    e = rms_norm(embed[tokens[1:]], ref[f"{p}.enorm.weight"], eps)
    h = rms_norm(hidden[:-1], ref[f"{p}.hnorm.weight"], eps)
    x = torch.cat([e, h], dim=-1) @ ref[f"{p}.eh_proj.weight"].T
    n = len(tokens) - 1
    with torch.no_grad():
        logits = mtp_model(inputs_embeds=x[None], position_ids=torch.arange(n)[None]).logits[0].float()
    save_file({"tokens": tokens.to(torch.int64), "hidden": hidden[:-1].contiguous(), "mtp_logits": logits.contiguous()},
              os.path.join(path, "golden_mtp.safetensors"))
    print(f"{path}: {n} draft rows, logits max |.| {logits.abs().max():.3f}")
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fixtures = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    ap.add_argument("--dir", nargs="*", help="fixture directories (default: all under tests/fixtures)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    dirs = args.dir or sorted(os.path.join(fixtures, d) for d in os.listdir(fixtures))
    for d in dirs:
        if os.path.exists(os.path.join(d, "config.json")) and not build(d):
            print(f"{d}: no MTP layer")


if __name__ == "__main__":
    main()
