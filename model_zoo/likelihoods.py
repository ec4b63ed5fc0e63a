"""Count likelihoods shared by the task heads and the VAE baselines: NB, zero-inflated NB, and totalVI's NB mixture.

As scvi-tools' ``scvi/distributions/_negative_binomial.py``: the NB is parameterised by its mean ``mu`` and
inverse dispersion ``theta`` (variance ``mu + mu**2 / theta``); ``eps`` keeps the logarithms finite. All
functions are element-wise and broadcast their arguments; they return log-likelihoods (negate for a loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def log_nb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Log-likelihood of counts ``x`` under NB(mean ``mu``, inverse dispersion ``theta``)."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (theta * (torch.log(theta + eps) - log_theta_mu) + x * (torch.log(mu + eps) - log_theta_mu)
            + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))


def log_zinb_positive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor,
                      eps: float = EPS) -> torch.Tensor:
    """Log-likelihood under a zero-inflated NB; ``zi_logits`` are the logits of the extra zeros."""
    softplus_neg = F.softplus(-zi_logits)  # -log(1 - pi)
    log_theta_mu = torch.log(theta + mu + eps)
    pi_theta_log = -zi_logits + theta * (torch.log(theta + eps) - log_theta_mu)
    case_zero = F.softplus(pi_theta_log) - softplus_neg
    case_non_zero = (-softplus_neg + pi_theta_log + x * (torch.log(mu + eps) - log_theta_mu)
                     + torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1))
    return torch.where(x < EPS, case_zero, case_non_zero)  # counts: zero vs positive, whatever eps


def log_nb_mixture(x: torch.Tensor, mu_background: torch.Tensor, mu_foreground: torch.Tensor, theta: torch.Tensor,
                   background_logits: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Log-likelihood under a two-component NB mixture sharing ``theta`` (totalVI's protein model).

    ``background_logits`` are the logits of belonging to the background component.
    """
    log_background = log_nb_positive(x, mu_background, theta, eps)
    log_foreground = log_nb_positive(x, mu_foreground, theta, eps)
    # log(sigmoid(l) * nb_back + sigmoid(-l) * nb_fore) = logsumexp(back, fore - l) - softplus(-l)
    return torch.logsumexp(torch.stack((log_background, log_foreground - background_logits)), dim=0) \
        - F.softplus(-background_logits)


def nb_mixture_mean(mu_background: torch.Tensor, mu_foreground: torch.Tensor,
                    background_logits: torch.Tensor) -> torch.Tensor:
    """Mean of the :func:`log_nb_mixture` distribution."""
    probability = torch.sigmoid(background_logits)
    return probability * mu_background + (1 - probability) * mu_foreground
