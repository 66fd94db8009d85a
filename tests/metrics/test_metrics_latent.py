"""sfa.metrics.latent_usage: how a model uses its latent, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

import scfm_adapt as sfa


def test_latent_usage_by_hand():
    # 4 cells, 2 tokens of 1 dimension: token 0 separates the labels, token 1 does not
    means = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])[:, :, None]
    variances = np.full_like(means, 0.5)
    out = sfa.metrics.latent_usage(means, variances, labels=["a", "a", "b", "b"])
    assert list(out.index) == ["token0", "token1", "all"]
    assert out.loc["token0", "posterior_variance"] == pytest.approx(0.5)
    assert out.loc["token0", "variance_of_means"] == pytest.approx(1.0)
    assert out.loc["token0", "signal_share"] == pytest.approx(1.0 / 1.5)
    assert out.loc["token0", "active_dims"] == 1 and out.loc["all", "active_dims"] == 2
    kl = 0.5 * (0.5 + 1.0 - 1.0 - np.log(0.5))  # per cell and dimension
    assert out.loc["token0", "kl"] == pytest.approx(kl)
    assert out.loc["all", "kl"] == pytest.approx(2 * kl)
    assert out.loc["token0", "label_share"] == pytest.approx(1.0)
    assert out.loc["token1", "label_share"] == pytest.approx(0.0)
    assert out.loc["all", "label_share"] == pytest.approx(0.5)


def test_an_unused_latent_is_all_noise():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 0.01, (50, 3, 4))  # the posterior means barely move
    out = sfa.metrics.latent_usage(means, np.ones_like(means))
    assert out.loc["all", "active_dims"] == 0 and out.loc["all", "signal_share"] < 0.01
    assert out.loc["all", "kl"] == pytest.approx(0.5 * (means**2).sum((1, 2)).mean())


def test_latent_usage_checks_its_inputs():
    m = np.zeros((4, 2, 3))
    with pytest.raises(ValueError, match="n_cells, n_tokens, token_dim"):
        sfa.metrics.latent_usage(m[0], np.ones((2, 3)))
    with pytest.raises(ValueError, match="positive"):
        sfa.metrics.latent_usage(m, np.zeros_like(m))
    with pytest.raises(ValueError, match="3 entries for 4 cells"):
        sfa.metrics.latent_usage(m, np.ones_like(m), labels=["a", "b", "c"])
