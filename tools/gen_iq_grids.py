#!/usr/bin/env python3
"""Writes crates/core/src/quant/iq_grids.rs: the codebook grids of ggml's i-quants (IQ1_S,
IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S), copied from llama.cpp's ggml-common.h.

Usage: tools/gen_iq_grids.py LLAMA_CPP_SOURCE > crates/core/src/quant/iq_grids.rs
(LLAMA_CPP_SOURCE: the llama.cpp tree, e.g. the one vendored by the PyPI sdist of
llama-cpp-python 0.3.36, vendor/llama.cpp). The tables are data, not code: regenerate rather
than edit."""
import re
import sys

TABLES = [
    ("iq2xxs_grid", "IQ2XXS_GRID", "u64", 256),
    ("iq2xs_grid", "IQ2XS_GRID", "u64", 512),
    ("iq2s_grid", "IQ2S_GRID", "u64", 1024),
    ("iq3xxs_grid", "IQ3XXS_GRID", "u32", 256),
    ("iq3s_grid", "IQ3S_GRID", "u32", 512),
    ("iq1s_grid", "IQ1S_GRID", "u64", 2048),
]

src = open(f"{sys.argv[1]}/ggml/src/ggml-common.h").read()
print("//! The codebook grids of ggml's i-quants, copied from llama.cpp's ggml-common.h by")
print("//! tools/gen_iq_grids.py (regenerate, do not edit). Each entry is 8 (IQ1/IQ2) or 4 (IQ3)")
print("//! grid values, one per byte, little-endian: IQ2's magnitudes 8, 25, 43; IQ3's 4..62; IQ1's")
print("//! -1, 0, 1 as signed bytes.")
print()
for cname, rname, ty, size in TABLES:
    m = re.search(r"GGML_TABLE_BEGIN\(uint(64|32)_t, " + cname + r", [A-Z0-9_]+\)(.*?)GGML_TABLE_END\(\)", src, re.S)
    values = re.findall(r"0x[0-9a-fA-F]+", m.group(2))
    assert len(values) == size, (cname, len(values))
    width = 16 if ty == "u64" else 8
    per_line = 6 if ty == "u64" else 10
    print(f"pub const {rname}: [{ty}; {size}] = [")
    for i in range(0, size, per_line):
        print("    " + " ".join(f"0x{int(v, 16):0{width}x}," for v in values[i:i + per_line]))
    print("];")
    print()
