#!/usr/bin/env python3
"""Trains the tiny default model in weights/: a DeepSeek-V3-architecture checkpoint (MLA, sigmoid
noaux_tc router over expert groups, a shared expert, a dense first layer) of about 1.5M parameters,
with a byte-level BPE tokenizer, trained for a few minutes on the CPU.

Run by hand (never in CI), from the repository root:

    /tmp/venv/bin/pip install torch transformers safetensors tokenizers
    /tmp/venv/bin/python tools/make_default_model.py [--minutes 8]

The corpus is the English prose of the Python standard library's docstrings (whatever Python runs
this script), so the model writes documentation-flavoured English: it exists to show that
loading, tokenising, generating and streaming work, not to be useful.
"""

import argparse
import ast
import json
import math
import os
import random
import sys
import sysconfig
import time

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

CONFIG = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=2048,
    hidden_size=128, intermediate_size=320, moe_intermediate_size=96, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    norm_topk_prob=True, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024,
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)


def corpus():
    """Docstrings of the standard library, one paragraph per document."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idlelib", "site-packages", "lib2to3"))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                tree = ast.parse(open(os.path.join(dirpath, f), encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 80:
                        for para in doc.split("\n\n"):
                            para = " ".join(para.split())
                            if len(para) > 60 and not para.startswith((">>>", "..")):
                                docs.append(para)
    return docs


def train_tokenizer(docs, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "weights"))
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    docs = corpus()
    print(f"corpus: {len(docs)} paragraphs, {sum(map(len, docs)) / 1e6:.1f} MB from Python {sys.version.split()[0]}")
    tok = train_tokenizer(docs, CONFIG["vocab_size"])
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    ids = []
    for d in docs:
        ids += [0] + tok.encode(d).ids + [1]
    data = torch.tensor(ids)
    print(f"tokens: {len(ids)}")

    config = transformers.DeepseekV3Config(**{k: v for k, v in CONFIG.items() if k not in ("model_type", "architectures")})
    config._experts_implementation = "eager"
    model = transformers.DeepseekV3ForCausalLM(config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))

    # Aux-loss-free balancing as in DeepSeek-V3: nudge each router's correction bias towards even load.
    loads = {}
    def hook(module, inputs, outputs):
        loads[module] = torch.bincount(outputs[2].flatten(), minlength=config.n_routed_experts)
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    for g in gates:
        g.register_forward_hook(hook)

    seq, batch, step = 128, 16, 0
    deadline = time.time() + args.minutes * 60
    total_steps_guess = int(args.minutes * 60 / 0.35)
    while time.time() < deadline:
        lr = 3e-3 * min(1.0, (step + 1) / 100) * max(0.1, 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps_guess))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s:s + seq] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for g in gates:
                load = loads[g].float()
                g.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e}", flush=True)
        step += 1
    print(f"trained {step} steps, last loss {loss.item():.3f}")

    os.makedirs(args.out, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.rsplit(".", 1)[0]
            inter = config.moe_intermediate_size
            for e in range(config.n_routed_experts):
                state[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :inter].to(torch.bfloat16)
                state[f"{prefix}.{e}.up_proj.weight"] = tensor[e, inter:].to(torch.bfloat16)
        elif name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(config.n_routed_experts):
                state[f"{prefix}.{e}.down_proj.weight"] = tensor[e].to(torch.bfloat16)
        elif name.endswith("e_score_correction_bias"):
            state[name] = tensor.float()
        else:
            state[name] = tensor.to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, os.path.join(args.out, "model.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        # DeepSeek-V3's published chat template, so `dsrun chat` and `serve` work out of the box.
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "chat_templates", "deepseek-v3.jinja")) as t:
            template = t.read()
        settings = {"add_bos_token": True, "bos_token": BOS, "eos_token": EOS, "model_max_length": CONFIG["max_position_embeddings"], "chat_template": template}
        json.dump(settings, f, indent=2, ensure_ascii=False)
    print("wrote", os.path.abspath(args.out))


if __name__ == "__main__":
    main()
