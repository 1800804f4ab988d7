"""Effective rank of frozen features: RankMe (Garrido et al., 2023), a collapse measure for probes.

RankMe(Z) = exp(-sum_k p_k log p_k) with p_k = sigma_k / sum_j sigma_j + eps, over the singular
values sigma of the feature matrix Z [N, D] as it is (not centred, as in the paper). It lies in
[1, min(N, D)]: 1 when every row points the same way, min(N, D) when all singular values are equal.
The entropy is the training monitors' (``metrics.rankme_of_singular_values``); here the singular
values come from the features themselves, not from their Gram matrix.
"""

from __future__ import annotations

import torch

from ijepa_fast.train.metrics import rankme_of_singular_values


@torch.no_grad()
def rankme(features: torch.Tensor) -> float:
    """RankMe of ``features`` [N, D] (float64 singular values); an all-zero matrix has rank 0."""
    if features.ndim != 2 or min(features.shape) < 1:
        raise ValueError(f"rankme needs a non-empty [N, D] feature matrix, got shape {tuple(features.shape)}")
    sigma = torch.linalg.svdvals(features.double())  # (min(N, D),)
    if sigma.sum() == 0:
        return 0.0
    return float(rankme_of_singular_values(sigma))
