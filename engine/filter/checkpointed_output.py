"""Append-only output files that survive a kill: data is committed together with a checkpoint.

``CommittedFiles`` owns a folder of append-only files plus ``checkpoint.json``. Writing goes
``append(...)`` (buffered) then ``commit(state)``: the files are flushed and fsynced, and only
then is the checkpoint, which records every file's committed byte size and the caller's ``state``,
replaced atomically (write to a temporary file, fsync, ``os.replace``). On resume each file is cut
back to its committed size, which drops appends that were never committed and repairs a torn last
line, so a resumed run continues exactly where the last commit left off.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from refteacher.engine.errors import UserError
from refteacher.engine.storage import write_json_atomic

CHECKPOINT = "checkpoint.json"
_FORMAT = "refteacher.checkpoint/1"


def read_checkpoint(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Return the checkpoint dict in ``folder`` (keys: settings, sizes, state), or None if absent."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        checkpoint = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is unreadable ({err}); delete it and start again without --resume") from None
    if checkpoint.get("format") != _FORMAT:
        raise UserError(f"{path} is not a refteacher checkpoint; delete it or use another --out-dir")
    return checkpoint


class CommittedFiles:
    """Append-only files in ``folder`` whose content is committed with a checkpoint.

    ``names`` are the file names. ``settings`` (a JSON-able dict) must match the checkpoint's when
    resuming, so a run is never continued with other inputs or options. With ``resume=False`` the
    files start empty; with ``resume=True`` they are cut back to the last commit (or emptied when
    no commit exists). ``state`` is the caller's state from the last commit (None when fresh).
    """

    def __init__(self, folder: str | os.PathLike, names: Iterable[str], *, settings: dict[str, Any],
                 resume: bool) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.names = list(names)
        self.settings = json.loads(json.dumps(settings))  # normalised as it will be stored
        checkpoint = read_checkpoint(self.folder) if resume else None
        if checkpoint is not None and checkpoint.get("settings") != self.settings:
            changed = sorted(
                k for k in set(self.settings) | set(checkpoint.get("settings", {}))
                if self.settings.get(k) != checkpoint.get("settings", {}).get(k)
            )
            raise UserError(
                f"{self.folder} holds a run with other settings (differs in: {', '.join(changed)}); resume with "
                "the same input and options, or start again without --resume"
            )
        sizes = checkpoint["sizes"] if checkpoint is not None else {}
        self.state: dict[str, Any] | None = checkpoint["state"] if checkpoint is not None else None
        if checkpoint is None and (self.folder / CHECKPOINT).exists():
            (self.folder / CHECKPOINT).unlink()
        self._files = {}
        for name in self.names:
            path = self.folder / name
            size = int(sizes.get(name, 0))
            if path.exists() and path.stat().st_size < size:
                raise UserError(f"{path} is shorter than its checkpoint says ({path.stat().st_size} < {size} bytes); "
                                "it was changed after the run; start again without --resume")
            handle = open(path, "r+b" if path.exists() else "w+b")
            handle.truncate(size)
            handle.seek(size)
            self._files[name] = handle
        self.sizes = {name: int(sizes.get(name, 0)) for name in self.names}

    def append(self, name: str, data: bytes) -> None:
        """Append bytes to file ``name`` (not durable until ``commit``)."""
        self._files[name].write(data)

    def commit(self, state: dict[str, Any]) -> None:
        """Make every append so far durable, then record it and ``state`` in the checkpoint."""
        for name, handle in self._files.items():
            handle.flush()
            os.fsync(handle.fileno())
            self.sizes[name] = handle.tell()
        write_json_atomic(
            self.folder / CHECKPOINT,
            {"format": _FORMAT, "settings": self.settings, "sizes": self.sizes, "state": state},
        )
        self.state = state

    def close(self) -> None:
        """Close the files (uncommitted appends stay on disk until the next resume cuts them)."""
        for handle in self._files.values():
            handle.close()
        self._files = {}

    def __enter__(self) -> "CommittedFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
