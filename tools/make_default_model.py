#!/usr/bin/env python3
"""Trains the tiny default model in weights/: a DeepSeek-V3-architecture checkpoint (MLA, sigmoid
noaux_tc router over expert groups, a shared expert, a dense first layer) of about 1.5M parameters,
with a byte-level BPE tokenizer, trained for a few minutes on the CPU.

Run by hand (never in CI), from the repository root:

    /tmp/venv/bin/pip install torch transformers safetensors tokenizers
    /tmp/venv/bin/python tools/make_default_model.py [--minutes 8]
    /tmp/venv/bin/python tools/make_default_model.py --mtp-only [--mtp-steps 1000]

The second form adds a trained multi-token-prediction (MTP) layer to the model already in
weights/ without changing a bit of it (the first form trains both, one after the other). The
MTP layer is DeepSeek-V3's (enorm, hnorm, eh_proj, one MoE decoder layer, shared_head.norm; its
embedding and output head are the main model's, so the checkpoint stores neither) and is
trained with DeepSeek's MTP loss, cross-entropy of the token after next, with the main model
frozen: DeepSeek weighs that loss 0.3 against the main loss while training both, which with a
frozen main model only scales the learning rate. Reported: the share of held-out positions
(docstrings of the installed site-packages, text neither model saw) where the MTP layer's
argmax equals the main model's own greedy choice for that token: what greedy speculative
decoding accepts.

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
    ap.add_argument("--mtp-only", action="store_true", help="add an MTP layer to the model in --out, main weights unchanged")
    ap.add_argument("--mtp-steps", type=int, default=1000)
    args = ap.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.mtp_only:
        train_mtp(args.out, args.mtp_steps, corpus())
        return

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
        lr = set_lr(opt, step, total_steps_guess)
        x = random_batch(data, seq, batch)
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
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "core", "templates", "deepseek-v3.jinja")) as t:
            template = t.read()
        settings = {"add_bos_token": True, "bos_token": BOS, "eos_token": EOS, "model_max_length": CONFIG["max_position_embeddings"], "chat_template": template}
        json.dump(settings, f, indent=2, ensure_ascii=False)
    print("wrote", os.path.abspath(args.out))
    train_mtp(args.out, args.mtp_steps, docs)


def site_packages_docs():
    """Held-out prose: docstrings of the installed third-party packages (not the stdlib)."""
    root = sysconfig.get_paths()["purelib"]
    saved = sysconfig.get_paths
    docs = []
    for pkg in ("pip", "setuptools", "jinja2", "sympy"):
        path = os.path.join(root, pkg)
        if not os.path.isdir(path):
            continue
        sysconfig.get_paths = lambda path=path: {"stdlib": path}
        try:
            docs += corpus()
        finally:
            sysconfig.get_paths = saved
    return docs


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def set_lr(opt, step, total):
    """Linear warm-up over 100 steps, then cosine decay to a tenth over `total` steps."""
    lr = 3e-3 * min(1.0, (step + 1) / 100) * max(0.1, 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def random_batch(data, seq, batch):
    starts = torch.randint(0, len(data) - seq - 1, (batch,))
    return torch.stack([data[s:s + seq] for s in starts])


def train_mtp(out, steps, docs):
    """Trains an MTP layer on top of the frozen model in `out` and adds it to the checkpoint."""
    from safetensors.torch import load_file
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg.pop("num_nextn_predict_layers", None)
    stored = {k: v for k, v in load_file(os.path.join(out, "model.safetensors")).items() if not k.startswith(f"model.layers.{cfg['num_hidden_layers']}.")}
    hf = transformers.DeepseekV3Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    hf._experts_implementation = "eager"
    main = transformers.DeepseekV3ForCausalLM(hf).float().eval()
    main.load_state_dict(fused(stored, hf), strict=True)
    for p in main.parameters():
        p.requires_grad_(False)

    # The MTP decoder layer as a one-layer model (MoE, as dsrun's is_moe_layer says for index
    # num_hidden_layers); its final norm is shared_head.norm, its head the main lm_head (frozen).
    d, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
    one = transformers.DeepseekV3Config(**dict({k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}, num_hidden_layers=1, first_k_dense_replace=0))
    one._experts_implementation = "eager"
    mtp = transformers.DeepseekV3ForCausalLM(one).float().train()
    mtp.lm_head.weight = main.lm_head.weight
    enorm, hnorm = torch.nn.Parameter(torch.ones(d)), torch.nn.Parameter(torch.ones(d))
    eh_proj = torch.nn.Linear(2 * d, d, bias=False)
    params = [p for n, p in mtp.named_parameters() if not n.startswith(("lm_head", "model.embed_tokens"))] + [enorm, hnorm, eh_proj.weight]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    loads = {}
    gate = mtp.model.layers[0].mlp.gate
    gate.register_forward_hook(lambda m, i, o: loads.__setitem__(m, torch.bincount(o[2].flatten(), minlength=one.n_routed_experts)))

    def draft_logits(x):
        with torch.no_grad():
            h = main.model(x).last_hidden_state  # after the final norm: what the lm_head reads
        e = rms_norm(main.model.embed_tokens(x[:, 1:]), enorm, eps)
        inp = eh_proj(torch.cat([e, rms_norm(h[:, :-1], hnorm, eps)], dim=-1))
        return mtp(inputs_embeds=inp).logits  # row i drafts x[i + 2]

    ids = []
    for doc in docs:
        ids += [0] + tok.encode(doc).ids + [1]
    data = torch.tensor(ids)
    seq, batch = 128, 16
    for step in range(steps):
        lr = set_lr(opt, step, steps)
        x = random_batch(data, seq, batch)
        logits = draft_logits(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            load = loads[gate].float()
            gate.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
        if step % 100 == 0:
            print(f"mtp step {step} loss {loss.item():.3f} lr {lr:.2e}", flush=True)
    print(f"mtp: trained {steps} steps, last loss {loss.item():.3f}")

    # Held-out agreement with the main model's greedy choice of the token after next.
    mtp.eval()
    held = site_packages_docs()
    agree = total = 0
    with torch.no_grad():
        for doc in held[:400]:
            x = torch.tensor([[0] + tok.encode(doc).ids[:seq]])
            if x.shape[1] < 4:
                continue
            target = main(x).logits[0, 1:-1].argmax(-1)  # the main model's choice for x[i + 2]
            draft = draft_logits(x)[0, :-1].argmax(-1)
            agree += (target == draft).sum().item()
            total += target.numel()
    print(f"mtp: held-out agreement with the main model's greedy choice {agree / max(total, 1):.3f} over {total} positions ({len(held)} paragraphs)")

    p = f"model.layers.{cfg['num_hidden_layers']}"
    layer = {k.replace("model.layers.0.", f"{p}."): v for k, v in unfused(mtp.state_dict(), one).items() if k.startswith("model.layers.0.")}
    layer.update({f"{p}.enorm.weight": enorm, f"{p}.hnorm.weight": hnorm, f"{p}.eh_proj.weight": eh_proj.weight,
                  f"{p}.shared_head.norm.weight": mtp.model.norm.weight})
    for k, v in layer.items():
        stored[k] = v.detach().float() if k.endswith("e_score_correction_bias") else v.detach().to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in sorted(stored.items())}, os.path.join(out, "model.safetensors"))
    cfg["num_nextn_predict_layers"] = 1
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print("added the MTP layer to", os.path.abspath(out))


def fused(stored, config):
    """The published per-expert tensors as transformers v5 holds them (fused experts), f32."""
    state = {}
    for k, v in stored.items():
        if ".mlp.experts." in k:
            continue
        state[k] = v.float()
    layers = {k.split(".mlp.experts.")[0] for k in stored if ".mlp.experts." in k}
    for prefix in layers:
        experts = range(config.n_routed_experts)
        state[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([stored[f"{prefix}.mlp.experts.{e}.gate_proj.weight"].float(), stored[f"{prefix}.mlp.experts.{e}.up_proj.weight"].float()]) for e in experts])
        state[f"{prefix}.mlp.experts.down_proj"] = torch.stack([stored[f"{prefix}.mlp.experts.{e}.down_proj.weight"].float() for e in experts])
    return state


def unfused(state, config):
    """transformers' fused experts back to the published per-expert names."""
    out = {}
    inter = config.moe_intermediate_size
    for name, tensor in state.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(config.n_routed_experts):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :inter]
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, inter:]
        elif name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(config.n_routed_experts):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


if __name__ == "__main__":
    main()
