"""Files written whole or not at all (checkpoints, image caches, metrics, exported weights), and small JSON records
read back without ever failing.

    with atomic_write("runs/x/metrics.json", "w") as file:
        json.dump(metrics, file)

A crash, a full disk or Ctrl-C in the middle leaves the previous file as it was and no half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A temporary file beside `path` to write into (`mode` "wb" or "w"). When the block ends without an error
    it is flushed to disk and renamed to `path` (a rename within a folder is atomic); when it fails, the
    temporary file is removed and `path` is untouched. The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else "utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual rights
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | os.PathLike) -> dict:
    """The JSON in `path`, or {} when it is missing or unreadable: a lost record or cache is never an error."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
