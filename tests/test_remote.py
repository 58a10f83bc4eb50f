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
    big = torch.zeros(4 << 20)  # 16 MB in the pool: must not travel with the request
    entry = (big, 0)
    BUFFERS._bufs.append(entry)
    try:
        size = remote.payload_bytes(model, PROMPTS, NAMES)
    finally:  # by identity: tuple equality would compare the tensors element-wise
        BUFFERS._bufs[:] = [e for e in BUFFERS._bufs if e is not entry]
    assert 0 < size < 1 << 20


def test_connect_builds_a_meta_model(tmp_path) -> None:  # noqa: ANN001
    src = mi.load("tiny:olmoe")
    src.hf_model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    model = remote.connect(str(tmp_path))
    assert model.device.type == "meta"
    assert model.hook_names() == src.hook_names()
    assert model.nnsight._module is model.hf_model  # the remote-capable wrapper (a model key needs a hub id)
    ids, mask = remote._encode(model, PROMPTS, chat=True)  # tokenized on the CPU, not on meta
    assert ids.device.type == "cpu" and torch.equal(ids, src.tokenize(PROMPTS)["input_ids"])
