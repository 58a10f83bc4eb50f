"""``moe-interp evaluate``: refusal rate and side effects of steering / ablation on a prompt file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["load_ablation", "load_direction", "register", "save_direction"]


def save_direction(path: str | Path, direction: Float[Tensor, " d_model"], **meta: Any) -> Path:
    """Write ``{'direction': tensor}`` to a ``.safetensors`` (metadata as strings) or ``.pt`` file."""
    p = Path(path)
    t = torch.as_tensor(direction).detach().float().cpu().contiguous()
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"direction": t}, str(p), metadata={k: json.dumps(v) for k, v in meta.items()})
    elif p.suffix == ".pt":
        torch.save({"direction": t, **meta}, p)
    else:
        raise ValueError(f"Direction files must end in .safetensors or .pt, got {p.name!r}.")
    return p


def load_direction(path: str | Path) -> Float[Tensor, " d_model"]:
    """The ``'direction'`` tensor of a ``.safetensors`` or ``.pt`` file (a bare tensor in a .pt also works)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Direction file {p} does not exist.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        data: Any = load_file(str(p))
    elif p.suffix == ".pt":
        data = torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"{p}: unknown direction file format; expected a .safetensors/.pt file with a 'direction' tensor "
            "or a circuit .json with a 'components' key."
        )
    if isinstance(data, Tensor):
        return data.float()
    if not isinstance(data, dict) or not isinstance(data.get("direction"), Tensor):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{p}: expected a 'direction' tensor, found {keys}.")
    return data["direction"].float()


def load_ablation(path: str | Path, model: Any) -> list[Any]:
    """Interventions from ``--ablate FILE``: a direction file → DirectionalAblation, a circuit JSON → its edits."""
    from moe_interp.interventions import DirectionalAblation

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Ablation file {p} does not exist.")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{p}: invalid JSON ({err}); expected a circuit JSON with a 'components' key."
            ) from err
        if not isinstance(data, dict) or "components" not in data:
            raise ValueError(f"{p}: expected a circuit JSON with a 'components' key.")
        try:
            from moe_interp.circuits import Circuit  # type: ignore[import-not-found]
        except ImportError as err:
            raise ValueError(
                f"{p} is a circuit file, but moe_interp.circuits.Circuit is not available in this install."
            ) from err
        return list(Circuit.load(p).to_interventions(model))
    return [DirectionalAblation(load_direction(p))]


def _evaluate(args: argparse.Namespace) -> int:
    from moe_interp.model import load
    from moe_interp.refusal.evaluate import evaluate
    from moe_interp.refusal.prompts_io import load_prompt_file

    prompts = load_prompt_file(args.prompts)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}.")
        prompts = prompts[: args.limit]
    model = load(args.model)
    ivs: list[Any] = []
    if args.steer:
        from moe_interp.steering import SteeringVectors

        ivs += list(SteeringVectors.load(args.steer, model=model).to_interventions())
    if args.ablate:
        ivs += load_ablation(args.ablate, model)
    res = evaluate(model, prompts, ivs, max_new_tokens=args.max_new_tokens, baseline=not args.no_baseline)
    d = res.to_dict(details=args.details)
    d["model"] = args.model
    d["prompts"] = str(args.prompts)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    lo, hi = res.refusal_rate_ci
    print(
        f"{args.model} on {args.prompts} (n={res.n}, interventions: {d['config']['interventions'] or 'none'})"
    )
    print(f"  refusal rate        {res.refusal_rate:.3f}  [95% CI {lo:.3f}, {hi:.3f}]")
    print(f"  mean refusal score  {res.mean_refusal_score:.3f}")
    if res.kl_to_baseline is not None:
        print(f"  first-token KL      {res.kl_to_baseline:.4f}")
        print(
            f"  CE of baseline completions  {res.ce_of_baseline_completions:.4f}"
            f" (unedited {res.ce_of_baseline_completions_unedited:.4f})"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` sub-command."""
    p = sub.add_parser("evaluate", help="refusal rate, refusal score and side effects on a prompt file")
    p.add_argument("model", help="HF id or directory, 'tiny:<family>' or 'organism'")
    p.add_argument("--prompts", required=True, help="prompt file (.json, .txt or .csv)")
    p.add_argument("--steer", help="steering vectors (SteeringVectors.save path) to add")
    p.add_argument("--ablate", help="direction file (.safetensors/.pt with 'direction') or circuit .json")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--details", action="store_true", help="include per-prompt rows in the JSON")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--no-baseline", action="store_true", help="skip KL / CE against the unedited model")
    p.set_defaults(func=_evaluate)
