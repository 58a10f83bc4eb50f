"""Guards against silent wrong results: argument checks of the model API and non-finite outputs under edits.

The non-finite check costs one ``torch.isfinite(logits).all()`` per forward pass with interventions active
(per generation step: one flag, all read once at the end), and nothing without interventions. Only when it
fails does the diagnosis run: the same inputs without interventions (are the model's own logits finite?),
then once more with every edit's input and output checked, to name the hook point and the intervention that
first produced NaN/inf.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moe_interp.errors import NonFiniteOutputError  # re-exported: defined where the CLI can import it cheaply
from moe_interp.tracing import EditRecord, TraceRequest

if TYPE_CHECKING:
    from moe_interp.model import MoEModel


# ------------------------------------------------------------------------------------------ arguments


def check_prompts(prompts: Any) -> list[str]:
    """A string or a non-empty sequence of strings, as a list."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes | bytearray):
        raise ValueError(f"Prompts must be a string or a list of strings, got {type(prompts).__name__}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("Prompts must be a non-empty list of strings, got an empty list.")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(
            f"Prompts must be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}: {prompts[bad[0]]!r}."
        )
    return prompts


def check_count(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """A positive integer (bools and floats such as ``8.0`` are refused), or None where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        accepted = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}.")
    return int(value)


def check_vocab(tokenizer: Any, n_embed: int) -> None:
    """The tokenizer's ids must all index the model's embedding."""
    n_tok = len(tokenizer)
    if n_tok > n_embed:
        raise ValueError(
            f"The tokenizer has {n_tok} tokens but the model's embedding has {n_embed} rows (ids >= {n_embed} "
            "would index past it): use the model's own tokenizer or resize the embeddings."
        )


def check_token_ids(ids: Tensor, n_embed: int) -> None:
    """Token ids given directly (a BatchEncoding or dict) must lie in ``[0, n_embed)``."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_embed):
        raise ValueError(
            f"input_ids must lie in [0, {n_embed}) (the model's embedding rows), got values in "
            f"[{int(ids.min())}, {int(ids.max())}]."
        )


def check_context(model: MoEModel, n_tokens: int, new_tokens: int = 0) -> None:
    """Prompt length (plus tokens to generate) within ``max_position_embeddings``, checked before running."""
    limit = getattr(model.hf_model.config, "max_position_embeddings", None)
    if limit is None or n_tokens + new_tokens <= limit:
        return
    gen = f" + max_new_tokens={new_tokens}" if new_tokens else ""
    fix = " or lower max_new_tokens" if new_tokens else ""
    raise ValueError(
        f"{n_tokens} prompt tokens{gen} exceed the model's context of {limit} tokens "
        f"(max_position_embeddings): shorten the prompts{fix}."
    )


# --------------------------------------------------------------------------------- non-finite outputs


def describe(iv: Any) -> str:
    """A short label for an intervention: its class and scalar fields (tensors by shape, functions by name)."""
    if not dataclasses.is_dataclass(iv):
        text = repr(iv)
        return text if len(text) <= 80 else type(iv).__name__
    parts = []
    for f in dataclasses.fields(iv):
        if not f.repr:
            continue
        v = getattr(iv, f.name)
        if isinstance(v, Tensor):
            text = f"tensor{list(v.shape)}"
        elif callable(v):
            text = getattr(v, "__name__", type(v).__name__)
        else:
            text = repr(v)
        parts.append(f"{f.name}={text if len(text) <= 40 else text[:37] + '...'}")
    return f"{type(iv).__name__}({', '.join(parts)})"


def _active(request: TraceRequest) -> str:
    """The labels of the interventions behind ``request``'s edits (at most four)."""
    labels = list(dict.fromkeys(lab for labs in request.labels.values() for lab in labs))
    more = f" (+{len(labels) - 4} more)" if len(labels) > 4 else ""
    return "; ".join(labels[:4]) + more


def _bad_positions(logits: Tensor, mask: Tensor) -> Tensor:
    """``[batch, pos]``: real (non-padding) positions whose logits contain NaN/inf."""
    bad = ~torch.isfinite(logits).all(-1)
    return bad & mask[:, -bad.shape[1] :].bool()


def _culprit(records: list[EditRecord]) -> str:
    """The first edit that made a finite input NaN/inf, else the edit with the largest output."""
    for r in records:
        if r.input_finite and not r.output_finite:
            return f"{r.name}: edit by {r.label} produced NaN/inf (its input was finite)"
    if not records:
        return "no edit ran in the diagnosis pass"
    r = max(records, key=lambda r: r.output_absmax)
    return (
        f"no edit returned NaN/inf itself, values overflowed downstream (largest edited value "
        f"|x| = {r.output_absmax:.3g} at {r.name}, edit by {r.label})"
    )


def check_finite(
    model: MoEModel, logits: Tensor, ids: Tensor, mask: Tensor, request: TraceRequest, *, last_only: bool
) -> None:
    """Raise :class:`NonFiniteOutputError` if the active edits made finite logits NaN/inf.

    Where the unedited model's logits are non-finite too, warn instead (the model itself overflows).
    """
    if not request.edits or request.monitor is not None or bool(torch.isfinite(logits).all()):
        return
    bad = _bad_positions(logits, mask)
    if not bool(bad.any()):
        return  # padding positions only: never read
    base, _ = model._trace(ids, mask, TraceRequest(), last_only=last_only)
    new_bad = bad & ~_bad_positions(base, mask)
    if not bool(new_bad.any()):
        warnings.warn(
            "Non-finite logits (NaN/inf) with interventions active, and also without them: the model itself "
            f"overflows (try float32). Active interventions: {_active(request)}.",
            RuntimeWarning,
            stacklevel=4,
        )
        return
    records: list[EditRecord] = []
    diag = dataclasses.replace(request, reads=set(), monitor=records)
    model._trace(ids, mask, diag, last_only=last_only)
    n_real = int(mask[:, -bad.shape[1] :].sum())
    raise NonFiniteOutputError(
        f"Interventions made the logits NaN/inf at {int(new_bad.sum())} of {n_real} positions "
        f"where the unedited model's are finite; {_culprit(records)}. Active interventions: {_active(request)}."
    )


def check_generation(
    model: MoEModel,
    flags: list[Tensor],
    ids: Tensor,
    mask: Tensor,
    request: TraceRequest,
    cause: BaseException | None = None,
) -> None:
    """After (or during) an edited generation: raise if a step's logits were NaN/inf (``flags``: one per step)."""
    if not flags:
        return
    ok = torch.stack(flags).cpu()
    if bool(ok.all()):
        return
    step = int((~ok).nonzero()[0, 0])
    base, _ = model._trace(ids, mask, TraceRequest(), last_only=True)
    if not bool(torch.isfinite(base).all()):
        warnings.warn(
            "Non-finite logits (NaN/inf) during generation with interventions active; the model's own prompt "
            f"logits are non-finite too (try float32). Active interventions: {_active(request)}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    if step == 0:  # the prompt pass: rerun as a forward, which names the hook and edit (raises)
        model._trace(ids, mask, request, last_only=True)
    raise NonFiniteOutputError(
        f"generate: interventions made the logits NaN/inf at generation step {step} (the unedited prompt's "
        f"logits are finite); the completions would be garbage. Active interventions: {_active(request)}."
    ) from cause
