"""Where refteacher keeps things on disk: the cache root and crash-safe (fsync'd, atomic) writes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Resolving a spec to a directory
# --------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """Return the refteacher cache folder: ``$REFTEACHER_CACHE`` or ``~/.cache/refteacher``."""
    return Path(os.environ.get("REFTEACHER_CACHE") or "~/.cache/refteacher").expanduser()


def write_json_atomic(path: str | os.PathLike, payload: Any, *, sort_keys: bool = False) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=sort_keys)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
