"""Triton kernels for DTQL's EDM losses, installed as dtql_fast.kernels (one file per op)."""
from __future__ import annotations

import torch

from dtql_fast.edm import SIGMA_DATA

# Importing the op modules registers torch.ops.dtql.edm_prepare / edm_loss (and their backwards).
# The functions below then shadow the submodules as package attributes; reach the modules'
# internals with `from dtql_fast.kernels.edm_loss import ...`, which resolves the submodule.
from .edm_loss import EdmLoss
from .edm_prepare import EdmPrepare

__all__ = ["edm_prepare", "edm_loss"]


def edm_prepare(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for dtql_fast.edm.edm_prepare: (x_in (B*K, A), t (B*K,)); gradient to x only.

    Differentiable with .backward(), torch.autograd.grad and torch.func.grad, eager or compiled.
    """
    return EdmPrepare.apply(x, sigma, noise, float(sigma_data))


def edm_loss(F: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             max_action: float | None, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Drop-in for dtql_fast.edm.edm_loss_from_output; max_action=None leaves D unclamped.

    Gradient to F and x (both paths through x); none to sigma and noise. Differentiable with
    .backward(), torch.autograd.grad and torch.func.grad, eager or compiled.
    """
    clamp = max_action is not None
    return EdmLoss.apply(F, x, sigma, noise, float(max_action) if clamp else 0.0, clamp, float(sigma_data))
