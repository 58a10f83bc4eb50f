"""Direct logit attribution (DLA) of a logit difference to embeddings, heads, experts and shared experts.

The residual stream entering the final norm is a sum of components (``hook_embed``, each layer's heads
``attn.hook_result`` and attention bias, or its whole ``hook_attn_out`` for linear attention, each routed
expert's ``mlp.hook_expert_out`` slice, the shared experts ``mlp.hook_shared_out``, or a dense layer's
``hook_mlp_out``). With the final norm's scale ``s`` frozen at its value on the full residual, the logit
difference is linear in them::

    logit_diff = Σ_c centre(c) / s · (w ⊙ d) + constant,   d = scale · W_U v

with ``w`` the final-norm weight, ``v`` the weights of the logit difference over the vocabulary, and the
constant the final-norm bias and unembedding bias read out along ``v``. The attributions sum to the
model's logit difference exactly (to rounding): :meth:`DLAResult.error` reports it.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from moe_interp.lens import _encode, _module, decode_tokens, final_norm, token_ids, unembedding

if TYPE_CHECKING:
    from moe_interp.model import MoECache, MoEModel

__all__ = [
    "COMPLIANCE_START_PHRASES",
    "DLAResult",
    "LogitDirection",
    "ResidualDirection",
    "direct_logit_attribution",
    "direction_attribution",
    "logit_direction",
]

#: First words of a compliant answer: the default "against" side of the refusal logit difference (the
#: organism's compliant openers; longer lists add sub-word first tokens such as "cer" for "Certainly").
COMPLIANCE_START_PHRASES: tuple[str, ...] = ("Sure", "Here")

Kind = Literal["embed", "head", "attn_bias", "attn", "expert", "shared", "mlp"]
Tokens = int | str | Sequence[int | str] | None


@dataclass(frozen=True)
class LogitDirection:
    """A linear function of the logits: ``Σ_i weights[i] · logits[..., ids[i]]``."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    label: str

    def of(self, logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
        w = torch.tensor(self.weights, dtype=logits.dtype, device=logits.device)
        return logits[..., list(self.ids)] @ w


def logit_direction(model: MoEModel, tokens: Tokens = None, against: Tokens = None) -> LogitDirection:
    """Mean logit of ``tokens`` minus mean logit of ``against`` (or just the mean logit of ``tokens``).

    Default (both None): the model's refusal first tokens (:func:`~moe_interp.refusal.judges.default_refusal_ids`,
    as in the refusal metric) against compliance first tokens (:data:`COMPLIANCE_START_PHRASES`).
    """
    from moe_interp.refusal.judges import default_refusal_ids, refusal_first_token_ids

    if tokens is None and against is None:
        pos = default_refusal_ids(model)
        neg = [i for i in refusal_first_token_ids(model.tokenizer, COMPLIANCE_START_PHRASES) if i not in pos]
        label = "refusal − compliance (first tokens)"
    else:
        if tokens is None:
            raise ValueError("Give tokens (and optionally against); against alone is ambiguous.")
        pos, neg = token_ids(model, tokens), token_ids(model, against) if against is not None else []
        strs = [model.tokenizer.decode([i]) for i in pos], [model.tokenizer.decode([i]) for i in neg]
        label = " + ".join(map(repr, strs[0])) + (" − " + " + ".join(map(repr, strs[1])) if neg else "")
    weights: dict[int, float] = {}
    for i in pos:
        weights[i] = weights.get(i, 0.0) + 1.0 / len(pos)
    for i in neg:
        weights[i] = weights.get(i, 0.0) - 1.0 / len(neg)
    return LogitDirection(tuple(weights), tuple(weights.values()), label)


@dataclass
class DLAResult:
    """Per-component contributions to a logit difference, at every token position.

    ``values[c, b, p]`` is component ``labels[c]``'s contribution at (prompt ``b``, position ``p``); labels are
    hook names (a head is ``blocks.L.attn.hook_result[h]``, the attention output bias ``blocks.L.attn.b_O``).
    ``values.sum(0) + constant`` equals ``logit_diff`` (the model's own) up to rounding. From
    :func:`direction_attribution`, ``logit_diff`` is the residual's projection on the direction instead.
    """

    values: Float[Tensor, "component batch pos"]
    labels: list[str]
    kinds: list[str]
    layers: list[int]
    index: list[int]
    constant: Float[Tensor, "batch pos"]
    logit_diff: Float[Tensor, "batch pos"]
    direction: LogitDirection | ResidualDirection
    n_layers: int
    n_heads: int
    n_experts: int
    str_tokens: list[list[str]]
    attention_mask: Int[Tensor, "batch pos"]

    def total(self) -> Float[Tensor, "batch pos"]:
        """Sum of the attributions plus the constant read-out terms."""
        return self.values.sum(0) + self.constant

    def error(self) -> float:
        """Largest ``|total − logit_diff|`` over non-padding positions."""
        m = self.attention_mask.bool()
        return float((self.total() - self.logit_diff)[m].abs().max())

    def at(self, pos: int = -1, batch: int | None = None) -> Float[Tensor, " component"]:
        """Contributions at position ``pos`` of prompt ``batch`` (mean over prompts when None)."""
        v = self.values[:, :, pos]
        return v.mean(1) if batch is None else v[:, batch]

    def grid(
        self, kind: Literal["head", "expert"], pos: int = -1, batch: int | None = None
    ) -> Float[Tensor, "layer unit"]:
        """Layer × head (``kind="head"``) or layer × expert contributions; NaN where a layer has none."""
        width = self.n_heads if kind == "head" else self.n_experts
        out = torch.full((self.n_layers, max(width, 1)), float("nan"))
        v = self.at(pos, batch)
        for c, k in enumerate(self.kinds):
            if k == kind:
                out[self.layers[c], self.index[c]] = v[c]
        return out

    def by_site(self, batch: int = 0) -> tuple[Float[Tensor, "site pos"], list[str]]:
        """Per token, contributions summed per residual write: ``hook_embed``, then ``blocks.L.hook_attn_out``
        and ``blocks.L.hook_mlp_out`` of each layer (heads + bias, experts + shared)."""
        sites = ["hook_embed"] + [
            f"blocks.{L}.hook_{s}_out" for L in range(self.n_layers) for s in ("attn", "mlp")
        ]
        out = torch.zeros(len(sites), self.values.shape[2])
        for c, k in enumerate(self.kinds):
            i = 0 if k == "embed" else 1 + 2 * self.layers[c] + (k in ("expert", "shared", "mlp"))
            out[i] += self.values[c, batch]
        return out, sites

    def top(self, k: int = 10, pos: int = -1, batch: int | None = None) -> list[tuple[str, float]]:
        """The ``k`` components of largest absolute contribution at ``pos``."""
        v = self.at(pos, batch)
        order = v.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(v[i])) for i in order.tolist()]

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><code>{html.escape(n)}</code></td><td>{v:+.4f}</td></tr>" for n, v in self.top(10)
        )
        what, unit = ("projection", "projection") if isinstance(self.direction, ResidualDirection) else (
            "logit diff", "logits")  # fmt: skip
        return (
            f"<p>DLA of <b>{html.escape(self.direction.label)}</b> at the last position, mean over "
            f"{self.values.shape[1]} prompt(s): {what} {float(self.logit_diff[:, -1].mean()):+.4f}, "
            f"sum error {self.error():.1e}</p><table><tr><th>component</th><th>{unit}</th></tr>{rows}</table>"
        )


def _names(model: MoEModel, upto: int | None = None) -> list[str]:
    """The hooks :func:`_components` reads (layers before ``upto`` only, when given) and the residual
    read out: ``blocks.{upto}.hook_resid_pre``, or the last layer's ``hook_resid_post``."""
    n = model.spec.n_layers
    read = f"blocks.{n - 1}.hook_resid_post" if upto is None else f"blocks.{upto}.hook_resid_pre"
    names = ["hook_embed", read]
    hooks = set(model.hook_names())
    for info in model.layers[:upto]:
        L = info.index
        names.append(f"blocks.{L}.attn.hook_result" if info.o is not None else f"blocks.{L}.hook_attn_out")
        if not info.is_moe:
            names.append(f"blocks.{L}.hook_mlp_out")
            continue
        topk = f"blocks.{L}.mlp.hook_topk_expert_out"
        if topk in hooks:
            names += [topk, f"blocks.{L}.mlp.hook_expert_indices"]
        else:
            names.append(f"blocks.{L}.mlp.hook_expert_out")
        if info.shared:
            names.append(f"blocks.{L}.mlp.hook_shared_out")
    return names


def direct_logit_attribution(
    model: MoEModel,
    prompts: Any,
    tokens: Tokens = None,
    against: Tokens = None,
    *,
    chat: bool = True,
    batch_size: int | None = None,
) -> DLAResult:
    """DLA of ``mean logit(tokens) − mean logit(against)`` (default: refusal vs compliance first tokens).

    Experts are attributed per token from their routed contributions only (``hook_topk_expert_out`` with
    ``hook_expert_indices``, the sparse form of ``hook_expert_out``; the dense hook where the family has no
    sparse one). The final-norm scale is frozen at its value on the full residual.
    """
    direction = logit_direction(model, tokens, against)
    norm, U = final_norm(model), unembedding(model)
    with torch.no_grad():
        v = torch.tensor(direction.weights, dtype=torch.float32, device=U.W_U.device)
        d_vocab = U.W_U[:, list(direction.ids)].float() @ v  # [d_model], in float32 whatever the model dtype
        u = U.scale * norm.weight.to(d_vocab.device) * d_vocab
        u = u - u.mean() if norm.centered else u  # centre(c)·u == c·centre(u)
        b_U = U.b_U[list(direction.ids)].float()
        const_row = float(U.scale * (norm.bias.to(d_vocab.device) @ d_vocab + b_U @ v))
    last = f"blocks.{model.spec.n_layers - 1}.hook_resid_post"

    def read(logits: Tensor, cache: MoECache) -> tuple[Tensor, Tensor]:
        return norm.scale(cache[last])[..., 0].float(), direction.of(logits.float())

    return _attribute(model, prompts, chat, batch_size, u, read, None, const_row, direction)


def _attribute(
    model: MoEModel,
    prompts: Any,
    chat: bool,
    batch_size: int | None,
    u: Float[Tensor, " d_model"],
    read: Callable[[Tensor, MoECache], tuple[Tensor, Tensor]],
    upto: int | None,
    constant: float,
    direction: LogitDirection | ResidualDirection,
) -> DLAResult:
    """The batch loop both attributions share: cache :func:`_names`, split the read-out direction ``u`` over
    :func:`_components`; ``read(logits, cache)`` gives each batch's scale ``s`` and the quantity explained."""
    enc = _encode(model, prompts, chat)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    step = batch_size or ids.shape[0]
    parts: list[tuple[Tensor, Tensor]] = []
    labels: list[str] = []
    meta: list[tuple[str, int, int]] = []
    names = _names(model, upto=upto)
    for start in range(0, ids.shape[0], step):
        sl = slice(start, start + step)
        with torch.no_grad():
            logits, cache = model.run_with_cache(
                {"input_ids": ids[sl], "attention_mask": mask[sl]}, names=names, chat=chat
            )
        s, explained = read(logits, cache)
        vals, labels, meta = _components(model, cache.cache_dict, u, s, upto=upto)
        parts.append((vals, explained))
    return _result(model, parts, labels, meta, constant, direction, ids, mask)


def _result(
    model: MoEModel,
    parts: list[tuple[Tensor, Tensor]],
    labels: list[str],
    meta: list[tuple[str, int, int]],
    constant: float,
    direction: LogitDirection | ResidualDirection,
    ids: Tensor,
    mask: Tensor,
) -> DLAResult:
    """A :class:`DLAResult` from per-batch ``(values, read-out)`` parts."""
    read = torch.cat([p[1] for p in parts]).cpu()
    return DLAResult(
        values=torch.cat([p[0] for p in parts], dim=1).cpu(),
        labels=labels,
        kinds=[m[0] for m in meta],
        layers=[m[1] for m in meta],
        index=[m[2] for m in meta],
        constant=torch.full_like(read, constant),
        logit_diff=read,
        direction=direction,
        n_layers=model.spec.n_layers,
        n_heads=max((i.n_heads for i in model.layers if i.o is not None), default=0),
        n_experts=max((i.n_experts for i in model.layers), default=0),
        str_tokens=decode_tokens(model, ids),
        attention_mask=mask.cpu(),
    )


@dataclass(frozen=True)
class ResidualDirection:
    """A unit direction read at ``blocks.{layer}.hook_resid_pre`` (what :func:`direction_attribution` explains)."""

    vector: Float[Tensor, " d_model"]
    layer: int
    label: str


def direction_attribution(
    model: MoEModel,
    prompts: Any,
    direction: Float[Tensor, " d_model"],
    layer: int,
    *,
    label: str | None = None,
    chat: bool = True,
    batch_size: int | None = None,
) -> DLAResult:
    """Which components *write* a residual direction: the projection of ``blocks.{layer}.hook_resid_pre`` on
    ``r̂ = direction / |direction|``, split over the embedding and every head (attention bias, or attention
    output for linear attention), routed expert (per token, from its routed contribution), shared expert and
    dense MLP of the layers before ``layer``.

    The residual stream there is exactly their sum, so no norm is frozen: the attributions sum to the
    projection (held in ``logit_diff``; ``constant`` is zero). DLA asks what the unembedding reads; this asks
    who writes, e.g., a refusal direction before the layer it was taken at.
    """
    from moe_interp.interventions import check_vector

    L = model.check_layer(layer)
    r = check_vector(direction, model.spec.d_model, "direction").detach().float()
    if float(r.norm()) == 0.0:
        raise ValueError("direction is the zero vector; there is nothing to attribute.")
    r = r / r.norm()
    resid = f"blocks.{L}.hook_resid_pre"

    def read(logits: Tensor, cache: MoECache) -> tuple[Tensor, Tensor]:
        x = cache[resid].float()
        return x.new_ones(x.shape[:2]), x @ r.to(x.device)

    label = label or f"direction at {resid}"
    return _attribute(model, prompts, chat, batch_size, r, read, L, 0.0, ResidualDirection(r.cpu(), L, label))


def _components(
    model: MoEModel,
    cache: dict[str, Tensor],
    u: Float[Tensor, " d_model"],
    s: Float[Tensor, "batch pos"],
    upto: int | None = None,
) -> tuple[Float[Tensor, "component batch pos"], list[str], list[tuple[str, int, int]]]:
    """Each component's ``c · u / s`` with its hook-name label and (kind, layer, index); with ``upto``, only
    the embedding and the layers before ``upto``."""
    u = u.to(s.device)

    def proj(x: Tensor) -> Tensor:  # [b, p, ..., d] -> [..., b, p]
        y = x.float() @ u / s.reshape(*s.shape, *([1] * (x.ndim - 3)))
        return y.permute(*range(2, y.ndim), 0, 1)

    rows: list[Tensor] = [proj(cache["hook_embed"])[None]]
    labels, meta = ["hook_embed"], [("embed", -1, -1)]
    hf_layers = _module(model.hf_model, model.family.layers)
    for info in model.layers[:upto]:
        L = info.index
        if info.attn is not None and info.o is not None:  # (o is resolved only under an attention module)
            heads = proj(cache[f"blocks.{L}.attn.hook_result"])
            rows.append(heads)
            labels += [f"blocks.{L}.attn.hook_result[{h}]" for h in range(heads.shape[0])]
            meta += [("head", L, h) for h in range(heads.shape[0])]
            o_proj = _module(hf_layers, f"{L}.{info.attn}.{info.o}")
            b_O = getattr(o_proj, "bias", None)
            bias = (
                s.new_zeros(s.shape)
                if b_O is None
                else (b_O.detach().float() @ u) * info.residual_multiplier / s
            )
            rows.append(bias.reshape(1, *s.shape))
            labels.append(f"blocks.{L}.attn.b_O")
            meta.append(("attn_bias", L, -1))
        else:
            rows.append(proj(cache[f"blocks.{L}.hook_attn_out"])[None])
            labels.append(f"blocks.{L}.hook_attn_out")
            meta.append(("attn", L, -1))
        if not info.is_moe:
            rows.append(proj(cache[f"blocks.{L}.hook_mlp_out"])[None])
            labels.append(f"blocks.{L}.hook_mlp_out")
            meta.append(("mlp", L, -1))
            continue
        topk = cache.get(f"blocks.{L}.mlp.hook_topk_expert_out")
        if topk is not None:  # scatter each token's routed slots to their experts
            slots = proj(topk)  # [k, b, p]
            idx = cache[f"blocks.{L}.mlp.hook_expert_indices"].long().permute(2, 0, 1)
            experts = slots.new_zeros(info.n_experts, *s.shape).scatter_add_(0, idx, slots)
        else:
            experts = proj(cache[f"blocks.{L}.mlp.hook_expert_out"])
        rows.append(experts)
        labels += [f"blocks.{L}.mlp.experts.{e}.hook_out" for e in range(info.n_experts)]
        meta += [("expert", L, e) for e in range(info.n_experts)]
        if info.shared:
            rows.append(proj(cache[f"blocks.{L}.mlp.hook_shared_out"])[None])
            labels.append(f"blocks.{L}.mlp.hook_shared_out")
            meta.append(("shared", L, -1))
    return torch.cat(rows).detach(), labels, meta
