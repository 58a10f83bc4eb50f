"""Architecture of the planted-mechanism organisms: residual channels, per-plant wiring masks and a functional
forward pass of ``OlmoeForCausalLM`` with the interventions used in training.

The residual stream (``d_model = 64``) is split into channels by construction::

    T  0..35   token content: initialised with a 36-d PCA of the shipped organism's embeddings (trained)
    F  36..39  token features learnt from zero (read only by plant components)
    C  40      a constant (written by the embedding; a bias for routers and the decision read-out)
    SA 41..44  harm summary moved by mover A          SB 45..48  harm summary moved by mover B
    D  49      the refusal decision (the only channel the unembedding reads besides T and C)
    J  50..63  "junk": written and read only by the frozen, randomly initialised non-plant components

Every linear map is masked so that a component reads and writes only the channels its role allows
(:func:`build_masks`); masked entries are zero in the saved weights, so the shipped checkpoint is a plain
``OlmoeForCausalLM`` whose only path from the prompt to the first response token runs through the plant.
The unembedding has non-zero rows only for the response tokens (the others have logit 0), so training
computes the full-vocabulary softmax from those rows alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from transformers.models.olmoe.modeling_olmoe import OlmoeDecoderLayer, OlmoeForCausalLM

N_LAYERS, D_MODEL, N_HEADS, D_HEAD, N_EXPERTS, TOP_K, D_FF = 3, 64, 4, 16, 8, 2, 32
N_SUFFIX = 4  # post-instruction template tokens: <|end|> \n <|assistant|> \n

CH_T = list(range(0, 36))
CH_F = list(range(36, 40))
CH_TF = CH_T + CH_F
CH_C = [40]
CH_SA = list(range(41, 45))
CH_SB = list(range(45, 49))
CH_S = CH_SA + CH_SB
CH_D = [49]
CH_J = list(range(50, 64))

#: Role of each head / expert / router row: what it reads (q/k, v or input) and writes.
HEAD_ROLES = ("junk", "mover_a", "mover_b", "plant", "writer")
EXPERT_ROLES = ("junk", "decide", "constant")
ROUTER_ROLES = ("junk", "always", "harm")


@dataclass(frozen=True)
class Wiring:
    """Roles of the non-junk components: ``heads[(layer, head)]``, ``experts`` / ``routers[(layer, expert)]``."""

    heads: dict[tuple[int, int], str] = field(default_factory=dict)
    experts: dict[tuple[int, int], str] = field(default_factory=dict)
    routers: dict[tuple[int, int], str] = field(default_factory=dict)

    def head(self, layer: int, h: int) -> str:
        return self.heads.get((layer, h), "junk")

    def expert(self, layer: int, e: int) -> str:
        return self.experts.get((layer, e), "junk")

    def router(self, layer: int, e: int) -> str:
        return self.routers.get((layer, e), "junk")


def _sel(rows: list[int] | slice, cols: list[int], shape: tuple[int, int]) -> Tensor:
    m = torch.zeros(shape)
    r = torch.arange(shape[0])[rows] if isinstance(rows, slice) else torch.tensor(rows)
    m[r[:, None], torch.tensor(cols)[None, :]] = 1.0
    return m


def build_masks(w: Wiring, vocab: int, out_rows: list[int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(allowed, trainable)`` masks per parameter name of the HF model (1 = may be non-zero / is trained).

    Junk components are allowed their entries but frozen (they keep their random initialisation); norms and
    the C embedding column are frozen; plant components, the T and F embedding columns and the unembedding
    rows ``out_rows`` (reading T, C and D) are trained.
    """
    allowed: dict[str, Tensor] = {}
    train: dict[str, Tensor] = {}
    emb = torch.zeros(vocab, D_MODEL)
    emb[:, CH_TF + CH_C] = 1
    allowed["model.embed_tokens.weight"] = emb
    train["model.embed_tokens.weight"] = _sel(slice(None), CH_TF, (vocab, D_MODEL))
    lm = _sel(out_rows, CH_T + CH_C + CH_D, (vocab, D_MODEL))
    allowed["lm_head.weight"], train["lm_head.weight"] = lm, lm
    read_junk = CH_T + CH_C + CH_J
    for L in range(N_LAYERS):
        p = f"model.layers.{L}."
        q = torch.zeros(N_HEADS * D_HEAD, D_MODEL)
        k, v, o = q.clone(), q.clone(), torch.zeros(D_MODEL, N_HEADS * D_HEAD)
        tq, tv, to = q.clone(), q.clone(), o.clone()
        for h in range(N_HEADS):
            rows = slice(h * D_HEAD, (h + 1) * D_HEAD)
            role = w.head(L, h)
            if role == "junk":
                q[rows, read_junk] = k[rows, read_junk] = v[rows, read_junk] = 1
                o[CH_J, rows] = 1
                continue
            q[rows, CH_TF + CH_C] = k[rows, CH_TF + CH_C] = 1
            tq[rows, CH_TF + CH_C] = 1
            vcols = CH_TF[h * 10 : (h + 1) * 10] if role == "writer" else CH_TF
            v[rows, vcols] = tv[rows, vcols] = 1
            out = {"mover_a": CH_SA, "mover_b": CH_SB}.get(role, CH_D)
            o[out, rows] = to[out, rows] = 1
        for n, a, t in (("q_proj", q, tq), ("k_proj", k, tq), ("v_proj", v, tv), ("o_proj", o, to)):
            allowed[f"{p}self_attn.{n}.weight"], train[f"{p}self_attn.{n}.weight"] = a, t
        gu = torch.zeros(N_EXPERTS, 2 * D_FF, D_MODEL)
        dn = torch.zeros(N_EXPERTS, D_MODEL, D_FF)
        tgu, tdn = gu.clone(), dn.clone()
        r, tr = torch.zeros(N_EXPERTS, D_MODEL), torch.zeros(N_EXPERTS, D_MODEL)
        for e in range(N_EXPERTS):
            role = w.expert(L, e)
            if role == "junk":
                gu[e][:, read_junk] = 1
                dn[e][CH_J] = 1
            else:
                cols = CH_S + CH_C if role == "decide" else CH_C
                gu[e][:, cols] = tgu[e][:, cols] = 1
                dn[e][CH_D] = tdn[e][CH_D] = 1
            rrole = w.router(L, e)
            cols = {"junk": read_junk, "always": CH_C, "harm": CH_S + CH_C}[rrole]
            r[e, cols] = 1
            if rrole != "junk":
                tr[e, cols] = 1
        allowed[f"{p}mlp.experts.gate_up_proj"], train[f"{p}mlp.experts.gate_up_proj"] = gu, tgu
        allowed[f"{p}mlp.experts.down_proj"], train[f"{p}mlp.experts.down_proj"] = dn, tdn
        allowed[f"{p}mlp.gate.weight"], train[f"{p}mlp.gate.weight"] = r, tr
    return allowed, train


def apply_masks(model: torch.nn.Module, allowed: dict[str, Tensor]) -> None:
    """Zero every entry a role does not allow (in place)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in allowed.items():
            params[name].mul_(m)


def _layers(model: OlmoeForCausalLM) -> list[OlmoeDecoderLayer]:
    """The decoder layers, typed (``nn.ModuleList`` yields plain modules)."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeDecoderLayer

    layers: list[OlmoeDecoderLayer] = []
    for layer in model.model.layers:
        assert isinstance(layer, OlmoeDecoderLayer)
        layers.append(layer)
    return layers


def init_weights(
    model: OlmoeForCausalLM, w: Wiring, token_basis: Float[Tensor, "vocab 36"], gen: torch.Generator
) -> None:
    """Embedding = ``[T | F=0 | C=1 | 0]``, norms = 1, other weights ~ N(0, 1/fan_in), unembedding 0."""
    with torch.no_grad():
        emb = torch.zeros(token_basis.shape[0], D_MODEL)
        emb[:, CH_T] = token_basis
        emb[:, CH_C] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "lm_head.weight":
                p.zero_()
            elif name != "model.embed_tokens.weight":
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        for L in range(N_LAYERS):
            gate = _layers(model)[L].mlp.gate.weight
            for e in range(N_EXPERTS):
                if w.router(L, e) == "always":
                    gate[e, CH_C] = 4.0
                elif w.router(L, e) == "harm":
                    gate[e, CH_C] = 0.0


# ------------------------------------------------------------------------------------ functional forward
@dataclass
class Edits:
    """Training-time interventions (per example), applied inside :func:`forward`.

    ``swap_heads[(layer, head)] = src``: at the suffix positions, example ``i`` takes head ``(layer, head)``'s
    ``z`` from example ``src[i]`` (``-1``: unchanged). ``drop_expert = (layer, expert, rows)``: the expert's
    routing weight is zeroed at every position of the rows flagged. ``zero_heads[(layer, head)] = rows``:
    ``z`` zeroed at the suffix positions. ``zero_channel = (layer, channels, rows)``: those channels of
    ``resid_pre`` of ``layer`` zeroed at every position (directional ablation of an axis direction).
    """

    swap_heads: dict[tuple[int, int], Int[Tensor, " batch"]] = field(default_factory=dict)
    zero_heads: dict[tuple[int, int], Bool[Tensor, " batch"]] = field(default_factory=dict)
    drop_expert: tuple[int, int, Bool[Tensor, " batch"]] | None = None
    zero_channel: tuple[int, list[int], Bool[Tensor, " batch"]] | None = None


def _rms(x: Tensor, g: Tensor, eps: float = 1e-5) -> Tensor:
    return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def forward(
    model: OlmoeForCausalLM,
    ids: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"],
    n_prompt: int,
    edits: Edits | None = None,
    live: frozenset[tuple[int, int]] = frozenset(),
    logit_cols: slice | None = None,
    logit_rows: list[int] | None = None,
) -> tuple[Float[Tensor, "batch n_cols n_rows"], list[Float[Tensor, "batch pos n_experts"]]]:
    """Logits (columns ``logit_cols`` of the sequence, vocabulary rows ``logit_rows``; default all) and router
    logits per layer; equal to the HF forward when ``edits`` is None.

    The prompt occupies columns ``[0, n_prompt)`` (left padded), so its suffix is ``n_prompt-4 .. n_prompt-1``.
    Only the experts in ``live`` (``(layer, expert)``) pass gradients; the others are computed without.
    """
    ed = edits or Edits()
    m = model.model
    B, P = ids.shape
    pos_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D_HEAD, 2, dtype=torch.float32) / D_HEAD))
    fr = pos_ids[..., None].float() * inv
    emb = torch.cat((fr, fr), -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, P, dh]
    causal = torch.ones(P, P, dtype=torch.bool).tril()
    allow = causal[None] & mask.bool()[:, None, :]
    allow = allow | torch.eye(P, dtype=torch.bool)[None]
    bias = torch.zeros(B, 1, P, P).masked_fill(~allow[:, None], float("-inf"))
    suffix = list(range(n_prompt - N_SUFFIX, n_prompt))
    h = m.embed_tokens(ids)
    routers = []
    for L, layer in enumerate(_layers(model)):
        if ed.zero_channel is not None and ed.zero_channel[0] == L:
            keep = torch.ones(B, 1, D_MODEL)
            rows = ed.zero_channel[2].nonzero().flatten()
            keep[rows[:, None], 0, torch.tensor(ed.zero_channel[1])[None, :]] = 0.0
            h = h * keep
        att = layer.self_attn
        x = _rms(h, layer.input_layernorm.weight)
        q = (
            _rms(F.linear(x, att.q_proj.weight), att.q_norm.weight)
            .view(B, P, N_HEADS, D_HEAD)
            .transpose(1, 2)
        )
        k = (
            _rms(F.linear(x, att.k_proj.weight), att.k_norm.weight)
            .view(B, P, N_HEADS, D_HEAD)
            .transpose(1, 2)
        )
        v = F.linear(x, att.v_proj.weight).view(B, P, N_HEADS, D_HEAD).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        att_w = (q @ k.transpose(-1, -2) * D_HEAD**-0.5 + bias).softmax(-1)
        z = (att_w @ v).transpose(1, 2)  # [B, P, H, dh]
        for (Lh, hd), src in ed.swap_heads.items():
            if Lh == L:
                rows = (src >= 0).nonzero().flatten()
                if len(rows):
                    z = z.clone()
                    z[rows[:, None], torch.tensor(suffix)[None, :], hd] = z[src[rows]][:, suffix, hd]
        for (Lh, hd), flag in ed.zero_heads.items():
            if Lh == L and flag.any():
                z = z.clone()
                z[flag.nonzero().flatten()[:, None], torch.tensor(suffix)[None, :], hd] = 0.0
        h = h + F.linear(z.reshape(B, P, -1), att.o_proj.weight)
        x = _rms(h, layer.post_attention_layernorm.weight)
        moe = layer.mlp
        logits_r = F.linear(x, moe.gate.weight)
        routers.append(logits_r)
        probs = logits_r.float().softmax(-1)
        top, idx = probs.topk(TOP_K, dim=-1)
        wts = torch.zeros_like(probs).scatter(-1, idx, top)
        if ed.drop_expert is not None and ed.drop_expert[0] == L:
            keep = torch.ones_like(wts)
            keep[ed.drop_expert[2], :, ed.drop_expert[1]] = 0.0
            wts = wts * keep
        mine = [e for (Le, e) in live if Le == L]
        y = torch.zeros_like(h)
        with torch.no_grad():
            xd, wd = x.detach().reshape(B * P, D_MODEL), wts.detach().reshape(B * P, N_EXPERTS)
            yd = torch.zeros_like(xd)
            for e in range(N_EXPERTS):
                rows = (wd[:, e] > 0).nonzero().flatten()
                if e in mine or not len(rows):
                    continue
                g, u = F.linear(xd[rows], moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
                yd.index_add_(
                    0, rows, wd[rows, e : e + 1] * F.linear(F.silu(g) * u, moe.experts.down_proj[e])
                )
            y = y + yd.view(B, P, D_MODEL)
        for e in mine:
            g, u = F.linear(x, moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = y + wts[..., e : e + 1] * F.linear(F.silu(g) * u, moe.experts.down_proj[e])
        h = h + y
    if logit_cols is not None:
        h = h[:, logit_cols]
    h = _rms(h, m.norm.weight)
    W = model.lm_head.weight if logit_rows is None else model.lm_head.weight[logit_rows]
    return F.linear(h, W), routers
