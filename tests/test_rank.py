"""RankMe against feature matrices whose singular values are chosen, so the answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from ijepa_fast.eval.rank import rankme


def with_singular_values(sigma: list[float], n: int = 300, d: int = 48, seed: int = 0) -> torch.Tensor:
    """[n, d] = U diag(sigma) V^T with random orthonormal U [n, k], V [d, k]."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(sigma), generator=g, dtype=torch.float64))
    return (u * torch.tensor(sigma, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("k", [1, 2, 7, 48])
def test_k_equal_singular_values_give_rank_k(k):
    assert rankme(with_singular_values([5.0] * k)) == pytest.approx(k, rel=1e-3)


def test_singular_values_three_and_one_give_the_entropy_of_three_quarters_and_a_quarter():
    want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # 1.7548
    assert rankme(with_singular_values([3.0, 1.0])) == pytest.approx(want, rel=1e-4)


def test_a_shared_offset_is_not_centred_away():
    """Rows that are one vector plus small noise: rank near 1 (the paper does not centre)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 32, generator=g) * 10 + 0.01 * torch.randn(500, 32, generator=g)
    assert rankme(z) < 1.2
    assert rankme(z - z.mean(0)) > 25


def test_rank_ignores_scale_and_float32_input():
    z = with_singular_values([4.0, 2.0, 1.0])
    assert rankme(z.float() * 1e3) == pytest.approx(rankme(z), rel=1e-5)


@pytest.mark.parametrize("shape", [(0, 4), (5,), (2, 3, 4)])
def test_a_tensor_that_is_not_a_feature_matrix_is_refused(shape):
    with pytest.raises(ValueError, match="rankme needs a non-empty"):
        rankme(torch.zeros(shape))
