"""files.py: atomic_write, which every file the package writes goes through (whole or not at all), and read_json."""

import json
import os

import pytest

from vit_helpers.files import atomic_write


def test_a_file_is_written_whole_with_the_usual_rights(tmp_path):
    path = tmp_path / "new" / "metrics.json"  # the folder is created
    with atomic_write(path, "w") as file:
        json.dump({"accuracy": 0.9}, file)
    assert json.loads(path.read_text()) == {"accuracy": 0.9}
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0o600
    assert os.listdir(path.parent) == ["metrics.json"]


def test_a_failure_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"the good version")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as file:
            file.write(b"half of the new ver")
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing
    assert path.read_bytes() == b"the good version"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_read_json_gives_an_empty_record_for_a_missing_damaged_or_other_file(tmp_path):
    from vit_helpers.files import read_json

    (tmp_path / "good.json").write_text('{"size": 3}')
    (tmp_path / "cut.json").write_text('{"size": ')  # a write cut short
    assert read_json(tmp_path / "good.json") == {"size": 3}
    assert read_json(tmp_path / "cut.json") == {} and read_json(tmp_path / "missing.json") == {}
    for damaged in ("null", "[]", '"text"', "3"):  # valid JSON, but not the record its readers look into
        (tmp_path / "other.json").write_text(damaged)
        assert read_json(tmp_path / "other.json") == {}


def test_the_process_umask_is_never_changed_even_for_a_moment(tmp_path, monkeypatch):
    """os.umask(0) to read the mask would let another thread create world-writable files meanwhile."""
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
    with atomic_write(tmp_path / "checkpoint.pt") as file:
        file.write(b"weights")
    assert calls == [] and (tmp_path / "checkpoint.pt").read_bytes() == b"weights"


def test_the_file_and_the_rename_are_flushed_to_disk(tmp_path, monkeypatch):
    """fsync of the file before the rename (no empty file after a power cut), and of the folder after it, so
    the new name itself survives a power cut."""
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or fsync(fd))
    with atomic_write(tmp_path / "metrics.json", "w") as file:
        file.write("{}")
    if os.name == "posix" and os.path.isdir("/proc/self/fd"):
        assert synced == [False, True]
