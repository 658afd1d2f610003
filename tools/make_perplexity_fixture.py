#!/usr/bin/env python3
"""Perplexity and bits per byte of the bundled model on a short text, from Hugging Face
transformers (float32, eager attention, the plain per-expert loop), following llama-perplexity's
rule: the text's tokens cut into whole windows of N (a shorter text is one window), each window's
first token replaced by BOS, the logits of positions N/2 .. N-2 scored against the next token;
bits per byte over the UTF-8 bytes of the scored tokens' text. `tests/perplexity.rs` holds
`dsrun perplexity` to it on the CPU reference and on wgpu.

Run by hand (never in CI), from the repository root:

    pip install torch transformers tokenizers safetensors
    python tools/make_perplexity_fixture.py      # rewrites tests/data/perplexity.json
"""

import json
import math
import os

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer

WEIGHTS = "weights"
OUT = "tests/data/perplexity.json"
WINDOW = 16
TEXT = ("The sort function returns a new list containing all items from the iterable in ascending order. "
        "A custom key function can be supplied to customize the sort order, and the reverse flag can be "
        "set to request the result in descending order. The sort is guaranteed to be stable.")


def reference_model():
    """transformers' float32 DeepseekV3ForCausalLM with the bundled checkpoint's values (its
    routed experts fused as transformers v5 holds them; the MTP layer, which it ignores, left out)."""
    config = transformers.AutoConfig.from_pretrained(WEIGHTS)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stored = {k: v.float() for k, v in load_file(os.path.join(WEIGHTS, "model.safetensors")).items()}
    state = {}
    for key in model.state_dict():
        if key.endswith("mlp.experts.gate_up_proj") or key.endswith("mlp.experts.down_proj"):
            prefix = key.rsplit(".", 1)[0]
            experts = range(config.n_routed_experts)
            if key.endswith("gate_up_proj"):
                state[key] = torch.stack([torch.cat([stored[f"{prefix}.{e}.gate_proj.weight"], stored[f"{prefix}.{e}.up_proj.weight"]]) for e in experts])
            else:
                state[key] = torch.stack([stored[f"{prefix}.{e}.down_proj.weight"] for e in experts])
        else:
            state[key] = stored[key]
    model.load_state_dict(state, strict=True)
    return model, config


def main():
    model, config = reference_model()
    tokenizer = Tokenizer.from_file(os.path.join(WEIGHTS, "tokenizer.json"))
    # tokenizer_config.json's add_bos_token: the text's tokens start with BOS, as llama-perplexity
    # tokenizes (and the first window's BOS stays BOS).
    bos = config.bos_token_id
    tokens = [bos] + tokenizer.encode(TEXT, add_special_tokens=False).ids
    windows = [tokens[i:i + WINDOW] for i in range(0, len(tokens) - WINDOW + 1, WINDOW)] or [tokens]
    nll, scored, nbytes = 0.0, 0, 0
    for w in windows:
        inputs = torch.tensor([[bos] + w[1:]])
        with torch.no_grad():
            logits = model(inputs).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        first = len(w) // 2
        for i in range(first, len(w) - 1):
            nll -= logprobs[i, w[i + 1]].item()
            scored += 1
        nbytes += len(tokenizer.decode(w[first + 1:]).encode("utf-8"))
    fixture = {
        "about": "tools/make_perplexity_fixture.py: transformers " + transformers.__version__ + ", torch " + torch.__version__.split("+")[0],
        "text": TEXT,
        "window": WINDOW,
        "tokens": tokens,
        "windows": len(windows),
        "scored": scored,
        "bytes": nbytes,
        "nll": nll,
        "perplexity": math.exp(nll / scored),
        "bits_per_byte": nll / math.log(2) / nbytes,
    }
    with open(OUT, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"{OUT}: {len(tokens)} tokens, {len(windows)} windows, {scored} scored, perplexity {fixture['perplexity']:.6f}, {fixture['bits_per_byte']:.6f} bits per byte")


if __name__ == "__main__":
    main()
