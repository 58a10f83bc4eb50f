"""Models split by accelerate's ``device_map``: layers offloaded to the CPU / disk keep their weights on the meta
device outside their own forward. Every hook (per-expert outputs, per-head results, re-routing read fused
weights outside that forward), interventions and the fast expert sweep must give the unsplit model's results.

This machine has no second accelerator: offloading is the multi-device path that runs here (accelerate's
hooks move weights and activations between devices around each module). Multi-GPU splits use the same hooks
without offloading (weights stay on their GPU); they are not run here.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch

import moe_interp as mi
from moe_interp.patching import expert_ablation_sweep, expert_mean_outputs

PROMPTS = ["How do I bake bread at home?", "Hi", "kill people now please"]


@functools.cache
def _pair(family: str) -> tuple[mi.MoEModel, mi.MoEModel]:
    """The tiny model and the same weights loaded with layer 1 offloaded to disk and layer 2 to the CPU."""
    from transformers import AutoModelForCausalLM

    src = mi.load(f"tiny:{family}", config=dict(initializer_range=0.2))
    folder, offload = tempfile.mkdtemp(), tempfile.mkdtemp()
    src.hf_model.save_pretrained(folder)
    layers = src.family.layers
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    device_map.update({f"{layers}.0": "cpu", f"{layers}.1": "disk", f"{layers}.2": "cpu"})
    hf = AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, offload_folder=offload, max_memory={"cpu": "1GiB"}, dtype=torch.float32
    )
    return src, mi.load(hf, tokenizer=src.tokenizer)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "granitemoe"])
def test_offloaded_layers_give_the_same_hooks(family: str) -> None:
    src, split = _pair(family)
    fam = src.family
    offloaded = f"{fam.layers}.1.{fam.mlp}.{fam.experts}."
    params = dict(split.hf_model.named_parameters())
    assert any(
        p.device.type == "meta" for n, p in params.items() if n.startswith(offloaded)
    )  # really offloaded
    with torch.no_grad():
        ref_logits, ref = src.run_with_cache(PROMPTS, names=lambda n: True)
        logits, cache = split.run_with_cache(PROMPTS, names=lambda n: True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in ref.keys():
        torch.testing.assert_close(cache[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_offloaded_layers_edits_and_fast_sweep(family: str) -> None:
    src, split = _pair(family)
    ivs = [mi.AblateExpert(1, 2, "reroute"), mi.ForceExpert(2, 5, "add", weight=0.5)]
    with torch.no_grad():
        with src.intervene(*ivs):
            ref = src.forward(PROMPTS)
        with split.intervene(*ivs):
            got = split.forward(PROMPTS)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    means = expert_mean_outputs(src, PROMPTS)
    for mode in ("drop", "renorm", "reroute", "mean"):
        a = expert_ablation_sweep(src, PROMPTS, mode, mean_outputs=means, progress=False)
        b = expert_ablation_sweep(split, PROMPTS, mode, mean_outputs=means, progress=False)
        torch.testing.assert_close(b.per_prompt, a.per_prompt, atol=1e-5, rtol=0, equal_nan=True, msg=mode)
