#!/usr/bin/env python3
"""A tiktoken-format tokenizer in Kimi-K2's layout, and the ids Python's tiktoken gives it.

Kimi-K2 (and Moonlight) ship `tiktoken.model` (one `base64(token) rank` line per token) and a
`tokenizer_config.json` whose `added_tokens_decoder` names the special tokens; the split pattern
lives in their `tokenization_kimi.py`, and 256 special-token ids follow the ranks (unnamed ones
are `<|reserved_token_{id}|>`). The published file is not reachable from where this was made, so
this script trains a small byte-level BPE of the same format on a mixed corpus (English, code,
Chinese, digits, emoji), writes it in Kimi's layout, and records `tiktoken.Encoding`'s ids for a
set of test strings with Kimi's pattern and special tokens: dsrun's conversion at load
(src/tiktoken.rs) must give the same ids. Run by hand:

    pip install tiktoken
    python tools/make_tiktoken_fixture.py --out tests/fixtures/tiktoken

With the published files at hand (Kimi-K2's `tiktoken.model` and `tokenizer_config.json`, from
its Hugging Face repository), `--published DIR --out tests/fixtures/tiktoken_kimi_k2` copies them
and records tiktoken's ids for the same strings; tests/tokenizer.rs checks every
`tests/fixtures/tiktoken*` directory.
"""

import argparse
import base64
import collections
import inspect
import json
import pathlib

import regex
import tiktoken

# Kimi-K2's pre-tokenizer pattern (tokenization_kimi.py): Han runs, words with their case
# classes (Han excluded) and English contractions, 1-3 digits, punctuation runs, newlines, spaces.
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
RESERVED_SPECIAL = 256
# Kimi-K2's named special tokens, at their offsets after the ranks.
NAMED_SPECIAL = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 15: "<|im_middle|>"}

CHINESE = (
    "深度求索发布了新的混合专家模型。它的注意力机制把键值缓存压缩成潜在向量，"
    "每个词元只激活少数专家，所以推理速度很快。我们在笔记本电脑上运行它，也在数据中心的显卡上运行它。"
    "分词器把汉字连在一起切分，数字每三位一组，标点单独处理。"
)

TESTS = [
    "Hello, world! It's a test: we're sure they'll pass.",
    "def forward(self, x):\n    return self.proj(x) + 1e-6\n\n\n",
    "深度求索的模型在本地运行，速度很快。",
    "Mixed 中文 and English，带标点！OK?",
    "Numbers: 1234567 3.14159 -42 0x1F and 2026-12-01.",
    "   leading spaces, tabs\tand\r\nwindows newlines\n",
    "Emoji 🚀🔥 and accents: naïve café, Ærøskøbing, ΕΛΛΗΝΙΚΆ.",
    "UPPERCASE Words and CamelCaseIdentifiers like HTTPServerError.",
    "<|im_user|>user<|im_middle|>What is MLA?<|im_end|><|im_assistant|>assistant<|im_middle|>",
    "[BOS]text between[EOS] specials",
    "",
]


def corpus() -> str:
    """Text to train on: this machine's Python sources and docstrings, and Chinese."""
    texts = [inspect.getsource(m) for m in (argparse, collections, json, base64, pathlib)]
    return "\n".join(texts) + ("\n" + CHINESE) * 20 + "\n🚀🔥 naïve café 12345 67890\n" * 5


def train(text: str, merges: int) -> dict[bytes, int]:
    """Byte-level BPE on pre-tokenized `text`: the 256 bytes, then `merges` merged pairs."""
    ranks = {bytes([b]): b for b in range(256)}
    # VERSION1: `&&` is set intersection, as in tiktoken's Rust regex engine (not literal '&&').
    pieces = regex.findall(KIMI_PATTERN, text, flags=regex.V1)
    words = collections.Counter(tuple(bytes([b]) for b in piece.encode()) for piece in pieces)
    for _ in range(merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        ranks.setdefault(merged, len(ranks))
        new_words = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--merges", type=int, default=1500)
    parser.add_argument("--published", type=pathlib.Path, help="a directory with a published tiktoken.model and tokenizer_config.json")
    args = parser.parse_args()
    if args.published:
        ranks = {}
        for line in (args.published / "tiktoken.model").read_text().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        published = json.loads((args.published / "tokenizer_config.json").read_text())
        named = {int(i): t["content"] for i, t in published.get("added_tokens_decoder", {}).items()}
    else:
        ranks = train(corpus(), args.merges)
        named = {len(ranks) + i: name for i, name in NAMED_SPECIAL.items()}
    base = len(ranks)
    special = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + RESERVED_SPECIAL)}
    enc = tiktoken.Encoding(name="kimi-fixture", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=special)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.published:
        for name in ("tiktoken.model", "tokenizer_config.json"):
            (args.out / name).write_bytes((args.published / name).read_bytes())
    else:
        write_synthetic(args.out, ranks, named)
    cases = [{"text": t, "ids": enc.encode(t, allowed_special="all")} for t in TESTS]
    for c in cases:
        assert enc.decode(c["ids"]) == c["text"]
    (args.out / "expected.json").write_text(json.dumps({"ranks": base, "special": RESERVED_SPECIAL, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"{args.out}: {base} ranks, {RESERVED_SPECIAL} special ids, {len(cases)} cases")


def write_synthetic(out: pathlib.Path, ranks: dict[bytes, int], named: dict[int, str]) -> None:
    with open(out / "tiktoken.model", "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    config = {
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "added_tokens_decoder": {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True} for i, name in named.items()},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
