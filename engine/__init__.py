"""refteacher.engine: everything with a model in it (data, models, feature, teacher, filter,
packing, distillation, evaluation, CLI)."""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("refteacher")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
