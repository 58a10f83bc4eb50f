"""The hook-point adapter, family by family: identities between hook values, agreement with the plain HF
forward, padding invariance, writable hooks, generation, cleanup after errors and input validation."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

import moe_interp as mi
from moe_interp.tracing import HookContext
from tests.conftest import FAMILIES, PROMPTS

ATOL = 1e-5
MOE_FAMILIES = [f for f in FAMILIES if not mi.get_family(f).dense]

# ------------------------------------------------------------------------------------------- helpers


def hf_logits(model: Any, enc: Any) -> Tensor:
    """Logits of the untouched HF model, with the position ids the adapter derives from the mask."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model.hf_model(ids, attention_mask=mask, position_ids=pos).logits


def close(a: Tensor, b: Tensor, atol: float = ATOL) -> None:
    """Assert two tensors are equal up to ``atol`` (with a useful message)."""
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def valid(t: Tensor, mask: Tensor) -> Tensor:
    """Values at the non-padded positions of a ``[batch, pos, ...]`` tensor, flattened over batch/pos."""
    return t[mask.bool()]


def first_moe_layer(model: Any) -> int:
    return model.spec.moe_layers[0]


def first_attn_layer(model: Any) -> int:
    return next(i.index for i in model.layers if i.attn is not None and i.o is not None)


def routed_expert(cache: Any, layer: int, mask: Tensor) -> int:
    """The expert chosen most often (over valid positions) at ``layer``."""
    idx = valid(cache[f"blocks.{layer}.mlp.hook_expert_indices"], mask)
    return int(torch.bincount(idx.flatten().long()).argmax())


@dataclass
class Edit:
    """A one-hook intervention: ``fn`` replaces the value of ``name``."""

    name: str
    fn: Callable[[Tensor, HookContext], Tensor]

    def edits(self, model: Any) -> dict[str, Callable[[Tensor, HookContext], Tensor]]:
        return {self.name: self.fn}


@dataclass
class ZeroExpertWeight:
    """Zero expert ``expert``'s routing weight at ``layer``."""

    layer: int
    expert: int

    def edits(self, model: Any) -> dict[str, Callable[[Tensor, HookContext], Tensor]]:
        def fn(w: Tensor, ctx: HookContext) -> Tensor:
            w = w.clone()
            w[..., self.expert] = 0
            return w

        return {f"blocks.{self.layer}.mlp.hook_expert_weights": fn}


@dataclass
class BanExpert:
    """Set expert ``expert``'s router logit to -1e9 at ``layer`` (the routing function is re-run)."""

    layer: int
    expert: int

    def edits(self, model: Any) -> dict[str, Callable[[Tensor, HookContext], Tensor]]:
        def fn(logits: Tensor, ctx: HookContext) -> Tensor:
            logits = logits.clone()
            logits[..., self.expert] = -1e9
            return logits

        return {f"blocks.{self.layer}.mlp.hook_router_logits": fn}


@dataclass
class ZeroHead:
    """Zero head ``head``'s ``hook_z`` at ``layer``."""

    layer: int
    head: int

    def edits(self, model: Any) -> dict[str, Callable[[Tensor, HookContext], Tensor]]:
        def fn(z: Tensor, ctx: HookContext) -> Tensor:
            z = z.clone()
            z[:, :, self.head] = 0
            return z

        return {f"blocks.{self.layer}.attn.hook_z": fn}


@dataclass
class AddVector:
    """Add ``vec`` at every position of a ``[batch, pos, d_model]`` hook."""

    name: str
    vec: Tensor

    def edits(self, model: Any) -> dict[str, Callable[[Tensor, HookContext], Tensor]]:
        return {self.name: lambda x, ctx: x + self.vec.to(x.dtype)}


class Boom(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------- identities


def test_identities(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Hook values add up the way the residual stream and the MoE block do."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    mask = enc["attention_mask"]
    logits, cache = model.run_with_cache(enc, names=model.hook_names())
    # hook_embed is in residual units (Granite multiplies embeddings by embedding_multiplier)
    close(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    cfg = model.hf_model.config
    for info in model.layers:
        if info.k is not None:  # head geometry from the config, not from q_proj (which may carry a gate)
            k = cache[f"blocks.{info.index}.attn.hook_k"]
            assert k.shape[2] == info.n_kv_heads == cfg.num_key_value_heads
            d_cfg = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            assert k.shape[3] == info.d_head == d_cfg
    for info in model.layers:
        L = info.index
        c = {
            k.removeprefix(f"blocks.{L}."): v
            for k, v in cache.cache_dict.items()
            if k.startswith(f"blocks.{L}.")
        }
        close(valid(c["hook_resid_mid"], mask), valid(c["hook_resid_pre"] + c["hook_attn_out"], mask))
        close(valid(c["hook_resid_post"], mask), valid(c["hook_resid_mid"] + c["hook_mlp_out"], mask))
        if L + 1 < len(model.layers):
            close(cache[f"blocks.{L + 1}.hook_resid_pre"], c["hook_resid_post"])
        if "attn.hook_result" in c:
            o_proj = getattr(getattr(model.hf_model.model.layers[L], info.attn), info.o)
            heads = c["attn.hook_result"].sum(dim=2)
            if o_proj.bias is not None:
                heads = heads + o_proj.bias * info.residual_multiplier
            close(valid(heads, mask), valid(c["hook_attn_out"], mask))
        if not info.is_moe:
            continue
        experts = c["mlp.hook_expert_out"]
        assert experts.shape[2] == info.n_experts
        total = experts.sum(dim=2) + c.get("mlp.hook_shared_out", 0)
        close(valid(total, mask), valid(c["hook_mlp_out"], mask))
        if "mlp.hook_topk_expert_out" in c:
            close(valid(c["mlp.hook_topk_expert_out"].sum(dim=2), mask), valid(experts.sum(dim=2), mask))
        for e in range(info.n_experts):
            close(c[f"mlp.experts.{e}.hook_out"], experts[:, :, e], atol=0.0)
        weights, idx = c["mlp.hook_expert_weights"], c["mlp.hook_expert_indices"]
        routed = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, idx.long(), True)
        assert (weights[~routed] == 0).all(), "hook_expert_weights is non-zero outside hook_expert_indices"
        assert (weights[routed] != 0).any()
        # an expert that is not routed to a token contributes nothing to it
        assert (experts[~routed] == 0).all()
    close(
        cache["ln_final.hook_normalized"],
        model.hf_model.model.norm(cache[f"blocks.{len(model.layers) - 1}.hook_resid_post"]),
    )
    close(valid(logits, mask), valid(hf_logits(model, enc), mask))


def test_empty_intervention_matches_hf(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Logits under an empty ``intervene()`` equal the plain HF forward (padded positions included)."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    with model.intervene():
        logits = model.forward(enc)
    close(logits, hf_logits(model, enc))


def test_cache_without_logits_stops_after_the_last_hook(
    family: str, tiny_model: Callable[[str], Any]
) -> None:
    """``run_with_cache(..., return_type=None)``: the same cache (bit for bit, under an edit too), no logits,
    and neither the layers after the last hook cached nor the unembedding run; the model works as before."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    names = [n for n in model.hook_names() if n.startswith("blocks.0.")] + ["blocks.1.hook_resid_pre"]
    edit = AddVector(
        "blocks.0.hook_resid_pre", torch.randn(model.spec.d_model, generator=torch.manual_seed(3))
    )
    layers = functools.reduce(getattr, model.family.layers.split("."), model.hf_model)
    ran: list[str] = []
    spies = [
        m.register_forward_hook(lambda *_, n=n: ran.append(n))
        for n, m in (("lm_head", model.hf_model.lm_head),)
    ]
    spies += [
        layer.register_forward_hook(lambda *_, i=i: ran.append(f"layer {i}"))
        for i, layer in enumerate(layers)
    ]
    try:
        with model.intervene(edit):
            _, full = model.run_with_cache(enc, names=names)
            ran.clear()
            none, part = model.run_with_cache(enc, names=names, return_type=None)
        assert none is None
        assert ran == ["layer 0"]  # layer 1 is stopped at its input, blocks.1.hook_resid_pre
    finally:
        for s in spies:
            s.remove()
    assert sorted(part.cache_dict) == sorted(full.cache_dict) == sorted(names)
    for n in names:
        assert torch.equal(part[n], full[n]), n
    close(model.forward(enc), hf_logits(model, enc))  # the stopped run leaves nothing behind
    kept: list[weakref.ref[Tensor]] = []
    spy = model.hf_model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: kept.append(weakref.ref(o))
    )
    try:
        model.run_with_cache(enc, names=names, return_type=None)
    finally:
        spy.remove()
    assert kept and kept[0]() is None  # the interrupted forward's activations are freed on return
    with pytest.raises(ValueError, match="return_type must be 'logits' or None"):
        model.run_with_cache(enc, names=names, return_type="loss")  # type: ignore[call-overload]


# -------------------------------------------------------------------------------------------- padding


def _padding_names(model: Any) -> list[str]:
    return [n for n in model.hook_names() if not (n.endswith(".hook_out") and "experts." in n)]


@functools.cache
def _alone(family: str, i: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and cache of ``PROMPTS[i]`` run alone (shared by the left and right padding tests)."""
    from tests.conftest import _load_cached

    model = _load_cached(family)
    enc = model.tokenize([PROMPTS[i]])
    assert enc["attention_mask"].bool().all()
    logits, cache = model.run_with_cache(enc, names=_padding_names(model))
    return logits, dict(cache.cache_dict)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(family: str, side: str, tiny_model: Callable[[str], Any]) -> None:
    """A padded batch gives, at its valid positions, the values of each prompt run alone."""
    model = tiny_model(family)
    names = _padding_names(model)
    enc = model.tokenize(PROMPTS, padding_side=side)
    assert not enc["attention_mask"].bool().all(), "prompts should need padding"
    logits, cache = model.run_with_cache(enc, names=names)
    for i in range(len(PROMPTS)):
        m = enc["attention_mask"][i].bool()
        logits_i, cache_i = _alone(family, i)
        close(logits[i][m], logits_i[0])
        for name in names:
            batched, single = cache[name][i], cache_i[name][0]
            if name.endswith("hook_pattern"):
                close(batched[:, m][:, :, m], single)
            elif name.endswith("hook_expert_indices"):
                assert torch.equal(batched[m].sort(-1).values, single.sort(-1).values), name
            else:
                close(batched[m], single)


# ------------------------------------------------------------------------------------- writable hooks


def _clean_moe_run(model: Any) -> tuple[Any, Tensor, int, list[str], Any, int]:
    """PROMPTS run at the first MoE layer L: (enc, mask, L, names, clean cache, most-routed expert)."""
    enc = model.tokenize(PROMPTS)
    mask = enc["attention_mask"]
    L = first_moe_layer(model)
    names = [
        f"blocks.{L}.hook_mlp_out",
        f"blocks.{L}.mlp.hook_expert_out",
        f"blocks.{L}.mlp.hook_expert_indices",
    ]
    _, clean = model.run_with_cache(enc, names=names)
    return enc, mask, L, names, clean, routed_expert(clean, L, mask)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_edit_expert_weights(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Zeroing one routed expert's weight removes exactly its contribution from hook_mlp_out."""
    model = tiny_model(family)
    enc, mask, L, names, clean, e = _clean_moe_run(model)
    contribution = clean[f"blocks.{L}.mlp.hook_expert_out"][:, :, e]
    assert valid(contribution, mask).abs().max() > 1e-4
    with model.intervene(ZeroExpertWeight(L, e)):
        _, edited = model.run_with_cache(enc, names=names)
    expected = clean[f"blocks.{L}.hook_mlp_out"] - contribution
    close(valid(edited[f"blocks.{L}.hook_mlp_out"], mask), valid(expected, mask))
    assert (edited[f"blocks.{L}.mlp.hook_expert_out"][:, :, e] == 0).all()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_edit_router_logits(family: str, tiny_model: Callable[[str], Any]) -> None:
    """A -1e9 router logit removes the expert from hook_expert_indices, and the MoE output changes."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    mask = enc["attention_mask"].bool()
    L = first_moe_layer(model)
    names = [
        f"blocks.{L}.mlp.hook_expert_indices",
        f"blocks.{L}.hook_mlp_out",
        f"blocks.{L}.mlp.hook_router_logits",
    ]
    _, clean = model.run_with_cache(enc, names=names)
    e = routed_expert(clean, L, mask)
    with model.intervene(BanExpert(L, e)):
        _, edited = model.run_with_cache(enc, names=names)
    assert (edited[f"blocks.{L}.mlp.hook_router_logits"][..., e] == -1e9).all()
    idx = edited[f"blocks.{L}.mlp.hook_expert_indices"]
    assert not (idx[mask] == e).any(), f"expert {e} still selected after its logit was set to -1e9"
    was_routed = (clean[f"blocks.{L}.mlp.hook_expert_indices"] == e).any(-1) & mask
    out_c, out_e = clean[f"blocks.{L}.hook_mlp_out"], edited[f"blocks.{L}.hook_mlp_out"]
    assert ((out_c - out_e).abs().amax(-1)[was_routed] > 1e-6).all()


def test_expert_hooks_match_hf_expert_computation(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Asking for per-expert outputs makes moe-interp compute the experts from the fused weights (and the HF
    experts module run on no tokens); hook_mlp_out and the logits must equal a run that leaves HF's own
    expert computation alone."""
    model = tiny_model(family)
    if not model.spec.is_moe:
        pytest.skip("dense family")
    enc = model.tokenize(PROMPTS)
    mlp = [f"blocks.{L}.hook_mlp_out" for L in model.spec.moe_layers]
    experts = [f"blocks.{L}.mlp.hook_expert_out" for L in model.spec.moe_layers]
    ref_logits, ref = model.run_with_cache(enc, names=mlp)
    logits, got = model.run_with_cache(enc, names=mlp + experts)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for name in mlp:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0)


def test_router_logit_rewrite_reproduces_routing(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Writing the router logits back unchanged re-runs the family's routing function
    (moe_interp.experts.route) in place of the router's own top-k: logits must not move."""
    model = tiny_model(family)
    if not model.spec.is_moe:
        pytest.skip("dense family")
    enc = model.tokenize(PROMPTS)
    base = model.forward(enc)
    names = [f"blocks.{L}.mlp.hook_router_logits" for L in model.spec.moe_layers]
    with model.intervene(*[Edit(n, lambda z, ctx: z.clone()) for n in names]):
        rerouted = model.forward(enc)
    torch.testing.assert_close(rerouted, base, atol=1e-5, rtol=0)


def test_edit_resid_pre(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Editing blocks.1.hook_resid_pre changes everything downstream and nothing upstream."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    mask = enc["attention_mask"]
    names = [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_attn_out",
        "blocks.2.hook_resid_pre",
    ]
    logits_c, clean = model.run_with_cache(enc, names=names)
    vec = torch.randn(model.spec.d_model, generator=torch.Generator().manual_seed(0))
    with model.intervene(AddVector("blocks.1.hook_resid_pre", vec)):
        logits_e, edited = model.run_with_cache(enc, names=names)
    close(edited["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_post"], atol=0.0)
    close(edited["blocks.1.hook_resid_pre"], clean["blocks.1.hook_resid_pre"] + vec)
    close(
        valid(edited["blocks.1.hook_resid_mid"], mask),
        valid(edited["blocks.1.hook_resid_pre"] + edited["blocks.1.hook_attn_out"], mask),
    )
    for name in ["blocks.1.hook_attn_out", "blocks.2.hook_resid_pre"]:
        assert (valid(edited[name] - clean[name], mask).abs().amax(-1) > 1e-4).all(), name
    assert (valid(logits_e - logits_c, mask).abs().amax(-1) > 1e-4).all()
    # the block is over: nothing persists
    close(model.forward(enc), logits_c, atol=0.0)


def test_edit_resid_mid(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Editing hook_resid_mid leaves attn_out alone and changes the MLP input and resid_post."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    mask = enc["attention_mask"]
    L = 1
    names = [
        f"blocks.{L}.{s}"
        for s in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
    ]
    _, clean = model.run_with_cache(enc, names=names)
    vec = torch.randn(model.spec.d_model, generator=torch.Generator().manual_seed(1))
    with model.intervene(AddVector(f"blocks.{L}.hook_resid_mid", vec)):
        _, edited = model.run_with_cache(enc, names=names)
    p = f"blocks.{L}."
    close(edited[p + "hook_attn_out"], clean[p + "hook_attn_out"], atol=0.0)
    close(edited[p + "hook_resid_mid"], clean[p + "hook_resid_mid"] + vec)
    close(
        valid(edited[p + "hook_resid_post"], mask),
        valid(edited[p + "hook_resid_mid"] + edited[p + "hook_mlp_out"], mask),
    )
    assert (valid(edited[p + "hook_mlp_out"] - clean[p + "hook_mlp_out"], mask).abs().amax(-1) > 1e-6).all()


def test_edit_hook_z(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Zeroing one head's hook_z removes exactly that head's hook_result from hook_attn_out."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    mask = enc["attention_mask"]
    L = first_attn_layer(model)
    head = model.layers[L].n_heads - 1
    names = [f"blocks.{L}.attn.hook_result", f"blocks.{L}.hook_attn_out", f"blocks.{L}.attn.hook_z"]
    _, clean = model.run_with_cache(enc, names=names)
    contribution = clean[f"blocks.{L}.attn.hook_result"][:, :, head]
    assert valid(contribution, mask).abs().max() > 1e-4
    with model.intervene(ZeroHead(L, head)):
        _, edited = model.run_with_cache(enc, names=names)
    assert (edited[f"blocks.{L}.attn.hook_z"][:, :, head] == 0).all()
    expected = clean[f"blocks.{L}.hook_attn_out"] - contribution
    close(valid(edited[f"blocks.{L}.hook_attn_out"], mask), valid(expected, mask))


def test_hook_result_replaces_the_output_projection(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Reading hook_result (which skips o_proj and sums the heads) leaves logits and hook_attn_out as without it;
    tripling one head's hook_result adds twice its contribution to hook_attn_out."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    mask = enc["attention_mask"]
    L = first_attn_layer(model)
    head = model.layers[L].n_heads - 1
    r_name, a_name = f"blocks.{L}.attn.hook_result", f"blocks.{L}.hook_attn_out"
    plain_logits, plain = model.run_with_cache(enc, names=[a_name])
    logits, clean = model.run_with_cache(enc, names=[r_name, a_name])
    close(valid(logits, mask), valid(plain_logits, mask))
    close(valid(clean[a_name], mask), valid(plain[a_name], mask))
    contribution = clean[r_name][:, :, head]
    assert valid(contribution, mask).abs().max() > 1e-4

    def triple(r: Tensor, ctx: HookContext) -> Tensor:
        r = r.clone()
        r[:, :, head] *= 3
        return r

    with model.intervene(mi.EditHook(r_name, triple)):
        _, edited = model.run_with_cache(enc, names=[r_name, a_name])
    close(valid(edited[a_name], mask), valid(clean[a_name] + 2 * contribution, mask))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_edit_single_expert_out(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Tripling experts.{e}.hook_out adds twice that expert's contribution to hook_mlp_out."""
    model = tiny_model(family)
    enc, mask, L, names, clean, e = _clean_moe_run(model)
    name = f"blocks.{L}.mlp.experts.{e}.hook_out"
    with model.intervene(Edit(name, lambda x, ctx: 3 * x)):
        _, edited = model.run_with_cache(enc, names=[*names, name])
    contribution = clean[f"blocks.{L}.mlp.hook_expert_out"][:, :, e]
    close(edited[name], 3 * contribution)
    expected = clean[f"blocks.{L}.hook_mlp_out"] + 2 * contribution
    close(valid(edited[f"blocks.{L}.hook_mlp_out"], mask), valid(expected, mask))


# ----------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "llama4_text"])
def test_generate_under_intervention(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Steering the final norm towards one token changes every generated token; nothing persists after."""
    model = tiny_model(family)
    prompts = PROMPTS[:2]
    base = model.generate(prompts, max_new_tokens=4, return_scores=True)
    base_ids = [g[0].token_ids for g in base]
    w_u = model.hf_model.get_output_embeddings().weight.detach()
    used = {t for ids in base_ids for t in ids} | {model.tokenizer.eos_token_id, model.tokenizer.pad_token_id}
    target = next(t for t in range(10, w_u.shape[0]) if t not in used)
    push = AddVector("ln_final.hook_normalized", 1e3 * w_u[target] / w_u[target].norm())
    with model.intervene(push):
        steered = model.generate(prompts, max_new_tokens=4, return_scores=True)
    for g in steered:
        assert g[0].token_ids == [target] * 4
    after = model.generate(prompts, max_new_tokens=4, return_scores=True)
    assert [g[0].token_ids for g in after] == base_ids


# ------------------------------------------------------------------------------------ error cleanup


def _snapshot(model: Any) -> tuple[dict[str, Tensor], dict[str, tuple[Any, ...]]]:
    weights = {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}
    hooks = {
        name: (
            tuple(mod._forward_hooks.items()),
            tuple(mod._forward_pre_hooks.items()),
            mod.__dict__.get("forward"),
            type(mod),
        )
        for name, mod in model.hf_model.named_modules()
    }
    return weights, hooks


def _assert_unchanged(model: Any, before: tuple[dict[str, Tensor], dict[str, tuple[Any, ...]]]) -> None:
    weights, hooks = _snapshot(model)
    assert weights.keys() == before[0].keys()
    for k, v in weights.items():
        assert torch.equal(v, before[0][k]), f"weight {k} changed"
    assert hooks == before[1], "module hooks changed"


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_exceptions_leave_model_intact(family: str, tiny_model: Callable[[str], Any]) -> None:
    """Errors raised in a ``with model.intervene()`` block or in an edit function leave no trace."""
    model = tiny_model(family)
    enc = model.tokenize(PROMPTS)
    logits = model.forward(enc)
    before = _snapshot(model)
    vec = torch.ones(model.spec.d_model)
    with pytest.raises(Boom), model.intervene(AddVector("blocks.0.hook_resid_post", vec)):
        model.forward(enc)
        raise Boom("in the block")
    _assert_unchanged(model, before)

    def explode(x: Tensor, ctx: HookContext) -> Tensor:
        raise Boom("in an edit")

    L = model.spec.moe_layers[0] if model.spec.is_moe else 0
    site = "mlp.hook_expert_weights" if model.spec.is_moe else "attn.hook_z"
    for iv in (Edit(f"blocks.{L}.{site}", explode), Edit("blocks.1.hook_resid_pre", explode)):
        with pytest.raises(Boom), model.intervene(AddVector("blocks.0.hook_resid_pre", vec), iv):
            model.forward(enc)
        _assert_unchanged(model, before)
        with pytest.raises(Boom), model.intervene(iv):
            model.generate(PROMPTS[:1], max_new_tokens=2)
        _assert_unchanged(model, before)
    assert model._active == []
    close(model.forward(enc), logits, atol=0.0)
    close(model.forward(enc), hf_logits(model, enc))


def test_bad_edit_return_value(tiny_model: Callable[[str], Any]) -> None:
    """An edit returning the wrong shape is an error naming the hook, and leaves the model intact."""
    model = tiny_model("olmoe")
    before = _snapshot(model)
    with pytest.raises(ValueError, match="blocks.0.hook_resid_pre"):
        with model.intervene(Edit("blocks.0.hook_resid_pre", lambda x, ctx: x[:, :1])):
            model.forward(PROMPTS)
    _assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------- bad input


def test_unknown_family() -> None:
    for call in (lambda: mi.load("tiny:nope"), lambda: mi.get_family("nope")):
        with pytest.raises(ValueError, match="nope") as err:
            call()
        assert "olmoe" in str(err.value) and "mixtral" in str(err.value)


def test_unknown_hook_name(tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="blocks.0.hook_resid_pre") as err:
        model.run_with_cache(PROMPTS, names=["blocks.0.hook_resid_pree"])
    assert "Closest valid names" in str(err.value)
    with pytest.raises(ValueError, match="blocks.1.mlp.hook_expert_weights"):
        with model.intervene(Edit("blocks.1.mlp.hook_expert_weight", lambda x, ctx: x)):
            pass  # pragma: no cover - intervene validates on entry
    assert model._active == []
    with pytest.raises(ValueError, match="read-only"):
        with model.intervene(Edit("blocks.0.attn.hook_pattern", lambda x, ctx: x)):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="not an intervention"):
        with model.intervene(object()):
            pass  # pragma: no cover


@pytest.mark.parametrize("prompts", [[], [1, 2], ["ok", None], None, b"bytes", 3.0])
def test_bad_prompts(prompts: Any, tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("olmoe")
    for call in (model.forward, model.run_with_cache, model.generate, model.tokenize):
        with pytest.raises(ValueError, match="[Pp]rompts"):
            call(prompts)


def test_layer_out_of_range(tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("olmoe")
    n = model.spec.n_layers
    for bad in (n, -1, 99):
        with pytest.raises(ValueError, match="out of range"):
            model.check_layer(bad)
    with pytest.raises(ValueError, match="out of range"):
        model.check_expert(0, model.spec.n_experts)
    with pytest.raises(ValueError, match="Unknown hook name"):
        model.run_with_cache(PROMPTS, names=[f"blocks.{n}.hook_resid_pre"])
    with pytest.raises(ValueError, match="Unknown hook name"):
        with model.intervene(AddVector(f"blocks.{n}.hook_resid_pre", torch.zeros(model.spec.d_model))):
            pass  # pragma: no cover


def test_hook_result_skips_the_output_projection(tiny_model: Callable[[str], Any]) -> None:
    """With hook_result read, o_proj's matmul is not run (its output is the sum of the per-head results)."""
    from torch.overrides import TorchFunctionMode

    model = tiny_model("olmoe")
    o_proj = model.hf_model.model.layers[0].self_attn.o_proj
    used: list[int] = []

    class CountOProj(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.nn.functional.linear and len(args) > 1 and args[1] is o_proj.weight:
                used.append(1)
            return func(*args, **(kwargs or {}))

    enc = model.tokenize(PROMPTS)
    with CountOProj():
        model.run_with_cache(enc, names=["blocks.0.hook_attn_out"])
    assert len(used) == 1
    used.clear()
    with CountOProj():
        model.run_with_cache(enc, names=["blocks.0.attn.hook_result", "blocks.0.hook_attn_out"])
    assert used == []


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_reading_hook_result_leaves_a_bf16_forward_unchanged(family: str) -> None:
    """In half precision o_proj is not replaced by the per-head sum unless hook_result is edited."""
    model = mi.load(f"tiny:{family}", dtype=torch.bfloat16)
    enc = model.tokenize(PROMPTS)
    plain, _ = model.run_with_cache(enc, names=["blocks.0.hook_attn_out"])
    observed, cache = model.run_with_cache(enc, names=["blocks.0.attn.hook_result", "blocks.0.hook_attn_out"])
    assert cache["blocks.0.attn.hook_result"].dtype == torch.bfloat16
    assert torch.equal(plain, observed)


def test_edited_expert_indices_are_range_checked_and_duplicates_accumulate(
    tiny_model: Callable[[str], Any],
) -> None:
    model = tiny_model("olmoe")
    enc = model.tokenize(PROMPTS)
    L, E = first_moe_layer(model), model.layers[first_moe_layer(model)].n_experts
    idx_name, out_name = f"blocks.{L}.mlp.hook_expert_indices", f"blocks.{L}.mlp.hook_expert_out"

    def out_of_range(idx: Tensor, ctx: HookContext) -> Tensor:
        idx = idx.clone()
        idx[..., 0] = -1
        return idx

    with pytest.raises(ValueError, match=rf"expert indices in \[0, {E}\), got values in \[-1,"):
        with model.intervene(mi.EditHook(idx_name, out_of_range)):
            model.run_with_cache(enc, names=[out_name])

    def duplicate(idx: Tensor, ctx: HookContext) -> Tensor:
        idx = idx.clone()
        idx[..., 1] = idx[..., 0]
        return idx

    with model.intervene(mi.EditHook(idx_name, duplicate)):
        _, c = model.run_with_cache(enc, names=[idx_name, out_name, f"blocks.{L}.mlp.hook_topk_expert_out"])
    topk, dense, idx = c[f"blocks.{L}.mlp.hook_topk_expert_out"], c[out_name], c[idx_name]
    assert (idx[..., 0] == idx[..., 1]).all()
    chosen = dense.gather(2, idx[..., :1, None].expand(-1, -1, 1, dense.shape[-1])).squeeze(2)
    close(chosen, topk[..., 0, :] + topk[..., 1, :])
    close(dense.sum(2), chosen)  # every other expert's row is zero
