"""The library's one rank correlation, against hand-computed values and the no-ties closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_interp.refusal.stats import average_ranks, pearson, spearman


def test_average_ranks_share_ties() -> None:
    assert average_ranks([10, 20, 20, 5]).tolist() == [1.0, 2.5, 2.5, 0.0]
    assert average_ranks(torch.tensor([3.0, 3.0, 3.0])).tolist() == [1.0, 1.0, 1.0]


def test_spearman_with_ties_by_hand() -> None:
    # ranks of y: [0, 1, 2.5, 4, 2.5]; centred x·y = 8, |x|^2 = 10, |y|^2 = 9.5
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)


def test_spearman_without_ties_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.normal(size=17), rng.normal(size=17)
        d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
        n = len(x)
        assert spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (n * (n**2 - 1)), abs=1e-12)


def test_pearson_by_hand_and_degenerate_input() -> None:
    # centred x = [-1, 0, 1], y = [-7, -1, 8] / 3: x·y = 5, |x|^2 = 2, |y|^2 = 114 / 9
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228), abs=1e-12)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1, 2, 3])
