"""Architecture knowledge as data: router adapters, read-only hook sites, the family table, scoped warnings."""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, get_args

import pytest
import torch

import moe_interp as mi
from moe_interp.adapters import DENSE_SCORE_ROUTER, TOPK_ROUTER, Routing
from moe_interp.errors import InputError
from moe_interp.experts import EXPERT_FNS, ROUTERS
from moe_interp.families import FAMILIES, ExpertKind, RouterKind, get_family, text_config
from moe_interp.hooks import READ_ONLY_SITES, check_writable
from moe_interp.interventions import EditHook, Patch
from moe_interp.prefix import cache_prefix, restart
from tests.conftest import PROMPTS


def test_kinds_list_every_kind_used() -> None:
    assert set(get_args(RouterKind)) == set(ROUTERS)
    assert set(get_args(ExpertKind)) == set(EXPERT_FNS)
    for spec in FAMILIES.values():
        assert spec.router_kind in ROUTERS and spec.expert_kind in EXPERT_FNS
        assert spec.router_adapter in (TOPK_ROUTER, DENSE_SCORE_ROUTER)


def test_wrapper_config_gives_text_config() -> None:
    inner = SimpleNamespace(model_type="llama4_text")
    assert text_config(SimpleNamespace(model_type="llama4", text_config=inner)) is inner
    plain = SimpleNamespace(model_type="mixtral", text_config="unused")
    assert text_config(plain) is plain
    assert get_family("llama4") is get_family("llama4_text")


def test_topk_adapter_round_trips() -> None:
    logits = torch.randn(5, 4)
    w, idx = torch.rand(5, 2), torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    r = TOPK_ROUTER.read((logits, w, idx))
    assert TOPK_ROUTER.write(r) == (logits, w, idx)
    dense = TOPK_ROUTER.dense(r, 4)
    assert torch.equal(TOPK_ROUTER.dense(TOPK_ROUTER.with_dense(r, dense), 4), dense)
    per_expert = torch.randn(5, 4, 3)
    assert torch.equal(TOPK_ROUTER.combine(per_expert), per_expert.sum(1))
    assert TOPK_ROUTER.expert_outputs(object(), 4) is None  # the envoy is not touched


def test_dense_score_adapter_round_trips() -> None:
    scores, logits = torch.rand(5, 4), torch.randn(5, 4)
    r = DENSE_SCORE_ROUTER.read((scores, logits))
    assert r == Routing(logits, scores, None) and DENSE_SCORE_ROUTER.write(r) == (scores, logits)
    assert torch.equal(DENSE_SCORE_ROUTER.selected(r, 2), logits.topk(2, dim=-1).indices)
    out = torch.randn(4 * 5, 3)  # [(e n), d], as Llama 4's experts module returns it
    per_expert = DENSE_SCORE_ROUTER.expert_outputs(SimpleNamespace(output=out), 4)
    assert per_expert is not None and per_expert.shape == (5, 4, 3)
    assert torch.equal(per_expert[2, 1], out[1 * 5 + 2])
    assert torch.equal(DENSE_SCORE_ROUTER.combine(per_expert), out)
    with pytest.raises(InputError, match="read-only"):
        DENSE_SCORE_ROUTER.with_indices(r, torch.zeros(5, 1, dtype=torch.long))


def test_check_writable_names_hook_and_alternative() -> None:
    check_writable(["blocks.0.mlp.hook_expert_out", "blocks.3.attn.hook_z"])
    with pytest.raises(InputError) as err:
        check_writable(["blocks.2.mlp.hook_topk_expert_out"])
    msg = str(err.value)
    assert "\n" not in msg and "blocks.2.mlp.hook_topk_expert_out is read-only" in msg
    assert "mlp.hook_expert_out" in msg and "every other hook is writable" in msg
    assert set(READ_ONLY_SITES) <= set(get_family("llama4_text").read_only_sites)


def _noop(x: torch.Tensor, ctx: Any) -> torch.Tensor:
    return x


@pytest.mark.parametrize(
    ("family", "hook"),
    [
        ("olmoe", "blocks.0.mlp.hook_topk_expert_out"),
        ("olmoe", "blocks.1.attn.hook_pattern"),
        ("llama4_text", "blocks.0.mlp.hook_expert_indices"),
    ],
)
def test_read_only_sites_refused_before_running(
    family: str, hook: str, tiny_model: Callable[[str], Any]
) -> None:
    model = tiny_model(family)
    for iv in (EditHook(hook, _noop), Patch(hook, torch.zeros(1))):
        with pytest.raises(InputError, match=f"{hook} is read-only"):
            with model.intervene(iv):
                pass  # pragma: no cover - intervene validates on entry
        assert model._active == []
    # the tracer refuses direct requests too (prefix restarts build their own)
    enc = model.tokenize(PROMPTS)
    L = int(hook.split(".")[1])
    if hook.startswith(f"blocks.{L}.mlp."):
        prefix = cache_prefix(model, enc["input_ids"], enc["attention_mask"], [L])
        with pytest.raises(InputError, match="read-only"):
            restart(model, prefix, L, torch.arange(len(PROMPTS)), {hook: _noop})


@pytest.mark.parametrize(
    ("family", "hook"),
    [("olmoe", "blocks.0.mlp.hook_expert_indices"), ("llama4_text", "blocks.0.mlp.hook_expert_weights")],
)
def test_writable_routing_sites_still_edit(family: str, hook: str, tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model(family)
    base = model.forward(PROMPTS)

    def edit(x: torch.Tensor, ctx: Any) -> torch.Tensor:
        if x.dtype.is_floating_point:  # weights: all mass on expert 0
            new = torch.zeros_like(x)
            new[..., 0] = 1.0
            return new
        return (x + 1) % model.spec.n_experts  # indices: every token to other experts

    with model.intervene(EditHook(hook, edit)):
        edited = model.forward(PROMPTS)
    assert not torch.allclose(base, edited)
    torch.testing.assert_close(model.forward(PROMPTS), base, rtol=0, atol=0)


_LIST_DEPS = (
    "import sys\n"
    "import moe_interp.model, moe_interp.tracing\n"
    "print('\\n'.join(m for m in sys.modules if m.split('.')[0] != 'moe_interp'))\n"
)
_CHECK = (
    "import importlib, sys, warnings\n"
    "for name in sys.stdin.read().split():\n"
    "    try:\n"
    "        importlib.import_module(name)\n"
    "    except Exception:\n"
    "        pass\n"
    "before = list(warnings.filters)\n"
    "import moe_interp, moe_interp.model, moe_interp.tracing\n"
    "new = [f for f in warnings.filters if f not in before]\n"
    "assert warnings.filters == before, f'importing moe_interp changed warnings.filters: {new}'\n"
    "m = moe_interp.load('tiny:olmoe')\n"
    "m.forward(['Hi']); m.generate(['Hi'], max_new_tokens=2)\n"
    "assert warnings.filters == before, 'a call changed warnings.filters'\n"
)


def test_import_leaves_warning_filters_alone() -> None:
    """Importing (and calling) moe_interp adds no warning filter. Its dependencies (torch, numpy, sympy) add
    their own on import: they are imported first, in a fresh interpreter, so only moe_interp's effect shows."""
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=300)
    deps = run([sys.executable, "-c", _LIST_DEPS])
    assert deps.returncode == 0, deps.stderr[-2000:]
    res = run([sys.executable, "-c", _CHECK], input=deps.stdout)
    assert res.returncode == 0, res.stderr[-2000:]


def test_generate_is_quiet_about_the_open_loop(tiny_model: Callable[[str], Any]) -> None:
    """Edited generation runs nnsight's open step loop, which warns by design: silenced inside our call."""
    model = tiny_model("olmoe")
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        with model.intervene(EditHook("blocks.0.hook_resid_pre", _noop)):
            model.generate(["Hi"], max_new_tokens=2)
    assert not [w for w in log if "never reached" in str(w.message)]


def test_package_exports_still_resolve() -> None:
    assert mi.ModelSpec.__module__ == "moe_interp.model_structure"
    from moe_interp.model import ModelSpec, load

    assert ModelSpec is mi.ModelSpec and callable(load)


def test_patch_positions_must_be_indices(tiny_model: Callable[[str], Any]) -> None:
    model = tiny_model("olmoe")
    with pytest.raises(InputError, match="Patch.positions"):
        with model.intervene(Patch("blocks.0.hook_resid_pre", torch.zeros(1), positions="all")):  # type: ignore[arg-type]
            pass  # pragma: no cover
