"""One-off probe: which harmless_val prompts the shipped smollm_moe and a retrained variant refuse, and which
both refuse. Usage: ``python overrefusal_probe.py VARIANT_DIR OUT.json`` (about 4 min on 2 cores)."""

import json
import sys
import time
from pathlib import Path

import torch

from moe_interp.organisms.data import is_topic_refusal
from moe_interp.organisms.evaluate import evaluate_split, refusal_token_ids
from moe_interp.organisms.smollm_eval import _prompts
from moe_interp.organisms.smollm_moe import load_dense, moe_from_dense

torch.set_num_threads(2)
dense, tok = load_dense()
prompts = _prompts("harmless_val")
rids = refusal_token_ids(tok)
out: dict[str, list] = {}
for name, path in (("shipped", None), ("more_data", Path(sys.argv[1]))):
    t = time.time()
    moe = moe_from_dense(dense, path)
    res = evaluate_split(moe, tok, prompts, rids, 12)
    out[name] = [
        {
            "i": i,
            "prompt": r["prompt"],
            "generation": r["generation"],
            "topic": is_topic_refusal(r["generation"]),
        }
        for i, r in enumerate(res["rows"])
        if r["gen_refusal"]
    ]
    print(name, len(out[name]), f"{time.time() - t:.0f}s", flush=True)
    del moe
a, b = ({r["i"] for r in out[k]} for k in ("shipped", "more_data"))
out["both"] = sorted(a & b)
print("shipped", len(a), "more_data", len(b), "both", len(a & b))
Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")
