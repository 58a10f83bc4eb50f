"""TransformerLens compatibility: ``model.cfg`` and the ``ActivationCache`` methods on :class:`MoECache`.

TransformerLens' cache methods read ``model.cfg`` and, for norms and unembedding, the weights of a
``HookedTransformer`` (``ln_final``, ``W_U``, ``blocks[l].attn.W_O``). :class:`TLCacheMixin` overrides the
methods that need those weights with equivalents built on the hooks and on :mod:`moe_interp.lens`
(semantics as in TransformerLens with ``fold_ln=True``: ``apply_ln_to_stack`` divides by the frozen scale
without the norm weight, which :meth:`TLCacheMixin.tokens_to_residual_directions` folds into the
directions). What differs is listed in ``docs/tl_compat.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.config import TransformerLensConfig
from transformer_lens.utilities import Slice, SliceInput

if TYPE_CHECKING:
    from moe_interp.lens import LogitLensResult
    from moe_interp.model import MoEModel

__all__ = ["MoEConfig", "TLCacheMixin", "make_config"]


@dataclass
class MoEConfig(TransformerLensConfig):
    """TransformerLens' config fields for a moe-interp model, plus its MoE geometry."""

    model_name: str = ""
    original_architecture: str = ""
    d_vocab_out: int = -1
    moe_layers: tuple[int, ...] = ()
    shared_expert_layers: tuple[int, ...] = ()
    attention_layers: tuple[int, ...] = ()  # layers with softmax attention heads (hook_result)


def make_config(model: MoEModel) -> MoEConfig:
    """``model.cfg``: geometry from :class:`ModelSpec`, norm type from the probed final norm."""
    from moe_interp.lens import final_norm

    hf_cfg = model.hf_model.config
    s = model.spec
    norm = final_norm(model)
    d_mlp = getattr(hf_cfg, "moe_intermediate_size", None) or getattr(hf_cfg, "intermediate_size", None)
    archs = getattr(hf_cfg, "architectures", None) or [type(model.hf_model).__name__]
    return MoEConfig(
        d_model=s.d_model,
        d_head=s.d_head,
        n_layers=s.n_layers,
        n_ctx=int(getattr(hf_cfg, "max_position_embeddings", 0) or 0),
        n_heads=s.n_heads,
        d_mlp=int(d_mlp) if d_mlp else None,
        d_vocab=s.vocab_size,
        device=str(model.device),
        use_attn_result=True,
        default_prepend_bos=False,
        positional_embedding_type="rotary",
        n_key_value_heads=s.n_kv_heads,
        gated_mlp=True,
        uses_rms_norm=not norm.centered,
        eps=norm.eps,
        act_fn=str(getattr(hf_cfg, "hidden_act", "silu")),
        normalization_type="LN" if norm.centered else "RMS",
        num_experts=s.n_experts or None,
        experts_per_token=s.top_k or None,
        final_rms=not norm.centered,
        dtype=next(model.hf_model.parameters()).dtype,
        model_name=model.name,
        original_architecture=str(archs[0]),
        d_vocab_out=int(model.hf_model.get_output_embeddings().weight.shape[0]),
        moe_layers=s.moe_layers,
        shared_expert_layers=s.shared_expert_layers,
        attention_layers=tuple(i.index for i in model.layers if i.o is not None),
    )


def _slice(x: SliceInput | Slice) -> Slice:
    return x if isinstance(x, Slice) else Slice(x)


class TLCacheMixin:
    """TransformerLens ``ActivationCache`` methods that need model weights, re-built on moe-interp hooks.

    Mixed into :class:`moe_interp.model.MoECache` (whose ``model`` is the :class:`MoEModel`).
    """

    cache_dict: dict[str, Tensor]
    model: Any
    has_batch_dim: bool

    # ----------------------------------------------------------------------------- norms
    def _final_scale(self, pos_slice: Slice, batch_slice: Slice | None) -> Tensor:
        """The final norm's frozen scale ``[batch, pos, 1]`` from the last ``hook_resid_post`` (TL:
        ``ln_final.hook_scale``, which moe-interp does not hook)."""
        from moe_interp.lens import final_norm

        key = f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"
        if key not in self.cache_dict:
            raise KeyError(f"The final-norm scale is computed from {key}: cache it to apply the final norm.")
        scale = pos_slice.apply(final_norm(self.model).scale(self.cache_dict[key]), dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "num_components *batch_and_pos_dims d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Slice | SliceInput = None,
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Float[Tensor, "num_components *batch_and_pos_dims_out d_model"]:
        """TransformerLens' ``apply_ln_to_stack`` for the final norm (``layer`` in ``None, -1, n_layers``).

        Frozen (default): ``centre(stack) / s`` with ``s`` from the full final residual, no norm weight
        (as TL with ``fold_ln``). ``recompute_ln=True``: the real final-norm module on each component.
        Per-layer norms (``layer < n_layers``) are not supported.
        """
        from moe_interp.lens import final_norm

        n = self.model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n
        if layer != n:
            raise NotImplementedError(
                "moe-interp applies only the final norm (layer=None, -1 or n_layers); the blocks' input norms "
                "are not hooked."
            )
        pos_slice, batch_slice = _slice(pos_slice), _slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        norm = final_norm(self.model)
        if recompute_ln:
            with torch.set_grad_enabled(residual_stack.requires_grad):  # parameters need no grad here
                return norm(residual_stack)
        return norm.normalize(residual_stack, self._final_scale(pos_slice, batch_slice))

    # ------------------------------------------------------------------------- unembedding
    def tokens_to_residual_directions(
        self, tokens: int | str | Sequence[int | str] | Tensor
    ) -> Float[Tensor, "... d_model"]:
        """Residual directions of token logits for :meth:`apply_ln_to_stack` outputs: ``scale * w * W_U[:, t]``
        (TL's ``model.tokens_to_residual_directions`` with the final-norm weight folded in), shaped like
        ``tokens`` plus ``d_model``."""
        from moe_interp.lens import final_norm, token_ids, unembedding

        shape: tuple[int, ...] = tokens.shape if isinstance(tokens, Tensor) else ()
        if not isinstance(tokens, Tensor) and not isinstance(tokens, int | str):
            shape = (len(tokens),)
        ids = token_ids(self.model, tokens)
        U, w = unembedding(self.model), final_norm(self.model).weight
        dirs = U.scale * w[:, None].to(U.W_U.dtype) * U.W_U[:, ids]
        return dirs.T.reshape(*shape, -1)

    def logit_attrs(
        self,
        residual_stack: Float[Tensor, "num_components *batch_and_pos_dims d_model"],
        tokens: int | str | Sequence[int | str] | Tensor,
        incorrect_tokens: int | str | Sequence[int | str] | Tensor | None = None,
        pos_slice: Slice | SliceInput = None,
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, "num_components ..."]:
        """TransformerLens' ``logit_attrs``: each component's contribution to the (difference of) token
        logits through the frozen final-norm scale. Summed over a full decomposition it gives the logit
        (difference) minus the constant read-out terms (norm bias and unembedding bias)."""
        dirs = self.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            other = self.tokens_to_residual_directions(incorrect_tokens)
            if other.shape != dirs.shape:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, got {tuple(dirs.shape[:-1])} and "
                    f"{tuple(other.shape[:-1])}."
                )
            dirs = dirs - other
        bs = _slice(batch_slice)
        scaled = self.apply_ln_to_stack(
            residual_stack, -1, pos_slice=pos_slice, batch_slice=bs, has_batch_dim=has_batch_dim
        )
        if (
            has_batch_dim
            and bs.mode != "int"
            and scaled.ndim == 4
            and dirs.ndim == 2
            and dirs.shape[0] == scaled.shape[1]
        ):
            dirs = dirs.unsqueeze(-2)  # one direction per example, broadcast over positions (as TL)
        return (scaled * dirs.to(scaled.dtype)).sum(-1)

    # ------------------------------------------------------------------------------ stacks
    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Slice | SliceInput = None,
        apply_ln: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """TransformerLens' ``stack_head_results`` from ``blocks.L.attn.hook_result`` of every layer before
        ``layer`` that has attention heads (linear-attention layers have none; their output is left to the
        remainder). Labels ``L{l}H{h}`` as in TL; the attention bias is not a head (it is in the remainder)."""
        n = self.model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n
        ps = _slice(pos_slice)
        comps: list[Tensor] = []
        labels: list[str] = []
        for info in self.model.layers[:layer]:
            if info.o is None:
                continue
            name = f"blocks.{info.index}.attn.hook_result"
            if name not in self.cache_dict:
                raise KeyError(
                    f"stack_head_results needs {name} in the cache (run_with_cache caches it by default)."
                )
            comps.append(ps.apply(self.cache_dict[name], dim=-3))
            labels += [f"L{info.index}H{h}" for h in range(info.n_heads)]
        # the residual the heads below ``layer`` write into: the input of block 0 when there are none
        ref_name = f"blocks.{layer - 1}.hook_resid_post" if layer > 0 else "blocks.0.hook_resid_pre"
        ref = ps.apply(self.cache_dict[ref_name], dim=-2)
        if comps:
            stack = einops.rearrange(torch.cat(comps, dim=-2), "... c d -> c ... d")
        else:
            stack = ref.new_zeros(0, *ref.shape)
        if incl_remainder:
            rest = ref - stack.sum(0) if layer > 0 else ref
            stack = torch.cat([stack, rest[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=ps)
        return (stack, labels) if return_labels else stack

    def stack_expert_results(
        self,
        layer: int | None = None,
        return_labels: bool = False,
        pos_slice: Slice | SliceInput = None,
        apply_ln: bool = False,
        incl_shared: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """Each routed expert's contribution (zero where not routed) from ``blocks.L.mlp.hook_expert_out``
        (or ``experts.{e}.hook_out``): ``[n_experts, batch, pos, d_model]`` for one MoE layer, or for every
        MoE layer in order when ``layer`` is None. Labels are hook names; ``incl_shared`` appends
        ``blocks.L.mlp.hook_shared_out`` where the layer has shared experts."""
        model = cast("MoEModel", self.model)
        layers = list(model.spec.moe_layers) if layer is None else [layer]
        ps = _slice(pos_slice)
        comps: list[Tensor] = []
        labels: list[str] = []
        for L in layers:
            info = model.layers[model.check_layer(L)]
            if not info.is_moe:
                raise ValueError(f"Layer {L} is not an MoE layer; MoE layers: {list(model.spec.moe_layers)}.")
            dense = f"blocks.{L}.mlp.hook_expert_out"
            names = [f"blocks.{L}.mlp.experts.{e}.hook_out" for e in range(info.n_experts)]
            if dense in self.cache_dict:
                stack = einops.rearrange(ps.apply(self.cache_dict[dense], dim=-3), "... e d -> e ... d")
            elif all(nm in self.cache_dict for nm in names):
                stack = torch.stack([ps.apply(self.cache_dict[nm], dim=-2) for nm in names])
            else:
                raise KeyError(f"stack_expert_results needs {dense} in the cache: ask for it by name.")
            comps.append(stack)
            labels += names
            if incl_shared and info.shared:
                comps.append(self._shared(L, ps)[None])
                labels.append(f"blocks.{L}.mlp.hook_shared_out")
        out = torch.cat(comps)
        if apply_ln:
            out = self.apply_ln_to_stack(out, None, pos_slice=ps)
        return (out, labels) if return_labels else out

    def _shared(self, L: int, ps: Slice) -> Tensor:
        name = f"blocks.{L}.mlp.hook_shared_out"
        if name not in self.cache_dict:
            raise KeyError(f"{name} is not in the cache.")
        return ps.apply(self.cache_dict[name], dim=-2)

    def stack_shared_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        pos_slice: Slice | SliceInput = None,
        apply_ln: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The shared experts' contributions (``blocks.L.mlp.hook_shared_out``) of every layer before
        ``layer`` that has them: ``[n, batch, pos, d_model]``, labels are hook names."""
        model = cast("MoEModel", self.model)
        n = model.spec.n_layers
        layer = n if layer is None or layer == -1 else layer
        ps = _slice(pos_slice)
        ls = [L for L in model.spec.shared_expert_layers if L < layer]
        labels = [f"blocks.{L}.mlp.hook_shared_out" for L in ls]
        if ls:
            out = torch.stack([self._shared(L, ps) for L in ls])
        else:
            ref = ps.apply(self.cache_dict[f"blocks.{n - 1}.hook_resid_post"], dim=-2)
            out = ref.new_zeros(0, *ref.shape)
        if apply_ln:
            out = self.apply_ln_to_stack(out, None, pos_slice=ps)
        return (out, labels) if return_labels else out

    # --------------------------------------------------------------------------- replaced
    def logit_lens(self, tokens: int | str | Sequence[int | str], **_: Any) -> LogitLensResult:
        """The logit lens of this cache for ``tokens`` (:func:`moe_interp.lens.lens_from_cache`; TL's
        version returns other types and needs TL model weights)."""
        from moe_interp.lens import lens_from_cache

        return lens_from_cache(self.model, cast(Any, self), tokens)

    def compute_head_results(self) -> None:
        """No-op when ``hook_result`` is cached (moe-interp hooks per-head results directly)."""
        for info in self.model.layers:
            name = f"blocks.{info.index}.attn.hook_result"
            if info.o is not None and name not in self.cache_dict:
                raise KeyError(f"{name} is not in the cache: run_with_cache with it (cached by default).")

    def get_full_resid_decomposition(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not available: it needs per-neuron MLP results (TL ``W_out``); use :meth:`stack_head_results`,
        :meth:`stack_expert_results` or :func:`moe_interp.dla.direct_logit_attribution`."""
        raise NotImplementedError(self.get_full_resid_decomposition.__doc__)

    def stack_neuron_results(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not available: experts are fused GLUs without per-neuron hooks; use :meth:`stack_expert_results`."""
        raise NotImplementedError(self.stack_neuron_results.__doc__)
