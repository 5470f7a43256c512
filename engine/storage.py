"""Where refteacher keeps things on disk: the cache root and crash-safe (fsync'd, atomic) writes."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Return the refteacher cache folder: ``$REFTEACHER_CACHE`` or ``~/.cache/refteacher``."""
    return Path(os.environ.get("REFTEACHER_CACHE") or "~/.cache/refteacher").expanduser()


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``target``, fsync it and rename it over
    ``target``, then fsync the folder: a reader sees the old file or the whole new one, also
    after a crash. The temporary file is removed if ``write`` raises."""
    target = Path(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_json_atomic(path: str | os.PathLike, payload: Any, *, sort_keys: bool = False, indent: int | None = 1) -> None:
    """Write ``payload`` as JSON to ``path`` with ``atomic_write``."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=indent, sort_keys=sort_keys)
            f.write("\n")

    atomic_write(path, write)


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    """Write ``rows`` (dicts) as JSON lines to ``path`` with ``atomic_write`` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    atomic_write(path, write)
    return path


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it survives a crash (a no-op where folders cannot be opened)."""
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
