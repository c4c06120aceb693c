"""Reference for `lora-train eval`: next-token loss of a transformers GPT-2 over consecutive windows.

python3 tools/make_eval_fixture.py MODEL_DIR BLOCK_SIZE (--ids N | --text FILE)
Windows: consecutive, non-overlapping, `block_size` tokens; the last shorter one kept if >= 2 tokens.
Loss: summed cross-entropy of every next-token prediction in every window / their count.
"""
import argparse, json, math, torch
from transformers import GPT2LMHeadModel, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("block_size", type=int)
ap.add_argument("--ids", type=int, help="use ids (i * 37 + 11) % vocab for i < N")
ap.add_argument("--text")
a = ap.parse_args()
model = GPT2LMHeadModel.from_pretrained(a.model).eval()
if a.text:
    ids = AutoTokenizer.from_pretrained(a.model)(open(a.text, encoding="utf-8").read())["input_ids"]
else:
    ids = [(i * 37 + 11) % model.config.vocab_size for i in range(a.ids)]
total, count, windows = 0.0, 0, 0
with torch.no_grad():
    for s in range(0, len(ids), a.block_size):
        w = ids[s:s + a.block_size]
        if len(w) < 2:
            continue
        t = torch.tensor([w])
        logits = model(t).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum").item()
        count += len(w) - 1
        windows += 1
print(json.dumps({"tokens": len(ids), "windows": windows, "loss": total / count,
                  "perplexity": math.exp(total / count), "block_size": a.block_size}))
