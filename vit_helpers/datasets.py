"""Datasets on disk: the shipped Fashion-MNIST sample, Animals-10 from Kaggle and CIFAR-10, fetched once and laid out
as ImageFolder trees.

    folder = resolve_dataset("animals10")  # data/animals10/<class>/<image>, downloaded and prepared on first use

Every dataset ends up as `<root>/<class>/<image>`, either with `train/` and `test/` inside (the split is given) or
without (the loaders draw a seeded split). `resolve_dataset` turns the names "sample", "animals10" and "cifar10"
into such a folder, downloading what is missing (under torchrun, rank 0 only: `rank_zero_first`);
`download_dataset` is what `python -m vit_helpers download <name>` runs. Reading the images, transforms, splits and
loaders are in `vit_helpers.data`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from vit_helpers.files import atomic_write, read_json
from vit_helpers.training import distributed_info

# --------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------

#: The repository (the package is installed editable from it); the shipped data lives in its `data/` folder.
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT / "data"

#: What counts as an image file (torchvision's list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: The names `resolve_dataset` (and so every `data` argument) understands besides a folder path.
DATASET_NAMES = ("sample", "animals10", "cifar10")

#: The shipped sample (data/sample, built by data/make_sample.py): Fashion-MNIST, 28x28 grayscale, balanced.
SAMPLE_CLASSES = ("ankle_boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "t-shirt_top",
                  "trouser")  # sorted, as ImageFolder numbers them
SAMPLE_TRAIN_PER_CLASS = 400
SAMPLE_TEST_PER_CLASS = 100

#: Animals-10 on Kaggle: https://www.kaggle.com/datasets/alessiocorrado99/animals10
ANIMALS10_DATASET = "alessiocorrado99/animals10"
#: The archive's folders are Italian. Our own map: the archive's translate.py lacks "ragno" and is never run.
ITALIAN_TO_ENGLISH = {
    "cane": "dog", "cavallo": "horse", "elefante": "elephant", "farfalla": "butterfly", "gallina": "chicken",
    "gatto": "cat", "mucca": "cow", "pecora": "sheep", "ragno": "spider", "scoiattolo": "squirrel",
}
#: The class names in the order the loaders number them (ImageFolder sorts folder names).
ANIMALS10_CLASSES = tuple(sorted(ITALIAN_TO_ENGLISH.values()))
#: Images per class in the Kaggle archive (26,179 in all), to check a prepared folder against.
ANIMALS10_COUNTS = {
    "dog": 4863, "spider": 4821, "chicken": 3098, "horse": 2623, "butterfly": 2112, "cow": 1866,
    "squirrel": 1862, "sheep": 1820, "cat": 1668, "elephant": 1446,
}

#: Written last into a prepared folder: present means complete.
PREPARED_MARKER = ".prepared.json"

#: Names Windows keeps for devices, with or without an extension: an archive member "raw-img/cane/nul.jpg" would
#: open the null device there, and "D:evil.png" would land on drive D.
WINDOWS_DEVICE_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{port}{digit}" for port in ("COM", "LPT") for digit in "123456789\u00b9\u00b2\u00b3"})
#: Characters no Windows file name may hold (':' is refused on its own, above), control characters included.
WINDOWS_FORBIDDEN = re.compile(r'[<>"|?*\x00-\x1f]')
#: The longest file name (in UTF-8 bytes) that Linux, macOS and Windows file systems all accept.
MAX_NAME_BYTES = 255

#: How long the other ranks of a torchrun job wait while rank 0 downloads and prepares a dataset (600 MB).
PREPARE_WAIT = timedelta(hours=3)

KAGGLE_CREDENTIALS_HELP = (
    "Kaggle needs your API credentials to download Animals-10. Create a token at "
    "https://www.kaggle.com/settings (API section), then do one of:\n"
    "  1. export KAGGLE_API_TOKEN=<token>   (or save the token in ~/.kaggle/access_token)\n"
    "  2. save kaggle.json in ~/.kaggle/kaggle.json (chmod 600 ~/.kaggle/kaggle.json)\n"
    "  3. export KAGGLE_USERNAME=<user> KAGGLE_KEY=<key>\n"
    "Or download the archive by hand from https://www.kaggle.com/datasets/alessiocorrado99/animals10 (it "
    "arrives as archive.zip) and save it as data/animals10.zip, beside the dataset's folder: it is then prepared "
    "from there, with no credentials. (Or run prepare_animals10('archive.zip', 'data/animals10').)"
)


class DatasetError(RuntimeError):
    """A dataset is missing, malformed or cannot be fetched; the message says what to do."""


class KaggleCredentialsError(DatasetError):
    """No Kaggle credentials were found (or Kaggle rejected them)."""


class DownloadError(DatasetError):
    """A download failed (offline, unreachable or refused); nothing was left half-written."""


class DamagedArchiveError(DatasetError):
    """An archive that cannot be read to the end (not a zip, a bad CRC, cut short)."""

    def __init__(self, archive: str | Path, reason: str, advice: str = "delete it and download it again."):
        self.archive, self.reason = Path(archive), reason
        super().__init__(f"{archive} is damaged ({reason}): {advice}")


# --------------------------------------------------------------------------------------------------------------
# Animals-10: download from Kaggle, prepare into dest/<english class>/<image>
# --------------------------------------------------------------------------------------------------------------

def kaggle_credentials_source() -> str | None:
    """Where the kaggle package (2.x) will find credentials, checked without importing it and in its order; None
    when there are none. The order: an access token (`kagglesdk.kaggle_env.get_access_token_from_env`), then
    kaggle.json and KAGGLE_USERNAME / KAGGLE_KEY (`KaggleApi._load_config`), then `kaggle auth login`'s
    ~/.kaggle/credentials.json."""
    token_source = _kaggle_access_token_source()
    if token_source:
        return token_source
    kaggle_json = _kaggle_json_path()
    config = read_json(kaggle_json)
    config = dict(config) if isinstance(config, dict) else {}
    config.update({k.removeprefix("KAGGLE_").lower(): v for k, v in os.environ.items() if k.startswith("KAGGLE_")})
    # kaggle only asks that both keys be there; empty values would be refused by Kaggle, so they count as none.
    if config.get("username") and config.get("key"):
        return str(kaggle_json) if kaggle_json.is_file() else "KAGGLE_USERNAME and KAGGLE_KEY"
    login = Path.home() / ".kaggle" / "credentials.json"
    login_record = read_json(login)
    if isinstance(login_record, dict) and login_record.get("refresh_token"):
        return f"{login} (kaggle auth login)"
    return None


def _kaggle_access_token_source() -> str | None:
    """Where kagglesdk's get_access_token_from_env finds an access token, or None; the same steps in its order."""
    environ = os.environ
    if environ.get("KAGGLE_KERNEL_RUN_TYPE") is not None and environ.get("KAGGLE_DATA_PROXY_URL") is not None:
        # Inside Kaggle's own notebooks the token is in a file that KAGGLE_API_V1_TOKEN names.
        if environ.get("KAGGLE_API_V1_TOKEN") and _read_token(Path(environ["KAGGLE_API_V1_TOKEN"])):
            return "KAGGLE_API_V1_TOKEN"
    token = environ.get("KAGGLE_API_TOKEN")
    if token:
        # The variable holds the token, or the path of a file holding it (an empty file: no token, as in kaggle).
        return "KAGGLE_API_TOKEN" if not _exists(Path(token)) or _read_token(Path(token)) else None
    for name in ("access_token", "access_token.txt"):
        token_file = Path.home() / ".kaggle" / name
        if _read_token(token_file):
            return str(token_file)
    return None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a token too long to be a file name
        return False


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return ""


def _kaggle_json_path() -> Path:
    """kaggle.json where KaggleApi looks: $KAGGLE_CONFIG_DIR, else ~/.kaggle; on Linux only, when ~/.kaggle does not
    exist, $XDG_CONFIG_HOME/kaggle (default ~/.config/kaggle)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json"
    legacy = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle" / "kaggle.json"
    return legacy / "kaggle.json"


def _authenticated_kaggle_api():
    """The kaggle package's API object, signed in. `import kaggle` signs in at import time and, without
    credentials, prints a page of help and calls exit(1) (SystemExit in a script, NameError in a notebook):
    both are caught here and turned into our clear error, and what it printed is kept out of the way."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
        return api
    except ImportError as exc:
        raise DatasetError("the kaggle package is missing: pip install kaggle (it is a dependency of "
                           "vit_helpers; reinstall with pip install -e .).") from exc
    except (SystemExit, NameError):
        raise KaggleCredentialsError("Kaggle did not accept the credentials it found.\n"
                                     + KAGGLE_CREDENTIALS_HELP) from None
    except Exception as exc:
        raise _download_error("signing in to Kaggle", exc) from exc


def _download_error(action: str, exc: BaseException) -> DatasetError:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DatasetError(f"{action} failed: the disk is full ({exc}). Animals-10 needs about 1.2 GB while it "
                            f"is prepared (the 600 MB archive and the images): free some space and try again.")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return KaggleCredentialsError(f"{action} failed: Kaggle refused the credentials (HTTP {status}).\n"
                                      + KAGGLE_CREDENTIALS_HELP)
    return DownloadError(f"{action} failed ({type(exc).__name__}: {exc}). Check the internet connection (Kaggle "
                         f"must be reachable) and try again; or download the archive by hand from "
                         f"https://www.kaggle.com/datasets/{ANIMALS10_DATASET} and run "
                         f"prepare_animals10(<zip>, <dest>).")


def _download_animals10_archive(archive: Path, progress: bool = True, quiet: bool = False) -> Path:
    """Download the Kaggle zip into a work folder beside `archive`; rename it to `archive` once whole.

    kaggle's progress bar shows unless progress=False; quiet=True hides the lines kaggle prints (its URL, ...).
    """
    if kaggle_credentials_source() is None:
        raise KaggleCredentialsError("no Kaggle credentials found.\n" + KAGGLE_CREDENTIALS_HELP)
    api = _authenticated_kaggle_api()
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = _new_work_folder(archive)  # kaggle names the file inside: <dataset slug>.zip
    try:
        try:
            with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                api.dataset_download_files(ANIMALS10_DATASET, path=str(partial), force=True, quiet=not progress,
                                           unzip=False)
        except (Exception, SystemExit) as exc:
            raise _download_error(f"downloading {ANIMALS10_DATASET}", exc) from exc
        zips = sorted(partial.glob("*.zip"))
        if len(zips) != 1 or not zipfile.is_zipfile(zips[0]):
            raise DownloadError(f"Kaggle's download of {ANIMALS10_DATASET} did not give one whole zip archive "
                                f"(found {[p.name for p in partial.iterdir()]}); try again.")
        with atomic_write(_download_record(archive), "w") as file:  # before the rename, so it is never missing
            json.dump(_file_stamp(zips[0]), file)
        os.replace(zips[0], archive)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return archive


def _download_record(archive: Path) -> Path:
    """For an archive that download_animals10 fetched: its size and time, which tell it apart from an archive the
    user put there (that one is used and kept, never overwritten or deleted). Without it an archive counts as the
    user's, so deleting .cache/ is safe."""
    return archive.parent / ".cache" / f"{archive.name}.downloaded.json"


def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"dataset": ANIMALS10_DATASET, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _downloaded_here(archive: Path) -> bool:
    """True when `archive` is the very file download_animals10 fetched (its record matches)."""
    try:
        return archive.is_file() and read_json(_download_record(archive)) == _file_stamp(archive)
    except OSError:
        return False


def _delete_downloaded_archive(archive: Path) -> None:
    archive.unlink(missing_ok=True)
    _download_record(archive).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _download_record(archive).parent.rmdir()  # only if nothing else is cached there


def download_animals10(dest: str | Path = "data/animals10", force: bool = False, *, keep_archive: bool = False,
                       quiet: bool = False, progress: bool = True) -> Path:
    """Download Animals-10 from Kaggle and prepare it as dest/<english class>/<image>; return dest.

    Returns at once when dest is already prepared (force=True prepares it again). The archive (about 600 MB)
    is fetched with kaggle's progress bar (progress=False hides it) into a work folder beside dest, renamed to
    <dest>.zip when whole, and deleted once the folder is prepared, unless keep_archive=True; an archive that
    turns out damaged is deleted too, so the next call downloads it afresh. An archive you put at <dest>.zip
    yourself (e.g. downloaded by hand) is used without downloading and always kept, even with force=True (which
    then prepares again from it). Prints the images per class unless quiet=True. What killed runs left beside
    dest (work folders of up to 600 MB) is deleted first.
    """
    dest = Path(dest)
    archive = dest.with_name(dest.name + ".zip")
    remove_stale_work_folders(dest)
    remove_stale_work_folders(archive)
    shutil.rmtree(archive.with_name(archive.name + ".part"), ignore_errors=True)  # left by earlier versions
    if is_prepared(dest) and not force:
        counts = check_animals10(dest)
        if not quiet:
            print(f"Animals-10 is already prepared in {dest}:\n{format_class_counts(counts)}")
        return dest
    _check_destination(dest)  # before fetching 600 MB that could not be used
    downloaded = _downloaded_here(archive)
    if not archive.is_file() or (force and downloaded):
        _download_animals10_archive(archive, progress=progress, quiet=quiet)
        downloaded = True
    try:
        prepare_animals10(archive, dest, force=force, quiet=quiet)
    except DamagedArchiveError as error:
        if not downloaded:
            raise DamagedArchiveError(archive, error.reason, "it was not downloaded here (you put it there), so it "
                                      "was kept: delete it and run again to download it from Kaggle, or replace "
                                      "it with a good copy.") from error
        _delete_downloaded_archive(archive)
        raise DamagedArchiveError(archive, error.reason, "it came from Kaggle and has been deleted: run the "
                                  "download again for a fresh copy.") from error
    if downloaded and not keep_archive:
        _delete_downloaded_archive(archive)  # 600 MB that the prepared folder now holds
    return dest


def is_prepared(folder: str | Path) -> bool:
    """True when `folder` was completely written by prepare_animals10 / prepare_cifar10 (its marker is there)."""
    return (Path(folder) / PREPARED_MARKER).is_file()


def find_animals10(folder: str | Path | None = None, download: bool = True) -> tuple[Path | None, str]:
    """(folder, why) when Animals-10 can be used now: already prepared, prepared from Kaggle's archive put at
    <folder>.zip by hand (no credentials needed; as download_animals10 does, it is kept), or downloaded with the
    user's Kaggle credentials. (None, why) otherwise, never raising: notebooks fall back to the shipped sample and
    print why. With download=False nothing is prepared or downloaded; why says what would be."""
    folder = Path(folder) if folder is not None else DATA_ROOT / "animals10"
    if is_prepared(folder):
        return folder, f"Animals-10 is prepared in {folder}"
    archive = folder.with_name(folder.name + ".zip")  # where download_animals10 uses an archive instead of fetching
    if archive.is_file():
        found, action, done = f"Kaggle's archive is at {archive}", "preparing", f"prepared from {archive}"
    else:
        credentials = kaggle_credentials_source()
        if credentials is None:
            return None, (f"no Kaggle credentials were found, so Animals-10 cannot be downloaded (nor is Kaggle's "
                          f"archive at {archive})")
        found, action = f"credentials found in {credentials}", "downloading"
        done = f"downloaded with the credentials from {credentials}"
    if not download:
        return None, f"Animals-10 is not prepared in {folder} ({found})"
    try:
        download_animals10(folder, quiet=True)
    except Exception as error:  # offline, refused, a damaged archive, a full disk: the message says what to do
        first_line = (str(error).splitlines() or [""])[0]
        if not isinstance(error, DatasetError):
            first_line = f"{type(error).__name__}: {first_line}"
        return None, f"{action} Animals-10 failed: {first_line}"
    return folder, f"Animals-10 was {done}"


def _animals10_entry(name: str) -> tuple[str, str] | str | None:
    """Where an archive member belongs: (english class, file name); a string saying why it is unsafe; or None
    for members that are simply not images of the ten classes (translate.py, folders, stray files)."""
    name = name.replace("\\", "/")  # Windows reads a backslash as a separator
    if name.startswith("/"):
        return "absolute path"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return "'..' in the path"
    for part in parts:
        if ":" in part:  # C:x is a drive on Windows, x:y a hidden stream of x
            return f"':' in {part!r}"
        if part.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICE_NAMES:
            return f"{part!r} is a Windows device name"
        if WINDOWS_FORBIDDEN.search(part):
            return f"{part!r} holds a character Windows forbids in file names"
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            return f"a name longer than {MAX_NAME_BYTES} bytes"
    if parts[:1] == ["raw-img"]:
        rest = parts[1:]
    elif parts[1:2] == ["raw-img"]:  # nested one level, e.g. animals10/raw-img/...
        rest = parts[2:]
    else:
        return None
    if len(rest) != 2 or rest[0] not in ITALIAN_TO_ENGLISH:
        return None
    italian, filename = rest
    if filename.startswith(".") or not filename.lower().endswith(IMAGE_EXTENSIONS):
        return None
    return ITALIAN_TO_ENGLISH[italian], filename


#: What reading a damaged zip raises: a bad CRC or header (BadZipFile), broken deflate data (zlib.error), a member
#: cut short (EOFError), or the disk (OSError).
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


def _extract_animals10_zip(archive: Path, staging: Path) -> list[str]:
    """Copy the images of the ten classes out of the zip into staging/<english>/; return what was refused.
    Output paths are built from our own class name and the member's base name, and checked to resolve inside
    staging before anything is opened. Members are streamed to disk, never held in memory whole, after a check that
    their declared sizes fit on the disk (zipfile never yields more than a member declares, so a zip bomb stops
    there). A damaged archive raises DamagedArchiveError."""
    refused, inside = [], staging.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except ZIP_READ_ERRORS as exc:
        raise DamagedArchiveError(archive, f"{type(exc).__name__}: {exc}") from exc
    with zf:
        _check_free_space(staging, [info.file_size for info in zf.infolist()
                                    if not info.is_dir() and isinstance(_animals10_entry(info.filename), tuple)],
                          f"extracting {archive}")
        for info in sorted(zf.infolist(), key=lambda info: info.filename):
            if info.is_dir():
                continue
            where = _animals10_entry(info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symbolic link stored in the zip
                where = "symbolic link"
            if where is None:
                continue
            target = staging / where[0] / where[1] if isinstance(where, tuple) else None
            if target is not None and not target.resolve().is_relative_to(inside):
                where = "would land outside the destination"
            if isinstance(where, str):
                refused.append(f"{info.filename!r} ({where})")
                continue
            if target.exists():
                refused.append(f"{info.filename!r} (duplicate of {where[0]}/{where[1]})")
                continue
            target.parent.mkdir(exist_ok=True)
            _copy_member(zf, info, archive, target)
            stamp = time.mktime(info.date_time + (0, 0, -1))  # keep the archive's dates: reproducible output
            os.utime(target, (stamp, stamp))
    return refused


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path, target: Path) -> None:
    """Stream one member into target (created, never overwritten), a megabyte at a time. An error reading it
    means a damaged archive; an error writing it (a full disk) passes through."""
    try:
        member = zf.open(info)
    except (NotImplementedError, RuntimeError) as exc:  # Deflate64 (Windows' zip for big files), a password
        raise DatasetError(f"Python cannot read {info.filename} in {archive} ({exc}): extract it with your own "
                           f"unzip tool and pass the folder instead.") from exc
    except ZIP_READ_ERRORS as exc:
        raise DamagedArchiveError(archive, f"{info.filename}: {type(exc).__name__}: {exc}") from exc
    with member, open(target, "xb") as file:
        while True:
            try:
                chunk = member.read(1 << 20)  # decompresses; at the end it checks the CRC-32
            except ZIP_READ_ERRORS as exc:
                raise DamagedArchiveError(archive, f"{info.filename}: {type(exc).__name__}: {exc}") from exc
            if not chunk:
                break
            file.write(chunk)


def _check_free_space(folder: Path, sizes: list[int], action: str) -> None:
    """Refuse before writing when files of these sizes will not fit on folder's disk (each takes whole 4 KiB
    blocks): a zip bomb or a nearly full disk fails here, clearly, instead of filling the disk."""
    needed = sum(-(-size // 4096) * 4096 for size in sizes)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DatasetError(f"{action} needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free on the disk "
                           f"of {folder.parent}: free some space or choose a destination on another disk.")


def _find_raw_img(folder: Path) -> Path:
    for candidate in (folder, folder / "raw-img", *sorted(folder.glob("*/raw-img"))):
        if candidate.is_dir() and not candidate.is_symlink() and any(
                (candidate / italian).is_dir() for italian in ITALIAN_TO_ENGLISH):
            return candidate
    raise DatasetError(f"{folder} does not look like Animals-10: expected raw-img/<italian class>/<image> "
                       f"(cane, cavallo, ...) in it or one folder below it.")


def _copy_animals10_folder(folder: Path, staging: Path) -> list[str]:
    """Copy raw-img/<italian>/<image> into staging/<english>/; symbolic links are refused, never followed."""
    refused = []
    raw_img = _find_raw_img(folder)
    for italian, english in sorted(ITALIAN_TO_ENGLISH.items()):
        class_dir = raw_img / italian
        if class_dir.is_symlink():
            refused.append(f"{class_dir} (symbolic link)")
            continue
        if not class_dir.is_dir():
            continue
        (staging / english).mkdir()
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if entry.is_symlink():
                refused.append(f"{entry.path} (symbolic link)")
            elif (entry.is_file() and not entry.name.startswith(".")
                  and entry.name.lower().endswith(IMAGE_EXTENSIONS)):
                shutil.copy2(entry.path, staging / english / entry.name)  # copy2 keeps the dates
    return refused


def prepare_animals10(source: str | Path, dest: str | Path = "data/animals10", *, force: bool = False,
                      quiet: bool = False) -> Path:
    """Lay Animals-10 out as dest/<english class>/<image>, from Kaggle's zip or its extracted folder; return dest.

    The folder is built in a temporary sibling and renamed into place with a completion marker, so dest is
    either absent or complete. A prepared dest is left untouched (force=True rebuilds it). Archive members that
    would land outside dest (absolute paths, '..', ':' or a Windows device name such as CON in any part) and
    symbolic links are refused with a warning; the archive's translate.py is never run. A damaged zip raises
    DamagedArchiveError, a full disk a DatasetError. Prints the images per class and warns if they differ from
    ANIMALS10_COUNTS. A dest that is a symbolic link to a folder is filled where it points, and the link kept.
    """
    source, dest = Path(source), Path(dest)
    if dest.is_symlink():
        dest = dest.resolve()  # build beside the folder it points to (say, on a bigger disk), not beside the link
    remove_stale_work_folders(dest)
    if is_prepared(dest) and not force:
        counts = check_animals10(dest)
    else:
        _check_destination(dest)
        if dest.exists() and source.resolve().is_relative_to(dest.resolve()):
            raise DatasetError(f"{source} is inside {dest}, which preparing again would replace: move it out of "
                               f"{dest} first.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = _new_work_folder(dest)
        try:
            counts = _build_animals10(source, staging)
            _finish_prepared_folder(staging, dest, {"dataset": "animals10", "source": str(source),
                                                    "counts": counts}, replace=force)
        except OSError as exc:  # writing: a full disk, no permission
            shutil.rmtree(staging, ignore_errors=True)
            raise DatasetError(f"preparing {dest} failed ({type(exc).__name__}: {exc}); check the free disk space "
                               f"(Animals-10 takes about 600 MB) and that {dest.parent} is writable.") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        check_animals10(dest)
    if not quiet:
        print(f"Animals-10 in {dest}:\n{format_class_counts(counts)}")
    return dest


def _build_animals10(source: Path, staging: Path) -> dict[str, int]:
    """Copy the ten classes from the zip or folder `source` into staging/<english>/; return the counts."""
    if source.is_file() and zipfile.is_zipfile(source):
        refused = _extract_animals10_zip(source, staging)
    elif source.is_dir():
        refused = _copy_animals10_folder(source, staging)
    elif source.is_file() and source.suffix.lower() == ".zip":
        raise DamagedArchiveError(source, "not a zip archive")
    else:
        raise DatasetError(f"{source} is neither the Animals-10 zip nor a folder holding raw-img/; "
                           f"download it with download_animals10() or from Kaggle.")
    if refused:
        warnings.warn(f"refused {len(refused)} entr(ies) of {source}: " + "; ".join(refused[:20]), stacklevel=3)
    counts = count_images(staging)
    if not counts:
        raise DatasetError(f"no images of the ten classes found in {source} (expected "
                           f"raw-img/<italian class>/<image>).")
    return counts


def _check_destination(dest: Path) -> None:
    """Refuse a dest that is a file, or a folder with something in it that prepare_animals10 did not write."""
    if os.path.lexists(dest) and not dest.is_dir():
        raise DatasetError(f"{dest} is a file, not a folder: move it away or choose another destination.")
    if dest.is_dir() and not is_prepared(dest) and any(dest.iterdir()):
        raise DatasetError(f"{dest} exists and was not written by prepare_animals10; move it away or choose "
                           f"another destination (it is never overwritten).")


def _finish_prepared_folder(staging: Path, dest: Path, marker: dict, replace: bool = False) -> None:
    """Write the completion marker last, then swap staging into dest (a rename: all or nothing). A dest that
    another process prepared meanwhile is kept, and staging deleted, unless replace=True (force): it may be in
    use already."""
    (staging / PREPARED_MARKER).write_text(json.dumps(marker, indent=1))
    staging.chmod(0o755)  # mkdtemp makes it private
    if is_prepared(dest) and not replace:
        shutil.rmtree(staging)
    elif dest.exists():
        retired = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(retired)
        try:
            staging.rename(dest)
        except BaseException:
            with contextlib.suppress(OSError):
                retired.rename(dest)  # put the old one back
            raise
        shutil.rmtree(retired)
    else:
        try:
            staging.rename(dest)
        except OSError:
            if not is_prepared(dest):
                raise
            shutil.rmtree(staging)  # another process finished first, between the check and the rename


def _new_work_folder(path: Path) -> Path:
    """A new private folder beside `path` to build it in: .<name>.<process id>.<random>.tmp."""
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))


def remove_stale_work_folders(path: str | Path) -> list[Path]:
    """Delete what killed runs left beside `path`: work folders .<name>.<pid>.<random>.tmp (also the older
    .<name>.<random>.tmp) and retired folders .<name>.old-<pid>, each up to 600 MB for Animals-10. Those of a
    process still running are kept (on Windows, where that cannot be checked cheaply, only this process's). Returns
    what was deleted."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp|old-(\d+))")
    removed = []
    with contextlib.suppress(OSError):
        for entry in sorted(path.parent.iterdir()):
            match = pattern.fullmatch(entry.name)
            if not match or entry.is_symlink() or not entry.is_dir():
                continue
            pid = match.group(1) or match.group(2)
            if pid is None or not _process_is_running(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _process_is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C there
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    return True


def count_images(folder: str | Path) -> dict[str, int]:
    """class folder -> number of image files in it (hidden folders and files are not counted)."""
    folder = Path(folder)
    return {d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
            for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def check_animals10(folder: str | Path) -> dict[str, int]:
    """Images per class in a prepared Animals-10 folder; warns if they differ from Kaggle's (ANIMALS10_COUNTS)."""
    counts = count_images(folder)
    differences = {name: (counts.get(name, 0), expected) for name, expected in ANIMALS10_COUNTS.items()
                   if counts.get(name, 0) != expected}
    if differences:
        listed = ", ".join(f"{name} {found} (expected {expected})" for name, (found, expected) in differences.items())
        warnings.warn(f"{folder} differs from the Kaggle Animals-10 archive: {listed}. "
                      f"Rebuild it with download_animals10(force=True) if that is not intended.", stacklevel=2)
    return counts


def format_class_counts(counts: dict[str, int]) -> str:
    """A small table, largest class first, with the total."""
    width = max(map(len, counts), default=5)
    rows = [f"  {name:<{width}} {count:>7,}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1])]
    return "\n".join(rows + [f"  {'total':<{width}} {sum(counts.values()):>7,}"])


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10: torchvision's download, written out once as an ImageFolder tree of PNGs
# --------------------------------------------------------------------------------------------------------------

def prepare_cifar10(dest: str | Path = DATA_ROOT / "cifar10", *, quiet: bool = False) -> Path:
    """Download CIFAR-10 with torchvision into dest and write dest/images/{train,test}/<class>/<index>.png
    (lossless); return dest/images. Offline, a clear error says where to put the archive by hand."""
    from torchvision.datasets import CIFAR10

    dest = Path(dest)
    images = dest / "images"
    if is_prepared(images):
        return images
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_work_folders(images)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            splits = {split: CIFAR10(root=str(dest), train=split == "train", download=True)
                      for split in ("train", "test")}
    except Exception as exc:
        raise DownloadError(f"could not get CIFAR-10 ({type(exc).__name__}: {exc}). Offline? Copy "
                            f"cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) "
                            f"into {dest} and try again, or pass a folder of images instead.") from exc
    staging = _new_work_folder(images)
    try:
        for split, dataset in splits.items():
            for name in dataset.classes:
                (staging / split / name).mkdir(parents=True)
            for index, (pixels, target) in enumerate(tqdm(zip(dataset.data, dataset.targets), total=len(dataset),
                                                          desc=f"CIFAR-10 {split}", disable=quiet)):
                Image.fromarray(pixels).save(staging / split / dataset.classes[target] / f"{index:05d}.png")
        _finish_prepared_folder(staging, images, {"dataset": "cifar10",
                                                  "counts": {s: len(d) for s, d in splits.items()}})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return images


# --------------------------------------------------------------------------------------------------------------
# Names -> folders
# --------------------------------------------------------------------------------------------------------------

def resolve_dataset(name_or_path: str | Path) -> Path:
    """The ImageFolder root for a dataset name ("sample", "animals10", "cifar10") or a folder path.

    A known name always means the dataset (a folder literally called "sample" can be given as "./sample").
    "animals10" is prepared in data/animals10 when missing, from data/animals10.zip if it was put there by hand,
    else downloaded with Kaggle credentials; "cifar10" is downloaded with torchvision into data/cifar10. Under
    torchrun every rank calls this: rank 0 fetches while the others wait (`rank_zero_first`).
    """
    name = name_or_path.strip().lower() if isinstance(name_or_path, str) else None
    if name == "sample":
        sample = DATA_ROOT / "sample"
        if not (sample / "train").is_dir() or not (sample / "test").is_dir():
            raise DatasetError(f"the shipped sample is not at {sample}. It comes with the repository: install "
                               f"vit_helpers from a clone with pip install -e . (a wheel does not carry data/), or "
                               f"rebuild it with python data/make_sample.py, or pass the folder's path.")
        return sample
    if name == "animals10":
        return rank_zero_first(_fetch_animals10)
    if name == "cifar10":
        return rank_zero_first(lambda: prepare_cifar10(DATA_ROOT / "cifar10"))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path} is not a folder. Pass a folder of images (<folder>/<class>/<image>, or with "
                           f"train/ and test/ inside) or one of the names {', '.join(DATASET_NAMES)}.")
    return path


def _fetch_animals10() -> Path:
    dest = DATA_ROOT / "animals10"
    if is_prepared(dest):
        return dest
    if dest.with_name("animals10.zip").is_file() or kaggle_credentials_source() is not None:
        return download_animals10(dest)
    raise KaggleCredentialsError(f"Animals-10 is not in {dest} and no Kaggle credentials were found.\n"
                                 + KAGGLE_CREDENTIALS_HELP)


T = TypeVar("T")


def rank_zero_first(fetch: Callable[[], T]) -> T:
    """fetch() in every process of a torchrun job without a race: rank 0 downloads and prepares (or decodes and
    caches) while the other ranks wait, then they call fetch() too and find the work done. If rank 0 fails, every
    rank raises a DatasetError, so no one waits for ever. Outside torch.distributed it is just fetch().

    The data folder must be shared by the ranks (one machine, or a shared file system).
    """
    rank, world_size = distributed_info()
    if world_size == 1:
        return fetch()
    # A gloo group of its own: it waits on the CPU for as long as a 600 MB download takes, where the default
    # group's timeout (10 minutes under NCCL) could run out first.
    group = dist.new_group(backend="gloo", timeout=PREPARE_WAIT)
    failure, error = [None], None
    if rank == 0:
        try:
            result = fetch()
        except BaseException as exc:  # whatever it is, tell the others before raising it
            error, failure = exc, [f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(failure, src=0, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise DatasetError(f"rank 0 could not fetch the data, so rank {rank} stops too. Rank 0's error: "
                           f"{failure[0]}")
    return result if rank == 0 else fetch()


def download_dataset(name: str, dest: str | Path | None = None, force: bool = False) -> Path:
    """Fetch and prepare a named dataset (what `python -m vit_helpers download <name>` runs); return its folder."""
    name = name.strip().lower()
    if name == "animals10":
        return download_animals10(dest or DATA_ROOT / "animals10", force=force)
    if name == "cifar10":
        dest = Path(dest or DATA_ROOT / "cifar10")
        if force and (dest / "images").exists():
            shutil.rmtree(dest / "images")
        return prepare_cifar10(dest)
    if name == "sample":
        return resolve_dataset("sample")  # shipped with the repository: nothing to download
    raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}.")
