"""refteacher.engine: everything with a model in it, in wings that follow the data flow.

``data`` (readers, prompt sets, packing) and ``modeling`` (loading, early-exit forward, prompt
states, generation, the teacher directory) feed ``teacher`` (feature, training, calibration),
which ``filter``, ``finetune`` and ``evaluation`` use; ``cli`` and ``quickstart`` sit on top.
Imports only go down that list (tests/test_layout.py).
"""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("refteacher")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
