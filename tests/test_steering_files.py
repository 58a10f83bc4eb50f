"""Steering files: a path loads back as what was last saved there, a failed write leaves the user's files as
they were, and unreadable files give one-line errors naming them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import moe_interp as mi
from moe_interp.errors import InputError, MissingFileError
from moe_interp.fileio import read_json_object
from moe_interp.steering.edits import RouterSteering, TopicGatedSteering
from moe_interp.steering.formats import load_steering
from moe_interp.steering.gguf_io import (
    export_control_vector_gguf,
    read_control_vector_gguf,
    read_control_vector_model_hint,
)
from moe_interp.steering.vectors import SteeringMetadata, SteeringVectors
from moe_interp.store import StoreError, load_tree, save_tree


@pytest.fixture(scope="module")
def olmoe() -> Any:
    return mi.load("tiny:olmoe")


def _sv(model: Any, hook: str = "blocks.1.hook_resid_pre", seed: int = 0) -> SteeringVectors:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.spec.d_model, generator=g)
    return SteeringVectors({(hook, None): v}, SteeringMetadata.from_model(model))


def test_a_plain_pair_saved_over_a_topic_gated_set_loads_back_as_the_pair(olmoe: Any, tmp_path: Path) -> None:
    sv = _sv(olmoe)
    TopicGatedSteering(sv, 0, torch.randn(olmoe.spec.d_model), 0.5, sv.metadata).save(tmp_path / "steer")
    assert (tmp_path / "steer.gate.safetensors").is_file()
    plain = _sv(olmoe, seed=1)
    plain.save(tmp_path / "steer")
    loaded = load_steering(tmp_path / "steer.json", olmoe)
    assert type(loaded) is SteeringVectors and not (tmp_path / "steer.gate.safetensors").exists()
    key = plain.keys[0]
    assert torch.equal(loaded.vectors[key], plain.vectors[key])
    # and the other way round: a gated set saved over a plain pair keeps its gate
    TopicGatedSteering(sv, 0, torch.randn(olmoe.spec.d_model), 0.5, sv.metadata).save(tmp_path / "steer")
    assert type(load_steering(tmp_path / "steer.json", olmoe)) is TopicGatedSteering


def test_router_steering_keeps_dotted_names_apart(olmoe: Any, tmp_path: Path) -> None:
    meta = SteeringMetadata.from_model(olmoe)
    a = RouterSteering(meta, deactivate={1: (0, 1)})
    b = RouterSteering(meta, deactivate={1: (2,)})
    assert a.save(tmp_path / "refusal.v1") == [tmp_path / "refusal.v1.json"]
    b.save(tmp_path / "refusal.v2")
    assert RouterSteering.load(tmp_path / "refusal.v1").deactivate == {1: (0, 1)}
    assert load_steering(tmp_path / "refusal.v2", olmoe).deactivate == {1: (2,)}
    assert a.save(tmp_path / "r.json") == [tmp_path / "r.json"]  # a .json suffix is not doubled


@pytest.mark.parametrize(
    ("gate", "layer", "threshold"),
    [
        (torch.randn(64), 0, float("nan")),
        (torch.randn(2, 64), 0, 0.5),
        (torch.full((64,), float("inf")), 0, 0.5),
        (torch.randn(64), 1.9, 0.5),
        (torch.randn(64), True, 0.5),
        (torch.arange(64), 0, 0.5),
    ],
)
def test_a_topic_gate_is_checked_when_built(olmoe: Any, gate: Any, layer: Any, threshold: Any) -> None:
    sv = _sv(olmoe)
    with pytest.raises(InputError, match="'gate' must be a finite 1-D float tensor"):
        TopicGatedSteering(sv, layer, gate, threshold, sv.metadata)


def test_the_gate_round_trips_in_its_own_dtype(olmoe: Any, tmp_path: Path) -> None:
    sv = _sv(olmoe)
    g64 = torch.randn(olmoe.spec.d_model, dtype=torch.float64)
    TopicGatedSteering(sv, 0, g64, 0.5, sv.metadata).save(tmp_path / "g")
    back = TopicGatedSteering.load(tmp_path / "g")
    assert back.gate.dtype == torch.float64 and torch.equal(back.gate, g64)


def test_a_failed_gguf_export_leaves_the_users_file(
    olmoe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gguf

    sv = _sv(olmoe, "blocks.1.hook_resid_post")
    path = export_control_vector_gguf(sv, tmp_path / "cv.gguf")
    before = path.read_bytes()

    def disk_full(self: Any, *a: Any, **k: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_control_vector_gguf(sv.scaled(2.0), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cv.gguf"]
    monkeypatch.undo()
    assert torch.equal(read_control_vector_gguf(path)[1], sv.effective(sv.keys[0]).float())


def test_unreadable_gguf_files_are_named_in_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    for read in (read_control_vector_gguf, read_control_vector_model_hint):
        with pytest.raises(InputError, match=r"junk.gguf is not a readable GGUF .*control-vector GGUF") as e:
            read(junk)
        assert "\n" not in str(e.value)
        with pytest.raises(MissingFileError, match="missing.gguf"):
            read(tmp_path / "missing.gguf")


def test_a_failed_store_write_keeps_the_previous_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    save_tree(tmp_path / "res", {"a": torch.ones(3)}, {"fingerprint": "old"})

    def unsupported(tensors: Any, path: str, metadata: Any = None) -> None:
        raise KeyError(torch.float64)  # what safetensors raises for a dtype it cannot store

    monkeypatch.setattr(safetensors.torch, "save_file", unsupported)
    with pytest.raises(StoreError, match=r"cannot store tensors of dtypes \['torch.float64'\]"):
        save_tree(tmp_path / "res", {"a": torch.ones(3, dtype=torch.float64)}, {"fingerprint": "new"})
    monkeypatch.undo()
    assert torch.equal(load_tree(tmp_path / "res")["a"], torch.ones(3))


def test_deeply_nested_json_is_an_input_error(tmp_path: Path) -> None:
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="deep.json is not valid JSON"):
        read_json_object(p, "a steering file")
    json.loads("[[1]]")  # the module still works afterwards


def test_router_steering_round_trips_equal(olmoe: Any, tmp_path: Path) -> None:
    meta = SteeringMetadata.from_model(olmoe)
    r = RouterSteering(meta, deactivate={1: [0, 1]}, activate={2: (3,)}, positions=(0, 1))
    r.save(tmp_path / "r")
    assert RouterSteering.load(tmp_path / "r") == r
