"""dtql_fast: a fast, verified trainer for Diffusion Trusted Q-Learning."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# kernels/ and profiling/ sit beside this package in the repository and install as its subpackages
# (setup.py's package_dir). In a source checkout that was not installed that way (a lent GPU machine
# with no network; an old-style `setup.py develop`), find them through the package's __path__ instead.
_root = _Path(__file__).resolve().parent.parent
if all((_root / name).is_file() for name in ("setup.py", "kernels/__init__.py", "profiling/__init__.py")):
    __path__.append(str(_root))
