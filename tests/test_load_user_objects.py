"""load() on the user's own objects: what it changes (eval mode, a missing pad token) only once nothing can
fail any more, and a dtype it would have to apply by converting the user's model is refused."""

from __future__ import annotations

import copy

import pytest
import torch

import moe_interp as mi


def test_a_model_of_the_wrong_layout_fails_with_one_line_and_is_left_as_it_was() -> None:
    base = mi.load("tiny:olmoe")
    hf = copy.deepcopy(base.hf_model).train()
    del hf.model.layers[0].mlp
    tok = copy.deepcopy(base.tokenizer)
    tok.pad_token = None
    with pytest.raises(ValueError, match=r"module layout of family 'olmoe'.*'mlp'") as err:
        mi.load(hf, tokenizer=tok)
    assert "\n" not in str(err.value)
    assert hf.training, "the failed load put the user's model in eval mode"
    assert tok.pad_token is None, "the failed load set a pad token on the user's tokenizer"


def test_dtype_for_an_in_memory_model_is_refused_unless_it_is_the_models_own() -> None:
    base = mi.load("tiny:olmoe")
    hf = copy.deepcopy(base.hf_model)
    with pytest.raises(ValueError, match=r"dtype=torch.bfloat16 .* in-memory model is torch.float32"):
        mi.load(hf, tokenizer=base.tokenizer, dtype=torch.bfloat16)
    assert next(hf.parameters()).dtype == torch.float32
    model = mi.load(hf, tokenizer=base.tokenizer, dtype="float32")  # its own dtype: accepted
    assert model.hf_model is hf
