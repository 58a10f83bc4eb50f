"""Per-pair expert outputs computed by the experts module itself, and when their sum is the module's output.

Where the module's implementation sums the weighted pair outputs over the top-k slots (transformers'
``grouped_mm`` and ``batched_mm``), the adapter uses that sum as the module's output in half precision and skips
the module, so the experts run once: these tests check the sum against the module's own call bit for bit (bf16,
fp32 and mixed-dtype weights), and that reading every expert hook then leaves bf16 logits bit-identical.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_interp as mi
from moe_interp.experts import module_pair_outputs, sums_like_module
from moe_interp.tiny import tiny_families

PROMPTS = ["How do I bake bread at home?", "Tell me a joke"]


def _experts(model: Any) -> torch.nn.Module:
    """The experts module of the first MoE layer."""
    suffix = f".{model.family.mlp}.{model.family.experts}"
    return next(m for name, m in model.hf_model.named_modules() if name.endswith(suffix))


def _slot_sum_families() -> list[str]:
    out = []
    for fam in tiny_families():
        model = mi.load(f"tiny:{fam}")
        if any(i.is_moe for i in model.layers) and sums_like_module(_experts(model), torch.float32):
            out.append(fam)
    return out


SLOT_SUM = _slot_sum_families()


def _assert_reads_keep_the_logits(model: Any) -> None:
    names = [n for n in model.hook_names() if ".mlp." in n and "expert" in n]
    enc = model.tokenize(PROMPTS)
    plain, _ = model.run_with_cache(enc, names=[])
    observed, cache = model.run_with_cache(enc, names=names)
    assert set(cache.keys()) == set(names)
    assert torch.equal(plain, observed)


def test_most_families_sum_like_their_module() -> None:
    assert len(SLOT_SUM) >= 8, SLOT_SUM


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
)
@pytest.mark.parametrize("family", SLOT_SUM)
def test_pair_sum_is_the_module_output_bit_for_bit(family: str, impl: str, dtypes: tuple) -> None:
    x_dtype, w_dtype = dtypes
    model = mi.load(f"tiny:{family}", dtype=x_dtype)
    model.hf_model.set_experts_implementation(impl)
    experts = _experts(model)
    assert sums_like_module(experts, x_dtype)
    gen = torch.Generator().manual_seed(0)
    info = next(i for i in model.layers if i.is_moe)
    n, d, k, n_exp = 13, model.spec.d_model, info.top_k, info.n_experts
    x = torch.randn(n, d, generator=gen).to(x_dtype)
    indices = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=gen).softmax(-1).to(w_dtype)
    with torch.no_grad():
        own = type(experts).forward(experts, x, indices, weights)
        pairs = module_pair_outputs(model.family, experts, x, weights, indices)
    assert pairs.shape == (n, k, own.shape[-1])
    assert torch.equal(pairs.sum(dim=1).to(own.dtype), own)


def test_eager_experts_do_not_count_as_slot_sums() -> None:
    model = mi.load("tiny:olmoe")
    model.hf_model.set_experts_implementation("eager")
    assert not sums_like_module(_experts(model), torch.float32)


@pytest.mark.parametrize("family", SLOT_SUM)
def test_reading_expert_hooks_leaves_bf16_logits_bit_identical(family: str) -> None:
    _assert_reads_keep_the_logits(mi.load(f"tiny:{family}", dtype=torch.bfloat16))


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_eager_experts_in_bf16_keep_the_module_output(family: str) -> None:
    """Another reduction (eager: index_add_ in expert order): the module runs too and keeps its own sum."""
    model = mi.load(f"tiny:{family}", dtype=torch.bfloat16)
    model.hf_model.set_experts_implementation("eager")
    names = [n for n in model.hook_names() if ".mlp." in n and "expert" in n]
    enc = model.tokenize(PROMPTS)
    plain, _ = model.run_with_cache(enc, names=[])
    observed, _ = model.run_with_cache(enc, names=names)
    assert torch.equal(plain, observed)
    edit = next(n for n in names if n.endswith("hook_expert_out"))
    with model.intervene(mi.EditHook(edit, lambda x, ctx: x)):
        edited, _ = model.run_with_cache(enc, names=[])
    assert torch.equal(plain, edited)


def test_experts_in_another_dtype_keep_the_module_output() -> None:
    """fp32 experts in a bf16 model: the module rounds each pair to bf16 before the weight would apply, so the
    pair sum is not its output; reading the hooks must still leave the logits alone."""
    model = mi.load("tiny:mixtral", dtype=torch.bfloat16)
    for name, mod in model.hf_model.named_modules():
        if name.endswith(f".{model.family.mlp}.{model.family.experts}"):
            mod.float()
    assert not sums_like_module(_experts(model), torch.bfloat16)
    _assert_reads_keep_the_logits(model)


def test_another_function_under_a_slot_sum_name_is_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A function registered as ``grouped_mm`` that weights differently (as a quantised backend's does)."""
    from transformers.integrations import moe as hf_moe

    def weights_in_bf16(self: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return hf_moe.grouped_mm_experts_forward(self, x, idx, w.to(torch.bfloat16))

    interface = hf_moe.ALL_EXPERTS_FUNCTIONS
    monkeypatch.setattr(interface, "get_interface", lambda impl, default: weights_in_bf16)
    model = mi.load("tiny:mixtral", dtype=torch.bfloat16)
    assert not sums_like_module(_experts(model), torch.bfloat16)
    _assert_reads_keep_the_logits(model)
