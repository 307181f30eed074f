"""A bare machine, imitated: with this folder on PYTHONPATH, the packages named in DTQL_HIDE
(comma-separated) cannot be imported, in this process and in every Python it starts, as on a lent
GPU machine that has no gymnasium, MuJoCo, Minari, Ray or nvtx."""
import importlib.abc
import os
import sys

_HIDDEN = {name for name in os.environ.get("DTQL_HIDE", "").split(",") if name}


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by tests/bare)", name=fullname)
        return None


if _HIDDEN:
    sys.meta_path.insert(0, _Hide())
