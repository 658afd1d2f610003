#!/usr/bin/env python3
"""Checks a `dsrun synth` checkpoint against transformers (run by hand):

    dsrun synth --out /tmp/syn --layers 3 --experts 16 --hidden 128
    dsrun logits --model /tmp/syn --tokens 0,5,17,300,9 --out /tmp/syn.npy --gpu cpu
    python tools/compare_synth.py /tmp/syn /tmp/syn.npy

Prints max |transformers - dsrun| / max |transformers| over the logits.
"""
import sys
import numpy as np
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
with torch.no_grad():
    reference = model(torch.tensor([[0, 5, 17, 300, 9]])).logits[0].numpy()
ours = np.load(sys.argv[2])
print("relative error", np.abs(reference - ours).max() / np.abs(reference).max())
