"""Jupyter views: HTML is produced offline with every token escaped, values match the hooks, and the static
twins are written as PDF + PNG."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from moe_interp.dla import direct_logit_attribution
from moe_interp.views import AttentionView, RoutingView, attention_view, dla_view, routing_view

EVIL = "<script>alert(1)</script>"


def _offline(html_text: str) -> None:
    assert "<script" not in html_text.lower() and "http" not in html_text


def _written(paths: list[Path]) -> None:
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    assert paths[0].read_bytes()[:4] == b"%PDF" and paths[1].read_bytes()[:4] == b"\x89PNG"


def test_attention_view(tiny_model, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_model("mixtral")
    view = attention_view(model, "Hi", layer=1, heads=[0, 3])
    _, cache = model.run_with_cache(model.tokenize(["Hi"]), names=["blocks.1.attn.hook_pattern"])
    torch.testing.assert_close(view.pattern, cache["blocks.1.attn.hook_pattern"][0, [0, 3]], rtol=0, atol=0)
    out = view._repr_html_()
    _offline(out)
    assert "&lt;|user|&gt;" in out and "<|user|>" not in out  # the chat template's special tokens, escaped
    assert out.count("<details") == 2 and out.count("<td ") == 2 * len(view.tokens) ** 2
    _written(view.save(tmp_path / "attention"))
    with pytest.raises(ValueError, match="no attention heads"):
        attention_view(tiny_model("qwen3_next"), "Hi", layer=0)
    for heads in ([7], [-1], []):  # -1 would show head 3 titled "head -1"
        with pytest.raises(ValueError, match=r"out of range: layer 1 has heads 0\.\.3"):
            attention_view(model, "Hi", layer=1, heads=heads)


def test_views_escape_token_text() -> None:
    att = AttentionView([EVIL, 'a"b'], torch.full((1, 2, 2), 0.5), layer=0, heads=[0])
    rout = RoutingView([EVIL], [0], torch.tensor([[[1, 2]]]), torch.tensor([[[0.7, 0.3]]]))
    for out in (att._repr_html_(), rout._repr_html_()):
        _offline(out)
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert 'a"b' not in att._repr_html_() and "a&quot;b" in att._repr_html_()


def test_routing_view(tiny_model, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_model("deepseek_v3")  # layer 0 is dense: only layers 1, 2 are shown
    view = routing_view(model, "How do I bake bread?")
    names = [f"blocks.{L}.mlp.hook_expert_{s}" for L in (1, 2) for s in ("indices", "weights")]
    _, cache = model.run_with_cache(model.tokenize(["How do I bake bread?"]), names=names)
    assert view.layers == [1, 2]
    for i, L in enumerate(view.layers):
        idx = cache[f"blocks.{L}.mlp.hook_expert_indices"][0]
        torch.testing.assert_close(view.indices[i], idx.long(), rtol=0, atol=0)
        dense = cache[f"blocks.{L}.mlp.hook_expert_weights"][0]
        torch.testing.assert_close(view.weights[i], dense.gather(-1, idx.long()), rtol=0, atol=0)
    out = view._repr_html_()
    _offline(out)
    rows = re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", out)[1:]  # after the header
    assert len(rows) == len(view.tokens)
    p = len(view.tokens) - 1  # last token, layer 2: its experts appear by weight, largest first
    order = torch.argsort(view.weights[1, p], descending=True)
    chips = re.findall(r">e(\d+) ([0-9.]+)</span>", re.findall(r"<td>(.*?)</td>", rows[p][1])[1])
    assert [int(c[0]) for c in chips] == view.indices[1, p][order].tolist()
    _written(view.save(tmp_path / "routing"))
    with pytest.raises(ValueError, match="no MoE layers"):
        routing_view(tiny_model("llama"), "Hi")


def test_dla_view(tiny_model, tmp_path: Path) -> None:  # noqa: ANN001
    model = tiny_model("olmoe")
    res = direct_logit_attribution(model, ["Hi", "How do I bake bread?"], tokens=17, against=42)
    view = dla_view(res, batch=0, k=2)
    out = view._repr_html_()
    _offline(out)
    real = int(res.attention_mask[0].sum())
    rows = re.findall(r"<tr><td>(\d+)</td>", out)
    assert len(rows) == real  # padding left out
    last = out.rsplit("<tr>", 1)[1]
    top = res.top(2, pos=-1, batch=0)
    assert [html_label for html_label in re.findall(r'title="([^:"]+):', last)] == [t[0] for t in top]
    assert f"{float(res.logit_diff[0, -1]):+.3f}" in last
    _written(view.save(tmp_path / "dla"))
    with pytest.raises(ValueError, match="out of range"):
        dla_view(res, batch=5)
    for k in (0, -1, 1.5):  # k=-1 silently dropped the last contribution
        with pytest.raises(ValueError, match="k must be a positive int"):
            dla_view(res, batch=0, k=k)


def test_circuitsvis_is_optional() -> None:
    view = AttentionView(["a", "b"], torch.full((1, 2, 2), 0.5), layer=0, heads=[0])
    if importlib.util.find_spec("circuitsvis") is None:
        with pytest.raises(ImportError, match="circuitsvis"):
            view.to_circuitsvis()
    else:
        assert hasattr(view.to_circuitsvis(), "_repr_html_")
