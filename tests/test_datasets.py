"""The datasets on disk: Animals-10 preparation and download (Kaggle replaced at its network boundary), damaged
archives and leftovers, CIFAR-10, dataset names (also under torchrun) and the shipped sample. Local fixtures only,
built in tmp_path. Reading images, transforms, splits and loaders: tests/test_data.py."""

import errno
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
import tracemalloc
import urllib.error
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit_helpers import data, datasets
from vit_helpers.data import make_dataloaders
from vit_helpers.datasets import (
    ANIMALS10_CLASSES,
    ITALIAN_TO_ENGLISH,
    SAMPLE_CLASSES,
    DatasetError,
    DownloadError,
    KaggleCredentialsError,
    prepare_animals10,
)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------------------
# Fixtures: small images of every mode, a Kaggle-like archive and folder
# --------------------------------------------------------------------------------------------------------------

def write_image(path: Path, mode: str = "RGB", size=(20, 14), seed: int = 0) -> Path:
    """A random image of `mode`, saved in the format its suffix names."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "RGBA":
        image = rgb.convert("RGBA")
        image.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)))
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 0
    else:
        image = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **({"transparency": 0} if mode == "P" else {}))
    return path


def write_truncated_jpeg(path: Path) -> Path:
    write_image(path, "RGB", size=(64, 48), seed=99)
    path.write_bytes(path.read_bytes()[:400])
    return path


#: Images per Italian class in the fixture (a different count each, so a mix-up shows).
FIXTURE_COUNTS = {italian: 1 + i % 3 for i, italian in enumerate(sorted(ITALIAN_TO_ENGLISH))}
TRANSLATE_PY = "raise RuntimeError('translate.py must never be imported or executed')\n"


def make_raw_img(folder: Path) -> Path:
    """folder/raw-img/<italian>/... with .jpeg/.jpg/.png, grayscale, RGBA, palette, CMYK and one truncated file,
    plus the archive's translate.py beside raw-img."""
    suffixes = [".jpeg", ".jpg", ".png"]
    for c, (italian, count) in enumerate(sorted(FIXTURE_COUNTS.items())):
        for i in range(count):
            write_image(folder / "raw-img" / italian / f"OIP-{c}{i}{suffixes[(c + i) % 3]}", seed=c * 10 + i)
    write_image(folder / "raw-img" / "cane" / "gray.jpg", "L", seed=1)
    write_image(folder / "raw-img" / "gatto" / "rgba.png", "RGBA", seed=2)
    write_image(folder / "raw-img" / "gatto" / "palette.png", "P", seed=3)
    write_image(folder / "raw-img" / "ragno" / "cmyk.jpg", "CMYK", seed=4)
    write_truncated_jpeg(folder / "raw-img" / "ragno" / "truncated.jpg")
    (folder / "translate.py").write_text(TRANSLATE_PY)
    return folder


def expected_english_counts() -> dict:
    counts = {ITALIAN_TO_ENGLISH[italian]: n for italian, n in FIXTURE_COUNTS.items()}
    counts["dog"] += 1
    counts["cat"] += 2
    counts["spider"] += 2  # cmyk and the truncated file: preparation copies, the loader skips
    return counts


def zip_folder(folder: Path, archive: Path, prefix: str = "", extra: dict | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
        for name, payload in (extra or {}).items():
            zf.writestr(zipfile.ZipInfo(name), payload)
    return archive


@pytest.fixture
def kaggle_folder(tmp_path) -> Path:
    return make_raw_img(tmp_path / "extracted")


@pytest.fixture
def kaggle_zip(tmp_path, kaggle_folder) -> Path:
    return zip_folder(kaggle_folder, tmp_path / "animals10-fixture.zip")


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------------------
# Animals-10: prepare
# --------------------------------------------------------------------------------------------------------------

def test_prepare_from_zip_and_from_folder_give_the_english_layout(tmp_path, kaggle_zip, kaggle_folder, capsys):
    with pytest.warns(UserWarning, match="differs from the Kaggle Animals-10 archive"):
        from_zip = prepare_animals10(kaggle_zip, tmp_path / "from_zip")
        from_folder = prepare_animals10(kaggle_folder, tmp_path / "from_folder", quiet=True)
    assert "dog" in capsys.readouterr().out  # the counts per class are printed
    assert datasets.count_images(from_zip) == datasets.count_images(from_folder) == expected_english_counts()
    assert sorted(datasets.count_images(from_zip)) == list(ANIMALS10_CLASSES)
    assert datasets.is_prepared(from_zip) and datasets.is_prepared(from_folder)
    zip_files = {k: v[1] for k, v in snapshot(from_zip).items() if k != datasets.PREPARED_MARKER}
    assert zip_files == {k: v[1] for k, v in snapshot(from_folder).items() if k != datasets.PREPARED_MARKER}
    assert not list(from_zip.rglob("translate.py"))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no staging folder left behind


def test_prepare_accepts_an_archive_nested_one_level(tmp_path, kaggle_folder):
    archive = zip_folder(kaggle_folder, tmp_path / "nested.zip", prefix="animals10/")
    with pytest.warns(UserWarning, match="differs"):
        dest = prepare_animals10(archive, tmp_path / "dest", quiet=True)
    assert datasets.count_images(dest) == expected_english_counts()


def test_prepare_is_idempotent(tmp_path, kaggle_zip):
    dest = tmp_path / "animals10"
    with pytest.warns(UserWarning, match="differs"):
        prepare_animals10(kaggle_zip, dest, quiet=True)
    before = snapshot(dest)
    with pytest.warns(UserWarning, match="differs"):
        assert prepare_animals10(kaggle_zip, dest, quiet=True) == dest
    assert snapshot(dest) == before  # same files, same bytes, same mtimes


#: Members that would land outside dest on Linux or on Windows (a drive in any part, a device name), in which
#: a backslash is a separator too.
ESCAPES = ["../evil.jpg", "raw-img/cane/../../evil2.jpg", "raw-img/../../../evil3.jpg",
           "raw-img/gatto/..\\..\\evil4.jpg", "raw-img\\cane\\D:evil5.png", "raw-img/cane/C:evil6.jpg",
           "C:/raw-img/cane/evil7.jpg", "raw-img/cane/evil8.jpg:stream", "raw-img/cane/CON.jpg",
           "raw-img/gatto/nul.png", "raw-img/gatto/Com1.jpeg", "raw-img/cane/lpt9.x.jpg", "raw-img/cane/AUX .png",
           "raw-img/cane/PRN", "raw-img/aux/evil9.jpg"]


def test_archive_entries_that_escape_dest_are_refused(tmp_path, kaggle_folder):
    outside = tmp_path / "outside"
    escapes = {name: b"x" for name in ESCAPES + [(outside / "absolute.jpg").as_posix()]}
    archive = zip_folder(kaggle_folder, tmp_path / "hostile.zip", extra=escapes)
    with zipfile.ZipFile(archive, "a") as zf:  # a symbolic link stored in the zip, pointing outside
        link = zipfile.ZipInfo("raw-img/cane/link.jpg")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, str(outside / "secret.jpg"))
    dest = tmp_path / "work" / "animals10"
    before = set(tmp_path.rglob("*"))
    with pytest.warns(UserWarning) as caught:
        prepare_animals10(archive, dest, quiet=True)
    refused = " ".join(str(w.message) for w in caught if "refused" in str(w.message))
    for name in list(escapes) + ["raw-img/cane/link.jpg"]:
        assert repr(name) in refused, name
    assert "'raw-img/cane/link.jpg' (symbolic link)" in refused
    written = set(tmp_path.rglob("*")) - before - {dest.parent, dest}
    assert written and all(dest in p.parents for p in written), sorted(written - set(dest.rglob("*")))
    assert not outside.exists()
    assert datasets.count_images(dest) == expected_english_counts()  # none of them landed in dest either
    assert datasets._animals10_entry("raw-img/cane/console.jpg") == ("dog", "console.jpg")  # not a device name


def test_a_target_outside_staging_is_refused_before_it_is_opened(tmp_path, kaggle_folder, monkeypatch):
    """The last guard, whatever the member name checks miss: every path must resolve inside the work folder."""
    archive = zip_folder(kaggle_folder, tmp_path / "archive.zip", extra={"raw-img/cane/sly.jpg": b"x"})
    real_entry = datasets._animals10_entry
    monkeypatch.setattr(datasets, "_animals10_entry", lambda name: ("dog", "../../escaped.jpg")
                        if name.endswith("sly.jpg") else real_entry(name))
    with pytest.warns(UserWarning) as caught:
        prepare_animals10(archive, tmp_path / "dest", quiet=True)
    assert any("'raw-img/cane/sly.jpg' (would land outside" in str(w.message) for w in caught)
    assert not list(tmp_path.rglob("escaped.jpg"))


def test_symbolic_links_in_a_folder_source_are_refused(tmp_path, kaggle_folder):
    secret = write_image(tmp_path / "secret" / "secret.jpg")
    (kaggle_folder / "raw-img" / "cane" / "link.jpg").symlink_to(secret)
    (kaggle_folder / "raw-img" / "mucca").rename(tmp_path / "real_mucca")
    (kaggle_folder / "raw-img" / "mucca").symlink_to(tmp_path / "real_mucca", target_is_directory=True)
    with pytest.warns(UserWarning) as caught:
        dest = prepare_animals10(kaggle_folder, tmp_path / "dest", quiet=True)
    assert any("link.jpg (symbolic link)" in str(w.message) for w in caught)
    assert not (dest / "dog" / "link.jpg").exists() and not (dest / "cow").exists()


def test_prepare_never_overwrites_a_foreign_folder(tmp_path, kaggle_zip):
    dest = tmp_path / "mine"
    write_image(dest / "holiday.jpg")
    with pytest.raises(DatasetError, match="not written by prepare_animals10"):
        prepare_animals10(kaggle_zip, dest, quiet=True)
    assert (dest / "holiday.jpg").is_file()


def test_the_prepared_folder_loads_with_every_image_mode_and_skips_the_truncated_file(tmp_path, kaggle_zip):
    with pytest.warns(UserWarning, match="differs"):
        dest = prepare_animals10(kaggle_zip, tmp_path / "animals10", quiet=True)
    with pytest.warns(UserWarning, match=r"truncated\.jpg"):
        folder = data.VerifiedImageFolder(dest)
    assert folder.classes == list(ANIMALS10_CLASSES)
    assert len(folder) == sum(expected_english_counts().values()) - 1
    modes = {Image.open(path).mode for path, _ in folder.samples}
    assert {"L", "RGBA", "P", "CMYK", "RGB"} <= modes
    _, test_transform = data.build_transforms(16, augment=False)
    for path, _ in folder.samples:
        assert test_transform(data.load_rgb(path)).shape == (3, 16, 16)


# --------------------------------------------------------------------------------------------------------------
# Animals-10: download (Kaggle replaced at its network boundary)
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """A HOME with no Kaggle credentials and no KAGGLE_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    return home


@pytest.fixture
def kaggle_api(fake_home, monkeypatch):
    """Fake legacy credentials (they authenticate without the network) and the real KaggleApi class."""
    monkeypatch.setenv("KAGGLE_USERNAME", "student")
    monkeypatch.setenv("KAGGLE_KEY", "0" * 32)
    from kaggle.api.kaggle_api_extended import KaggleApi
    return KaggleApi


class FakeKaggle:
    """Kaggle's servers at the HTTP layer (requests' HTTPAdapter.send, where bytes would cross the network), so
    kaggle's own dataset_download_files runs: it asks the API for the dataset, follows the redirect to storage
    and streams the archive into <slug>.zip with its progress bar and size check.

    `payload` is what storage serves; `offline` refuses every connection; `claimed_size` makes storage announce
    more bytes than it sends (a download cut short)."""

    API = "https://api.kaggle.com/v1/datasets.DatasetApiService/DownloadDataset"
    STORAGE = "https://storage.googleapis.com/kaggle-data-sets/animals10/archive.zip"

    def __init__(self, payload: bytes):
        self.payload, self.offline, self.claimed_size, self.on_storage = payload, False, None, None
        self.requests = []

    def send(self, adapter, request, **settings):
        import requests
        import urllib3

        self.requests.append((request.method, request.url.split("?")[0], request.headers.get("Authorization")))
        if self.offline:
            raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")
        if request.url == self.API:
            status, body, headers = 302, b"", {"Location": self.STORAGE + "?X-Goog-Signature=abc"}
        else:
            if self.on_storage:
                self.on_storage()
            status, body = 200, self.payload
            headers = {"Content-Type": "application/zip", "Content-Length": str(self.claimed_size or len(body)),
                       "Last-Modified": "Sun, 17 Nov 2019 10:00:00 GMT", "Accept-Ranges": "bytes"}
        raw = urllib3.HTTPResponse(body=io.BytesIO(body), headers=headers, status=status, preload_content=False,
                                   request_method=request.method, enforce_content_length=False)
        return adapter.build_response(request, raw)

    def downloads(self) -> int:
        return sum(url == self.STORAGE for _, url, _ in self.requests)


@pytest.fixture
def kaggle_server(kaggle_api, kaggle_zip, monkeypatch) -> FakeKaggle:
    import requests.adapters

    server = FakeKaggle(kaggle_zip.read_bytes())
    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send",
                        lambda adapter, request, **settings: server.send(adapter, request, **settings))
    return server


def test_download_renames_a_whole_archive_then_prepares(tmp_path, kaggle_server, capsys):
    dest = tmp_path / "data" / "animals10"

    def storage_answers():
        assert not dest.with_name("animals10.zip").exists()  # the final name appears only when whole

    kaggle_server.on_storage = storage_answers
    with pytest.warns(UserWarning, match="differs"):
        assert datasets.download_animals10(dest, quiet=True) == dest
    # kaggle's own code ran: it asked the API with the credentials, then fetched from storage without them.
    assert [(method, url, (auth or "")[:6]) for method, url, auth in kaggle_server.requests] == [
        ("POST", FakeKaggle.API, "Basic "), ("GET", FakeKaggle.STORAGE, "")]
    assert datasets.count_images(dest) == expected_english_counts()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["animals10"]  # archive and work folder removed
    output = capsys.readouterr()
    assert "100%" in output.err and "Dataset URL" not in output.out  # the progress bar shows; quiet hides the rest

    with pytest.warns(UserWarning, match="differs"):
        assert datasets.download_animals10(dest, quiet=True) == dest
    assert kaggle_server.downloads() == 1  # a prepared folder is not downloaded again


def test_the_download_command_shows_kaggles_progress_bar(tmp_path, kaggle_server, capsys):
    from vit_helpers.cli import main

    with pytest.warns(UserWarning, match="differs"):
        assert main(["download", "animals10", "--dest", str(tmp_path / "animals10")]) == 0
    output = capsys.readouterr()
    total = sum(expected_english_counts().values())
    assert "100%" in output.err  # the bar, although the command asks download_animals10 to be quiet
    assert output.out.startswith(f"animals10 is ready in {tmp_path / 'animals10'}: {total} images (")
    assert len(output.out.strip().splitlines()) == 1


def test_progress_false_hides_the_bar_and_quiet_false_prints_the_counts(tmp_path, kaggle_server, capsys):
    with pytest.warns(UserWarning, match="differs"):
        datasets.download_animals10(tmp_path / "data" / "animals10", progress=False, keep_archive=True)
    output = capsys.readouterr()
    assert "100%" not in output.err and "dog" in output.out
    # kept: the bytes storage sent, under the name Kaggle gave them (<slug>.zip) and then ours
    assert (tmp_path / "data" / "animals10.zip").read_bytes() == kaggle_server.payload


def test_an_archive_downloaded_by_hand_is_used_and_kept_even_with_force(tmp_path, kaggle_zip, kaggle_server):
    archive = tmp_path / "data" / "animals10.zip"
    archive.parent.mkdir()
    archive.write_bytes(kaggle_zip.read_bytes())
    with pytest.warns(UserWarning, match="differs"):
        dest = datasets.download_dataset("animals10", tmp_path / "data" / "animals10")
    assert datasets.count_images(dest) == expected_english_counts() and archive.is_file()
    (dest / "dog" / "extra.jpg").write_bytes(b"not from the archive")
    with pytest.warns(UserWarning, match="differs"):
        datasets.download_animals10(dest, force=True, quiet=True)
    assert not (dest / "dog" / "extra.jpg").exists()  # prepared again...
    assert archive.read_bytes() == kaggle_zip.read_bytes() and kaggle_server.requests == []  # ...from the user's
    assert datasets.download_dataset("sample") == ROOT / "data" / "sample"
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets.download_dataset("imagenet")


def test_force_downloads_again_an_archive_it_downloaded_and_kept(tmp_path, kaggle_server):
    dest = tmp_path / "data" / "animals10"
    with pytest.warns(UserWarning, match="differs"):
        datasets.download_animals10(dest, quiet=True, keep_archive=True)
        datasets.download_animals10(dest, force=True, quiet=True)
    assert kaggle_server.downloads() == 2
    assert sorted(p.name for p in dest.parent.iterdir()) == ["animals10"]  # not kept the second time


def test_missing_credentials_give_a_clear_error_naming_the_three_ways(tmp_path, fake_home):
    assert datasets.kaggle_credentials_source() is None
    with pytest.raises(KaggleCredentialsError) as error:
        datasets.download_animals10(tmp_path / "data" / "animals10")  # our pre-check raises before kaggle is asked
    message = str(error.value)
    assert "KAGGLE_API_TOKEN" in message and "kaggle.json" in message and "KAGGLE_USERNAME" in message
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_kaggles_own_exit_without_credentials_becomes_the_clear_error(tmp_path, fake_home, monkeypatch, capsys):
    """The pre-check bypassed: kaggle's real authenticate() finds nothing, prints its help and calls exit(1)."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    capsys.readouterr()
    monkeypatch.setattr(KaggleApi, "config", str(fake_home / "none" / "kaggle.json"))  # fixed at kaggle's import
    monkeypatch.setattr(datasets, "kaggle_credentials_source", lambda: "somewhere the pre-check wrongly saw")
    with pytest.raises(KaggleCredentialsError, match="KAGGLE_USERNAME") as error:
        datasets.download_animals10(tmp_path / "data" / "animals10", quiet=True)
    assert isinstance(error.value.__context__, SystemExit)  # kaggle did call exit(1), and it did not escape
    assert "Authentication required" not in capsys.readouterr().out  # nor did kaggle's page of help


def test_each_credential_source_is_recognised(fake_home, monkeypatch):
    (fake_home / ".kaggle").mkdir()
    (fake_home / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert datasets.kaggle_credentials_source().endswith("kaggle.json")
    (fake_home / ".kaggle" / "access_token").write_text("token\n")
    assert datasets.kaggle_credentials_source().endswith("access_token")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
    assert datasets.kaggle_credentials_source() == "KAGGLE_API_TOKEN"


def test_the_credential_check_follows_the_kaggle_package(fake_home, tmp_path, monkeypatch):
    from kagglesdk.kaggle_env import get_access_token_from_env

    xdg = tmp_path / "xdg"
    (xdg / "kaggle").mkdir(parents=True)
    (xdg / "kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setattr(sys, "platform", "linux")
    assert datasets.kaggle_credentials_source() == str(xdg / "kaggle" / "kaggle.json")  # Linux, no ~/.kaggle
    monkeypatch.setattr(sys, "platform", "darwin")
    assert datasets.kaggle_credentials_source() is None  # kaggle reads XDG only on Linux
    (fake_home / ".kaggle").mkdir()
    monkeypatch.setattr(sys, "platform", "linux")
    assert datasets.kaggle_credentials_source() is None  # nor on Linux when ~/.kaggle exists
    # Inside a Kaggle notebook the token is in the file KAGGLE_API_V1_TOKEN names.
    token = tmp_path / "v1_token"
    token.write_text("secret\n")
    monkeypatch.setenv("KAGGLE_API_V1_TOKEN", str(token))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert datasets.kaggle_credentials_source() is None and get_access_token_from_env()[0] is None  # no proxy URL
    monkeypatch.setenv("KAGGLE_DATA_PROXY_URL", "http://proxy")
    assert datasets.kaggle_credentials_source() == "KAGGLE_API_V1_TOKEN"
    assert get_access_token_from_env() == ("secret", "KAGGLE_API_V1_TOKEN")
    # KAGGLE_API_TOKEN may name a file; an empty one means no token, as in kaggle.
    for name in ("KAGGLE_API_V1_TOKEN", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_DATA_PROXY_URL"):
        monkeypatch.delenv(name)
    token.write_text("")
    monkeypatch.setenv("KAGGLE_API_TOKEN", str(token))
    (fake_home / ".kaggle" / "access_token").write_text("token")
    assert datasets.kaggle_credentials_source() is None and get_access_token_from_env()[0] is None
    (fake_home / ".kaggle" / "credentials.json").write_text('{"refresh_token": "r"}')
    assert datasets.kaggle_credentials_source().endswith("(kaggle auth login)")


@pytest.mark.parametrize("failure", [SystemExit(1), NameError("name 'exit' is not defined")])
def test_kaggle_exiting_while_signing_in_becomes_the_clear_error(tmp_path, kaggle_api, monkeypatch, failure):
    def authenticate(self):
        print("a long page of Kaggle help")
        raise failure

    monkeypatch.setattr(kaggle_api, "authenticate", authenticate)
    with pytest.raises(KaggleCredentialsError, match="KAGGLE_USERNAME"):
        datasets.download_animals10(tmp_path / "data" / "animals10", quiet=True)


@pytest.mark.parametrize("failure", ["offline", "cut short"])
def test_a_failed_download_leaves_nothing_half_written(tmp_path, kaggle_server, failure):
    if failure == "offline":
        kaggle_server.offline = True
    else:
        kaggle_server.claimed_size = len(kaggle_server.payload) + 1000  # kaggle's own size check catches it
    data_dir = tmp_path / "data"
    with pytest.raises(DownloadError, match="internet connection" if failure == "offline" else "does not match"):
        datasets.download_animals10(data_dir / "animals10", quiet=True)
    assert list(data_dir.iterdir()) == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_full_disk_or_ctrl_c_mid_download_leaves_nothing_and_a_retry_works(tmp_path, kaggle_server, monkeypatch,
                                                                               failure):
    class FailingFile:  # the archive as kaggle writes it: the first chunk goes half to disk, then the failure
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, chunk):
            self.file.write(chunk[:100])
            raise failure

    kaggle_module = sys.modules["kaggle.api.kaggle_api_extended"]
    monkeypatch.setattr(kaggle_module, "open", lambda file, mode="r", *args, **kwargs: FailingFile(
        open(file, mode, *args, **kwargs)) if str(file).endswith(".zip") else open(file, mode, *args, **kwargs),
        raising=False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # kaggle retries 5 times, backing off up to a minute
    data_dir = tmp_path / "data"
    expected = (DatasetError, "the disk is full") if isinstance(failure, OSError) else (KeyboardInterrupt, None)
    with pytest.raises(expected[0], match=expected[1]) as raised:
        datasets.download_animals10(data_dir / "animals10", quiet=True)
    assert "internet" not in str(raised.value)  # not an advice to check the connection
    assert list(data_dir.iterdir()) == []
    monkeypatch.delattr(kaggle_module, "open")
    with pytest.warns(UserWarning, match="differs"):
        datasets.download_animals10(data_dir / "animals10", quiet=True)
    assert datasets.is_prepared(data_dir / "animals10")


def test_find_animals10_says_why_and_never_raises(tmp_path, kaggle_server, monkeypatch):
    """What the notebooks use to choose Animals-10 or the shipped sample."""
    dest = tmp_path / "data" / "animals10"
    monkeypatch.delenv("KAGGLE_USERNAME")
    assert datasets.find_animals10(dest) == (None, f"no Kaggle credentials were found, so Animals-10 cannot be "
                                                   f"downloaded (nor is Kaggle's archive at {dest}.zip)")
    monkeypatch.setenv("KAGGLE_USERNAME", "student")
    folder, why = datasets.find_animals10(dest, download=False)
    assert folder is None and "not prepared" in why
    kaggle_server.offline = True
    folder, why = datasets.find_animals10(dest)
    assert folder is None and why.startswith("downloading Animals-10 failed")
    kaggle_server.offline = False
    with pytest.warns(UserWarning, match="differs"):
        assert datasets.find_animals10(dest) == (dest, "Animals-10 was downloaded with the credentials from "
                                                   "KAGGLE_USERNAME and KAGGLE_KEY")
    assert datasets.find_animals10(dest) == (dest, f"Animals-10 is prepared in {dest}")


def test_find_animals10_prepares_an_archive_put_there_by_hand_without_credentials(tmp_path, kaggle_zip, fake_home):
    """Kaggle's archive downloaded from the website and saved as data/animals10.zip needs no credentials."""
    dest = tmp_path / "data" / "animals10"
    archive = dest.with_name("animals10.zip")
    archive.parent.mkdir()
    shutil.copy(kaggle_zip, archive)
    assert datasets.kaggle_credentials_source() is None
    folder, why = datasets.find_animals10(dest, download=False)
    assert folder is None and why == f"Animals-10 is not prepared in {dest} (Kaggle's archive is at {archive})"
    with pytest.warns(UserWarning, match="differs"):
        assert datasets.find_animals10(dest) == (dest, f"Animals-10 was prepared from {archive}")
    assert datasets.count_images(dest) == expected_english_counts()
    assert archive.read_bytes() == kaggle_zip.read_bytes()  # the user's archive is kept
    damaged_copy(kaggle_zip, archive)
    assert datasets.find_animals10(dest) == (dest, f"Animals-10 is prepared in {dest}")  # the archive is not read
    shutil.rmtree(dest)
    folder, why = datasets.find_animals10(dest)
    assert folder is None and why.startswith(f"preparing Animals-10 failed: {archive} is damaged")


# --------------------------------------------------------------------------------------------------------------
# Animals-10: damaged archives, leftovers of killed runs
# --------------------------------------------------------------------------------------------------------------

def damaged_copy(archive: Path, out: Path) -> Path:
    """The archive with one byte of an image flipped: still a zip (is_zipfile passes), but its CRC fails."""
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        member = next(info for info in zf.infolist() if info.filename.endswith(".png"))
        payload = zf.read(member)
    position = raw.find(payload) + len(payload) // 2
    raw[position] ^= 0xFF
    out.write_bytes(bytes(raw))
    assert zipfile.is_zipfile(out)
    return out


def test_a_damaged_archive_is_a_clear_error_that_leaves_nothing(tmp_path, kaggle_zip):
    damaged = damaged_copy(kaggle_zip, tmp_path / "damaged.zip")
    dest = tmp_path / "out" / "animals10"
    with pytest.raises(datasets.DamagedArchiveError, match=r"damaged\.zip is damaged .*CRC.*delete it"):
        prepare_animals10(damaged, dest, quiet=True)
    assert list(dest.parent.iterdir()) == []  # no dest, no work folder
    not_a_zip = tmp_path / "page.zip"
    not_a_zip.write_text("<html>Please sign in</html>")
    with pytest.raises(datasets.DamagedArchiveError, match="not a zip archive"):
        prepare_animals10(not_a_zip, dest, quiet=True)


def test_a_damaged_download_is_deleted_so_the_next_call_downloads_again(tmp_path, kaggle_zip, kaggle_server):
    good = kaggle_server.payload
    kaggle_server.payload = damaged_copy(kaggle_zip, tmp_path / "damaged.zip").read_bytes()
    dest = tmp_path / "data" / "animals10"
    with pytest.raises(DatasetError, match="came from Kaggle and has been deleted"):
        datasets.download_animals10(dest, quiet=True)
    assert list(dest.parent.iterdir()) == []
    kaggle_server.payload = good
    with pytest.warns(UserWarning, match="differs"):
        datasets.download_animals10(dest, quiet=True)
    assert kaggle_server.downloads() == 2 and datasets.count_images(dest) == expected_english_counts()


def test_a_damaged_archive_put_there_by_hand_is_kept_and_named(tmp_path, kaggle_zip, kaggle_api, capsys):
    from vit_helpers.cli import main

    archive = damaged_copy(kaggle_zip, tmp_path / "animals10.zip")
    before = archive.read_bytes()
    with pytest.raises(DatasetError, match=r"animals10\.zip is damaged .*you put it there\), so it was kept"):
        datasets.download_animals10(tmp_path / "animals10", quiet=True)
    assert archive.read_bytes() == before
    folder, why = datasets.find_animals10(tmp_path / "animals10")  # with credentials it tries, and never raises
    assert folder is None and "animals10.zip is damaged" in why
    capsys.readouterr()
    assert main(["download", "animals10", "--dest", str(tmp_path / "animals10")]) == 1  # one line, no traceback
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is damaged" in error and "Traceback" not in error


def test_leftovers_of_killed_runs_are_swept_but_not_those_of_running_ones(tmp_path, kaggle_zip):
    dead, alive = 99_999_999, os.getppid()  # no process can have that id; our parent is running
    stale = [f".animals10.{dead}.abcd_123.tmp", ".animals10.abcd_123.tmp", f".animals10.old-{dead}"]
    kept = [f".animals10.{alive}.abcd_123.tmp", f".animals10.old-{alive}", ".animals10.v2.1.abcd_123.tmp",
            ".animals10-small.1.abcd_123.tmp", "notes.tmp"]
    for name in stale + kept:
        (tmp_path / name / "dog").mkdir(parents=True)
    with pytest.warns(UserWarning, match="differs"):
        prepare_animals10(kaggle_zip, tmp_path / "animals10", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("extracted", kaggle_zip.name)) == sorted(
        kept + ["animals10"])


# --------------------------------------------------------------------------------------------------------------
# Animals-10: hostile archives, awkward destinations, two processes at once
# --------------------------------------------------------------------------------------------------------------

def test_names_too_long_or_unusable_on_windows_are_refused_and_the_rest_is_prepared(tmp_path, kaggle_folder):
    names = ["raw-img/cane/" + "a" * 252 + ".jpg",  # 256 bytes: more than a file name may have
             "raw-img/cane/what?.jpg", 'raw-img/cane/say"hi".png', "raw-img/gatto/a|b.jpg", "raw-img/gatto/<b>.png",
             "raw-img/gatto/star*.jpg", "raw-img/ragno/new\nline.jpg"]
    archive = zip_folder(kaggle_folder, tmp_path / "odd.zip", extra={name: b"x" for name in names})
    with pytest.warns(UserWarning) as caught:
        dest = prepare_animals10(archive, tmp_path / "dest", quiet=True)
    refused = " ".join(str(w.message) for w in caught if "refused" in str(w.message))
    for name in names:
        assert repr(name) in refused, name
    assert datasets.count_images(dest) == expected_english_counts()


def test_a_zip_bomb_is_streamed_to_disk_not_held_in_memory(tmp_path, kaggle_folder):
    archive = zip_folder(kaggle_folder, tmp_path / "bomb.zip")
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("raw-img/cane/bomb.jpg", bytes(64 << 20))  # 64 MiB of zeros in 64 kB
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match="differs"):
            dest = prepare_animals10(archive, tmp_path / "dest", quiet=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (dest / "dog" / "bomb.jpg").stat().st_size == 64 << 20
    assert peak < 16 << 20


def test_an_archive_larger_than_the_free_space_is_refused_before_writing(tmp_path, kaggle_zip, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    dest = tmp_path / "out" / "animals10"
    with pytest.raises(DatasetError, match=r"needs .* but only .* free"):
        prepare_animals10(kaggle_zip, dest, quiet=True)
    assert list(dest.parent.iterdir()) == []


def test_a_zip_that_python_cannot_read_is_a_clear_error(tmp_path, kaggle_folder):
    archive = zip_folder(kaggle_folder, tmp_path / "deflate64.zip")
    raw = bytearray(archive.read_bytes())
    first = zipfile.ZipFile(archive).infolist()[0]
    assert first.filename.startswith("raw-img/")
    central = raw.find(b"PK\x01\x02")  # its central directory entry comes first too
    for at in (first.header_offset + 8, central + 10):  # the compression method: 9 = Deflate64 (Windows' zip)
        raw[at:at + 2] = (9).to_bytes(2, "little")
    archive.write_bytes(bytes(raw))
    dest = tmp_path / "out" / "animals10"
    with pytest.raises(DatasetError, match="cannot read .* extract it .* pass the folder"):
        prepare_animals10(archive, dest, quiet=True)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("what", ["a file", "a folder of yours"])
def test_an_unusable_destination_is_a_clear_error_before_any_download(tmp_path, kaggle_zip, kaggle_server, what):
    dest = tmp_path / "data" / "animals10"
    mine = dest if what == "a file" else dest / "holiday.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    message = "is a file, not a folder" if what == "a file" else "not written by prepare_animals10"
    with pytest.raises(DatasetError, match=message):
        prepare_animals10(kaggle_zip, dest, quiet=True)
    with pytest.raises(DatasetError, match=message):
        datasets.download_animals10(dest, quiet=True)
    assert kaggle_server.downloads() == 0 and mine.read_text() == "mine"
    assert os.listdir(dest.parent) == ["animals10"]


def test_force_never_deletes_a_source_inside_dest(tmp_path, kaggle_zip):
    with pytest.warns(UserWarning, match="differs"):
        dest = prepare_animals10(kaggle_zip, tmp_path / "animals10", quiet=True)
    inside = dest / "animals10.zip"
    shutil.copy(kaggle_zip, inside)
    with pytest.raises(DatasetError, match="is inside"):
        prepare_animals10(inside, dest, force=True, quiet=True)
    assert inside.read_bytes() == kaggle_zip.read_bytes() and datasets.is_prepared(dest)


def test_a_dest_that_links_to_a_folder_is_filled_where_it_points(tmp_path, kaggle_zip):
    """data/animals10 -> a bigger disk: the images go there and the link stays."""
    big_disk = tmp_path / "big_disk"
    (big_disk / "animals10").mkdir(parents=True)
    link = tmp_path / "data" / "animals10"
    link.parent.mkdir()
    link.symlink_to(big_disk / "animals10", target_is_directory=True)
    with pytest.warns(UserWarning, match="differs"):
        prepare_animals10(kaggle_zip, link, quiet=True)
        prepare_animals10(kaggle_zip, link, force=True, quiet=True)
    assert link.is_symlink() and datasets.is_prepared(big_disk / "animals10")
    assert os.listdir(link.parent) == ["animals10"] and os.listdir(big_disk) == ["animals10"]


@pytest.mark.parametrize("moment", ["while this one builds", "just before its rename"])
def test_a_folder_another_process_prepared_meanwhile_is_kept(tmp_path, kaggle_zip, monkeypatch, moment):
    """Two notebooks preparing at once: the one that finishes second must not delete the folder that the first may
    already be training from, nor fail."""
    dest = tmp_path / "animals10"
    with pytest.warns(UserWarning, match="differs"):
        theirs = prepare_animals10(kaggle_zip, tmp_path / "theirs", quiet=True)
    (theirs / "in-use.txt").write_text("the other process reads this folder")

    def the_other_process_finishes():
        if not dest.exists():
            os.rename(theirs, dest)

    if moment == "while this one builds":
        build = datasets._build_animals10
        monkeypatch.setattr(datasets, "_build_animals10",
                            lambda *args: (build(*args), the_other_process_finishes())[0])
    else:
        rename = Path.rename
        monkeypatch.setattr(Path, "rename", lambda self, target: (
            the_other_process_finishes() if Path(target) == dest else None, rename(self, target))[1])
    with pytest.warns(UserWarning, match="differs"):
        assert prepare_animals10(kaggle_zip, dest, quiet=True) == dest
    assert (dest / "in-use.txt").is_file() and datasets.is_prepared(dest)
    assert sorted(os.listdir(tmp_path)) == sorted(["animals10", "extracted", kaggle_zip.name])


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10 and names
# --------------------------------------------------------------------------------------------------------------

def test_cifar10_offline_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DownloadError, match="cifar-10-python.tar.gz"):
        datasets.prepare_cifar10(tmp_path / "cifar10", quiet=True)
    assert not (tmp_path / "cifar10" / "images").exists()


def test_cifar10_is_written_as_an_image_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    batches = tmp_path / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in names:
        entry = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 1]}
        (batches / name).write_bytes(pickle.dumps(entry))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "automobile", "bird"]}))
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # the fixture has its own md5s
    images = datasets.prepare_cifar10(tmp_path / "cifar10", quiet=True)
    assert datasets.count_images(images / "train") == {"airplane": 5, "automobile": 10, "bird": 5}
    assert datasets.count_images(images / "test") == {"airplane": 1, "automobile": 2, "bird": 1}
    assert Image.open(images / "test" / "bird" / "00002.png").size == (32, 32)


def test_resolve_dataset_names_and_paths(tmp_path, monkeypatch, fake_home):
    assert datasets.resolve_dataset("sample") == ROOT / "data" / "sample"
    assert datasets.resolve_dataset(tmp_path) == tmp_path
    with pytest.raises(DatasetError, match="not a folder"):
        datasets.resolve_dataset(tmp_path / "missing")
    monkeypatch.setattr(datasets, "DATA_ROOT", tmp_path / "installed")
    with pytest.raises(DatasetError, match="make_sample.py"):
        datasets.resolve_dataset("sample")
    with pytest.raises(KaggleCredentialsError, match="KAGGLE_API_TOKEN"):
        datasets.resolve_dataset("animals10")


def _two_ranks_fetch_cifar10(rank: int, port: int, root: str) -> None:
    """One of two torchrun-like processes resolving "cifar10": first with a download that fails, then one that
    works. torchvision's CIFAR10 is replaced by a fake that logs who called it; prepare_cifar10 is the real one."""
    import torchvision.datasets

    from vit_helpers import training

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    training.init_distributed("cpu")
    datasets.DATA_ROOT = Path(root) / "data"
    datasets.PREPARE_WAIT = datasets.timedelta(seconds=30)  # a rank left waiting fails the test instead of hanging it

    class FakeCIFAR10:
        offline = True

        def __init__(self, root, train, download):
            with open(Path(root).parents[1] / "downloads.log", "a") as log:
                log.write(f"rank {rank} {'train' if train else 'test'}\n")
            time.sleep(0.5)  # long enough for a second rank to start a download of its own, if it could
            if FakeCIFAR10.offline:
                raise urllib.error.URLError("no network")
            self.classes, self.targets = ["cat", "dog"], [0, 1, 1]
            self.data = np.zeros((3, 32, 32, 3), dtype=np.uint8)

        def __len__(self):
            return len(self.targets)

    torchvision.datasets.CIFAR10 = FakeCIFAR10
    outcomes = []
    for offline in (True, False):
        FakeCIFAR10.offline = offline
        started = time.perf_counter()
        try:
            outcome = str(datasets.resolve_dataset("cifar10"))
        except DatasetError as error:
            outcome = f"{type(error).__name__}: {error}"
        outcomes.append((outcome, time.perf_counter() - started))
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(outcomes))
    training.cleanup_distributed()


def test_under_torchrun_rank_0_fetches_once_while_the_others_wait_and_its_failure_stops_them(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_ranks_fetch_cifar10, args=(port, str(tmp_path)), nprocs=2, join=True)
    (failed0, seconds0), (ready0, _) = json.loads((tmp_path / "rank0.json").read_text())
    (failed1, seconds1), (ready1, _) = json.loads((tmp_path / "rank1.json").read_text())
    assert failed0.startswith("DownloadError") and "cifar-10-python.tar.gz" in failed0
    assert failed1.startswith("DatasetError: rank 0 could not fetch the data, so rank 1 stops too")
    assert "DownloadError" in failed1 and seconds1 < 10  # told at once, not after a timeout
    assert ready0 == ready1 == str(tmp_path / "data" / "cifar10" / "images")
    # Only rank 0 ever downloaded: once failing (train), once working (train, then test).
    assert (tmp_path / "downloads.log").read_text().splitlines() == ["rank 0 train", "rank 0 train", "rank 0 test"]
    assert datasets.count_images(tmp_path / "data" / "cifar10" / "images" / "test") == {"cat": 1, "dog": 2}


# --------------------------------------------------------------------------------------------------------------
# The shipped sample
# --------------------------------------------------------------------------------------------------------------

SAMPLE = ROOT / "data" / "sample"


def load_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_sample_has_the_documented_size():
    for split, per_class in (("train", 400), ("test", 100)):
        assert datasets.count_images(SAMPLE / split) == {name: per_class for name in SAMPLE_CLASSES}
    pngs = sorted(SAMPLE.glob("*/*/*.png"))
    assert len(pngs) == 5000
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file() and ".cache" not in p.parts) <= 5e6
    assert {Image.open(p).size + (Image.open(p).mode,) for p in pngs[::250]} == {(28, 28, "L")}
    assert all(re.fullmatch(r"\d{5}\.png", p.name) for p in pngs)  # the image's index in Fashion-MNIST's split
    assert (SAMPLE / "LICENSE").read_text().startswith("The MIT License")
    assert sorted(load_make_sample().CLASS_NAMES) == list(SAMPLE_CLASSES)


def test_the_shipped_sample_matches_its_provenance_fingerprint():
    provenance = (SAMPLE / "PROVENANCE.md").read_text()
    recorded = provenance.split("fingerprint: ")[1].split()[0]
    assert load_make_sample().content_fingerprint(SAMPLE) == recorded


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_make_sample_rebuilds_the_sample_byte_for_byte(tmp_path):
    make_sample = load_make_sample()
    rebuilt = make_sample.build_sample(out=tmp_path / "sample")
    assert make_sample.content_fingerprint(rebuilt) == make_sample.content_fingerprint(SAMPLE)
    assert (rebuilt / "PROVENANCE.md").read_text() == (SAMPLE / "PROVENANCE.md").read_text()


def test_the_sample_loads_through_the_name():
    train, test, classes = make_dataloaders("sample", image_size=28, batch_size=100, num_workers=0)
    assert classes == list(SAMPLE_CLASSES)
    assert len(train.dataset) == 4000 and len(test.dataset) == 1000
    assert Counter(train.dataset.targets) == {i: 400 for i in range(10)}
    assert Counter(test.dataset.targets) == {i: 100 for i in range(10)}
    assert len(train) == 40
