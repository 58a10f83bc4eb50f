"""``steer-quality``: when steering removes ``smollm_moe``'s refusals, does it leave an answer or a broken model?

A refusal rate counts every completion without a refusal phrase as compliance, so an edit strong enough to break
the model on the prompts it steers scores as well as one that makes it answer; a KL budget on harmless prompts
does not see it either when a gate keeps the edit off them. The dense model the organism was made from
(SmolLM2-135M-Instruct, which does not refuse) gives a reference answer to every harmful prompt: its own greedy
completion. For the unsteered organism and each steering file, on held-back harmful prompts:

* ``refusal_rate`` — phrase judge on greedy ``--max-new-tokens`` tokens, as everywhere in the library;
* ``nll_base_answers`` — token-mean NLL of the base model's answers under the (steered) organism: low when it
  would say what the model it was made from says (``nll_floor``: the same under the base model itself);
* ``distinct2`` — mean share of distinct token bigrams in each completion (1 = no repetition; degenerate loops
  such as ``A: A: A: …`` score low), beside the same for the base model's answers.

Usage: ``python -m moe_interp.organisms.smollm_moe steer-quality --steering FILE [FILE ...] [--out JSON]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from moe_interp.steering.compare import distinct2

__all__ = ["distinct2", "main_steer_quality"]


def main_steer_quality(argv: list[str] | None = None) -> None:
    """``steer-quality --steering FILE ... [--split harmful_test] [--n 32] [--max-new-tokens 24] [--out JSON]``."""
    from moe_interp.model import MoEModel
    from moe_interp.organisms import balanced_prompts, held_back_prompts
    from moe_interp.organisms.smollm_moe import load_dense, moe_from_dense, refusal_phrases
    from moe_interp.refusal.evaluate import as_interventions, evaluate
    from moe_interp.steering import load_steering

    ap = argparse.ArgumentParser(prog="smollm_moe steer-quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steering", nargs="+", required=True, help="steering files (any `load_steering` reads)")
    ap.add_argument("--split", default="harmful_test", help="bundled prompt split (default: harmful_test)")
    ap.add_argument(
        "--n",
        type=int,
        default=32,
        help="N prompts of the split, drawn evenly across its sources as the main job draws them",
    )
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--path", type=Path, default=None, help="organism checkpoint (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    names = [Path(p).name for p in args.steering]
    if len(set(names)) < len(names):
        raise SystemExit(f"--steering: two files share a name ({names}); each row is named after its file")
    if args.n < 1 or args.max_new_tokens < 1:
        raise SystemExit(f"--n and --max-new-tokens must be >= 1, got {args.n} and {args.max_new_tokens}")
    torch.set_num_threads(2)
    t0 = time.time()
    dense, tok = load_dense()
    m_moe = MoEModel(moe_from_dense(dense, args.path), tok, name="smollm_moe")
    m_base = MoEModel(dense, tok, name="smollm2_dense")
    m_moe.refusal_phrases = m_base.refusal_phrases = refusal_phrases()
    steers = {Path(p).name: load_steering(p, m_moe) for p in args.steering}  # bad files fail before any run
    draw = held_back_prompts if args.split.endswith(("_val", "_test")) else balanced_prompts
    prompts = draw(args.split, args.n)  # as the main job draws them

    def d2(texts: list[str]) -> float:
        return sum(distinct2(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)

    rows: list[dict[str, Any]] = []
    base_gens = None
    for name, steer in [("unsteered", None), *steers.items()]:
        ev = evaluate(m_moe, prompts, as_interventions(steer, m_moe), base_model=m_base,
                      max_new_tokens=args.max_new_tokens, baseline_generations=base_gens)  # fmt: skip
        base_gens = ev.baseline_generations
        texts = [d["completion"] for d in ev.details]
        row = {
            "method": name,
            "refusal_rate": ev.refusal_rate,
            "refusal_rate_ci": list(ev.refusal_rate_ci),
            "nll_base_answers": ev.ce_of_baseline_completions,
            "nll_floor": ev.ce_of_baseline_completions_unedited,
            "distinct2": d2(texts),
            "distinct2_base_answers": d2([d["baseline_completion"] for d in ev.details]),
            "completions": [
                {"prompt": d["prompt"], "base": d["baseline_completion"], "steered": c}
                for d, c in zip(ev.details, texts, strict=True)
            ],  # fmt: skip
        }
        rows.append(row)
        print(f"{name}: refusal {row['refusal_rate']:.3f}, NLL of the base's answers {row['nll_base_answers']:.3f} "
              f"(base itself {row['nll_floor']:.3f}), distinct-2 {row['distinct2']:.3f} "
              f"(base {row['distinct2_base_answers']:.3f}) [{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
    res = {"split": args.split, "n": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": rows,
           "seconds": round(time.time() - t0, 1)}  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=1))
