"""The stage store: JSON + safetensors round trips, an allow-list of classes, and damaged files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_interp.circuits import Circuit
from moe_interp.patching.activation import PatchingResult
from moe_interp.store import StoreError, load_tree, read_header, save_tree


def _tree() -> dict:
    v = torch.arange(6.0).reshape(2, 3)
    return {
        "plain": [1, 2.5, "s", None, True],
        "nan": float("nan"),
        "inf": -math.inf,
        "tuple": (1, (2, 3)),
        "int_keys": {0: "a", (1, 2): "b"},
        "tensor": v,
        "view": v[0],  # shares storage with "tensor"
        "bool": torch.tensor([True, False]),
        "result": PatchingResult(
            values=torch.randn(2, 3),
            kind="resid",
            hook="blocks.{L}.hook_resid_pre",
            dims=("layer", "pos"),
            direction="denoise",
            positions=[-2, -1],
            position_labels=["a", "b"],
            clean_metric=1.5,
        ),  # fmt: skip
        "circuit": Circuit(
            components=[{"name": "blocks.0.hook_attn_out", "kind": "attn", "layer": 0}],
            faithfulness={"circuit": 0.9},
            metadata={"positions": [-1]},
            means={"blocks.0.hook_attn_out": torch.ones(4)},
        ),
    }


def test_round_trip(tmp_path: Path) -> None:
    tree = _tree()
    files = save_tree(tmp_path / "x", tree, {"fingerprint": "abc"})
    assert [f.name for f in files] == ["x.json", "x.safetensors"]
    assert read_header(tmp_path / "x") == {"fingerprint": "abc"}
    back = load_tree(tmp_path / "x")
    assert back["plain"] == tree["plain"] and back["tuple"] == (1, (2, 3))
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert back["int_keys"] == {0: "a", (1, 2): "b"}
    assert torch.equal(back["tensor"], tree["tensor"]) and torch.equal(back["view"], tree["view"])
    assert back["bool"].dtype == torch.bool and torch.equal(back["bool"], tree["bool"])
    r = back["result"]
    assert isinstance(r, PatchingResult) and torch.equal(r.values, tree["result"].values)
    assert r.dims == ("layer", "pos") and r.clean_metric == 1.5 and math.isnan(r.corrupt_metric)
    c = back["circuit"]
    assert isinstance(c, Circuit) and c.components == tree["circuit"].components
    assert torch.equal(c.means["blocks.0.hook_attn_out"], torch.ones(4))
    # no tensors: no .safetensors file, and a stale one from before is removed
    save_tree(tmp_path / "x", {"a": 1})
    assert not (tmp_path / "x.safetensors").exists() and load_tree(tmp_path / "x") == {"a": 1}


def test_unknown_types_are_refused_on_save(tmp_path: Path) -> None:
    class Thing:
        pass

    with pytest.raises(TypeError, match="Thing"):
        save_tree(tmp_path / "x", {"a": Thing()})
    assert not (tmp_path / "x.json").exists()


def test_a_file_can_only_name_allowed_classes(tmp_path: Path) -> None:
    save_tree(tmp_path / "x", {"a": 1})
    doc = json.loads((tmp_path / "x.json").read_text())
    doc["tree"] = {"__dataclass__": "Popen", "fields": {"args": ["touch", str(tmp_path / "pwned")]}}
    (tmp_path / "x.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="'Popen' is not storable"):
        load_tree(tmp_path / "x")
    doc["tree"] = {"__dataclass__": "Circuit", "fields": {"components": [], "evil": 1}}
    (tmp_path / "x.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="unknown fields"):
        load_tree(tmp_path / "x")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["truncated_json", "foreign_json", "truncated_tensors", "missing_tensor"])
def test_damaged_files_raise_store_error(tmp_path: Path, damage: str) -> None:
    save_tree(tmp_path / "x", {"t": torch.ones(64)})
    js, st = tmp_path / "x.json", tmp_path / "x.safetensors"
    if damage == "truncated_json":
        js.write_text(js.read_text()[:20])
    elif damage == "foreign_json":
        js.write_text(json.dumps({"format": "something else", "header": {}}))
    elif damage == "truncated_tensors":
        st.write_bytes(st.read_bytes()[:40])
    else:
        st.unlink()
    with pytest.raises(StoreError):
        load_tree(tmp_path / "x")


def load_file_x(stem: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return next(iter(load_file(str(stem) + ".safetensors").values()))


def test_an_interrupted_save_never_pairs_an_old_header_with_new_tensors(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    stem = tmp_path / "stage"
    save_tree(stem, {"x": torch.zeros(2)}, header={"fingerprint": "old"})
    import safetensors.torch

    def write_then_die(tensors, path) -> None:  # noqa: ANN001
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_tree(stem, {"x": torch.ones(2)}, header={"fingerprint": "new"})
    # interrupted while the new tensors are written: the previous result is still whole (its header, its tensors)
    assert read_header(stem)["fingerprint"] == "old" and torch.equal(load_tree(stem)["x"], torch.zeros(2))
    monkeypatch.undo()

    import moe_interp.store as store

    def die_writing_json(path: Path) -> Any:  # the new tensors are in place, the new header is not yet
        raise KeyboardInterrupt

    real_atomic = store.atomic_path
    monkeypatch.setattr(
        store, "atomic_path", lambda p: die_writing_json(p) if p.suffix == ".json" else real_atomic(p)
    )
    with pytest.raises(KeyboardInterrupt):
        save_tree(stem, {"x": torch.ones(2)}, header={"fingerprint": "new"})
    # no header left that a --resume could match: the result is missing, not mixed
    assert not (tmp_path / "stage.json").exists() and torch.equal(load_file_x(stem), torch.ones(2))
