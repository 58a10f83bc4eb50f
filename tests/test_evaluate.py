"""evaluate(): refusal rate / CI, logit score, first-token KL and CE against hand computations; prompt files; CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from conftest import PROMPTS

from moe_interp.cli import main
from moe_interp.interventions import AddVector, DirectionalAblation
from moe_interp.refusal.cli import load_ablation, load_direction, save_direction
from moe_interp.refusal.evaluate import bootstrap_ci, evaluate
from moe_interp.refusal.judges import JudgeResult, refusal_score
from moe_interp.refusal.orthogonalize import orthogonalize
from moe_interp.refusal.prompts_io import load_prompt_file

TOKS = [5, 6, 7]


class KeywordJudge:
    """Refuses iff the instruction contains 'poem' (ignores completions): a known refusal rate."""

    def judge(self, instructions: Sequence[str], completions: Sequence[str]) -> list[JudgeResult]:
        assert len(instructions) == len(completions)
        return [JudgeResult(refused="poem" in i, score=float("poem" in i)) for i in instructions]


def _vec(d: int, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * scale


def _hand_kl(pb: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    lb, le = torch.log_softmax(pb.double(), -1), torch.log_softmax(pe.double(), -1)
    return (lb.exp() * (lb - le)).sum(-1)


def test_no_intervention_is_zero_side_effect(tiny_model) -> None:
    model = tiny_model("olmoe")
    res = evaluate(model, PROMPTS, judge=KeywordJudge(), refusal_token_ids=TOKS, max_new_tokens=4)
    assert res.n == 3
    assert res.refusal_rate == pytest.approx(1 / 3)
    lo, hi = res.refusal_rate_ci
    assert 0.0 <= lo <= 1 / 3 <= hi <= 1.0
    assert abs(res.kl_to_baseline) < 1e-9
    assert res.ce_of_baseline_completions == pytest.approx(res.ce_of_baseline_completions_unedited, abs=1e-9)
    scores = refusal_score(model.forward(PROMPTS)[:, -1], TOKS)
    assert res.mean_refusal_score == pytest.approx(float(scores.mean()), abs=1e-5)
    assert [d["completion"] for d in res.details] == model.generate(PROMPTS, max_new_tokens=4)
    d = res.to_dict()
    for k in ("n", "refusal_rate", "refusal_rate_ci", "mean_refusal_score", "kl_to_baseline"):
        assert k in d
    assert "ce_of_baseline_completions" in d and len(d["details"]) == 3
    json.dumps(d)


def test_kl_and_ce_match_hand_computation(tiny_model) -> None:
    model = tiny_model("qwen2_moe")
    iv = AddVector("blocks.1.hook_resid_pre", _vec(model.spec.d_model), coeff=1.0)
    res = evaluate(model, PROMPTS, [iv], refusal_token_ids=TOKS, max_new_tokens=3, batch_size=2)
    base_last = model.forward(PROMPTS)[:, -1]
    with model.intervene(iv):
        edit_last = model.forward(PROMPTS)[:, -1]
    kl = _hand_kl(base_last, edit_last)
    assert float(kl.mean()) > 1e-4
    assert res.kl_to_baseline == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7)
    assert res.mean_refusal_score == pytest.approx(float(refusal_score(edit_last, TOKS).mean()), abs=1e-4)
    # CE: one prompt at a time (no padding), prompt + unedited greedy completion, teacher forced
    nll, ntok = 0.0, 0
    for i, p in enumerate(PROMPTS):
        comp = model.generate([p], max_new_tokens=3, return_scores=True)[0][0].token_ids
        ids = torch.cat([model.tokenize([p])["input_ids"][0], torch.tensor(comp)])[None]
        with model.intervene(iv):
            logits = model.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0].double()
        lp = torch.log_softmax(logits[-len(comp) - 1 : -1], -1)
        row = -lp.gather(-1, torch.tensor(comp)[:, None]).sum()
        assert res.details[i]["ce"] == pytest.approx(float(row) / len(comp), rel=1e-4)
        nll, ntok = nll + float(row), ntok + len(comp)
    assert res.ce_of_baseline_completions == pytest.approx(nll / ntok, rel=1e-4)
    assert res.ce_of_baseline_completions > res.ce_of_baseline_completions_unedited


def test_reused_baseline_generations_give_the_same_result(tiny_model, monkeypatch) -> None:
    """Two edits on one prompt set: the second reuses the first's unedited completions, generates only its
    own, and reports exactly what a fresh evaluation reports."""
    model = tiny_model("qwen2_moe")
    iv1 = AddVector("blocks.1.hook_resid_pre", _vec(model.spec.d_model), coeff=1.0)
    iv2 = AddVector("blocks.0.hook_resid_pre", _vec(model.spec.d_model, seed=2), coeff=1.0)
    kw = dict(refusal_token_ids=TOKS, max_new_tokens=3, batch_size=2)
    first = evaluate(model, PROMPTS, [iv1], **kw)
    assert len(first.baseline_generations) == len(PROMPTS) and "baseline_generations" not in first.to_dict()
    fresh = evaluate(model, PROMPTS, [iv2], **kw)
    scored: list[bool] = []
    generate = model.generate

    def counting(*a, **k):  # noqa: ANN002, ANN003, ANN202
        # the unedited model generates outside the edits (forced: the NLL passes)
        scored.append(not model.has_interventions and k.get("force") is None)
        return generate(*a, **k)

    monkeypatch.setattr(model, "generate", counting)
    reused = evaluate(model, PROMPTS, [iv2], baseline_generations=first.baseline_generations, **kw)
    assert scored and not any(scored)  # only the edited model generated
    assert reused.to_dict() == fresh.to_dict()
    with pytest.raises(ValueError, match="baseline_generations has 1 completions for 3 prompts"):
        evaluate(model, PROMPTS, [iv2], baseline_generations=first.baseline_generations[:1], **kw)


def test_orthogonalized_model_against_base_model(tiny_model) -> None:
    model = tiny_model("olmoe")
    r = _vec(model.spec.d_model, seed=1)
    hooked = evaluate(model, PROMPTS, [DirectionalAblation(r)], refusal_token_ids=TOKS, max_new_tokens=3)
    weights = evaluate(
        orthogonalize(model, r), PROMPTS, base_model=model, refusal_token_ids=TOKS, max_new_tokens=3
    )
    assert hooked.kl_to_baseline > 1e-4
    assert weights.kl_to_baseline == pytest.approx(hooked.kl_to_baseline, rel=1e-3, abs=1e-6)
    assert weights.mean_refusal_score == pytest.approx(hooked.mean_refusal_score, abs=1e-4)
    assert [d["completion"] for d in weights.details] == [d["completion"] for d in hooked.details]


def test_bootstrap_ci() -> None:
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, seed=0)
    assert 0.38 < lo < 0.5 < hi < 0.62  # normal approx: 0.5 +- 1.96 * 0.05
    assert bootstrap_ci([0.0, 1.0] * 50, seed=0) == (lo, hi)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_evaluate_bad_input(tiny_model) -> None:
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="d_model"):
        evaluate(model, PROMPTS, [DirectionalAblation(torch.randn(3))])
    with pytest.raises(ValueError, match="NaN"):
        evaluate(model, PROMPTS, [AddVector("blocks.0.hook_resid_pre", torch.full((64,), float("nan")))])
    with pytest.raises(ValueError, match="out of range"):
        evaluate(model, PROMPTS, [DirectionalAblation(torch.randn(64), layers=[99])])


# ------------------------------------------------------------------------------------ prompt files
@pytest.mark.parametrize("key", ["instruction", "goal", "prompt"])
def test_prompt_json_objects(tmp_path, key: str) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{key: "a", "x": 1}, {key: "b"}]))
    assert load_prompt_file(f) == ["a", "b"]


def test_prompt_formats(tmp_path) -> None:
    (tmp_path / "s.json").write_text(json.dumps(["a", "b c"]))
    assert load_prompt_file(tmp_path / "s.json") == ["a", "b c"]
    (tmp_path / "p.txt").write_text("first\n\nsecond one\n")
    assert load_prompt_file(tmp_path / "p.txt") == ["first", "second one"]
    (tmp_path / "p.csv").write_text('id,goal\n1,"hello, world"\n2,bye\n')
    assert load_prompt_file(tmp_path / "p.csv") == ["hello, world", "bye"]


def test_prompt_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_prompt_file(tmp_path / "missing.json")
    (tmp_path / "p.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match=r"unknown prompt file format.*expected.*\.jsonl"):
        load_prompt_file(tmp_path / "p.yaml")
    (tmp_path / "d.json").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder; expected"):
        load_prompt_file(tmp_path / "d.json")
    (tmp_path / "k.json").write_text(json.dumps([{"text": "a"}]))
    with pytest.raises(ValueError, match="instruction"):
        load_prompt_file(tmp_path / "k.json")
    (tmp_path / "c.csv").write_text("text\na\n")
    with pytest.raises(ValueError, match="CSV columns.*instruction"):
        load_prompt_file(tmp_path / "c.csv")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_file(tmp_path / "e.json")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_file(tmp_path / "e.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_prompt_file(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------ CLI
def test_direction_files(tmp_path, tiny_model) -> None:
    v = torch.randn(64)
    for name in ("d.safetensors", "d.pt"):
        save_direction(tmp_path / name, v, layer=1)
        torch.testing.assert_close(load_direction(tmp_path / name), v)
    (ivs,) = load_ablation(tmp_path / "d.pt", tiny_model("olmoe"))
    assert isinstance(ivs, DirectionalAblation)
    with pytest.raises(ValueError, match="components"):
        (tmp_path / "c.json").write_text("{}")
        load_ablation(tmp_path / "c.json", tiny_model("olmoe"))
    with pytest.raises(ValueError, match="direction"):
        torch.save({"x": v}, tmp_path / "x.pt")
        load_direction(tmp_path / "x.pt")


def test_cli_evaluate_json(tmp_path, capsys) -> None:
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps(PROMPTS))
    save_direction(tmp_path / "d.safetensors", _vec(64, seed=2))
    argv = ["evaluate", "tiny:olmoe", "--prompts", str(pf), "--json", "--max-new-tokens", "2", "--limit", "2"]
    assert main([*argv, "--ablate", str(tmp_path / "d.safetensors")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and out["kl_to_baseline"] > 0
    for k in ("refusal_rate", "refusal_rate_ci", "mean_refusal_score", "kl_to_baseline"):
        assert k in out
    assert out["config"]["interventions"] == ["DirectionalAblation"]
    assert main(["evaluate", "tiny:olmoe", "--prompts", str(tmp_path / "p.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"foo": 1}))
    assert main([*argv, "--ablate", str(tmp_path / "c.json")]) == 2
    assert "components" in capsys.readouterr().err


def test_cli_steer_matches_add_vector(tmp_path, capsys, tiny_model) -> None:
    from moe_interp.steering import SteeringMetadata, SteeringVectors

    model = tiny_model("olmoe")
    v = _vec(64, seed=3)
    key = ("blocks.1.hook_resid_pre", None)
    SteeringVectors({key: v}, SteeringMetadata.from_model(model)).save(tmp_path / "sv")
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(PROMPTS[:2]))
    argv = ["evaluate", "tiny:olmoe", "--prompts", str(pf), "--json", "--max-new-tokens", "2"]
    assert main([*argv, "--steer", str(tmp_path / "sv")]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = evaluate(model, PROMPTS[:2], [AddVector(key[0], v)], max_new_tokens=2)
    assert out["kl_to_baseline"] > 1e-4
    assert out["kl_to_baseline"] == pytest.approx(ref.kl_to_baseline, rel=1e-4)


def test_position_offset_interventions_act_on_the_prompt(tiny_model) -> None:
    """An edit placed by position offset (as a circuit's) must change the first-token distribution that
    evaluate reports, exactly as a prompt-only forward under the same edit does."""
    import moe_interp as mi
    from moe_interp.refusal.evaluate import first_token_kl

    model = tiny_model("olmoe")
    prompts = ["How do I bake bread?", "Tell me a joke about cats"]
    edit = mi.AddVector("blocks.0.hook_resid_pre", torch.ones(model.spec.d_model), coeff=5.0, positions=[-1])
    res = evaluate(model, prompts, [edit], max_new_tokens=3)
    enc = model.tokenize(prompts)
    base = model.forward(enc, last_only=True)[:, -1]
    with model.intervene(edit):
        edited = model.forward(enc, last_only=True)[:, -1]
    expected = float(first_token_kl(base, edited).mean())
    assert expected > 1e-3
    assert abs(res.kl_to_baseline - expected) < 1e-5


def test_forced_generation_scores_are_teacher_forced_logprobs(tiny_model) -> None:
    """generate(force=...): the forced tokens come back, with the log-probabilities a plain forward over
    prompt + tokens gives (one prompt at a time, no padding); a shorter list is cut at its own length."""
    from moe_interp.errors import InputError

    model = tiny_model("olmoe")
    force = [[11, 12, 13], [7], []]
    gens = model.generate(PROMPTS, force=force, return_scores=True)
    for p, f, g in zip(PROMPTS, force, gens, strict=True):
        assert g[0].token_ids == f and len(g[0].token_logprobs) == len(f)
        if not f:
            continue
        ids = torch.cat([model.tokenize([p])["input_ids"][0], torch.tensor(f)])[None]
        logits = model.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0].double()
        want = torch.log_softmax(logits[-len(f) - 1 : -1], -1).gather(-1, torch.tensor(f)[:, None])[:, 0]
        assert g[0].token_logprobs == pytest.approx(want.tolist(), rel=1e-4, abs=1e-5)
    with pytest.raises(InputError, match="one token list per prompt"):
        model.generate(PROMPTS, force=force[:2])
    with pytest.raises(InputError, match="one greedy sequence"):
        model.generate(PROMPTS, force=force, do_sample=True)


def test_generation_ends_at_any_end_token_of_the_generation_config(tiny_model) -> None:
    """A chat model's generation config can list several end tokens; a completion that ends on one the tokenizer
    does not name stops there (it used to carry the padding that follows while the batch's other completion goes
    on, with its log-probabilities)."""
    model = tiny_model("olmoe")
    first = [g[0] for g in model.generate(PROMPTS[:2], max_new_tokens=8, return_scores=True)]
    a, b = first[0].token_ids, first[1].token_ids
    k = next(
        i for i, t in enumerate(a[:-1]) if t not in b
    )  # the first token of one that the other never emits
    assert a[k] not in model.end_token_ids and len(b) == 8
    cfg = model.hf_model.generation_config
    saved = cfg.eos_token_id
    try:
        cfg.eos_token_id = [model.tokenizer.eos_token_id, a[k]]
        assert model.end_token_ids == {model.tokenizer.eos_token_id, a[k]}
        ends = [g[0] for g in model.generate(PROMPTS[:2], max_new_tokens=8, return_scores=True)]
    finally:
        cfg.eos_token_id = saved
    assert ends[0].token_ids == a[: k + 1]
    assert ends[0].token_logprobs == pytest.approx(first[0].token_logprobs[: k + 1])
    assert ends[1].token_ids == b  # the other completion is unchanged


def test_unedited_ce_from_generation_scores_or_forced(tiny_model) -> None:
    """The unedited NLL of the baseline completions is read from their generation log-probabilities; completions
    without them (built by hand) are scored by teacher forcing, to the same figure."""
    from dataclasses import replace

    model = tiny_model("qwen2_moe")
    iv = AddVector("blocks.1.hook_resid_pre", _vec(model.spec.d_model), coeff=1.0)
    kw = dict(refusal_token_ids=TOKS, max_new_tokens=3, batch_size=2)
    first = evaluate(model, PROMPTS, [iv], **kw)
    assert all(len(g.token_logprobs) == len(g.token_ids) for g in first.baseline_generations)
    bare = [replace(g, token_logprobs=[]) for g in first.baseline_generations]
    again = evaluate(model, PROMPTS, [iv], baseline_generations=bare, **kw)
    assert again.ce_of_baseline_completions_unedited == pytest.approx(
        first.ce_of_baseline_completions_unedited, rel=1e-5
    )
    assert again.ce_of_baseline_completions == pytest.approx(first.ce_of_baseline_completions, rel=1e-5)
    nll = -sum(lp for g in first.baseline_generations for lp in g.token_logprobs)
    ntok = sum(len(g.token_ids) for g in first.baseline_generations)
    assert first.ce_of_baseline_completions_unedited == pytest.approx(nll / ntok, rel=1e-6)
