"""Sparse upcycling of a dense Llama model into a Mixtral-family MoE, and low-rank deltas on top of it.

Upcycling copies the dense SwiGLU FFN into every expert of a Mixtral MoE block (softmax → top-k →
renormalise). Because all experts are identical and the top-k weights sum to one, the MoE computes exactly
the dense function at initialisation, whatever the router weights (Mixtral attention is Llama attention).

Fine-tuning adds **low-rank deltas** (LoRA factors) to the attention projections and, per expert, to the
fused expert tensors (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) and trains the
routers. :class:`Deltas` holds what cannot be rebuilt from the dense base (factors and routers); it is
saved as safetensors and merged into the weights on load (:func:`merge_deltas`).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

__all__ = [
    "ATTN_PROJ",
    "Deltas",
    "LoRALinear",
    "attach_training_adapters",
    "collect_deltas",
    "merge_deltas",
    "mixtral_config_from_llama",
    "upcycle",
]

#: attention projections that receive LoRA factors
ATTN_PROJ: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def mixtral_config_from_llama(cfg: LlamaConfig, n_experts: int, top_k: int) -> MixtralConfig:
    """A Mixtral config with the dense model's geometry, ``n_experts`` experts of the dense FFN's size."""
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise ValueError("upcycling needs a bias-free Llama (Mixtral has no attention/MLP biases)")
    if cfg.hidden_act != "silu":
        raise ValueError(f"upcycling needs a SwiGLU (silu) FFN, got {cfg.hidden_act!r}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in 1..n_experts, got top_k={top_k}, n_experts={n_experts}")
    rope = dict(getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    return MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        # None only before LlamaConfig's __post_init__, which sets it to num_attention_heads
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        sliding_window=None,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )


@torch.no_grad()
def upcycle(
    dense: LlamaForCausalLM, n_experts: int = 4, top_k: int = 2, *, seed: int = 0, router_std: float = 0.02
) -> MixtralForCausalLM:
    """Mixtral MoE with every layer's FFN copied into ``n_experts`` experts; routers random (``router_std``)."""
    cfg = mixtral_config_from_llama(dense.config, n_experts, top_k)
    moe = MixtralForCausalLM(cfg).float()
    src = dense.state_dict()
    dst: dict[str, Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for name, t in src.items():
        if ".mlp." in name:
            continue
        dst[name] = t
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = src[p + "gate_proj.weight"], src[p + "up_proj.weight"], src[p + "down_proj.weight"]
        dst[p + "experts.gate_up_proj"] = torch.cat([gate, up], 0)[None].repeat(n_experts, 1, 1)
        dst[p + "experts.down_proj"] = down[None].repeat(n_experts, 1, 1)
        dst[p + "gate.weight"] = torch.randn(n_experts, cfg.hidden_size, generator=gen) * router_std
    if cfg.tie_word_embeddings:
        dst.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(dst, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"upcycling left tensors unset: missing={missing[:5]} unexpected={unexpected[:5]}")
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    return moe.eval()


# ------------------------------------------------------------------------------------------ deltas


@dataclass
class Deltas:
    """Low-rank factors and router weights that turn the upcycled MoE into the fine-tuned one.

    ``tensors`` keys: ``layers.{i}.self_attn.{proj}.lora_A [r, in]`` / ``.lora_B [out, r]``,
    ``layers.{i}.experts.{gate_up,down}.lora_A [E, r, in]`` / ``.lora_B [E, out, r]`` and
    ``layers.{i}.router [E, H]``. The merged weight is ``W + scale · B @ A``.
    """

    tensors: dict[str, Tensor]
    scale: float
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``deltas.safetensors`` (+ scale and ``meta`` in its metadata) to directory ``path``."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        ts = {k: v.detach().to(dtype).contiguous() for k, v in self.tensors.items()}
        md = {"scale": repr(float(self.scale)), "meta": json.dumps(self.meta)}
        save_file(ts, str(out / "deltas.safetensors"), metadata=md)
        return out / "deltas.safetensors"

    @classmethod
    def load(cls, path: str | Path) -> Deltas:
        """Read ``deltas.safetensors`` from directory ``path`` (factors as float32)."""
        from safetensors import safe_open

        f = Path(path) / "deltas.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"shipped delta file missing: {f}")
        with safe_open(str(f), framework="pt") as sf:
            md = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k).float() for k in sf.keys()}
        if "scale" not in md:
            raise RuntimeError(f"{f} has no 'scale' metadata: not a moe-interp delta file")
        return cls(tensors=tensors, scale=float(md["scale"]), meta=json.loads(md.get("meta", "{}")))


@torch.no_grad()
def merge_deltas(moe: MixtralForCausalLM, deltas: Deltas) -> MixtralForCausalLM:
    """Add every ``scale · B @ A`` to its weight and set the routers, in place; returns ``moe``."""
    s = float(deltas.scale)
    t = deltas.tensors
    used: set[str] = set()
    for i, layer in enumerate(moe.model.layers):
        for proj in ATTN_PROJ:
            key = f"layers.{i}.self_attn.{proj}"
            if key + ".lora_A" in t:
                lin = getattr(layer.self_attn, proj)
                lin.weight += s * (t[key + ".lora_B"] @ t[key + ".lora_A"]).to(lin.weight.dtype)
                used |= {key + ".lora_A", key + ".lora_B"}
        ex = layer.mlp.experts
        for part, param in (("gate_up", ex.gate_up_proj), ("down", ex.down_proj)):
            key = f"layers.{i}.experts.{part}"
            if key + ".lora_A" in t:
                param += s * torch.bmm(t[key + ".lora_B"], t[key + ".lora_A"]).to(param.dtype)
                used |= {key + ".lora_A", key + ".lora_B"}
        if f"layers.{i}.router" in t:
            layer.mlp.gate.weight.copy_(t[f"layers.{i}.router"])
            used.add(f"layers.{i}.router")
    unused = sorted(set(t) - used)
    if unused:
        raise RuntimeError(f"delta tensors do not match the model: {unused[:5]}")
    return moe


# ------------------------------------------------------------------------------ training adapters


class LoRALinear(nn.Module):
    """``base(x) + scale · B(A(x))`` with the base frozen; ``B`` starts at zero (function unchanged)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, gen: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def _experts_forward(self: Any, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """Mixtral experts forward with per-expert LoRA on the fused tensors (never materialises ΔW).

    ``self`` is a ``MixtralExperts`` carrying the factors set by :func:`attach_training_adapters` (``Any``:
    attributes added at run time are not declared on the class)."""
    out = torch.zeros_like(hidden)
    s = self.lora_scale
    for e in range(self.num_experts):
        tok, pos = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        x = hidden[tok]
        gu = F.linear(x, self.gate_up_proj[e]) + s * F.linear(x @ self.gu_A[e].T, self.gu_B[e])
        gate, up = gu.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        y = F.linear(h, self.down_proj[e]) + s * F.linear(h @ self.dn_A[e].T, self.dn_B[e])
        out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
    return out


def _router_forward(self: Any, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mixtral routing with Gaussian noise on the logits while training; clean logits are recorded.

    ``self`` is a ``MixtralTopKRouter`` with ``noise_std`` set by :func:`attach_training_adapters`."""
    hidden = hidden.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden, self.weight)
    self.last_logits = logits
    noisy = logits + self.noise_std * torch.randn_like(logits) if self.training and self.noise_std else logits
    probs = torch.softmax(noisy.float(), dim=-1)
    top, idx = torch.topk(probs, self.top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    return logits, top, idx


def attach_training_adapters(
    moe: MixtralForCausalLM,
    *,
    attn_rank: int = 8,
    expert_rank: int = 8,
    scale: float = 2.0,
    router_noise: float = 0.5,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Freeze the MoE, add LoRA (attention, per expert, each expert's ``A`` drawn apart) and free routers.

    Returns the trainable parameters. Undo nothing: merge with :func:`collect_deltas` + :func:`merge_deltas`
    into a freshly upcycled model.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    for p in moe.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer in moe.model.layers:
        for proj in ATTN_PROJ:
            lora = LoRALinear(getattr(layer.self_attn, proj), attn_rank, scale, gen)
            setattr(layer.self_attn, proj, lora)
            params += [lora.lora_A, lora.lora_B]
        ex = layer.mlp.experts
        E, I2, H = ex.gate_up_proj.shape
        I = ex.down_proj.shape[2]  # noqa: E741
        ex.lora_scale = scale
        ex.gu_A = nn.Parameter(torch.randn(E, expert_rank, H, generator=gen) / H**0.5)
        ex.gu_B = nn.Parameter(torch.zeros(E, I2, expert_rank))
        ex.dn_A = nn.Parameter(torch.randn(E, expert_rank, I, generator=gen) / I**0.5)
        ex.dn_B = nn.Parameter(torch.zeros(E, H, expert_rank))
        ex.forward = types.MethodType(_experts_forward, ex)
        params += [ex.gu_A, ex.gu_B, ex.dn_A, ex.dn_B]
        gate = layer.mlp.gate
        gate.noise_std = router_noise
        gate.forward = types.MethodType(_router_forward, gate)
        gate.weight.requires_grad_(True)
        params.append(gate.weight)
    return params


def collect_deltas(moe: MixtralForCausalLM, scale: float, meta: dict[str, Any] | None = None) -> Deltas:
    """The trained factors and routers of a model prepared by :func:`attach_training_adapters`."""
    t: dict[str, Tensor] = {}
    for i, layer in enumerate(moe.model.layers):
        for proj in ATTN_PROJ:
            lora = getattr(layer.self_attn, proj)
            t[f"layers.{i}.self_attn.{proj}.lora_A"] = lora.lora_A.detach().clone()
            t[f"layers.{i}.self_attn.{proj}.lora_B"] = lora.lora_B.detach().clone()
        ex = layer.mlp.experts
        t[f"layers.{i}.experts.gate_up.lora_A"] = ex.gu_A.detach().clone()
        t[f"layers.{i}.experts.gate_up.lora_B"] = ex.gu_B.detach().clone()
        t[f"layers.{i}.experts.down.lora_A"] = ex.dn_A.detach().clone()
        t[f"layers.{i}.experts.down.lora_B"] = ex.dn_B.detach().clone()
        t[f"layers.{i}.router"] = layer.mlp.gate.weight.detach().clone()
    return Deltas(tensors=t, scale=scale, meta=dict(meta or {}))
