"""Path patching (Wang et al. 2022, IOI): the effect of a sender on the output *through* one receiver.

Three passes, all on the clean input, built from :class:`~moe_interp.interventions.Patch`:

1. run clean and corrupt, caching the sender, the receiver and every residual write in between;
2. patch the sender with its corrupt value while freezing every other component's contribution at its
   clean value (each ``hook_attn_out`` / ``hook_mlp_out`` strictly between sender and receiver; for an
   expert receiver also the layer's routing weights) and record the receiver's input;
3. patch only the receiver with the value recorded in pass 2 and measure the metric.

Components are hook names with an optional index into dim 2 (a head of ``attn.hook_result`` /
``hook_q`` / ``hook_z``, an expert of ``mlp.hook_expert_out``, an expert's router logit). A receiver is the
hook that reads the sender's path: ``mlp.hook_router_logits`` (the router's input, seen through its linear
map; editing it re-runs routing), ``attn.hook_q/k/v`` (a head's input), or an expert's output
``mlp.experts.{e}.hook_out`` (its input, seen through the expert with its routing weight frozen).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from moe_interp.hooks import parse_hook
from moe_interp.interventions import Patch
from moe_interp.lens import _encode

if TYPE_CHECKING:
    from moe_interp.model import MoEModel

__all__ = [
    "Node",
    "PathPatchResult",
    "PathPatchSweep",
    "expert_senders",
    "head_senders",
    "path_patch",
    "path_patch_sweep",
]

Metric = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Node:
    """A component: a hook name and an optional index into its dim 2 (head or expert)."""

    hook: str
    index: int | None = None

    def __str__(self) -> str:
        return self.hook if self.index is None else f"{self.hook}[{self.index}]"


def _node(x: Node | str | tuple[str, int]) -> Node:
    if isinstance(x, Node):
        return x
    if isinstance(x, str):
        return Node(x)
    return Node(x[0], int(x[1]))


def _stage(model: MoEModel, name: str) -> tuple[int, int]:
    """Execution order of a hook at residual-stream granularity: (layer, 0 pre | 1 attn | 2 mid | 3 mlp | 4 post)."""
    h = parse_hook(name)
    if h.layer is None:
        return (-1, 4) if name == "hook_embed" else (model.spec.n_layers, 0)
    site = h.site
    if site == "hook_resid_pre":
        return (h.layer, 0)
    if site.startswith("attn.") or site == "hook_attn_out":
        return (h.layer, 1)
    if site == "hook_resid_mid":
        return (h.layer, 2)
    if site.startswith("mlp.") or site == "hook_mlp_out":
        return (h.layer, 3)
    return (h.layer, 4)


def _writers(model: MoEModel) -> list[tuple[tuple[int, int], str]]:
    out = []
    for L in range(model.spec.n_layers):
        out += [((L, 1), f"blocks.{L}.hook_attn_out"), ((L, 3), f"blocks.{L}.hook_mlp_out")]
    return out


def _is_expert_output(name: str) -> bool:
    h = parse_hook(name)
    return h.expert is not None or h.site == "mlp.hook_expert_out"


def _frozen(model: MoEModel, sender: Node, receiver: Node) -> list[str]:
    """Hooks frozen at clean values in pass 2 (residual writes between sender and receiver, routing)."""
    s, r = _stage(model, sender.hook), _stage(model, receiver.hook)
    if not s < r:
        raise ValueError(
            f"The receiver {receiver} must be downstream of the sender {sender}'s residual write."
        )
    names = [n for k, n in _writers(model) if s < k < r]
    if _is_expert_output(receiver.hook):
        names.append(f"blocks.{parse_hook(receiver.hook).layer}.mlp.hook_expert_weights")
    return names


def _mix(base: Tensor, other: Tensor, index: int | None) -> Tensor:
    """``base`` with ``other`` at ``index`` of dim 2 (everything when index is None)."""
    if index is None:
        return other.clone()
    out = base.clone()
    out[:, :, index] = other[:, :, index]
    return out


@dataclass
class PathPatchResult:
    """One sender → receiver path: the receiver's values in the three runs and the metric."""

    sender: Node
    receiver: Node
    frozen: list[str]
    receiver_clean: Tensor
    receiver_corrupt: Tensor
    receiver_patched: Tensor
    logits: Float[Tensor, "batch pos vocab"]
    metric_clean: float
    metric_corrupt: float
    metric_patched: float

    @property
    def effect(self) -> float:
        """Metric change through the path: patched − clean."""
        return self.metric_patched - self.metric_clean

    @property
    def normalized(self) -> float:
        """``(patched − clean) / (corrupt − clean)``: 1 = the path carries the whole corrupt effect."""
        gap = self.metric_corrupt - self.metric_clean
        return self.effect / gap if gap != 0 else float("nan")


@dataclass
class PathPatchSweep:
    """Path patching from many senders into one receiver."""

    senders: list[Node]
    receiver: Node
    effects: Float[Tensor, " sender"]
    metric_clean: float
    metric_corrupt: float
    results: list[PathPatchResult] = field(default_factory=list, repr=False)

    @property
    def normalized(self) -> Float[Tensor, " sender"]:
        gap = self.metric_corrupt - self.metric_clean
        return self.effects / gap if gap != 0 else torch.full_like(self.effects, float("nan"))

    @property
    def labels(self) -> list[str]:
        return [str(s) for s in self.senders]


def _metric(model: MoEModel, metric: Metric | None) -> Metric:
    if metric is not None:
        return metric
    from moe_interp.patching.metrics import refusal_metric

    return refusal_metric(model)


def _scalar(metric: Metric, logits: Tensor) -> float:
    from moe_interp.patching.metrics import call_metric

    return float(call_metric(metric, logits))


def _encode_pair(model: MoEModel, clean: Any, corrupt: Any, chat: bool) -> tuple[dict, dict]:
    """Prompt lists are tokenized together (left padded to one length: positions align from the end)."""
    if isinstance(clean, str):
        clean = [clean]
    if isinstance(corrupt, str):
        corrupt = [corrupt]
    if isinstance(clean, list | tuple) and isinstance(corrupt, list | tuple):
        if len(clean) != len(corrupt):
            raise ValueError(f"Clean and corrupt need as many prompts, got {len(clean)} and {len(corrupt)}.")
        enc = _encode(model, [*clean, *corrupt], chat)
        n = len(clean)
        return {k: v[:n] for k, v in enc.items()}, {k: v[n:] for k, v in enc.items()}
    return _encode(model, clean, chat), _encode(model, corrupt, chat)


def path_patch_sweep(
    model: MoEModel,
    clean: Any,
    corrupt: Any,
    senders: Sequence[Node | str | tuple[str, int]],
    receiver: Node | str | tuple[str, int],
    *,
    metric: Metric | None = None,
    positions: Sequence[int] | None = None,
    chat: bool = True,
) -> PathPatchSweep:
    """Path-patch each sender into ``receiver`` (one clean and one corrupt run shared by all senders).

    ``clean``/``corrupt``: prompt lists (tokenized together, so positions align from the end) or
    ``{"input_ids", "attention_mask"}`` of the same shape. ``metric``:
    logits → scalar (default: mean refusal log-odds at the last position). ``positions``: where the
    sender is corrupted (default all).
    """
    snd, rcv = [_node(s) for s in senders], _node(receiver)
    if not snd:
        raise ValueError("Give at least one sender.")
    enc_c, enc_x = _encode_pair(model, clean, corrupt, chat)
    if enc_c["input_ids"].shape != enc_x["input_ids"].shape:
        raise ValueError(
            f"Clean and corrupt inputs must have the same shape, got {tuple(enc_c['input_ids'].shape)} and "
            f"{tuple(enc_x['input_ids'].shape)}; pass aligned input_ids."
        )
    frozen = {str(s): _frozen(model, s, rcv) for s in snd}
    clean_names = sorted({rcv.hook, *(s.hook for s in snd), *(n for f in frozen.values() for n in f)})
    corrupt_names = sorted({rcv.hook, *(s.hook for s in snd)})
    fn = _metric(model, metric)
    with torch.no_grad():
        logits_c, cache_c = model.run_with_cache(enc_c, names=clean_names)
        logits_x, cache_x = model.run_with_cache(enc_x, names=corrupt_names)
        m_clean, m_corrupt = _scalar(fn, logits_c), _scalar(fn, logits_x)
        results = []
        for s in snd:
            patches = [Patch(s.hook, _mix(cache_c[s.hook], cache_x[s.hook], s.index), positions)]
            patches += [Patch(n, cache_c[n]) for n in frozen[str(s)]]
            with model.intervene(*patches):  # pass 2: the sender's path alone reaches the receiver
                _, cache_p = model.run_with_cache(enc_c, names=[rcv.hook], return_type=None)
            recorded = cache_p[rcv.hook]
            with model.intervene(Patch(rcv.hook, _mix(cache_c[rcv.hook], recorded, rcv.index))):  # pass 3
                logits_p = model.forward(enc_c)
            sl = (slice(None), slice(None), rcv.index) if rcv.index is not None else (slice(None),)
            results.append(
                PathPatchResult(
                    sender=s,
                    receiver=rcv,
                    frozen=frozen[str(s)],
                    receiver_clean=cache_c[rcv.hook][sl],
                    receiver_corrupt=cache_x[rcv.hook][sl],
                    receiver_patched=recorded[sl],
                    logits=logits_p,
                    metric_clean=m_clean,
                    metric_corrupt=m_corrupt,
                    metric_patched=_scalar(fn, logits_p),
                )
            )
    return PathPatchSweep(
        senders=snd,
        receiver=rcv,
        effects=torch.tensor([r.effect for r in results]),
        metric_clean=m_clean,
        metric_corrupt=m_corrupt,
        results=results,
    )


def path_patch(
    model: MoEModel,
    clean: Any,
    corrupt: Any,
    sender: Node | str | tuple[str, int],
    receiver: Node | str | tuple[str, int],
    *,
    metric: Metric | None = None,
    positions: Sequence[int] | None = None,
    chat: bool = True,
) -> PathPatchResult:
    """Path-patch one ``sender`` into one ``receiver`` (see the module docstring for the three passes).

    ``sender``/``receiver``: a hook name, ``(hook, index)`` or :class:`Node`, e.g.
    ``("blocks.0.attn.hook_result", 3)`` → ``"blocks.2.mlp.hook_router_logits"``.
    """
    sweep = path_patch_sweep(
        model, clean, corrupt, [sender], receiver, metric=metric, positions=positions, chat=chat
    )
    return sweep.results[0]


def head_senders(model: MoEModel, before_layer: int | None = None) -> list[Node]:
    """Every attention head (``blocks.L.attn.hook_result[h]``) of the layers before ``before_layer``."""
    stop = model.spec.n_layers if before_layer is None else before_layer
    return [
        Node(f"blocks.{i.index}.attn.hook_result", h)
        for i in model.layers[:stop]
        if i.o is not None
        for h in range(i.n_heads)
    ]


def expert_senders(model: MoEModel, before_layer: int | None = None) -> list[Node]:
    """Every routed expert (``blocks.L.mlp.hook_expert_out[e]``) of the MoE layers before ``before_layer``."""
    stop = model.spec.n_layers if before_layer is None else before_layer
    return [
        Node(f"blocks.{i.index}.mlp.hook_expert_out", e)
        for i in model.layers[:stop]
        if i.is_moe
        for e in range(i.n_experts)
    ]
