"""Restart a forward pass at (or after) layer L from cached values of the unedited pass (family-agnostic).

An edit of layer L's MLP (router, experts, their outputs) leaves everything before it unchanged: the
embedding, layers < L and layer L's attention. :func:`cache_prefix` runs the prompts once and keeps, per layer
L asked for, the output of decoder layer L−1 (the input of layer L, exactly as the module returned it) and the
output of layer L's attention module. :func:`restart` runs the model on any rows of those prompts with
nnsight ``skip``: layers < L and layer L's attention return the cached values instead of computing, so the
forward really starts at layer L's MLP. :func:`restart_after` starts at layer L + 1 from layer L's cached
output plus a given change of the residual stream (an edit whose effect is known without running layer L).
Masks, position ids and rotary embeddings are still made by the HF model itself (cheap), so nothing here
depends on the family beyond :class:`FamilySpec` paths.

Only the last position's logits are computed. With ``cut_last`` the last layer's MLP also runs on the last
position only: the decoder layer's residual add broadcasts its ``[rows, 1, d]`` output, and the other positions
of the last layer's output are never read (``logits_to_keep=1``; RMSNorm/LayerNorm act per position). Families
whose layer reshapes the MLP output to the residual's shape say so (``FamilySpec.mlp_broadcasts``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from moe_interp.tracing import EditFn, LayerTracer, TraceRequest, _get

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = ["PrefixCache", "cache_prefix", "restart", "restart_after"]


@dataclass
class PrefixCache:
    """What :func:`restart` / :func:`restart_after` need at any of ``layers``: module outputs of one pass."""

    ids: Int[Tensor, "n pos"]
    mask: Int[Tensor, "n pos"]
    layers: tuple[int, ...]
    #: last-position logits of the unedited pass, ``[n, 1, vocab]``
    logits: Tensor
    #: L -> output of decoder layer L−1 as returned (tensor or tuple), for L > 0
    layer_in: dict[int, Any] = field(default_factory=dict)
    #: L -> output of layer L's attention module as returned (``(out, weights)`` for most families)
    attn_out: dict[int, Any] = field(default_factory=dict)
    #: L -> output of decoder layer L as returned (kept with ``outputs=True``), for :func:`restart_after`
    layer_out: dict[int, Any] = field(default_factory=dict)
    #: L -> hidden-state input of layer L's MLP block, ``[n, pos, d]`` (kept with ``outputs=True``)
    mlp_in: dict[int, Tensor] = field(default_factory=dict)
    #: hook values read in the same pass (``[n, pos, ...]``), e.g. router weights of the cached layers
    reads: dict[str, Tensor] = field(default_factory=dict)
    #: whether layer inputs and attention outputs were kept (:func:`restart` needs them)
    inputs: bool = True


def _index(value: Any, rows: Tensor, n: int) -> Any:
    """Rows ``rows`` of every batch-first tensor with batch ``n`` inside ``value`` (tensor, tuple, list, None)."""
    if isinstance(value, Tensor):
        return value.index_select(0, rows) if value.ndim and value.shape[0] == n else value
    if isinstance(value, tuple | list):
        return type(value)(_index(v, rows, n) for v in value)
    return value


def _attn_path(model: MoEModel, L: int) -> str | None:
    info = model.layers[L]
    return info.attn or info.linear_attn


def _cut_input(envoy: Any) -> None:
    """Keep only the last position of a module's hidden-state input (first positional or ``hidden_states``)."""
    args, kwargs = envoy.inputs
    if args:
        envoy.inputs = ((args[0][:, -1:], *args[1:]), kwargs)
    else:
        envoy.inputs = (args, {**kwargs, "hidden_states": kwargs["hidden_states"][:, -1:]})


def _prefix_body(
    model: MoEModel,
    layers: list[int],
    reads: set[str],
    store: dict,
    raw: dict,
    mask: Tensor,
    inputs: bool,
    outputs: bool,
) -> None:
    """Trace body of :func:`cache_prefix` (module outputs are visited in execution order)."""
    nn = model.nnsight
    envs = _get(nn, model.family.layers)
    b, p = mask.shape
    tracer = LayerTracer(nn, model.family, model.layers, TraceRequest(reads=reads), store, b, p, mask)
    for L in layers:
        if inputs and L > 0:
            raw["in", L] = envs[L - 1].output
        path = _attn_path(model, L)
        if inputs and path is not None:
            raw["attn", L] = getattr(envs[L], path).output
        if outputs:
            args, kwargs = getattr(envs[L], model.layers[L].mlp).inputs
            raw["mlp_in", L] = args[0] if args else kwargs["hidden_states"]
        if tracer.req.any_prefix(f"blocks.{L}.mlp.") or tracer.req.wants(f"blocks.{L}.hook_mlp_out"):
            tracer._mlp(model.layers[L], envs[L])
        if outputs:
            raw["out", L] = envs[L].output
    raw["logits"] = nn.output.logits


def cache_prefix(
    model: MoEModel,
    ids: Int[Tensor, "n pos"],
    mask: Int[Tensor, "n pos"],
    layers: Iterable[int],
    reads: Iterable[str] = (),
    *,
    inputs: bool = True,
    outputs: bool = False,
) -> PrefixCache:
    """One unedited forward (no active interventions) that caches what restarting at ``layers`` needs.

    ``reads`` may name MLP hooks of those layers (``blocks.L.mlp.*``, ``blocks.L.hook_mlp_out``), read in the
    same pass without changing it. ``inputs`` keeps each layer's input and attention output (for
    :func:`restart`), ``outputs`` its output and its MLP's input (for :func:`restart_after`).
    """
    layers = sorted(set(layers))
    reads = set(reads)
    ok = tuple(p for L in layers for p in (f"blocks.{L}.mlp.", f"blocks.{L}.hook_mlp_out"))
    bad = [r for r in reads if not r.startswith(ok)]
    if bad:
        raise ValueError(f"cache_prefix reads only MLP hooks of the cached layers; got {bad}.")
    store: dict[str, list[Tensor]] = {}
    raw: dict[Any, Any] = {}
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        with model.nnsight.trace(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1):
            _prefix_body(model, layers, reads, store, raw, mask, inputs, outputs)
    return PrefixCache(
        ids=ids,
        mask=mask,
        layers=tuple(layers),
        layer_in={L: raw["in", L] for L in layers if ("in", L) in raw},
        attn_out={L: raw["attn", L] for L in layers if ("attn", L) in raw},
        layer_out={L: raw["out", L] for L in layers if ("out", L) in raw},
        mlp_in={L: raw["mlp_in", L] for L in layers if ("mlp_in", L) in raw},
        reads={k: v[0] for k, v in store.items()},
        logits=raw["logits"],
        inputs=inputs,
    )


def _restart_body(
    model: MoEModel,
    prefix: PrefixCache,
    L: int,
    rows: Tensor,
    request: TraceRequest | None,
    delta: Tensor | None,
    store: dict,
    out: dict,
    cut_last: bool,
) -> None:
    """Trace body of :func:`restart` (``delta`` None: start at layer L's MLP) and :func:`restart_after`."""
    nn = model.nnsight
    envs = _get(nn, model.family.layers)
    n = prefix.ids.shape[0]
    info, last = model.layers[L], len(model.layers) - 1
    cut_last = cut_last and model.family.mlp_broadcasts
    if delta is not None:  # layers 0..L return layer L's cached output + delta
        value = _index(prefix.layer_out[L], rows, n)
        first = value[0] if isinstance(value, tuple) else value
        new = first + delta.to(first)
        value = (new, *value[1:]) if isinstance(value, tuple) else new
        for i in range(L + 1):
            envs[i].skip(value)
        if cut_last and L < last:
            _cut_input(getattr(envs[last], model.layers[last].mlp))
        out["logits"] = nn.output.logits
        return
    if L > 0:
        value = _index(prefix.layer_in[L], rows, n)
        for i in range(L):
            envs[i].skip(value)
    attn_path = _attn_path(model, L)
    if L in prefix.attn_out and attn_path is not None:  # recorded only for layers with an attention path
        getattr(envs[L], attn_path).skip(_index(prefix.attn_out[L], rows, n))
    mask = prefix.mask.index_select(0, rows)
    p = mask.shape[1]
    if cut_last and L == last:
        _cut_input(getattr(envs[L], info.mlp))
        p = 1
    assert request is not None
    tracer = LayerTracer(nn, model.family, model.layers, request, store, len(rows), p, mask[:, -p:])
    tracer._mlp(info, envs[L])
    if cut_last and L < last:
        _cut_input(getattr(envs[last], model.layers[last].mlp))
    out["logits"] = nn.output.logits


def _run(
    model: MoEModel,
    prefix: PrefixCache,
    layer: int,
    rows: Tensor,
    request: TraceRequest | None,
    delta: Tensor | None,
    store: dict,
    cut_last: bool,
) -> Tensor:
    ids, mask = prefix.ids.index_select(0, rows), prefix.mask.index_select(0, rows)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        with model.nnsight.trace(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1):
            _restart_body(model, prefix, layer, rows, request, delta, store, out, cut_last)
    return out["logits"]


def restart_after(
    model: MoEModel,
    prefix: PrefixCache,
    layer: int,
    rows: Int[Tensor, " rows"],
    delta: Float[Tensor, "rows pos d_model"],
    *,
    cut_last: bool = True,
) -> Float[Tensor, "rows 1 vocab"]:
    """Last-position logits of prompts ``prefix.ids[rows]`` when layer ``layer``'s output (the residual stream,
    ``blocks.{layer}.hook_resid_post``) is the cached one plus ``delta``: the forward starts at layer + 1.

    Needs ``cache_prefix(..., outputs=True)``. An edit whose effect on the residual stream is known without
    running the layer (removing one expert's cached contribution) costs only the layers after it.
    """
    if layer not in prefix.layer_out:
        raise ValueError(f"Layer {layer}'s output was not cached (cache_prefix(..., outputs=True)).")
    rows = rows.to(prefix.ids.device)
    return _run(model, prefix, layer, rows, None, delta, {}, cut_last)


def restart(
    model: MoEModel,
    prefix: PrefixCache,
    layer: int,
    rows: Int[Tensor, " rows"],
    edits: dict[str, EditFn] | None = None,
    *,
    reads: Iterable[str] = (),
    cut_last: bool = True,
    store: dict[str, list[Tensor]] | None = None,
) -> Float[Tensor, "rows 1 vocab"]:
    """Last-position logits of prompts ``prefix.ids[rows]``, starting the forward at ``layer``'s MLP.

    ``edits`` (hook name -> edit function) and ``reads`` may name only hooks of ``blocks.{layer}.mlp.*`` and
    ``blocks.{layer}.hook_mlp_out``; values read are appended to ``store``. With ``cut_last`` and
    ``layer`` the last layer, those hooks see the last position only (``[rows, 1, ...]``).
    """
    if layer not in prefix.layers or not prefix.inputs:
        raise ValueError(f"Layer {layer}'s input was not cached (cache_prefix(..., layers, inputs=True)).")
    edits = edits or {}
    ok = (f"blocks.{layer}.mlp.", f"blocks.{layer}.hook_mlp_out")
    bad = [h for h in [*edits, *reads] if not h.startswith(ok)]
    if bad:
        raise ValueError(f"restart at layer {layer} edits and reads only {ok[0]}* and {ok[1]}; got {bad}.")
    request = TraceRequest(reads=set(reads), edits={k: [fn] for k, fn in edits.items()})
    rows = rows.to(prefix.ids.device)
    return _run(model, prefix, layer, rows, request, None, {} if store is None else store, cut_last)
