#!/usr/bin/env python3
"""Expected chat-template ids from transformers' `apply_chat_template`, for tests/chat.rs.

Run by hand (never in CI), from the repository root (no torch needed):

    pip install --target /tmp/pyhf transformers jinja2
    PYTHONPATH=/tmp/pyhf python3 tools/make_chat_fixtures.py

Writes tests/data/chat/tokenizer.json (the bundled model's tokenizer plus the special tokens the
vendored templates use, so special-token handling is exercised) and tests/data/chat/expected.json:
for each template in crates/core/templates/ and each conversation below, the rendered text
and the token ids of `apply_chat_template(..., tokenize=True)`.
"""

import json
import os

from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "crates", "core", "templates")
OUT = os.path.join(ROOT, "tests", "data", "chat")

DEEPSEEK = dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>")
KIMI = dict(bos="[BOS]", eos="[EOS]")
SPECIALS = {
    "deepseek-v3": DEEPSEEK,
    "deepseek-r1": DEEPSEEK,
    "deepseek-v2-lite-chat": DEEPSEEK,
    "kimi-k2": KIMI,
}
# Marker tokens of the templates (DeepSeek's and Kimi-K2's), added as special tokens.
MARKERS = [
    DEEPSEEK["bos"], DEEPSEEK["eos"], "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>",
    KIMI["bos"], KIMI["eos"], "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
]

CONVERSATIONS = [
    ([{"role": "user", "content": "Hello, who are you?"}], True),
    ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}], True),
    (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        True,
    ),
    ([{"role": "user", "content": "Write a haiku about the sea."}, {"role": "assistant", "content": "Waves fold into foam"}], False),
    (
        [
            {"role": "system", "content": "First rule."},
            {"role": "system", "content": "Second rule."},
            {"role": "user", "content": "unicode: héllo 世界 🌊\n  indented\tand tabbed"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "Think first."},
            {"role": "assistant", "content": "<think>\nhmm, 6 * 7\n</think>\n\nThe answer is 42."},
            {"role": "user", "content": "Again?"},
        ],
        True,
    ),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(ROOT, "weights", "tokenizer.json"))
    tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
    tokenizer_path = os.path.join(OUT, "tokenizer.json")
    tok.save(tokenizer_path)

    cases = []
    for name in sorted(SPECIALS):
        with open(os.path.join(TEMPLATES, name + ".jinja"), encoding="utf-8") as f:
            source = f.read()
        special = SPECIALS[name]
        hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, bos_token=special["bos"], eos_token=special["eos"])
        hf.chat_template = source
        for messages, generation_prompt in CONVERSATIONS:
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            if not isinstance(ids, list):
                ids = ids["input_ids"]
            cases.append(
                dict(template=name, bos_token=special["bos"], eos_token=special["eos"], messages=messages,
                     add_generation_prompt=generation_prompt, text=text, ids=[int(i) for i in ids])
            )
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
