"""Noise schedule and samplers (parameter-free)."""

from __future__ import annotations

import pytest
import torch

from scfm_adapt.diffusion import NoiseSchedule, ddim_invert, ddim_sample, ddpm_sample, timesteps


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_alpha_bar_decreases_from_one_towards_zero(kind):
    ab = NoiseSchedule(200, kind).alpha_bar()
    assert ab.shape == (200,)
    assert (ab[1:] < ab[:-1]).all()
    assert 0.99 < ab[0] <= 1 and ab[-1] < 0.05


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_split_inverts_the_forward_process(prediction):
    s = NoiseSchedule(100, prediction=prediction)
    x0, noise = torch.randn(8, 4, 3, dtype=torch.float64), torch.randn(8, 4, 3, dtype=torch.float64)
    t = torch.randint(0, 99, (8,))
    x_t = s.q_sample(x0, t, noise)
    x0_hat, eps_hat = s.split(x_t, t, s.target(x0, t, noise))
    assert torch.allclose(x0_hat, x0, atol=1e-8) and torch.allclose(eps_hat, noise, atol=1e-8)


def test_ddim_with_an_oracle_denoiser_lands_on_the_data_point():
    s = NoiseSchedule(1000)
    target = torch.tensor([[1.5, -2.0, 0.5]])
    ab = s.alpha_bar()

    def oracle(x, t):  # the exact eps for a point-mass data distribution
        a = ab[t].float().view(-1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    x_T = torch.randn(16, 1, 3, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(oracle, s, x_T, n_steps=50)
    assert torch.allclose(out, target.expand_as(out), atol=1e-3)
    out_ddpm = ddpm_sample(oracle, s, x_T, n_steps=50, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out_ddpm, target.expand_as(out), atol=1e-2)


def test_ddim_is_deterministic_and_ddpm_depends_on_seed():
    s = NoiseSchedule(100)
    den = lambda x, t: 0.1 * x
    x_T = torch.randn(4, 2, 2)
    assert torch.equal(ddim_sample(den, s, x_T, 10), ddim_sample(den, s, x_T, 10))
    a = ddpm_sample(den, s, x_T, 10, generator=torch.Generator().manual_seed(0))
    b = ddpm_sample(den, s, x_T, 10, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


def test_bad_schedule_arguments_fail_clearly():
    with pytest.raises(ValueError, match="schedule kind"):
        NoiseSchedule(10, "sigmoid")
    with pytest.raises(ValueError, match="prediction"):
        NoiseSchedule(10, prediction="x0")


# --------------------------------------------------------------------------- diffusion
def test_ddim_inversion_round_trips_with_an_oracle_denoiser():
    """For Gaussian data the exact eps is linear in x: invert, then sample back."""
    s = NoiseSchedule(1000)
    ab = s.alpha_bar()
    sigma2 = 0.5

    def oracle(x, t):  # E[eps | x_t] for x0 ~ N(0, sigma2 I)
        a = ab[t].float().view(-1, 1, 1)
        return (1 - a).sqrt() * x / (a * sigma2 + 1 - a)

    x0 = torch.randn(32, 2, 3, generator=torch.Generator().manual_seed(0)) * sigma2**0.5
    for strength in (0.5, 0.9):
        errors = []
        for n_steps in (50, 200):
            x_T = ddim_invert(oracle, s, x0, n_steps=n_steps, strength=strength)
            assert not torch.allclose(x_T, x0, atol=1e-2)  # it went somewhere
            back = ddim_sample(oracle, s, x_T, n_steps=n_steps, strength=strength)
            errors.append(((back - x0).norm() / x0.norm()).item())
        # A first-order scheme: small, and shrinking with the step size.
        assert errors[1] < 0.02 and errors[1] < errors[0] / 2, (strength, errors)


def test_timesteps_follow_strength():
    s = NoiseSchedule(100)
    assert timesteps(s, 10)[0] == 99 and timesteps(s, 10)[-1] == 0
    assert timesteps(s, 10, strength=0.5)[0] == 50
    with pytest.raises(ValueError, match="strength"):
        timesteps(s, 10, strength=0.0)
