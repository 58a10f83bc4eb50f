"""Path patching against a hand-written computation on tiny OLMoE: the receiver's input is the clean
residual plus (corrupt − clean) sender, put through the receiver's own HF modules; the third pass is re-run
with a plain torch hook on the HF module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_interp.interventions import Patch
from moe_interp.path_patching import Node, expert_senders, head_senders, path_patch, path_patch_sweep
from tests.conftest import PROMPTS

ATOL = 1e-5


@pytest.fixture(scope="module")
def setup(tiny_model):  # noqa: ANN001, ANN201
    """The model, clean and corrupt inputs (half the real tokens replaced), and a logit-difference metric."""
    model = tiny_model("olmoe")
    enc = model.tokenize(PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    gen = torch.Generator().manual_seed(0)
    swap = mask.bool() & (torch.rand(ids.shape, generator=gen) < 0.5)
    bad = ids.clone()
    bad[swap] = torch.randint(10, 500, (int(swap.sum()),), generator=gen)
    clean = {"input_ids": ids, "attention_mask": mask}
    corrupt = {"input_ids": bad, "attention_mask": mask}

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, 17] - logits[:, -1, 42]).mean()

    return model, clean, corrupt, metric


def _delta(model, clean, corrupt, hook: str, index: int) -> torch.Tensor:  # noqa: ANN001
    """corrupt − clean value of one sender slice (dim 2), the only change its direct path carries."""
    _, c = model.run_with_cache(clean, names=[hook])
    _, x = model.run_with_cache(corrupt, names=[hook])
    return x[hook][:, :, index] - c[hook][:, :, index]


def _hf_logits(model, clean, module: torch.nn.Module, new_input: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Plain HF forward with ``module``'s input replaced (a torch pre-hook, no moe-interp machinery)."""
    ids, mask = clean["input_ids"], clean["attention_mask"]
    handle = module.register_forward_pre_hook(lambda m, args: (new_input.reshape(args[0].shape), *args[1:]))
    try:
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            return model.hf_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("receiver_layer", [1, 2])
def test_head_to_router(setup, receiver_layer: int) -> None:  # noqa: ANN001
    model, clean, corrupt, metric = setup
    sender = ("blocks.0.attn.hook_result", 1)
    receiver = f"blocks.{receiver_layer}.mlp.hook_router_logits"
    res = path_patch(model, clean, corrupt, sender, receiver, metric=metric)
    mid = f"blocks.{receiver_layer}.hook_resid_mid"
    _, cache = model.run_with_cache(clean, names=[mid])
    x = cache[mid] + _delta(model, clean, corrupt, *sender)  # direct path only: everything else clean
    layer = model.hf_model.model.layers[receiver_layer]
    with torch.no_grad():
        h = layer.post_attention_layernorm(x)
        hand = F.linear(h, layer.mlp.gate.weight)
    torch.testing.assert_close(res.receiver_patched, hand, rtol=0, atol=ATOL)
    assert (res.receiver_patched - res.receiver_clean).abs().max() > 1e-3  # the path does something
    # pass 3: only the router's input changes; HF re-runs its own routing, experts see the clean input
    hand_logits = _hf_logits(model, clean, layer.mlp.gate, h)
    torch.testing.assert_close(res.logits, hand_logits, rtol=0, atol=ATOL)
    assert abs(res.metric_patched - float(metric(hand_logits))) < ATOL
    expected = ["blocks.0.hook_mlp_out"] + [
        f"blocks.{L}.hook_{s}_out" for L in range(1, receiver_layer) for s in ("attn", "mlp")
    ]
    assert res.frozen == expected + [f"blocks.{receiver_layer}.hook_attn_out"]


def test_freezing_differs_from_plain_patching(setup) -> None:  # noqa: ANN001
    model, clean, corrupt, metric = setup
    sender, receiver = Node("blocks.0.attn.hook_result", 1), "blocks.2.mlp.hook_router_logits"
    res = path_patch(model, clean, corrupt, sender, receiver, metric=metric)
    _, c = model.run_with_cache(clean, names=[sender.hook])
    _, x = model.run_with_cache(corrupt, names=[sender.hook])
    value = c[sender.hook].clone()
    value[:, :, 1] = x[sender.hook][:, :, 1]
    with model.intervene(Patch(sender.hook, value)):  # total effect: indirect paths included
        _, total = model.run_with_cache(clean, names=[receiver])
    assert (total[receiver] - res.receiver_patched).abs().max() > 1e-4


def test_expert_to_head_query(setup) -> None:  # noqa: ANN001
    model, clean, corrupt, metric = setup
    sender, receiver = ("blocks.0.mlp.hook_expert_out", 3), ("blocks.1.attn.hook_q", 2)
    res = path_patch(model, clean, corrupt, sender, receiver, metric=metric)
    _, cache = model.run_with_cache(clean, names=["blocks.1.hook_resid_pre"])
    x = cache["blocks.1.hook_resid_pre"] + _delta(model, clean, corrupt, *sender)
    layer = model.hf_model.model.layers[1]
    with torch.no_grad():
        q = layer.self_attn.q_proj(layer.input_layernorm(x))
    hand = q.reshape(*q.shape[:2], model.spec.n_heads, -1)[:, :, 2]
    torch.testing.assert_close(res.receiver_patched, hand, rtol=0, atol=ATOL)
    assert res.frozen == []  # nothing between layer 0's MLP and layer 1's attention


def test_head_to_expert_input(setup) -> None:  # noqa: ANN001
    model, clean, corrupt, metric = setup
    e = 3
    res = path_patch(
        model, clean, corrupt, ("blocks.0.attn.hook_result", 0), f"blocks.1.mlp.experts.{e}.hook_out"
    )
    names = ["blocks.1.hook_resid_mid", "blocks.1.mlp.hook_expert_weights"]
    _, cache = model.run_with_cache(clean, names=names)
    x = cache["blocks.1.hook_resid_mid"] + _delta(model, clean, corrupt, "blocks.0.attn.hook_result", 0)
    layer = model.hf_model.model.layers[1]
    ex = layer.mlp.experts
    with torch.no_grad():
        h = layer.post_attention_layernorm(x)
        gate, up = F.linear(h, ex.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, ex.down_proj[e])
    w = cache["blocks.1.mlp.hook_expert_weights"][..., e : e + 1]  # routing frozen at clean
    torch.testing.assert_close(res.receiver_patched, y * w, rtol=0, atol=ATOL)
    assert "blocks.1.mlp.hook_expert_weights" in res.frozen


def test_sweep_and_errors(setup) -> None:  # noqa: ANN001
    model, clean, corrupt, metric = setup
    senders = head_senders(model, before_layer=1)[:2] + expert_senders(model, before_layer=1)[:1]
    sweep = path_patch_sweep(model, clean, corrupt, senders, "blocks.1.mlp.hook_router_logits", metric=metric)
    assert sweep.labels == [
        "blocks.0.attn.hook_result[0]",
        "blocks.0.attn.hook_result[1]",
        "blocks.0.mlp.hook_expert_out[0]",
    ]
    one = path_patch(model, clean, corrupt, senders[1], "blocks.1.mlp.hook_router_logits", metric=metric)
    assert abs(float(sweep.effects[1]) - one.effect) < 1e-6
    assert (
        sweep.normalized.shape == (3,)
        and abs(sweep.metric_clean - float(metric(model.forward(clean)))) < ATOL
    )
    with pytest.raises(ValueError, match="downstream"):
        path_patch(model, clean, corrupt, "blocks.1.hook_attn_out", "blocks.1.attn.hook_q")
    with pytest.raises(ValueError, match="same shape"):
        short = {k: v[:, 1:] for k, v in corrupt.items()}
        path_patch(model, clean, short, "blocks.0.hook_attn_out", "blocks.1.mlp.hook_router_logits")


def test_prompt_lists_are_aligned(setup) -> None:  # noqa: ANN001
    model, _, _, metric = setup
    clean, corrupt = ["Hi", "How do I bake bread at home?"], ["Write a short poem", "Hi"]
    res = path_patch(
        model, clean, corrupt, ("blocks.0.attn.hook_result", 2), "blocks.1.hook_resid_pre", metric=metric
    )
    enc = model.tokenize(clean + corrupt)  # one padded length for both
    _, c = model.run_with_cache({k: v[:2] for k, v in enc.items()}, names=["blocks.1.hook_resid_pre"])
    delta = _delta(
        model,
        {k: v[:2] for k, v in enc.items()},
        {k: v[2:] for k, v in enc.items()},
        "blocks.0.attn.hook_result",
        2,
    )
    torch.testing.assert_close(res.receiver_patched, c["blocks.1.hook_resid_pre"] + delta, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="as many prompts"):
        path_patch(model, clean, corrupt[:1], "blocks.0.hook_attn_out", "blocks.1.hook_resid_pre")
