"""Triton kernels for DTQL's EDM losses, installed as dtql_fast.kernels: one file per op, each holding the
custom op (torch.ops.dtql.*, a Triton kernel on CUDA, the same arithmetic in PyTorch elsewhere), its
autograd formula, and the public function the training step calls.

Per op, what torch.library leaves necessary: the op with its registered autograd (differentiable where the
op is called directly), one autograd.Function of the same formula (torch.func.grad refuses the one that
register_autograd generates), and the public function (argument types; a view of each tensor so that a
compiled torch.func.grad traces through the Function: _common.traceable).
"""
from __future__ import annotations

# Importing the op modules registers torch.ops.dtql.edm_input (and its backward) and edm_loss. The
# functions then shadow the submodules as package attributes; reach a module's internals with
# `from dtql_fast.kernels.edm_loss import ...`, which resolves the submodule.
from .edm_input import edm_input
from .edm_loss import edm_loss

__all__ = ["edm_input", "edm_loss"]
