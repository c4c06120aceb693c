#!/usr/bin/env python3
"""Compare our logits with transformers + PEFT (a manual check, not part of the build).

    lora-train eval --model M --adapter OUT/adapter --text T --dump-logits ours.safetensors
    python3 tools/check_peft_adapter.py ours.safetensors --model M --adapter OUT/adapter
    lora-train merge --model M --adapter OUT/adapter --out MERGED
    python3 tools/check_peft_adapter.py ours.safetensors --merged MERGED

Loads the base GPT-2 with transformers and the adapter with PeftModel.from_pretrained (unmerged), or
a merged folder with GPT2LMHeadModel.from_pretrained, runs the same input ids and prints the max
absolute logit difference (exit 1 above --tol).
"""
import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

p = argparse.ArgumentParser()
p.add_argument("ours")
p.add_argument("--model")
p.add_argument("--adapter")
p.add_argument("--merged")
p.add_argument("--tol", type=float, default=1e-4)
a = p.parse_args()

ours = load_file(a.ours)
ids = ours["input_ids"].round().long()
if a.merged:
    model = GPT2LMHeadModel.from_pretrained(a.merged)
    what = f"transformers on {a.merged}"
else:
    from peft import PeftModel

    model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(a.model), a.adapter)
    what = f"PEFT {a.adapter} on {a.model} (unmerged)"
model.eval()
with torch.no_grad():
    theirs = model(input_ids=ids).logits
diff = (theirs - ours["logits"]).abs().max().item()
print(f"{what}: {ids.shape[1]} tokens, max |logit diff| = {diff:.3e} (tol {a.tol:g})")
sys.exit(0 if diff <= a.tol else 1)
