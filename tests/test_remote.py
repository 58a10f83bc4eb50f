"""Remote execution through nnsight's request serialisation (``remote="local"``: serialise, deserialise with
moe-interp hidden as on an NDIF server, run here) gives the local results exactly."""

from __future__ import annotations

import pytest
import torch

import moe_interp as mi
from moe_interp import remote
from moe_interp.buffers import BUFFERS

PROMPTS = ["How do I bake bread at home?", "Hi"]
NAMES = [
    "blocks.0.hook_resid_pre",
    "blocks.1.attn.hook_z",
    "blocks.1.mlp.hook_expert_out",  # dense per-expert outputs: data-dependent Python inside the body
    "blocks.2.mlp.hook_expert_weights",
]


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "llama4_text"])
def test_remote_local_equals_local(tiny_model, family: str) -> None:  # noqa: ANN001
    model = tiny_model(family)
    with model.intervene(
        mi.AblateExpert(1, 3, "renorm"), mi.AddVector("blocks.0.hook_resid_post", torch.ones(64))
    ):
        logits, cache = remote.run_with_cache(model, PROMPTS, NAMES, remote="local")
        ref_logits, ref = model.run_with_cache(PROMPTS, names=NAMES)
        last = remote.forward(model, PROMPTS, remote="local", last_only=True)
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
    for name in NAMES:
        torch.testing.assert_close(cache[name], ref[name], atol=0, rtol=0)
    torch.testing.assert_close(last, ref_logits[:, -1:], atol=1e-5, rtol=1e-5)


def test_payload_is_small_and_never_carries_pooled_buffers(tiny_model) -> None:  # noqa: ANN001
    model = tiny_model("olmoe")
    model.run_with_cache(PROMPTS, names=["blocks.1.mlp.hook_expert_out"])  # may fill the buffer pool
    with torch.no_grad():  # 16 MB handed out by the pool and still held: it must not travel with the request
        big = BUFFERS.zeros((4 << 20,), torch.float32, torch.device("cpu"))
    if BUFFERS.nbytes < big.numel() * big.element_size():
        pytest.skip("this torch has no storage use count, so the buffer pool is off")
    size = remote.payload_bytes(model, PROMPTS, NAMES)
    assert 0 < size < 1 << 20
    del big  # free again: the pool reuses it


def test_connect_builds_a_meta_model(tmp_path) -> None:  # noqa: ANN001
    src = mi.load("tiny:olmoe")
    src.hf_model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    model = remote.connect(str(tmp_path))
    assert model.device.type == "meta"
    assert model.hook_names() == src.hook_names()
    assert all(p.device.type == "meta" for p in model.hf_model.parameters())  # no weights here
    # a request from the meta model (prompts tokenized here, on the CPU) runs the saved weights exactly
    logits = remote.forward(model, PROMPTS, remote="local")
    torch.testing.assert_close(logits, src.forward(PROMPTS), atol=0, rtol=0)
    assert remote.payload_bytes(model, PROMPTS, NAMES) < 1 << 20


def test_default_names_and_patterns_by_name_and_no_graph(tiny_model) -> None:  # noqa: ANN001
    """names=None runs (every hook but the attention pattern), a pattern asked for by name is read with
    eager attention in the local dry run and equals the local one, and nothing carries an autograd graph."""
    model = tiny_model("olmoe")
    impl = model.hf_model.config._attn_implementation
    logits, cache = remote.run_with_cache(model, PROMPTS, remote="local")
    assert not logits.requires_grad and not any(cache[k].requires_grad for k in cache.keys())
    assert "blocks.1.hook_resid_pre" in cache.keys() and not any(
        k.endswith("hook_pattern") for k in cache.keys()
    )
    name = "blocks.1.attn.hook_pattern"
    _, got = remote.run_with_cache(model, PROMPTS, [name], remote="local")
    _, ref = model.run_with_cache(PROMPTS, names=[name])
    torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=0)
    assert model.hf_model.config._attn_implementation == impl  # switched for the read only
