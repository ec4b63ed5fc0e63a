"""Count likelihoods (shared by the task heads and the VAE baselines) against torch.distributions and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from atlasformer.model_zoo.likelihoods import (
    log_nb_mixture,
    log_nb_positive,
    log_zinb_positive,
    nb_mixture_mean,
)


@pytest.fixture
def nb_params():
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(40, 30, generator=gen) * 5, generator=gen).double()
    mu = torch.rand(40, 30, generator=gen).double() * 6 + 0.05
    theta = torch.rand(30, generator=gen).double() * 4 + 0.1
    logits = torch.randn(40, 30, generator=gen).double()
    return x, mu, theta, logits


def nb_reference(x, mu, theta):
    # NB with mean mu and inverse dispersion theta = torch's NB(total_count=theta, logits=log(mu / theta))
    return torch.distributions.NegativeBinomial(total_count=theta.expand_as(mu), logits=torch.log(mu) - torch.log(theta)).log_prob(x)


def test_nb_log_likelihood_matches_torch_distributions(nb_params):
    x, mu, theta, _ = nb_params
    torch.testing.assert_close(log_nb_positive(x, mu, theta, eps=0.0), nb_reference(x, mu, theta))


def test_nb_log_likelihood_matches_scipy_at_default_eps(nb_params):
    x, mu, theta, _ = nb_params
    theta = theta.expand_as(mu)
    reference = stats.nbinom.logpmf(x.numpy(), theta.numpy(), (theta / (theta + mu)).numpy())  # n = theta, p = theta / (theta + mu)
    np.testing.assert_allclose(log_nb_positive(x, mu, theta).numpy(), reference, atol=1e-6)
    np.testing.assert_allclose(log_nb_positive(x.float(), mu.float(), theta.float()).numpy(), reference, atol=1e-5)


def test_zinb_log_likelihood_matches_mixture_with_point_mass(nb_params):
    x, mu, theta, logits = nb_params
    pi = torch.sigmoid(logits)
    nb = nb_reference(x, mu, theta).exp()
    reference = torch.log(torch.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    torch.testing.assert_close(log_zinb_positive(x, mu, theta, logits, eps=0.0), reference)
    torch.testing.assert_close(log_zinb_positive(x, mu, theta, logits), reference, atol=1e-6, rtol=1e-6)


def test_nb_mixture_log_likelihood_and_mean_match_two_component_mixture(nb_params):
    x, mu, theta, logits = nb_params
    weight = torch.sigmoid(logits)
    reference = torch.log(weight * nb_reference(x, mu, theta).exp() + (1 - weight) * nb_reference(x, 3 * mu, theta).exp())
    torch.testing.assert_close(log_nb_mixture(x, mu, 3 * mu, theta, logits, eps=0.0), reference)
    torch.testing.assert_close(nb_mixture_mean(mu, 3 * mu, logits), weight * mu + (1 - weight) * 3 * mu)
