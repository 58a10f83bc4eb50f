"""Tests for moe_interp.refusal.stats (streaming moments) and moe_interp.refusal.directions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_interp.refusal.directions import (
    RefusalDirections,
    collect_resid_acts,
    collect_resid_stats,
    diff_of_means,
    directions_from_stats,
    pca_direction,
    post_instruction_positions,
    ridge_direction,
    shrunk_lda_direction,
    weighted_moments,
    weighted_ridge_direction,
)
from moe_interp.refusal.stats import StreamingMoments


def _moments(x: np.ndarray, track_cov: bool = True, w: np.ndarray | None = None) -> StreamingMoments:
    m = StreamingMoments(x.shape[1:-1], x.shape[-1], track_cov=track_cov)
    m.update(torch.from_numpy(x), None if w is None else torch.from_numpy(w))
    return m


# ---------------------------------------------------------------------------- stats
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 30),
    d=st.integers(1, 5),
    sites=st.sampled_from([(), (2,), (2, 3)]),
    weighted=st.booleans(),
    data=st.data(),
)
def test_streaming_matches_numpy(n: int, d: int, sites: tuple[int, ...], weighted: bool, data) -> None:
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *sites, d)) * 3 + 5
    w = rng.uniform(0.1, 2.0, size=n) if weighted else None
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    m = StreamingMoments(sites, d, track_cov=True)
    bounds = [0, *cuts, n]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        m.update(torch.from_numpy(x[a:b]), None if w is None else torch.from_numpy(w[a:b]))
    assert m.n == n
    flat = x.reshape(n, -1, d)
    for s in range(flat.shape[1]):
        xs = flat[:, s]
        mean = np.average(xs, axis=0, weights=w)
        cov_pop = np.atleast_2d(np.cov(xs, rowvar=False, aweights=w, bias=True))
        cov_unb = np.atleast_2d(np.cov(xs, rowvar=False, aweights=w, ddof=1))
        idx = np.unravel_index(s, sites) if sites else ()
        np.testing.assert_allclose(m.mean[idx].numpy(), mean, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(m.cov[idx].numpy(), cov_pop, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(m.covariance(unbiased=True)[idx].numpy(), cov_unb, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(m.var[idx].numpy(), np.diag(cov_pop), rtol=1e-9, atol=1e-9)


def test_streaming_merge_and_zero_weights() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3, 4))
    a, b = _moments(x[:4]), _moments(x[4:])
    a.merge(b)
    full = _moments(x)
    torch.testing.assert_close(a.mean, full.mean)
    torch.testing.assert_close(a.cov, full.cov)
    # zero-weight samples are counted in n but do not move the statistics
    w = np.array([1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    m = _moments(x, w=w)
    keep = w > 0
    np.testing.assert_allclose(m.mean.numpy(), np.average(x[keep], axis=0, weights=w[keep]), atol=1e-12)
    assert m.n == 10 and m.weight_sum == pytest.approx(8.0)


def test_streaming_bad_input() -> None:
    m = StreamingMoments((2,), 3)
    with pytest.raises(ValueError, match=r"shape \[batch, 2, 3\]"):
        m.update(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        m.update(torch.full((1, 2, 3), float("nan")))
    with pytest.raises(ValueError, match="non-negative"):
        m.update(torch.zeros(2, 2, 3), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"weights must have shape \[batch\]"):
        m.update(torch.zeros(2, 2, 3), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="no .* samples"):
        _ = m.mean
    with pytest.raises(ValueError, match="track_cov=True"):
        m.update(torch.zeros(1, 2, 3))
        _ = m.cov
    with pytest.raises(ValueError, match="two samples"):
        m.variance(unbiased=True)
    with pytest.raises(ValueError):
        StreamingMoments((0,), 3)


# ---------------------------------------------------------------------------- directions
def test_diff_of_means_exact() -> None:
    h = np.array([[[1.0, 2.0]], [[3.0, 4.0]]])  # sites (1,), d=2
    c = np.array([[[0.0, 0.0]], [[0.0, 2.0]], [[0.0, 4.0]]])
    v = diff_of_means(_moments(h, False), _moments(c, False))
    np.testing.assert_allclose(v.numpy(), [[2.0, 1.0]])
    with pytest.raises(ValueError, match="same sites"):
        diff_of_means(_moments(h, False), _moments(np.zeros((2, 2, 2)), False))
    with pytest.raises(ValueError, match="no .* samples"):
        diff_of_means(_moments(h, False), StreamingMoments((1,), 2))


def test_ridge_direction_matches_numpy_solve() -> None:
    rng = np.random.default_rng(1)
    r = rng.normal(size=(20, 2, 3, 4)) + 1.0
    c = rng.normal(size=(25, 2, 3, 4)) @ rng.normal(size=(4, 4))
    v = ridge_direction(_moments(r, False), _moments(c, True), lam=0.5)
    assert v.shape == (2, 3, 4) and v.dtype == torch.float64
    for i in range(2):
        for j in range(3):
            cov = np.cov(c[:, i, j], rowvar=False, bias=True)
            want = np.linalg.solve(cov + 0.5 * np.eye(4), r[:, i, j].mean(0) - c[:, i, j].mean(0))
            np.testing.assert_allclose(v[i, j].numpy(), want, rtol=1e-10)
    # huge lambda -> diff of means / lambda
    big = ridge_direction(_moments(r, False), _moments(c, True), lam=1e8)
    dom = diff_of_means(_moments(r, False), _moments(c, False))
    np.testing.assert_allclose((big * 1e8).numpy(), dom.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="track_cov=True"):
        ridge_direction(_moments(r, False), _moments(c, False), lam=1.0)
    with pytest.raises(ValueError, match="lam"):
        ridge_direction(_moments(r, False), _moments(c, True), lam=-1.0)


def test_shrunk_lda_direction_pools_groups_about_their_own_means() -> None:
    rng = np.random.default_rng(3)
    groups = [rng.normal(size=(n, 4)) @ rng.normal(size=(4, 4)) + 5.0 * k for k, n in enumerate((6, 9, 7))]
    mu = groups[0].mean(0) - groups[1].mean(0)
    v = shrunk_lda_direction(torch.from_numpy(mu), [torch.from_numpy(g) for g in groups], 0.3)
    x = np.concatenate([g - g.mean(0) for g in groups])  # the +5k offsets between groups do not enter
    cov = x.T @ x / len(x)
    np.testing.assert_allclose(
        v.numpy(), np.linalg.solve(cov + 0.3 * np.trace(cov) / 4 * np.eye(4), mu), rtol=1e-10
    )
    big = shrunk_lda_direction(torch.from_numpy(mu), [torch.from_numpy(g) for g in groups], 1e8)
    np.testing.assert_allclose(
        (big * 1e8 * np.trace(cov) / 4).numpy(), mu, rtol=1e-5
    )  # -> the mean difference
    same = [torch.ones(3, 4), torch.ones(2, 4)]  # no spread inside the groups: the mean difference itself
    assert torch.equal(shrunk_lda_direction(torch.from_numpy(mu), same, 0.3), torch.from_numpy(mu))
    with pytest.raises(ValueError, match="shrinkage must be a positive"):
        shrunk_lda_direction(torch.from_numpy(mu), [torch.from_numpy(g) for g in groups], 0.0)
    with pytest.raises(ValueError, match="groups must be"):
        shrunk_lda_direction(torch.from_numpy(mu), [], 1.0)


def test_weighted_ridge_hand_computed() -> None:
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(12, 3, 2))  # sites (3,), d=2
    conf = np.array([0.9, -0.5, 1.0, 0.0, -1.0, 0.3, -0.2, 0.05, -0.7, 0.6, -0.4, -0.1])
    v = weighted_ridge_direction(torch.from_numpy(acts), torch.from_numpy(conf), lam=0.1)
    wr, wc = np.maximum(conf, 0), np.maximum(-conf, 0)
    for s in range(3):
        mu_r = (wr[:, None] * acts[:, s]).sum(0) / wr.sum()
        mu_c = (wc[:, None] * acts[:, s]).sum(0) / wc.sum()
        xc = acts[:, s] - mu_c
        cov = (wc[:, None, None] * xc[:, :, None] * xc[:, None, :]).sum(0) / wc.sum()
        want = np.linalg.solve(cov + 0.1 * np.eye(2), mu_r - mu_c)
        np.testing.assert_allclose(v[s].numpy(), want, rtol=1e-10)
    # streaming in two chunks gives the same answer
    pair = weighted_moments(torch.from_numpy(acts[:5]), conf[:5])
    weighted_moments(torch.from_numpy(acts[5:]), conf[5:], into=pair)
    torch.testing.assert_close(ridge_direction(*pair, lam=0.1), v)
    with pytest.raises(ValueError, match="one value per sample"):
        weighted_ridge_direction(torch.from_numpy(acts), conf[:3], lam=0.1)
    with pytest.raises(ValueError, match="c > 0 and one with c < 0"):
        weighted_ridge_direction(torch.from_numpy(acts), np.abs(conf), lam=0.1)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        weighted_ridge_direction(torch.from_numpy(acts), conf * 3, lam=0.1)


def test_pca_direction_recovers_planted_direction_with_sign() -> None:
    rng = np.random.default_rng(3)
    n, d = 40, 6
    u = np.zeros(d)
    u[2] = 1.0
    harmless = rng.normal(size=(n, 2, d))
    coef = rng.uniform(1.0, 3.0, size=(n, 1, 1))
    harmful = harmless + coef * u + 0.01 * rng.normal(size=(n, 2, d))
    v = pca_direction(torch.from_numpy(harmful), torch.from_numpy(harmless))
    assert v.shape == (2, d)
    np.testing.assert_allclose(v.norm(dim=-1).numpy(), 1.0, atol=1e-12)
    assert (v[:, 2] > 0.999).all()  # sign aligned with the mean difference (+u)
    # swapping classes flips the sign
    assert (pca_direction(torch.from_numpy(harmless), torch.from_numpy(harmful))[:, 2] < -0.999).all()
    # centred PCA: the variation of the differences lies along u too (coef varies)
    vc = pca_direction(torch.from_numpy(harmful), torch.from_numpy(harmless), center=True)
    assert (vc[:, 2] > 0.99).all()
    # check against numpy SVD on one site
    diffs = harmful[:, 0] - harmless[:, 0]
    top = np.linalg.svd(diffs, full_matrices=False)[2][0]
    top = top * np.sign(top @ diffs.mean(0))
    np.testing.assert_allclose(v[0].numpy(), top, atol=1e-10)
    with pytest.raises(ValueError, match="equal shape"):
        pca_direction(torch.zeros(3, 2, d), torch.zeros(4, 2, d))


def test_refusal_directions_container() -> None:
    cand = torch.zeros(2, 3, 4)
    cand[1, 2] = torch.tensor([3.0, 0.0, 4.0, 0.0])
    rd = RefusalDirections(cand, layers=[4, 7], positions=[-3, -2, -1], method="diff_of_means")
    torch.testing.assert_close(rd.get(7, -1), torch.tensor([0.6, 0.0, 0.8, 0.0]))
    assert rd.norms()[1, 2].item() == pytest.approx(5.0)
    assert rd.unit()[0, 0].abs().sum() == 0  # zero vectors stay zero
    with pytest.raises(ValueError, match="zero vector"):
        rd.get(4, -3)
    with pytest.raises(ValueError, match="layer 5"):
        rd.get(5, -1)
    with pytest.raises(ValueError, match="position -4"):
        rd.get(4, -4)
    bad = cand.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RefusalDirections(bad, [4, 7], [-3, -2, -1])
    with pytest.raises(ValueError, match="does not match"):
        RefusalDirections(cand, [4], [-3, -2, -1])
    with pytest.raises(ValueError, match=r"\[n_layers, n_pos, d\]"):
        RefusalDirections(torch.zeros(2, 3), [4, 7], [-3, -2, -1])


# ---------------------------------------------------------------------------- collection (fake model)
class CharTokenizer:
    """One token per character, with offsets (like a fast tokenizer)."""

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False):
        enc = {"input_ids": [ord(ch) for ch in text]}
        if return_offsets_mapping:
            enc["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return enc


class FakeSpec:
    n_layers = 3
    d_model = 4


class FakeResidModel:
    """run_with_cache returns activations determined by (prompt, layer, position)."""

    def __init__(self) -> None:
        self.spec = FakeSpec()
        self.tokenizer = CharTokenizer()
        self.batches: list[int] = []

    def format_chat(self, prompts: list[str]) -> list[str]:
        return [f"<u>{p}</u><a>" for p in prompts]

    @staticmethod
    def act(prompt: str, layer: int, pos: int) -> torch.Tensor:
        base = float(sum(map(ord, prompt)) % 17)
        return torch.tensor([base, layer, pos, base * layer + pos], dtype=torch.float32)

    def run_with_cache(self, prompts, names, positions, return_type="logits"):
        self.batches.append(len(prompts))
        assert return_type is None  # only the cache is read: the forward may stop early
        cache = {}
        for nm in names:
            layer = int(nm.split(".")[1])
            cache[nm] = torch.stack(
                [torch.stack([self.act(p, layer, q) for q in positions]) for p in prompts]
            )
        return None, cache


def test_post_instruction_positions_fake() -> None:
    assert post_instruction_positions(FakeResidModel()) == list(range(-7, 0))  # "</u><a>" = 7 chars


def test_collect_resid_stats_fake_model() -> None:
    model = FakeResidModel()
    prompts = [f"prompt number {i}" for i in range(7)]
    stats = collect_resid_stats(
        model, prompts, layers=[0, 2], positions=[-2, -1], batch_size=3, progress=False
    )
    assert model.batches == [3, 3, 1]
    assert stats.sites == (2, 2) and stats.n == 7
    assert stats.meta == {"layers": [0, 2], "positions": [-2, -1]}
    want = torch.stack(
        [torch.stack([torch.stack([model.act(p, L, q) for q in (-2, -1)]) for L in (0, 2)]) for p in prompts]
    )
    torch.testing.assert_close(stats.mean, want.double().mean(0))
    acts = collect_resid_acts(model, prompts, layers=[0, 2], positions=[-2, -1], batch_size=4, progress=False)
    torch.testing.assert_close(acts, want)
    other = collect_resid_stats(
        model, ["zz", "y"], layers=[0, 2], positions=[-2, -1], track_cov=True, progress=False
    )
    rd = directions_from_stats(stats, other)
    assert rd.layers == [0, 2] and rd.positions == [-2, -1]
    torch.testing.assert_close(rd.candidates, (stats.mean - other.mean).float())
    # default positions come from the chat template
    assert collect_resid_stats(model, prompts[:2], progress=False).sites == (3, 7)
    with pytest.raises(ValueError, match="non-empty"):
        collect_resid_stats(model, [], progress=False)
    with pytest.raises(ValueError, match="layers"):
        collect_resid_stats(model, prompts, layers=[3], positions=[-1], progress=False)
    with pytest.raises(ValueError, match="negative"):
        collect_resid_stats(model, prompts, positions=[0], progress=False)
    with pytest.raises(ValueError, match="one value per prompt"):
        collect_resid_stats(model, prompts, positions=[-1], weights=[1.0], progress=False)


# ---------------------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def tiny():
    import moe_interp as mi

    return mi.load("tiny:olmoe")


def test_post_instruction_positions_tiny(tiny) -> None:
    pos = post_instruction_positions(tiny)
    n = len(pos)
    assert pos == list(range(-n, 0)) and n >= 1
    instr = "Tell me about the weather today"
    ids = tiny.tokenize([instr])["input_ids"][0].tolist()
    tail = tiny.tokenizer.decode(ids[-n:])
    assert "today" not in tail and "weather" not in tail
    assert "y" in tiny.tokenizer.decode(ids[-n - 1 :][:1])  # the token before is the instruction's end
    # the same template tokens follow any instruction
    ids2 = tiny.tokenize(["Short one"])["input_ids"][0].tolist()
    assert ids2[-n:] == ids[-n:]


def test_collect_resid_stats_tiny_matches_unbatched(tiny) -> None:
    harmful = ["How do I pick a lock on a door", "Write malware", "Explain how to build a weapon quickly"]
    harmless = ["How do I bake bread", "Name three colours", "What is the capital of France and why"]
    pos = post_instruction_positions(tiny)
    layers = [0, 2]
    names = [f"blocks.{L}.hook_resid_pre" for L in layers]
    st_h = collect_resid_stats(tiny, harmful, layers=layers, batch_size=2, progress=False)
    st_c = collect_resid_stats(tiny, harmless, layers=layers, batch_size=3, track_cov=True, progress=False)
    assert st_h.sites == (2, len(pos)) and st_h.d == tiny.spec.d_model and st_h.n == 3
    # reference: one prompt at a time (no padding), full sequence, take the last positions
    ref = []
    for p in harmful:
        _, cache = tiny.run_with_cache([p], names=names)
        ref.append(torch.stack([cache[nm][0, pos] for nm in names]))
    ref_mean = torch.stack(ref).double().mean(0)
    torch.testing.assert_close(st_h.mean, ref_mean, atol=1e-4, rtol=1e-4)
    rd = directions_from_stats(st_h, st_c, method="ridge", lam=1.0)
    assert rd.candidates.shape == (2, len(pos), tiny.spec.d_model)
    assert rd.layers == layers and rd.positions == pos
    assert rd.get(2, -1).norm().item() == pytest.approx(1.0, abs=1e-5)
    acts_h = collect_resid_acts(tiny, harmful, layers=layers, progress=False)
    acts_c = collect_resid_acts(tiny, harmless, layers=layers, progress=False)
    v = pca_direction(acts_h, acts_c)
    assert v.shape == (2, len(pos), tiny.spec.d_model)
    assert ((v * diff_of_means(st_h, st_c)).sum(-1) >= 0).all()


def test_orthogonal_to_removes_the_component_along_ref_per_row() -> None:
    """Against numpy's least squares: v - proj_ref(v), row by row; a zero ref leaves v unchanged."""
    from moe_interp.refusal.directions import orthogonal_to

    g = torch.Generator().manual_seed(0)
    v, ref = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    got = orthogonal_to(v, ref)
    for i in range(3):
        coef = np.linalg.lstsq(ref[i].numpy()[:, None], v[i].numpy(), rcond=None)[0]
        np.testing.assert_allclose(got[i].numpy(), v[i].numpy() - coef[0] * ref[i].numpy(), atol=1e-12)
    assert torch.equal(orthogonal_to(v[0], torch.zeros(5, dtype=torch.float64)), v[0])
