"""The tensors of a nested checkpoint object (dicts, lists, tuples), by path, for bitwise comparisons."""
import torch


def tensors(x, prefix=""):
    """(path, tensor) for every tensor in x, of every dtype, in x's own order."""
    if isinstance(x, torch.Tensor):
        yield prefix, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from tensors(v, f"{prefix}[{i}]")
