"""Silent wrong results become errors: bad intervention parameters, NaN/inf produced by edits, bad model-API
arguments, and ``AblateExpert(mode="reroute")`` on routers whose selection score is not the logit."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import moe_interp as mi
from moe_interp.guards import NonFiniteOutputError
from moe_interp.tracing import HookContext
from tests.conftest import FAMILIES, PROMPTS

MOE_FAMILIES = [f for f in FAMILIES if not mi.get_family(f).dense]
LONG = "bread " * 300  # more tokens than the tiny models' context (max_position_embeddings=256)


def _nan(x: Tensor, ctx: HookContext) -> Tensor:
    return x * float("nan")


# ------------------------------------------------------------------------------------ SteerRouter epsilon


@pytest.mark.parametrize("eps", [-0.01, -1, float("nan"), float("inf"), True, "0.1"])
def test_steer_router_rejects_bad_epsilon(eps: Any, tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match=r"SteerRouter\.epsilon must be a finite number >= 0"):
        with model.intervene(mi.SteerRouter(layer=1, deactivate=[0], epsilon=eps)):
            pass


def test_steer_router_deactivate_with_valid_epsilon(tiny_model: Callable[[str], Any]) -> None:
    """epsilon = 0 is accepted, and deactivating the most used expert removes it from every real token."""
    model = tiny_model("mixtral")
    enc = model.tokenize(PROMPTS)
    real = enc["attention_mask"].bool()
    name = "blocks.1.mlp.hook_expert_indices"
    _, base = model.run_with_cache(enc, names=[name])
    e = int(torch.mode(base[name][real].flatten()).values)
    for eps in (0.0, 0.01):
        with model.intervene(mi.SteerRouter(layer=1, deactivate=[e], epsilon=eps)):
            _, cache = model.run_with_cache(enc, names=[name])
        assert not (cache[name][real] == e).any()


@pytest.mark.parametrize("family", ["deepseek_v3", "llama4_text"])
def test_steer_router_leaves_other_tokens_routing_alone(
    family: str, tiny_model: Callable[[str], Any]
) -> None:
    """Sigmoid routers: deactivating an expert changes nothing at tokens that did not route to it (a softmax
    without renormalisation rescales the kept weights, as SteerMoE's log-softmax edit does)."""
    model = tiny_model(family)
    L = next(i for i, layer in enumerate(model.layers) if layer.is_moe)
    enc = model.tokenize(PROMPTS)
    real = enc["attention_mask"].bool()
    names = [f"blocks.{L}.mlp.hook_expert_indices", f"blocks.{L}.mlp.hook_expert_weights"]
    _, base = model.run_with_cache(enc, names=names)
    e = int(torch.mode(base[names[0]][real].flatten()).values)
    with model.intervene(mi.SteerRouter(layer=L, deactivate=[e])):
        _, cache = model.run_with_cache(enc, names=names)
    untouched = real & ~(base[names[0]] == e).any(-1)
    assert untouched.sum() > 0 and not (cache[names[0]][real] == e).any()
    torch.testing.assert_close(cache[names[0]][untouched], base[names[0]][untouched], rtol=0, atol=0)
    torch.testing.assert_close(cache[names[1]][untouched], base[names[1]][untouched], rtol=0, atol=1e-6)


def test_steer_router_margin_survives_bf16() -> None:
    """In bf16 an activated expert is routed at every token: the epsilon margin is at least one dtype step."""
    model = mi.load("tiny:olmoe", dtype=torch.bfloat16)
    enc = model.tokenize(PROMPTS)
    real = enc["attention_mask"].bool()
    name = "blocks.1.mlp.hook_expert_indices"
    for e in range(model.spec.n_experts):
        with model.intervene(mi.SteerRouter(layer=1, activate=[e], epsilon=1e-3)):
            _, cache = model.run_with_cache(enc, names=[name])
        assert (cache[name][real] == e).any(-1).all(), e


# ----------------------------------------------------------------------------------- non-finite outputs


def _nan_in_place(x: Tensor, ctx: HookContext) -> Tensor:
    return x.mul_(float("nan"))


@pytest.mark.parametrize("fn", [_nan, _nan_in_place])
def test_nan_edit_raises_naming_hook_and_intervention(fn: Callable, tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")
    hook = "blocks.1.hook_resid_pre"
    with model.intervene(mi.EditHook(hook, fn)):
        for run in (
            model.forward,
            lambda p: model.run_with_cache(p, names=[hook]),
            lambda p: model.run_with_cache(p, names=[hook], return_type=None),  # stopped at the hook
        ):
            with pytest.raises(
                NonFiniteOutputError, match=rf"{hook}: edit by EditHook\(.*{fn.__name__}\) produced NaN/inf"
            ):
                run(PROMPTS)
    assert torch.isfinite(model.forward(PROMPTS)).all()  # nothing persists


def test_a_stopped_read_checks_every_position(tiny_model: Callable[[str], Any]) -> None:
    """``return_type=None`` stops at the last hook read; a NaN an edit put at one early position of it is still
    caught, as on the full forward (which checks the logits at every real position, not only the last)."""
    model = tiny_model("mixtral")
    hook = f"blocks.{model.spec.n_layers - 1}.hook_resid_post"

    def first_position_nan(x: Tensor, ctx: HookContext) -> Tensor:
        x = x.clone()
        x[:, 0] = float("nan")
        return x

    with model.intervene(mi.EditHook(hook, first_position_nan)):
        for return_type in ("logits", None):
            with pytest.raises(NonFiniteOutputError, match=rf"{hook}: edit by EditHook"):
                model.run_with_cache(PROMPTS[:1], names=[hook], return_type=return_type)


def test_huge_coefficient_raises(tiny_model: Callable[[str], Any]) -> None:
    """coeff · vector overflows float32 at the hook (finite Python float, inf tensor)."""
    model = tiny_model("mixtral")
    hook = "blocks.2.hook_resid_pre"
    coeff = 10 * float(torch.finfo(torch.float32).max)
    with model.intervene(mi.AddVector(hook, torch.ones(model.spec.d_model), coeff=coeff)):
        with pytest.raises(NonFiniteOutputError, match=rf"{hook}: edit by AddVector\(.*coeff="):
            model.forward(PROMPTS, last_only=True)


def test_overflow_downstream_of_a_finite_edit_names_the_edit(tiny_model: Callable[[str], Any]) -> None:
    """A finite edit whose values overflow later (in o_proj's sum) is still caught at the logits."""
    model = tiny_model("mixtral")
    hook = "blocks.1.attn.hook_v"
    big = float(torch.finfo(torch.float32).max) / 2
    with model.intervene(mi.EditHook(hook, lambda x, ctx: torch.full_like(x, big))):
        with pytest.raises(NonFiniteOutputError, match=rf"overflowed downstream .* at {hook}"):
            model.forward(PROMPTS)


def test_finite_check_runs_no_extra_forward(tiny_model: Callable[[str], Any]) -> None:
    """The check is one isfinite per forward: an edit runs exactly once per pass when outputs are finite."""
    model = tiny_model("mixtral")
    calls = []

    def count(x: Tensor, ctx: HookContext) -> Tensor:
        calls.append(1)
        return x

    with model.intervene(mi.EditHook("blocks.1.hook_resid_pre", count)):
        model.forward(PROMPTS)
    assert len(calls) == 1


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_raises_on_non_finite_steps(do_sample: bool, tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")

    def nan_generated(x: Tensor, ctx: HookContext) -> Tensor:
        return x if ctx.is_prompt else x * float("nan")

    with model.intervene(mi.EditHook("blocks.1.hook_resid_pre", nan_generated)):
        with pytest.raises(NonFiniteOutputError, match=r"generation step 1 .*EditHook"):
            model.generate(PROMPTS, max_new_tokens=3, do_sample=do_sample, seed=0)
    with model.intervene(mi.EditHook("blocks.1.hook_resid_pre", _nan)):  # the prompt pass: names the hook
        with pytest.raises(NonFiniteOutputError, match=r"blocks\.1\.hook_resid_pre: edit by EditHook"):
            model.generate(PROMPTS, max_new_tokens=3, do_sample=do_sample, seed=0)


def test_model_that_is_non_finite_itself_warns_instead() -> None:
    """NaN logits without interventions are not blamed on them: a warning, no error."""
    model = mi.load("tiny:llama")
    with torch.no_grad():
        model.hf_model.lm_head.weight[5] = float("nan")
    with model.intervene(mi.EditHook("blocks.1.hook_resid_pre", lambda x, ctx: x.clone())):
        with pytest.warns(RuntimeWarning, match="also without them"):
            logits = model.forward(PROMPTS)
    assert torch.isnan(logits[..., 5]).all()


# ------------------------------------------------------------------------------------------- arguments


def test_prompt_longer_than_context(tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")
    enc = model.tokenize([LONG])
    assert enc["input_ids"].shape[1] > model.hf_model.config.max_position_embeddings
    for run in (model.forward, model.run_with_cache, model.generate):
        for inputs in ([LONG], enc):
            with pytest.raises(ValueError, match=r"exceed the model's context of 256 tokens"):
                run(inputs)


def test_generation_past_context(tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")
    n = model.tokenize(["Hi"])["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"max_new_tokens=\d+ exceed the model's context"):
        model.generate(["Hi"], max_new_tokens=257 - n)
    assert len(model.generate(["Hi"], max_new_tokens=2)) == 1


def test_tokenizer_larger_than_embedding() -> None:
    hf = mi.load("tiny:llama").hf_model
    tok = copy.deepcopy(mi.load("tiny:llama").tokenizer)
    tok.add_tokens([f"<extra_{i}>" for i in range(hf.get_input_embeddings().num_embeddings - len(tok) + 1)])
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's embedding has \d+ rows"):
        mi.load(hf, tokenizer=tok)


def test_token_ids_out_of_range(tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")
    n = model.hf_model.get_input_embeddings().num_embeddings
    for bad in (n, -1):
        enc = {"input_ids": torch.tensor([[1, 5, bad]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
        with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {n}\)"):
            model.forward(enc)


@pytest.mark.parametrize("bad", [0, -2, 1.5, 2.0, True, "2"])
def test_bad_counts(bad: Any, tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer or None"):
        model.run_with_cache(PROMPTS, names=["hook_embed"], batch_size=bad)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive integer"):
        model.generate(PROMPTS, max_new_tokens=bad)
    with pytest.raises(ValueError, match=r"num_return_sequences must be a positive integer"):
        model.generate(PROMPTS, num_return_sequences=bad, do_sample=True)


def test_good_counts_still_work(tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")
    full, _ = model.run_with_cache(PROMPTS, names=["hook_embed"])
    batched, _ = model.run_with_cache(PROMPTS, names=["hook_embed"], batch_size=1)
    torch.testing.assert_close(batched, full, atol=1e-5, rtol=0)
    out = model.generate(PROMPTS[:1], max_new_tokens=2, num_return_sequences=2, do_sample=True, seed=0)
    assert len(out) == 1 and len(out[0]) == 2


# ----------------------------------------------------------------------------------- reroute exclusion


def _router_inputs(model: Any, layer: int, enc: Any) -> Tensor:
    """The hidden states entering layer ``layer``'s router, from a plain torch hook (no library code)."""
    router = getattr(model.hf_model.model.layers[layer].mlp, model.family.router)
    seen: list[Tensor] = []
    handle = router.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        model.forward(enc)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).float()


def _hand_route(family: str, cfg: Any, router: Any, h: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """Routing written from the config and router weights with expert ``e`` removed: (indices, dense weights)."""
    k, n_exp = cfg.num_experts_per_tok, router.weight.shape[0]
    logits = h @ router.weight.float().T
    gone = torch.zeros(n_exp, dtype=torch.bool)
    gone[e] = True
    if family == "deepseek_v3":  # sigmoid; choose on sigmoid + correction bias within the best groups
        s = logits.sigmoid()
        choice = (s + router.e_score_correction_bias).masked_fill(gone, -math.inf)
        per = n_exp // cfg.n_group
        group = choice.view(-1, cfg.n_group, per).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group, dtype=torch.bool).scatter(1, group.topk(cfg.topk_group).indices, True)
        idx = choice.masked_fill(~keep.repeat_interleave(per, 1), -math.inf).topk(k).indices
        w = s.gather(1, idx)
        w = (w / w.sum(-1, keepdim=True) if cfg.norm_topk_prob else w) * cfg.routed_scaling_factor
    else:  # softmax over the remaining experts
        s = logits.masked_fill(gone, -math.inf).softmax(-1)
        if getattr(cfg, "topk_method", "") == "group_limited_greedy":
            per = n_exp // cfg.n_group
            group = s.view(-1, cfg.n_group, per).max(-1).values
            keep = torch.zeros_like(group, dtype=torch.bool).scatter(
                1, group.topk(cfg.topk_group).indices, True
            )
            s = s.masked_fill(~keep.repeat_interleave(per, 1), 0.0)
        idx = s.topk(k).indices
        w = s.gather(1, idx)
        if family == "mixtral":
            w = w / w.sum(-1, keepdim=True)
        else:
            w = w * cfg.routed_scaling_factor
    return idx, torch.zeros(len(h), n_exp).scatter(1, idx, w)


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("deepseek_v3", {}),
        ("deepseek_v2", {}),
        ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}),
        ("mixtral", {}),
    ],
)
def test_reroute_matches_hand_written_routing(family: str, config: dict) -> None:
    model = mi.load(f"tiny:{family}", config=config)
    L = model.spec.moe_layers[0]
    router = getattr(model.hf_model.model.layers[L].mlp, model.family.router)
    enc = model.tokenize(PROMPTS)
    real = enc["attention_mask"].bool().flatten()
    h = _router_inputs(model, L, enc)
    idx_name, w_name = f"blocks.{L}.mlp.hook_expert_indices", f"blocks.{L}.mlp.hook_expert_weights"
    _, base = model.run_with_cache(enc, names=[idx_name])
    e = int(torch.mode(base[idx_name].flatten()).values)  # the most used expert
    if family == "deepseek_v3":  # a correction bias that favours e: sigmoid(-inf) + bias still wins
        with torch.no_grad():
            router.e_score_correction_bias.copy_(0.1 * torch.randn(model.spec.n_experts))
            router.e_score_correction_bias[e] = 2.0
    want_idx, want_w = _hand_route(family, model.hf_model.config, router, h, e)
    with model.intervene(mi.AblateExpert(layer=L, expert=e, mode="reroute")):
        _, cache = model.run_with_cache(enc, names=[idx_name, w_name])
    got_idx = cache[idx_name].reshape(len(h), -1)[real]
    assert not (got_idx == e).any()
    assert torch.equal(got_idx.sort(-1).values, want_idx[real].sort(-1).values)
    torch.testing.assert_close(cache[w_name].reshape(len(h), -1)[real], want_w[real], atol=1e-5, rtol=1e-5)


def _neg_inf_logit(e: int) -> Callable[[Tensor, HookContext], Tensor]:
    def fn(z: Tensor, ctx: HookContext) -> Tensor:
        z = z.clone()
        z[..., e] = -math.inf
        return z

    return fn


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("how", ["reroute", "-inf logit"])
def test_excluded_expert_never_selected(family: str, how: str, tiny_model: Callable[[str], Any]) -> None:
    """Every routing kind: a rerouted expert (or one whose router logit is set to −inf) takes no slot."""
    model = tiny_model(family)
    L = model.spec.moe_layers[0]
    name = f"blocks.{L}.mlp.hook_expert_indices"
    enc = model.tokenize(PROMPTS)
    real = enc["attention_mask"].bool()
    _, base = model.run_with_cache(enc, names=[name])
    e = int(torch.mode(base[name][real].flatten()).values)
    iv = (
        mi.AblateExpert(layer=L, expert=e, mode="reroute")
        if how == "reroute"
        else mi.EditHook(f"blocks.{L}.mlp.hook_router_logits", _neg_inf_logit(e))
    )
    with model.intervene(iv):
        logits, cache = model.run_with_cache(enc, names=[name])
    assert (base[name][real] == e).any() and not (cache[name][real] == e).any()
    assert torch.isfinite(logits).all()


def test_excluding_too_many_experts_is_an_error(tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("mixtral")  # top-2 of 8 experts

    def keep_one(z: Tensor, ctx: HookContext) -> Tensor:
        z = z.clone()
        z[..., 1:] = -math.inf
        return z

    with model.intervene(mi.EditHook("blocks.1.mlp.hook_router_logits", keep_one)):
        with pytest.raises(ValueError, match=r"1 selectable experts left .* top_k=2"):
            model.forward(PROMPTS)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_in_place_edit_of_the_shared_expert_counts(family: str, tiny_model: Callable[[str], Any]) -> None:
    """An edit that zeroes hook_shared_out in place must act as the same edit made out of place (the delta
    used to be new − new = 0, so it was dropped while the cache showed it)."""
    model = tiny_model(family)
    L = next(i for i, layer in enumerate(model.layers) if layer.is_moe)
    hook = f"blocks.{L}.mlp.hook_shared_out"
    base = model.forward(PROMPTS)
    with model.intervene(mi.EditHook(hook, lambda x, ctx: x * 0)):
        out_of_place = model.forward(PROMPTS)
    with model.intervene(mi.EditHook(hook, lambda x, ctx: x.mul_(0))):
        in_place = model.forward(PROMPTS)
    assert (out_of_place - base).abs().max() > 1e-4
    torch.testing.assert_close(in_place, out_of_place, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "granitemoe", "deepseek_v3", "olmoe"])
def test_router_edits_leave_other_positions_bit_identical_in_bf16(family: str) -> None:
    """Re-routing returns weights in the router's own dtype: an identity edit of the logits changes nothing,
    and rerouting at the last position changes no earlier position (causality), in bf16."""
    model = mi.load(f"tiny:{family}", dtype=torch.bfloat16)
    L = next(i for i, layer in enumerate(model.layers) if layer.is_moe)
    base = model.forward(PROMPTS)
    with model.intervene(mi.EditHook(f"blocks.{L}.mlp.hook_router_logits", lambda x, ctx: x.clone())):
        assert torch.equal(model.forward(PROMPTS), base)
    with model.intervene(mi.AblateExpert(layer=L, expert=0, mode="reroute", positions=[-1])):
        assert torch.equal(model.forward(PROMPTS)[:, :-1], base[:, :-1])


@pytest.mark.parametrize("positions", ["all", "after_first", [-2, -1]])
def test_position_mask_follows_the_hook_tensor_device(positions: Any) -> None:
    """device_map across GPUs: the attention mask sits on the first device, a layer's tensor on another; the
    mask must come on the tensor's device (here the mask is on the CPU and the tensor on 'meta')."""
    from moe_interp.interventions import position_mask
    from moe_interp.tracing import HookContext

    ctx = HookContext("blocks.1.hook_resid_pre", 1, torch.ones(2, 5, dtype=torch.long), True, 0)
    m = position_mask(ctx, positions, torch.zeros(2, 5, 3, device="meta"))
    assert m is not None and m.device.type == "meta"
    assert (
        position_mask(ctx, positions, torch.Size([2, 5, 3])).device.type == "cpu"
    )  # a bare shape: as before


def test_topk_expert_out_width_does_not_depend_on_the_batch(tiny_model: Callable[[str], Any]) -> None:
    """After a weight edit (ForceExpert 'only': one non-zero weight per token) a prompt alone and in a padded
    batch give hook_topk_expert_out of the same width (the router's top-k), and the same values."""
    model = tiny_model("olmoe")
    name = "blocks.1.mlp.hook_topk_expert_out"
    with model.intervene(mi.ForceExpert(1, 3, mode="only")):
        _, alone = model.run_with_cache(PROMPTS[:1], names=[name])
        _, both = model.run_with_cache(PROMPTS, names=[name], batch_size=1)
    assert alone[name].shape[2] == both[name].shape[2] == model.layers[1].top_k
    p = alone[name].shape[1]  # the batch is left-padded to its longest prompt
    torch.testing.assert_close(both[name][:1, -p:], alone[name], rtol=0, atol=1e-6)
