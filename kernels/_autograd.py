"""The autograd.Function each op's public function calls, built from the op's registered autograd."""
from __future__ import annotations

import types
from typing import Callable

import torch


def op_function(name: str, op: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function class `name` whose forward is the custom op `op` (torch.ops.dtql.*)
    and whose setup_context and backward are the ones the op registers with register_autograd.

    torch.func transforms refuse the autograd.Function that register_autograd generates: it has no
    setup_context (pytorch/pytorch#170834). This one is the same formula in the form they accept.
    """
    def forward(*args):
        return op(*args)

    def body(ns):
        ns.update(__doc__=f"{op} with its registered autograd formula, in a form torch.func transforms accept.",
                  __module__=backward.__module__, forward=staticmethod(forward),
                  setup_context=staticmethod(setup_context), backward=staticmethod(backward))

    # types.new_class runs autograd.Function's metaclass under `name`, so the backward node is
    # named after it (EdmInputBackward, EdmLossBackward), as with a class statement of that name.
    return types.new_class(name, (torch.autograd.Function,), exec_body=body)
