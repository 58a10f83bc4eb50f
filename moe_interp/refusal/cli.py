"""``moe-interp evaluate``: refusal rate and side effects of steering / ablation on a prompt file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.errors import InputError, MissingFileError
from moe_interp.fileio import atomic_path, read_json_object, read_safetensors, read_torch_file

__all__ = ["load_ablation", "load_direction", "save_direction"]


def save_direction(path: str | Path, direction: Float[Tensor, " d_model"], **meta: Any) -> Path:
    """Write ``{'direction': tensor}`` to a ``.safetensors`` (metadata as strings) or ``.pt`` file, atomically."""
    p = Path(path)
    if p.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"Direction files must end in .safetensors or .pt, got {p.name!r}.")
    t = torch.as_tensor(direction).detach().float().cpu().contiguous()
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"direction": t}, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
        else:
            torch.save({"direction": t, **meta}, tmp)
    return p


def load_direction(path: str | Path) -> Float[Tensor, " d_model"]:
    """The ``'direction'`` tensor of a ``.safetensors`` or ``.pt`` file (a bare tensor in a .pt also works)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"Direction file {p} does not exist.")
    if p.suffix == ".safetensors":
        data: Any = read_safetensors(p)
    elif p.suffix == ".pt":
        data = read_torch_file(p)
    else:
        raise InputError(
            f"{p}: unknown direction file format; expected a .safetensors/.pt file with a 'direction' tensor "
            "or a circuit .json with a 'components' key."
        )
    if isinstance(data, Tensor):
        data = {"direction": data}
    if not isinstance(data, dict) or not isinstance(data.get("direction"), Tensor):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{p}: expected a 'direction' tensor, found {keys}.")
    d = data["direction"]
    if d.ndim != 1 or not d.is_floating_point() or not bool(torch.isfinite(d).all()):
        raise InputError(
            f"{p}: 'direction' must be a finite 1-D float tensor, got {d.dtype} {tuple(d.shape)}."
        )
    return d.float()


def load_ablation(path: str | Path, model: Any) -> list[Any]:
    """Interventions from ``--ablate FILE``: a direction file → DirectionalAblation, a circuit JSON → its edits."""
    from moe_interp.interventions import DirectionalAblation

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"Ablation file {p} does not exist.")
    if p.suffix == ".json":
        expected = "a circuit JSON with a 'components' key (Circuit.save)"
        data = read_json_object(p, expected)
        if "components" not in data:
            raise InputError(f"{p}: no 'components' key; expected {expected}.")
        from moe_interp.circuits import Circuit

        return list(Circuit.load(p, model=model).to_interventions(model))
    direction = load_direction(p)
    if direction.shape[0] != model.spec.d_model:
        raise InputError(
            f"{p}: the direction has width {direction.shape[0]}, the model's d_model is {model.spec.d_model}."
        )
    return [DirectionalAblation(direction)]


def _evaluate(args: argparse.Namespace) -> int:
    """``moe-interp evaluate`` (arguments defined in :mod:`moe_interp.cli`)."""
    from moe_interp.cli import load_model
    from moe_interp.refusal.evaluate import evaluate
    from moe_interp.refusal.prompts_io import load_prompt_file

    prompts = load_prompt_file(args.prompts)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}.")
        prompts = prompts[: args.limit]
    steer = None
    if args.steer:  # read before the model loads, so a bad file is reported at once
        from moe_interp.steering.cli import check_steering, load_steering

        steer = load_steering(args.steer)
    model = load_model(args.model)
    ivs: list[Any] = []
    if steer is not None:
        check_steering(steer, model, args.steer)
        ivs += list(steer.to_interventions())
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
