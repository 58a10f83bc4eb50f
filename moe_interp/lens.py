"""The model's read-out as data (final norm, unembedding) and the logit lens.

The final norm of every supported family is elementwise: ``y = centre(x) / s(x) * w + b`` with
``s(x) = sqrt(mean(centre(x)^2) + eps)`` and ``centre`` the mean subtraction of LayerNorm (identity for
RMSNorm). :func:`final_norm` finds ``centre``, ``w`` and ``b`` by probing the norm module itself (so a
zero-centred ``(1 + w)`` RMSNorm or a LayerNorm with bias needs no special case and no family name), and
checks the fit. The unembedding is the HF output embedding times the output logit scale, measured once
per model on a short calibration forward (Granite divides its logits by ``logits_scaling``).

With the scale ``s`` of the full residual frozen, the read-out is linear: a residual component ``c``
contributes ``centre(c) / s * w @ W_U * scale`` to the logits. This is what direct logit attribution
(:mod:`moe_interp.dla`) and the expert lens use.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

if TYPE_CHECKING:
    from moe_interp.model import MoECache, MoEModel

__all__ = [
    "FinalNorm",
    "LogitLensResult",
    "decode_tokens",
    "Unembed",
    "final_norm",
    "lens_from_cache",
    "logit_lens",
    "token_ids",
    "unembedding",
]

_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)  # dotted path; a ModuleList's children are named "0", "1", ...


@dataclass(frozen=True)
class FinalNorm:
    """The final norm as ``y = centre(x) / s(x) * weight + bias`` (fitted to the module, see :func:`final_norm`)."""

    module: nn.Module
    centered: bool
    eps: float
    weight: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"]

    def center(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Subtract the mean over d_model (LayerNorm); identity for RMSNorm."""
        return x - x.mean(-1, keepdim=True) if self.centered else x

    def scale(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
        """``s(x)``: the norm's divisor computed on the full residual ``resid`` (at least float32)."""
        x = self.center(resid.to(torch.promote_types(resid.dtype, torch.float32)))
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def normalize(
        self, stack: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"]
    ) -> Float[Tensor, "... d_model"]:
        """``centre(stack) / scale``: TransformerLens' ``apply_ln_to_stack`` (no weight, no bias)."""
        return self.center(stack.to(scale.dtype)) / scale

    def __call__(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The real module (statistics recomputed from ``x``)."""
        return self.module(x)


def final_norm(model: MoEModel) -> FinalNorm:
    """Probe the final norm module of ``model`` (``FamilySpec.final_norm``) and return its affine form.

    ``bias = N(0)``; centring is detected by ``N(x + 5) == N(x)``; ``weight`` is the least-squares fit of
    ``N(x) - bias`` on ``centre(x) / s(x)`` over random probes, and the fit must reproduce the module to
    rounding, else ``NotImplementedError`` (a norm that is not elementwise-affine after scaling).
    """
    mod = _module(model.hf_model, model.family.final_norm)
    p = next(mod.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    d = model.spec.d_model
    eps_attr = next((a for a in _EPS_ATTRS if isinstance(getattr(mod, a, None), int | float)), None)
    if eps_attr is None:
        raise NotImplementedError(
            f"Final norm {type(mod).__name__} has no epsilon attribute ({', '.join(_EPS_ATTRS)})."
        )
    eps = float(getattr(mod, eps_attr))
    if dtype not in (
        torch.float32,
        torch.float64,
    ):  # probe half-precision norms with fp32 copies of their weights
        dtype = torch.float32
        params = {k: v.to(dtype) for k, v in [*mod.named_parameters(), *mod.named_buffers()]}

        def run(t: Tensor) -> Tensor:
            return torch.func.functional_call(mod, params, (t,))
    else:
        run = mod
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, d, generator=gen, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    with torch.no_grad():
        y = run(x).double()
        shifted = run(x + 5).double()
        bias = run(torch.zeros(1, d, device=device, dtype=dtype)).double()[0]
    tol = max(64 * torch.finfo(dtype).eps, 1e-6) * (1 + float(y.abs().max()))
    centered = float((shifted - y).abs().max()) <= max(tol, 1e-3 * (1 + float(y.abs().max())))
    xd = x.double()
    xc = xd - xd.mean(-1, keepdim=True) if centered else xd
    xhat = xc / (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    weight = ((y - bias) * xhat).sum(0) / xhat.pow(2).sum(0).clamp_min(1e-30)
    err = float((xhat * weight + bias - y).abs().max())
    if not math.isfinite(err) or err > tol:
        raise NotImplementedError(
            f"Final norm {type(mod).__name__} is not of the form centre(x)/s(x)*w+b (fit error {err:.2e})."
        )
    return FinalNorm(mod, centered, eps, weight.float().to(device), bias.float().to(device))


@dataclass(frozen=True)
class Unembed:
    """Logits as ``scale * (y @ W_U + b_U)`` of the final-norm output ``y``."""

    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"]
    scale: float

    def __call__(self, y: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        return self.scale * (y.to(self.W_U.dtype) @ self.W_U + self.b_U)


_SCALES: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def unembedding(model: MoEModel) -> Unembed:
    """The model's unembedding (``get_output_embeddings()``) with its output logit scale.

    The scale is measured once per model: the least-squares ratio of the model's logits to
    ``lm_head(ln_final.hook_normalized)`` on a short calibration input; it must explain the logits to rounding.
    """
    head = model.hf_model.get_output_embeddings()
    W_U = head.weight.T
    b = getattr(head, "bias", None)
    b_U = b if b is not None else torch.zeros(W_U.shape[1], device=W_U.device, dtype=W_U.dtype)
    if model not in _SCALES:
        n = min(8, model.spec.vocab_size)
        ids = torch.arange(n, device=model.device)[None]
        with torch.no_grad():
            logits, cache = model.run_with_cache(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                names=["ln_final.hook_normalized"],
                chat=False,
            )
            raw = (cache["ln_final.hook_normalized"].to(W_U.dtype) @ W_U + b_U).double()
        logits = logits.double()
        scale = float((logits * raw).sum() / (raw * raw).sum().clamp_min(1e-30))
        err = float((scale * raw - logits).abs().max())
        tol = max(64 * torch.finfo(W_U.dtype).eps, 1e-6) * (1 + float(logits.abs().max()))
        if not math.isfinite(err) or err > tol:
            raise NotImplementedError(
                f"The logits are not a scaled linear read-out of ln_final.hook_normalized (error {err:.2e}); "
                "soft-capped or otherwise transformed logits are not supported."
            )
        _SCALES[model] = scale
    return Unembed(W_U, b_U, _SCALES[model])


def token_ids(model: MoEModel, tokens: int | str | Sequence[int | str] | Tensor) -> list[int]:
    """Token ids from ids or strings (each string must be one token; no special tokens added)."""
    if isinstance(tokens, Tensor):
        tokens = tokens.reshape(-1).tolist()
    if isinstance(tokens, int | str):
        tokens = [tokens]
    out: list[int] = []
    for t in tokens:
        if isinstance(t, str):
            ids = model.tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{t!r} is {len(ids)} tokens, not one: pass token ids instead.")
            t = ids[0]
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.spec.vocab_size:
            raise ValueError(f"Token ids must be ints in [0, {model.spec.vocab_size}), got {t!r}.")
        out.append(int(t))
    if not out:
        raise ValueError("No tokens given.")
    return out


@dataclass
class LogitLensResult:
    """Logit lens: the final norm and unembedding applied to each layer's residual stream.

    ``logits[i]`` reads ``labels[i]`` (``blocks.0.hook_resid_pre``, then each layer's ``hook_resid_post``;
    the last row is the model's own logits). ``expert_logits[L, e]`` is expert ``e``'s direct effect on the
    token logits through the frozen final-norm scale (NaN for dense layers), when asked for.
    """

    logits: Float[Tensor, "layer batch pos n_tokens"]
    logprobs: Float[Tensor, "layer batch pos n_tokens"]
    ranks: Int[Tensor, "layer batch pos n_tokens"]
    labels: list[str]
    tokens: list[int]
    token_strs: list[str]
    str_tokens: list[list[str]]
    attention_mask: Int[Tensor, "batch pos"]
    expert_logits: Float[Tensor, "layer expert batch pos n_tokens"] | None = None
    expert_labels: list[list[str]] = field(default_factory=list)

    def final_layer(self, token: int = 0, batch: int = 0, pos: int = -1) -> int:
        """The first layer row from which ``token`` stays the top-1 token at (batch, pos), or -1."""
        top = self.ranks[:, batch, pos, token] == 0
        for i in range(len(top)):
            if bool(top[i:].all()):
                return i
        return -1


def decode_tokens(model: MoEModel, ids: Int[Tensor, "batch pos"]) -> list[list[str]]:
    """Each token of each row decoded on its own (readable text, special tokens kept)."""
    return [[model.tokenizer.decode([t]) for t in row] for row in ids.tolist()]


def lens_from_cache(
    model: MoEModel,
    cache: MoECache,
    tokens: int | str | Sequence[int | str],
    *,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> LogitLensResult:
    """Logit lens of a cache holding every ``hook_resid_post`` and ``blocks.0.hook_resid_pre`` (and, for the
    expert lens, ``hook_expert_out`` of the MoE layers)."""
    ids = token_ids(model, tokens)
    norm, U = final_norm(model), unembedding(model)
    n = model.spec.n_layers
    labels = ["blocks.0.hook_resid_pre"] + [f"blocks.{L}.hook_resid_post" for L in range(n)]
    missing = [h for h in labels if h not in cache.cache_dict]
    if missing:
        raise KeyError(f"The logit lens needs {missing[0]} (and {len(missing) - 1} more) in the cache.")
    rows_logits, rows_lp, rows_rank = [], [], []
    with torch.no_grad():
        for h in labels:
            full = U(norm(cache[h])).float()
            sel = full[..., ids]
            rows_logits.append(sel)
            rows_lp.append(torch.log_softmax(full, -1)[..., ids])
            rows_rank.append((full[..., None, :] > sel[..., None]).sum(-1))
        expert_logits: Tensor | None = None
        expert_labels: list[list[str]] = []
        if any(f"blocks.{L}.mlp.hook_expert_out" in cache.cache_dict for L in model.spec.moe_layers):
            expert_logits, expert_labels = _expert_lens(model, cache, ids, norm, U)
    x = cache[labels[1]]
    mask = attention_mask if attention_mask is not None else torch.ones(x.shape[:2], dtype=torch.long)
    return LogitLensResult(
        logits=torch.stack(rows_logits),
        logprobs=torch.stack(rows_lp),
        ranks=torch.stack(rows_rank),
        labels=labels,
        tokens=ids,
        token_strs=[model.tokenizer.decode([i]) for i in ids],
        str_tokens=decode_tokens(model, input_ids) if input_ids is not None else [],
        attention_mask=mask,
        expert_logits=expert_logits,
        expert_labels=expert_labels,
    )


def _expert_lens(
    model: MoEModel, cache: MoECache, ids: list[int], norm: FinalNorm, U: Unembed
) -> tuple[Tensor, list[list[str]]]:
    n, E = model.spec.n_layers, max((i.n_experts for i in model.layers), default=0)
    s = norm.scale(cache[f"blocks.{n - 1}.hook_resid_post"])
    dirs = U.scale * norm.weight[:, None].to(U.W_U.device) * U.W_U[:, ids].float()  # [d, n_tok]
    x = cache[f"blocks.{n - 1}.hook_resid_post"]
    out = torch.full((n, E, *x.shape[:2], len(ids)), float("nan"))
    labels: list[list[str]] = []
    for info in model.layers:
        name = f"blocks.{info.index}.mlp.hook_expert_out"
        labels.append([f"blocks.{info.index}.mlp.experts.{e}.hook_out" for e in range(info.n_experts)])
        if name not in cache.cache_dict:
            continue
        eo = norm.normalize(cache[name], s[:, :, None])  # [b, p, E, d]
        out[info.index, : info.n_experts] = torch.einsum("bped,dt->ebpt", eo.float(), dirs).cpu()
    return out, labels


def logit_lens(
    model: MoEModel,
    prompts: Any,
    tokens: int | str | Sequence[int | str],
    *,
    experts: bool = False,
    chat: bool = True,
) -> LogitLensResult:
    """Run ``prompts`` and read ``tokens`` off every layer's residual stream (and, with ``experts=True``,
    off every routed expert's output through the frozen final-norm scale)."""
    n = model.spec.n_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{L}.hook_resid_post" for L in range(n)]
    if experts:
        names += [f"blocks.{L}.mlp.hook_expert_out" for L in model.spec.moe_layers]
    enc = _encode(model, prompts, chat)
    with torch.no_grad():
        _, cache = model.run_with_cache(enc, names=names, chat=chat, return_type=None)
    return lens_from_cache(
        model, cache, tokens, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
    )


def _encode(model: MoEModel, prompts: Any, chat: bool) -> dict[str, Tensor]:
    """Prompts → ``{"input_ids", "attention_mask"}`` (a dict or BatchEncoding passes through)."""
    if isinstance(prompts, dict) or hasattr(prompts, "keys"):
        ids = prompts["input_ids"]
        mask = prompts.get("attention_mask")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}
    enc = model.tokenize(prompts, chat=chat)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
