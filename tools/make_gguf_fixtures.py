"""GGUF fixtures made by llama.cpp's own converter from the tiny safetensors fixtures.

Run by hand (CI never runs it); the outputs are committed under tests/fixtures/gguf/:

    python -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers safetensors numpy
    /tmp/venv/bin/pip install "$LLAMA/gguf-py"          # gguf-py from the same llama.cpp tree
    /tmp/venv/bin/python tools/make_gguf_fixtures.py LLAMA_CPP_DIR

LLAMA_CPP_DIR: llama.cpp's source as the PyPI sdist of llama-cpp-python 0.3.36 vendors it
(`vendor/llama.cpp`), with `llama-tokenize`, `llama-quantize` and `llama-gguf-split` built in
`build/bin` (`cmake --build build --target llama-tokenize llama-quantize llama-gguf-split llama-imatrix`, after
tools/llama_cpp_side_by_side.sh's configure step).

For each family (v3_noaux: sigmoid router with correction bias, query LoRA; v2_lite: softmax
router, direct query, YaRN):

1. The fixture's config and weights with a byte-level BPE tokenizer trained here (the fixtures
   have none; the converter needs one): the two special tokens the configs name (ids 0 and 1),
   the 256 byte tokens, merges to fill the vocabulary, DeepSeek-V3's pre-tokenizer, and a chat
   template.
2. `convert_hf_to_gguf.py --outtype f32`: f32 keeps every weight exactly (the fixtures are bf16
   and f32), so the fixture's golden logits from transformers hold for the GGUF too. The
   converter identifies a pre-tokenizer by hashing how it splits a test text; this vocabulary
   is new to it, so an environment variable (GGUF_PRE_FALLBACK, patched into conversion/base.py
   as tools/llama_cpp_side_by_side.sh does) names it `deepseek-v3`. It writes the current MLA
   layout: `attn_k_b` (W_UK transposed, per head) and `attn_v_b`.
3. v3_noaux once more in the older layout (one `attn_kv_b` per layer, as converters before
   mid-2025 wrote it), rewritten with gguf-py from the file of step 2.
4. `tokens.json`: llama.cpp's own tokenizer (`llama-tokenize --ids`) on each file for a few
   texts, which dsrun's tokenizer from the same file must reproduce.
5. Quantised files by `llama-quantize` (its default mix for the type: tensors whose rows do not
   hold whole blocks fall back to F16, vectors stay F32), each with its own golden logits: the
   file's tensors dequantised by gguf-py (from the same llama.cpp tree), mapped back to
   Hugging Face names, in transformers' float32 model (tools/make_fixtures.py's
   `reference_model`) on the family's golden tokens: `<file>.golden.safetensors`. Only
   v3_noaux: this llama.cpp (0.3.36's) refuses to quantise a V2-Lite-shaped file of fewer than
   27 layers (it then wants `q_lora_rank`).
6. The K-quants need rows of 256: a small V3-shaped model whose rows are whole 256-blocks (`kq`,
   random f32 weights by tools/make_fixtures.py's `build`) converted to f32 and quantised by
   `llama-quantize` to Q4_K_M (Q4_K and Q6_K, F16/Q8_0/Q5_0 fallbacks) with its golden logits
   as in step 5, to every other type this llama.cpp makes without an importance matrix, and to
   the i-quants (IQ1_S .. IQ3_S) with one `llama-imatrix` computes on the f32 file; the
   IQ2_XXS mix (IQ2_XXS with Q2_K, Q4_K, IQ3_S and F16 where llama.cpp keeps more) with its
   golden logits too.
   `formats.safetensors`: for each ggml type met, the first two rows of the first tensor of
   that type (`<TYPE>.bytes`, as stored) and gguf-py's dequantisation of them (`<TYPE>.values`,
   f32 [2, cols]): each decoder in dsrun is checked against gguf-py's on llama.cpp's own output.
   For the types `dsrun quantize` writes (Q8_0, Q4_K, Q6_K), `llama-quantize --pure` rows
   (`<TYPE>.quantised`) beside the f32 rows they came from (`<TYPE>.source`).
7. `split/`: the Q8_0 file split in three by `llama-gguf-split --split-max-tensors 20` (the
   way large models are published), which must load as the whole file.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gguf"
FAMILIES = ["v3_noaux", "v2_lite"]
# (source family, llama-quantize type) for the quantised fixtures with golden logits.
QUANTISED = [("v3_noaux", "Q8_0"), ("kq", "Q4_K_M"), ("kq", "IQ2_XXS")]
# llama-quantize types whose tensors feed formats.safetensors (no importance matrix needed).
FORMAT_SOURCES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]
# The i-quants, which llama-quantize makes only with an importance matrix (`imatrix`); its
# IQ2_M mix holds the IQ2_S tensors (its IQ2_S mix is mostly IQ2_XS).
IQ_SOURCES = ["IQ2_XXS", "IQ2_XS", "IQ2_M", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]
# The types `dsrun quantize` writes: llama-quantize --pure's rows of each, from the f32 rows
# beside them, must come out of dsrun's quantisers byte for byte.
QUANTIZE_TYPES = ["Q8_0", "Q4_K", "Q6_K"]
# A V3 shape whose matrices' rows are whole 256-value K-quant blocks (attn_k_b's are not: F16).
KQ_FAMILY = dict(
    storage="f32",
    config=dict(
        model_type="deepseek_v3", vocab_size=320, hidden_size=256, intermediate_size=256,
        moe_intermediate_size=256, num_hidden_layers=2, first_k_dense_replace=1,
        num_attention_heads=2, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=32,
        qk_rope_head_dim=32, v_head_dim=128, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
    ),
)
# GGUF block tensor names -> Hugging Face names (tools side of gguf/deepseek2.rs's table).
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. 12345 apples!",
    "  leading spaces\nand lines\n\n",
    "naïve café, 東京 and ünïcödé",
]
# DeepSeek-V3's tokenizer.json pre-tokenizer (llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM).
PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {"type": "Split", "pattern": {"Regex": "[一-龥぀-ゟ゠-ヿ]+"}, "behavior": "Isolated", "invert": False},
        {
            "type": "Split",
            "pattern": {
                "Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Hello world! Hello there, the world is wide and the sea is deep. " * 4,
    "In the beginning there were tokens, and the tokens were merged. " * 4,
]


def tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.decoder = decoders.ByteLevel()
    t = json.loads(tok.to_str())
    assert len(t["model"]["vocab"]) == vocab_size, (len(t["model"]["vocab"]), vocab_size)
    t["pre_tokenizer"] = PRE_TOKENIZER
    return json.dumps(t, ensure_ascii=False)


def convert(llama: Path, family: str, work: Path, fixture: Path | None = None) -> Path:
    """`family`'s checkpoint (tests/fixtures/<family>, or `fixture`) as an f32 GGUF in OUT."""
    src = work / family
    src.mkdir(parents=True)
    fixture = fixture or ROOT / "tests" / "fixtures" / family
    config = json.loads((fixture / "config.json").read_text())
    shutil.copy(fixture / "config.json", src / "config.json")
    shutil.copy(fixture / "model.safetensors", src / "model.safetensors")
    (src / "tokenizer.json").write_text(tokenizer_json(config["vocab_size"]))
    (src / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE, "tokenizer_class": "LlamaTokenizerFast"}, ensure_ascii=False)
    )
    out = OUT / f"{family}-f32.gguf"
    env = dict(os.environ, GGUF_PRE_FALLBACK="deepseek-v3")
    subprocess.run([sys.executable, str(llama / "convert_hf_to_gguf.py"), str(src), "--outtype", "f32", "--outfile", str(out)], check=True, env=env)
    return out


def older_layout(path: Path, out: Path) -> None:
    """The file again with each layer's attn_k_b / attn_v_b joined back into attn_kv_b."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, vtype)
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.name.endswith("attn_v_b.weight"):
            continue
        if t.name.endswith("attn_k_b.weight"):
            block = t.name[: -len("attn_k_b.weight")]
            k_b = np.asarray(t.data)  # [heads, kv_lora, nope]: W_UK transposed per head
            v_b = np.asarray(tensors[block + "attn_v_b.weight"].data)  # [heads, v, kv_lora]
            kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)  # [heads, nope + v, kv_lora]
            writer.add_tensor(block + "attn_kv_b.weight", np.ascontiguousarray(kv_b.reshape(-1, kv_b.shape[-1])))
            continue
        writer.add_tensor(t.name, np.asarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantised(path: Path) -> dict:
    """The file's tensors as gguf-py dequantises them, under Hugging Face names (float32)."""
    import gguf
    import torch

    reader = gguf.GGUFReader(path)
    values = {t.name: torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)).astype(np.float32)) for t in reader.tensors}
    out = {}
    for name, v in values.items():
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = v
            continue
        _, layer, rest = name.split(".", 2)
        prefix = f"model.layers.{layer}"
        if rest.startswith("ffn_") and rest.endswith("_exps.weight"):
            projection = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[rest.split("_")[1]]
            for e in range(v.shape[0]):
                out[f"{prefix}.mlp.experts.{e}.{projection}.weight"] = v[e]
        elif rest == "attn_k_b.weight":
            v_b = values[f"blk.{layer}.attn_v_b.weight"]  # [heads, v, kv_lora]
            out[f"{prefix}.self_attn.kv_b_proj.weight"] = torch.cat([v.transpose(1, 2), v_b], dim=1).reshape(-1, v.shape[1])
        elif rest != "attn_v_b.weight":
            out[f"{prefix}.{LAYER_NAMES[rest]}"] = v
    return out


def quantise(llama: Path, source: Path, out: Path, qtype: str, imatrix: Path | None = None, pure: bool = False) -> Path:
    # The importance matrix by its bare name, from its folder: llama-quantize records the path
    # it was given in the file (a temporary folder's name would change it at every run).
    extra = (["--imatrix", imatrix.name] if imatrix else []) + (["--pure"] if pure else [])
    cwd = imatrix.parent if imatrix else None
    subprocess.run([str(llama / "build" / "bin" / "llama-quantize"), *extra, str(source.resolve()), str(out.resolve()), qtype], check=True, capture_output=True, cwd=cwd)
    return out


def imatrix(llama: Path, source: Path, work: Path) -> Path:
    """llama-imatrix's importance matrix of `source` over the tokenizer texts repeated (its
    values only steer the i-quants' rounding; the fixtures check decoding, not quality)."""
    text = work / "imatrix.txt"
    text.write_text(("\n".join(TEXTS) + "\n") * 40)
    out = work / "imatrix.gguf"
    subprocess.run([str(llama / "build" / "bin" / "llama-imatrix"), "-m", str(source), "-f", str(text), "-o", str(out), "-c", "64", "--chunks", "4"], check=True, capture_output=True)
    return out


def quantised_golden(llama: Path, family: str, qtype: str, source: Path, fixture: Path, weights: Path | None = None) -> Path:
    """`llama-quantize` of the family's f32 file (with an importance matrix where given), and
    its golden logits from gguf-py's values."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_fixtures import reference_logits

    out = quantise(llama, source, OUT / f"{family}-{qtype.lower()}.gguf", qtype, weights)
    cfg = json.loads((fixture / "config.json").read_text())
    tokens = load_file(fixture / "golden.safetensors")["tokens"]
    logits = reference_logits(str(fixture), cfg, dequantised(out), tokens)
    save_file({"tokens": tokens, "logits": logits.contiguous()}, out.with_suffix(".golden.safetensors"))
    os.chmod(out.with_suffix(".golden.safetensors"), 0o644)
    return out


def formats(files: list, source: Path, pure: list) -> None:
    """formats.safetensors: two rows of the first tensor of each ggml type met in `files`; and
    for each `--pure` file of `pure`, the first two rows of its first tensor of that type
    (`<TYPE>.quantised`) with the same rows of the f32 `source` (`<TYPE>.source`)."""
    import gguf
    import torch
    from safetensors.torch import save_file

    out = {}
    f32 = {t.name: t for t in gguf.GGUFReader(source).tensors}
    for path, qtype in pure:
        t = next(t for t in gguf.GGUFReader(path).tensors if t.tensor_type.name == qtype and len(t.data.shape) >= 2)
        out[f"{qtype}.quantised"] = torch.from_numpy(np.ascontiguousarray(t.data.reshape(-1, t.data.shape[-1])[:2]).view(np.uint8).reshape(-1).copy())
        rows = f32[t.name].data.reshape(-1, f32[t.name].data.shape[-1])[:2]
        out[f"{qtype}.source"] = torch.from_numpy(np.ascontiguousarray(rows.astype(np.float32)))
    for path in files:
        for t in gguf.GGUFReader(path).tensors:
            name = t.tensor_type.name
            if name in ("F32", "F16") or f"{name}.bytes" in out or len(t.data.shape) < 2:
                continue
            rows = np.ascontiguousarray(t.data.reshape(-1, t.data.shape[-1])[:2])
            values = gguf.quants.dequantize(rows, t.tensor_type).astype(np.float32)
            out[f"{name}.bytes"] = torch.from_numpy(rows.view(np.uint8).reshape(-1).copy())
            out[f"{name}.values"] = torch.from_numpy(np.ascontiguousarray(values))
    save_file(out, OUT / "formats.safetensors")
    os.chmod(OUT / "formats.safetensors", 0o644)
    print("formats:", sorted(k[: -len(".bytes")] for k in out if k.endswith(".bytes")))


def llama_tokens(llama: Path, path: Path) -> list:
    ids = []
    for text in TEXTS:
        out = subprocess.run([str(llama / "build" / "bin" / "llama-tokenize"), "-m", str(path), "-p", text, "--ids", "--log-disable"], check=True, capture_output=True, text=True).stdout
        ids.append(json.loads(out.strip().splitlines()[-1]))
    return ids


def main() -> None:
    llama = Path(sys.argv[1]).resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    tokens = {"texts": TEXTS, "files": {}}
    with tempfile.TemporaryDirectory() as work:
        for family in FAMILIES:
            path = convert(llama, family, Path(work))
            tokens["files"][path.name] = llama_tokens(llama, path)
        older = OUT / "v3_noaux-kvb-f32.gguf"
        older_layout(OUT / "v3_noaux-f32.gguf", older)
        tokens["files"][older.name] = llama_tokens(llama, older)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_fixtures import build

        build("kq", KQ_FAMILY, work, 0, 1.0)
        kq = Path(work) / "kq"
        kq_f32 = convert(llama, "kq", Path(work) / "src", kq)
        weights = imatrix(llama, kq_f32, Path(work))
        for family, qtype in QUANTISED:
            fixture = kq if family == "kq" else ROOT / "tests" / "fixtures" / family
            quantised_golden(llama, family, qtype, OUT / f"{family}-f32.gguf", fixture, weights if qtype.startswith("IQ") else None)
        sources = [quantise(llama, kq_f32, Path(work) / f"kq-{q}.gguf", q) for q in FORMAT_SOURCES]
        sources += [quantise(llama, kq_f32, Path(work) / f"kq-{q}.gguf", q, weights) for q in IQ_SOURCES]
        # What `dsrun quantize` writes, as llama-quantize's reference quantisers make it.
        pure = [(quantise(llama, kq_f32, Path(work) / f"kq-pure-{q}.gguf", q, pure=True), q) for q in QUANTIZE_TYPES]
        formats(sources, kq_f32, pure)
        # Split files, as big models ship: the Q8_0 fixture in three (`split/`).
        (OUT / "split").mkdir(exist_ok=True)
        subprocess.run([str(llama / "build" / "bin" / "llama-gguf-split"), "--split", "--split-max-tensors", "20", str(OUT / "v3_noaux-q8_0.gguf"), str(OUT / "split" / "v3_noaux-q8_0")], check=True, capture_output=True)
        kq_f32.unlink()  # not a fixture itself (the Q4_K_M file is)
    (OUT / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
