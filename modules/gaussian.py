"""Diagonal Gaussians: the one place that owns clamping, sampling and KL.

Every exp(log_var) and every KL term is evaluated in fp32, whatever autocast chose for
the tensors coming in: exp(30) overflows fp16 and bf16 sums lose the small KL terms.
Only explicit casts (`at_least_fp32`) are used (no autocast context), so this stays friendly
to torch.compile and CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_VAR_MIN, LOG_VAR_MAX = -30.0, 30.0
STD_MIN, STD_MAX = 1e-8, 10.0


def at_least_fp32(x: Tensor) -> Tensor:
    """fp16/bf16 → fp32; fp32 and fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def clamp_log_var(log_var: Tensor) -> Tensor:
    return log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)


class Gaussian:
    """N(mu, exp(log_var)) with log_var clamped to [-30, 30] on construction."""

    __slots__ = ("mu", "log_var")

    def __init__(self, mu: Tensor, log_var: Tensor) -> None:
        self.mu = mu
        self.log_var = clamp_log_var(log_var)

    @property
    def std(self) -> Tensor:
        # fp32; clamped to [1e-8, 10] as the original did before every draw
        return torch.exp(0.5 * at_least_fp32(self.log_var)).clamp(STD_MIN, STD_MAX)

    @property
    def mean(self) -> Tensor:
        return self.mu

    def sample(self) -> Tensor:
        """Reparameterised draw mu + eps * std, returned in mu's dtype."""
        std = self.std
        eps = torch.randn_like(std)
        return (at_least_fp32(self.mu) + eps * std).to(self.mu.dtype)

    def draw(self, mode: str) -> Tensor:
        """`random`: a fresh sample; `fix`: the mean (deterministic point prediction)."""
        if mode == "fix":
            return self.mean
        if mode == "random":
            return self.sample()
        raise ValueError(f"mode must be 'random' or 'fix', got {mode!r}")

    def kl_standard(self) -> Tensor:
        return kl_standard_normal(self.mu, self.log_var)


def kl_standard_normal(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)): batch mean of 1/2 sum(mu^2 + sigma^2 - log sigma^2 - 1).

    Summed over every axis but the first (the batch); fp32 scalar.
    """
    mu = at_least_fp32(mu)
    log_var = clamp_log_var(at_least_fp32(log_var))
    per_elem = mu.square() + log_var.exp() - log_var - 1.0
    return 0.5 * per_elem.flatten(1).sum(dim=1).mean()


def kl_residual(delta_mu: Tensor, delta_log_var: Tensor, prior_log_var: Tensor) -> Tensor:
    """Exact KL of a residual posterior against its prior, batch mean, fp32 scalar.

    KL(N(mu_p + dmu, sigma_p^2 exp(dlv)) || N(mu_p, sigma_p^2))
        = 1/2 sum(dmu^2 / sigma_p^2 + exp(dlv) - dlv - 1), summed over every axis but the
    batch. mu_p cancels, so it is not an argument.
    """
    delta_mu = at_least_fp32(delta_mu)
    delta_log_var = clamp_log_var(at_least_fp32(delta_log_var))
    prior_log_var = clamp_log_var(at_least_fp32(prior_log_var))
    # multiply by exp(-log_var) rather than divide: no 0-division, finite for |log_var| <= 30
    per_elem = (
        delta_mu.square() * torch.exp(-prior_log_var)
        + delta_log_var.exp()
        - delta_log_var
        - 1.0
    )
    return 0.5 * per_elem.flatten(1).sum(dim=1).mean()
