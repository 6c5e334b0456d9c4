"""Helpers the model families (modules/vae.py, modules/conditioners.py) build with:
initialisation, group counts, and the VAE's spectral norm."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm


class Architecture:
    """Base of the frozen dataclasses that fix a model's shapes (VAEArchitecture,
    ConditionerArchitecture): a checkpoint stores `stored()`, and `from_stored` reads it
    back, fields an older checkpoint lacks taking their defaults. `filters` is kept a tuple."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))   # a list from JSON or a test

    @classmethod
    def from_stored(cls, stored: dict[str, Any]):
        return cls(**stored)

    def stored(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "filters": list(self.filters)}


def largest_divisor(c: int, cap: int) -> int:
    """The largest divisor of c that is not above cap (GroupNorm's group count)."""
    g = max(1, min(cap, c))
    while c % g:
        g -= 1
    return g


def he_init(root: nn.Module, types: tuple[type[nn.Module], ...]) -> None:
    """He (Kaiming-uniform, ReLU gain) weights and zero biases on every module of `types`,
    as the original initialised both its VAE and its conditioners. Call it before
    spectral norm, so the power iteration starts from the final weights."""
    for m in root.modules():
        if isinstance(m, types):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _DivideBySigma(torch.autograd.Function):
    """W / σ with σ = uᵀ W v (u, v fixed), and a backward that makes 3 sweeps over W.

    Autograd's own backward of `weight / vdot(u, mv(W, v))` makes about seven (G/σ, G·W,
    its negation and division, the outer product u vᵀ, the sum); on the 1280×1280×5
    weights of a wide decoder that was ~45 ms of a 190 ms bf16 step. Same formula:
        dL/dW = (G − ⟨G, W⟩/σ · u vᵀ) / σ,   G = dL/d(W/σ).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, weight_mat: Tensor, u: Tensor, v: Tensor, dim: int) -> Tensor:
        sigma = torch.vdot(u, torch.mv(weight_mat, v))   # exactly torch's σ: same ops, same order
        ctx.save_for_backward(weight, u, v, sigma)
        ctx.dim = dim
        return weight / sigma

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        weight, u, v, sigma = ctx.saved_tensors
        dim = ctx.dim
        grad = grad.contiguous()
        inner = torch.vdot(grad.reshape(-1), weight.reshape(-1))                  # ⟨G, W⟩
        u_scaled = u * (-inner / sigma / sigma)                                   # (out,)
        out = grad / sigma
        if dim == 0:
            out.view(out.shape[0], -1).addr_(u_scaled, v)                         # in place: one sweep
        else:   # ConvTranspose: the matrix rows are weight dim `dim`
            rest = [n for d, n in enumerate(weight.shape) if d != dim]
            out.add_(torch.outer(u_scaled, v).view(weight.shape[dim], *rest).movedim(0, dim))
        return out, None, None, None, None


class _SpectralNorm(_TorchSpectralNorm):
    """torch.nn.utils.parametrizations' spectral norm with a cheaper backward and an eval cache.

    A subclass, so everything but `forward` is torch's: the buffers `_u`/`_v` (state dicts
    are interchangeable), the 15 initial power iterations, one power iteration per forward in
    train mode, none in eval. The forward value W/σ is computed by the same operations as
    torch's (bit-identical); only the gradient is assembled in fewer passes (equal up to
    float rounding; see `_DivideBySigma`).

    In eval mode without autograd (validation, latent extraction, prediction) W/σ is a pure
    function of W, u and v, yet the parametrization recomputed it at every call: a third of
    a batch-1 prediction. It is kept until W, u or v changes (another tensor, or an in-place
    update: an optimizer step, load_state_dict, an EMA update all bump the version counter),
    or the module is put in train mode.
    """

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            return super().forward(weight)
        if self.training or torch.is_grad_enabled():
            return self._normalised(weight)
        try:
            key = (weight._version, self._u._version, self._v._version)
        except RuntimeError:                      # inference tensors keep no version counter
            return self._normalised(weight)
        cached = self.__dict__.get("_eval_cache")
        if cached is not None and cached[0] is weight and cached[1] is self._u and cached[2] is self._v \
                and cached[3] == key:
            return cached[4]
        out = self._normalised(weight)
        # the tensors themselves are held, so their memory cannot be reused under the same key
        self.__dict__["_eval_cache"] = (weight, self._u, self._v, key, out)
        return out

    def _normalised(self, weight: Tensor) -> Tensor:
        with torch.no_grad():
            weight_mat = self._reshape_weight_to_matrix(weight)   # (out, rest); a copy for dim != 0
        if self.training:
            self._power_method(weight_mat, self.n_power_iterations)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return _DivideBySigma.apply(weight, weight_mat, u, v, self.dim)

    def train(self, mode: bool = True):
        if mode:                                  # eval() → eval() (done per call by some callers) keeps it
            self.__dict__.pop("_eval_cache", None)
        return super().train(mode)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12) -> nn.Module:
    """As torch.nn.utils.parametrizations.spectral_norm (same defaults and dim choice)."""
    weight = getattr(module, name)
    dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, name, _SpectralNorm(weight, n_power_iterations, dim, eps))
    return module
