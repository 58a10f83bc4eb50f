"""``moe-interp`` turns bad input into one line on stderr and exit status 2, never a traceback; ``--help``
imports nothing heavy. Each test writes a small bad file and drives :func:`moe_interp.cli.main`."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_interp import cli
from moe_interp.cli import main
from moe_interp.steering.edits import RouterSteering, TopicGatedSteering
from moe_interp.steering.vectors import SteeringMetadata, SteeringVectors

MODEL = "tiny:olmoe"
RESID = ("blocks.1.hook_resid_pre", None)


@pytest.fixture(scope="module")
def olmoe(tiny_model: Callable[[str], Any]) -> Any:
    return tiny_model("olmoe")


def one_line_error(capsys: pytest.CaptureFixture[str], command: str, *needles: str) -> str:
    """The captured stderr, asserted to be one ``moe-interp <command>: error:`` line naming ``needles``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"moe-interp {command}: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


def steer(path: Path, *extra: str) -> int:
    return main(["steer", MODEL, "--vectors", str(path), "--prompt", "hi", "--max-new-tokens", "1", *extra])


@pytest.fixture
def vectors(olmoe: Any, tmp_path: Path) -> tuple[Path, Path]:
    """A valid steering pair ``v.safetensors`` + ``v.json`` for the tiny olmoe."""
    sv = SteeringVectors({RESID: torch.randn(64)}, SteeringMetadata.from_model(olmoe), {RESID: -4.0})
    return sv.save(tmp_path / "v")


def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def test_valid_vectors_run(vectors: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert steer(vectors[0], "--json") == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["prompt"] == "hi"


def test_huge_coefficient_is_one_line(vectors: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """A coefficient that overflows the forward is the user's input, not a bug: one line naming the edit."""
    assert steer(vectors[0], "--coeff", "1e38") == 2
    one_line_error(capsys, "steer", "produced NaN/inf")


# ------------------------------------------------------------------------------------ steering files


@pytest.mark.parametrize("content", [lambda b: b[: len(b) // 2], lambda b: b"not a safetensors file" * 4])
def test_truncated_or_garbage_safetensors(vectors, capsys, content) -> None:
    st, _ = vectors
    st.write_bytes(content(st.read_bytes()))
    assert steer(st) == 2
    one_line_error(capsys, "steer", "v.safetensors", "not a readable .safetensors")


def test_steering_json_without_metadata(vectors, capsys) -> None:
    edit_json(vectors[1], lambda d: {k: v for k, v in d.items() if k != "metadata"})
    assert steer(vectors[1]) == 2
    one_line_error(capsys, "steer", "v.json", "metadata")


def test_steering_json_list(vectors, capsys) -> None:
    vectors[1].write_text("[1, 2]")
    assert steer(vectors[0]) == 2
    one_line_error(capsys, "steer", "v.json", "JSON list", "object")


def test_steering_metadata_bad_field(vectors, capsys) -> None:
    edit_json(vectors[1], lambda d: {**d, "metadata": {**d["metadata"], "colour": "red"}})
    assert steer(vectors[1]) == 2
    one_line_error(capsys, "steer", "v.json", "colour")


@pytest.mark.parametrize("drop", ["all", "one"])
def test_steering_json_without_coeffs_is_refused(vectors, capsys, drop) -> None:
    """Without coeffs the vector used to be applied at +1.0 (the stored -4.0: sign flipped, 4x weaker)."""
    edit_json(
        vectors[1],
        lambda d: {k: v for k, v in d.items() if k != "coeffs"} if drop == "all" else {**d, "coeffs": {}},
    )
    assert steer(vectors[1]) == 2
    one_line_error(capsys, "steer", "v.json", "coeffs")


def test_steering_for_another_model(vectors, capsys) -> None:
    assert main(["steer", "tiny:qwen2_moe", "--vectors", str(vectors[0]), "--prompt", "hi"]) == 2
    one_line_error(capsys, "steer", "v.safetensors", "family")


@pytest.mark.parametrize("field,value", [("family", "mixtral"), ("n_experts", 16), ("n_layers", 5)])
def test_router_steering_metadata_mismatch(olmoe, tmp_path, capsys, field, value) -> None:
    (path,) = RouterSteering(SteeringMetadata.from_model(olmoe), deactivate={1: (2,)}).save(tmp_path / "r")
    assert steer(path) == 0
    capsys.readouterr()
    edit_json(path, lambda d: {**d, "metadata": {**d["metadata"], field: value}})
    assert steer(path) == 2
    one_line_error(capsys, "steer", "r.json", field)


def test_router_steering_missing_field(olmoe, tmp_path, capsys) -> None:
    (path,) = RouterSteering(SteeringMetadata.from_model(olmoe), deactivate={1: (2,)}).save(tmp_path / "r")
    edit_json(path, lambda d: {k: v for k, v in d.items() if k != "activate"})
    assert steer(path) == 2
    one_line_error(capsys, "steer", "r.json", "activate")


# ------------------------------------------------------------------------------------ topic gate


def _gated(olmoe: Any) -> TopicGatedSteering:
    sv = SteeringVectors({RESID: torch.randn(64)}, SteeringMetadata.from_model(olmoe), {RESID: -2.0})
    return TopicGatedSteering(sv, 1, torch.randn(64), 0.25)


def test_gate_saved_as_safetensors_and_legacy_pt_still_read(olmoe, tmp_path) -> None:
    from moe_interp.steering.cli import load_steering

    g = _gated(olmoe)
    files = g.save(tmp_path / "g")
    assert [f.name for f in files] == ["g.safetensors", "g.json", "g.gate.safetensors"]
    back = load_steering(tmp_path / "g.json", olmoe)
    assert isinstance(back, TopicGatedSteering) and back.gate_layer == 1 and back.threshold == 0.25
    assert torch.equal(back.gate, g.gate)
    (tmp_path / "g.gate.safetensors").unlink()
    torch.save({"gate": g.gate, "gate_layer": 1, "threshold": 0.25}, tmp_path / "g.gate.pt")
    old = load_steering(tmp_path / "g", olmoe)
    assert torch.equal(old.gate, g.gate) and old.threshold == 0.25


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_gate(olmoe, tmp_path, capsys, legacy) -> None:
    g = _gated(olmoe)
    g.save(tmp_path / "g")
    if legacy:
        (tmp_path / "g.gate.safetensors").unlink()
        torch.save({"gate": g.gate, "gate_layer": 1, "threshold": 0.25}, tmp_path / "g.gate.pt")
    gate = tmp_path / ("g.gate.pt" if legacy else "g.gate.safetensors")
    gate.write_bytes(gate.read_bytes()[:40])
    assert steer(tmp_path / "g") == 2
    err = one_line_error(capsys, "steer", gate.name, "not a readable")
    assert "weights_only=False" not in err  # torch's advice would run arbitrary code


# ------------------------------------------------------------------------------------ evaluate


def _prompts(tmp_path: Path) -> Path:
    p = tmp_path / "p.txt"
    p.write_text("hello there\nwrite a poem\n")
    return p


def evaluate(tmp_path: Path, *extra: str) -> int:
    argv = ["evaluate", MODEL, "--prompts", str(_prompts(tmp_path)), "--limit", "1", "--max-new-tokens", "1"]
    return main([*argv, "--no-baseline", "--json", *extra])


def _circuit(tmp_path: Path, layer: int = 1, **meta: Any) -> Path:
    name = f"blocks.{layer}.hook_mlp_out"
    doc = {
        "components": [{"name": name, "kind": "mlp", "layer": layer, "effect": 0.5}],
        "faithfulness": {},
        "metadata": {"positions": [-2, -1], **meta},
        "means": {name: [[0.0] * 64, [0.0] * 64]},
    }
    path = tmp_path / "circuit.json"
    path.write_text(json.dumps(doc))
    return path


def test_valid_circuit_ablates(tmp_path, capsys) -> None:
    assert evaluate(tmp_path, "--ablate", str(_circuit(tmp_path))) == 0
    assert json.loads(capsys.readouterr().out)["config"]["interventions"]


def test_circuit_without_positions(tmp_path, capsys) -> None:
    path = _circuit(tmp_path)
    edit_json(path, lambda d: {**d, "metadata": {}})
    assert evaluate(tmp_path, "--ablate", str(path)) == 2
    one_line_error(capsys, "evaluate", "circuit.json", "positions")


def test_circuit_naming_hooks_the_model_lacks(tmp_path, capsys) -> None:
    assert evaluate(tmp_path, "--ablate", str(_circuit(tmp_path, layer=7))) == 2
    one_line_error(capsys, "evaluate", "circuit.json", "blocks.7.hook_mlp_out", "lacks")


def test_circuit_component_malformed(tmp_path, capsys) -> None:
    path = _circuit(tmp_path)
    edit_json(path, lambda d: {**d, "components": [{"kind": "neuron", "layer": 1}]})
    assert evaluate(tmp_path, "--ablate", str(path)) == 2
    one_line_error(capsys, "evaluate", "circuit.json", "components[0]", "kind")


def test_garbage_direction_file(tmp_path, capsys) -> None:
    for name, data in (("d.safetensors", b"\x00garbage" * 3), ("d.pt", b"PK\x03\x04trunc")):
        (tmp_path / name).write_bytes(data)
        assert evaluate(tmp_path, "--ablate", str(tmp_path / name)) == 2
        one_line_error(capsys, "evaluate", name, "not a readable")


def test_direction_of_wrong_width(tmp_path, capsys) -> None:
    from moe_interp.refusal.cli import save_direction

    save_direction(tmp_path / "d.safetensors", torch.randn(32))
    assert evaluate(tmp_path, "--ablate", str(tmp_path / "d.safetensors")) == 2
    one_line_error(capsys, "evaluate", "d.safetensors", "width 32", "64")


def test_evaluate_steer_reads_router_files(olmoe, tmp_path, capsys) -> None:
    (path,) = RouterSteering(SteeringMetadata.from_model(olmoe), deactivate={1: (2,)}).save(tmp_path / "r")
    assert evaluate(tmp_path, "--steer", str(path)) == 0
    assert json.loads(capsys.readouterr().out)["config"]["interventions"] == ["SteerRouter"]


# ------------------------------------------------------------------------------------ models, --out


def test_out_is_an_existing_file(tmp_path, capsys) -> None:
    (tmp_path / "f").write_text("mine")
    assert main(["locate", MODEL, "--out", str(tmp_path / "f")]) == 2
    one_line_error(capsys, "locate", "--out", "existing file")
    assert main(["locate", MODEL, "--out", str(tmp_path / "f" / "sub")]) == 2
    one_line_error(capsys, "locate", "is a file")
    assert (tmp_path / "f").read_text() == "mine"


def test_benchmark_bad_out_and_organism_fail_before_the_run(tmp_path, capsys, monkeypatch) -> None:
    from moe_interp import benchmark

    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a, **k: pytest.fail("ran before checking"))
    (tmp_path / "f").write_text("mine")
    assert main(["benchmark", "--out", str(tmp_path / "f")]) == 2
    one_line_error(capsys, "benchmark", "--out", "existing file", "expected a folder")
    assert main(["benchmark", "--organisms", "experts"]) == 2
    one_line_error(
        capsys, "benchmark", "unknown planted organism 'experts'", "expert, router, head, direction"
    )
    assert (tmp_path / "f").read_text() == "mine"


def test_inspect_missing_folder(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "./missing"]) == 2
    one_line_error(capsys, "inspect", "./missing", "does not exist", "tiny:<family>")


def test_inspect_unknown_hub_id_offline(capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["inspect", "no-such-org-xyz/no-such-model"]) == 2
    one_line_error(capsys, "inspect", "no-such-org-xyz/no-such-model", "cannot load model")


def test_model_folder_without_tokenizer(olmoe, tmp_path, capsys) -> None:
    """transformers would build an empty tokenizer from such a folder (every prompt → no tokens)."""
    olmoe.hf_model.save_pretrained(tmp_path / "m")
    capsys.readouterr()  # transformers' progress bar
    assert main(["inspect", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "inspect", "no tokenizer", "save_pretrained")
    olmoe.tokenizer.save_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0


def test_missing_package(monkeypatch, capsys) -> None:
    def load(source: str, **kw: Any) -> Any:
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(cli, "load_model", load)
    assert main(["inspect", MODEL]) == 2
    one_line_error(capsys, "inspect", "'scipy'", "pip install scipy")


# ------------------------------------------------------------------------------------ bugs stay loud


@pytest.mark.parametrize(
    "exc", [KeyError("positions"), TypeError("bug"), ModuleNotFoundError("x", name="moe_interp.nope")]
)
def test_bugs_keep_their_traceback(monkeypatch, exc) -> None:
    def load(source: str, **kw: Any) -> Any:
        raise exc

    monkeypatch.setattr(cli, "load_model", load)
    with pytest.raises(type(exc)):
        main(["inspect", MODEL])


@pytest.mark.parametrize("argv", [["--debug", "inspect", "./missing"], ["inspect", "./missing", "--debug"]])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, argv) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(argv)


# ------------------------------------------------------------------------------------ saving


def test_failed_save_leaves_the_old_pair(olmoe, tmp_path) -> None:
    meta = SteeringMetadata.from_model(olmoe)
    old = SteeringVectors({RESID: torch.randn(64)}, meta, {RESID: -1.0})
    old.save(tmp_path / "v")
    bad = SteeringVectors(
        {RESID: torch.randn(64)}, SteeringMetadata.from_model(olmoe, extra={"x": float("nan")})
    )
    with pytest.raises(ValueError):
        bad.save(tmp_path / "v")
    back = SteeringVectors.load(tmp_path / "v")
    assert torch.equal(back.vectors[RESID], old.vectors[RESID]) and back.coeffs == old.coeffs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.safetensors"]


def test_interrupted_save_leaves_the_old_pair(olmoe, tmp_path, monkeypatch) -> None:
    import moe_interp.steering.vectors as vectors_module

    old = SteeringVectors({RESID: torch.randn(64)}, SteeringMetadata.from_model(olmoe), {RESID: -1.0})
    old.save(tmp_path / "v")

    def disk_full(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(vectors_module, "save_file", disk_full)
    with pytest.raises(OSError):
        SteeringVectors({RESID: torch.randn(64)}, old.metadata).save(tmp_path / "v")
    monkeypatch.undo()
    assert torch.equal(SteeringVectors.load(tmp_path / "v").vectors[RESID], old.vectors[RESID])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.safetensors"]


def test_atomic_path_keeps_the_old_file(tmp_path) -> None:
    from moe_interp.fileio import atomic_path

    f = tmp_path / "a.txt"
    f.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(f) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# ------------------------------------------------------------------------------------ help


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from moe_interp.cli import build_parser\n"
        "p = build_parser()\n"
        "for argv in ([], ['locate'], ['steer'], ['evaluate'], ['inspect'], ['plan']):\n"
        "    try:\n"
        "        p.parse_args([*argv, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('torch', 'transformers', 'nnsight', 'safetensors', 'numpy', 'matplotlib')\n"
        "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"
    assert "prompt files" in out and ".jsonl" in out and ".csv" in out  # formats described


def test_top_level_help() -> None:
    res = subprocess.run([sys.executable, "-m", "moe_interp.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    listed = [ln.split()[0] for ln in res.stdout.splitlines() if re.match(r"^ {4}\S", ln)]
    assert listed[:5] == ["locate", "steer", "evaluate", "inspect", "plan"]
    assert "train-organism" not in res.stdout and "python -m moe_interp.organisms.train" in res.stdout
    assert ".txt" in res.stdout and "--debug" in res.stdout


def _offered_choices(argv: list[str], capsys: pytest.CaptureFixture[str]) -> set[str]:
    """The choices the command line lists when the last argument of ``argv`` is an invalid one."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    listed = re.search(r"invalid choice: .*\(choose from (.*)\)", err)
    assert exit_.value.code == 2 and listed, err
    return {c.strip(" '\"") for c in listed.group(1).split(",")}


def test_handlers_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    from moe_interp.plan import DTYPE_BYTES

    assert _offered_choices(["no-such-command"], capsys) == set(cli.HANDLERS)
    for command, target in cli.HANDLERS.items():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), command
    assert _offered_choices(["plan", "tiny:olmoe", "--dtype", "int3"], capsys) == set(DTYPE_BYTES)


def test_a_typo_of_a_bundled_name_fails_before_the_hub(monkeypatch) -> None:
    from transformers import AutoConfig

    def no_hub(*a: Any, **k: Any) -> Any:
        raise AssertionError("asked the hub")

    monkeypatch.setattr(AutoConfig, "from_pretrained", no_hub)
    for typo, name in (("organsim", "organism"), ("smollm-moe", "smollm_moe")):
        with pytest.raises(cli.InputError, match=rf"unknown model '{typo}'; did you mean '{name}'\?"):
            cli.check_model_source(typo)


def test_bundled_models_need_no_hub_and_run_with_their_recipe(monkeypatch, tmp_path) -> None:
    """``locate smollm_moe`` must not ask the hub for 'smollm_moe', and runs with circuits/smollm_moe/config.json."""
    import torch

    from moe_interp import pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in cli.NAMED_MODELS:
        cli.check_model_source(name)  # no hub lookup, no error
    seen: dict[str, Any] = {}

    def load(source: str, **kw: Any) -> Any:
        seen.update(kw, source=source)
        raise RuntimeError("stop after the config was chosen")

    monkeypatch.setattr("moe_interp.model.load", load)
    with pytest.raises(RuntimeError, match="stop after"):
        pipeline.run_pipeline("smollm_moe", out=tmp_path / "o")
    # the recipe's dtype (float32); a config built from defaults would say bfloat16
    assert seen == {"source": "smollm_moe", "dtype": torch.float32}
