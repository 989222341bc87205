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
import secrets
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A temporary file beside `path` to write into (`mode` "wb" or "w"). When the block ends without an error
    it is flushed to disk and renamed to `path` (a rename within a folder is atomic), and the folder flushed so the
    rename survives a power cut; when it fails, the temporary file is removed and `path` is untouched. The folder
    is created if missing. The file gets the usual rights (0o666 less the umask), not mkstemp's private 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_temporary(path)
    try:
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else "utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(path.parent)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file .<name>.<random>.tmp beside path, opened for writing. Created with mode 0o666 so that the
    system applies the umask; reading the umask instead would mean setting it for a moment, for every thread."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # O_EXCL: never through a link
    for _ in range(100):
        temporary = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; POSIX only (Windows cannot open a folder so)."""
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object: a lost or damaged record
    or cache is never an error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
