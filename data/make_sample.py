"""Rebuild `data/sample/`, the small Fashion-MNIST subset the project ships, byte for byte.

    sudo apt-get install dataset-fashion-mnist      # Debian/Ubuntu: the four IDX files, MIT licence
    .venv/bin/python data/make_sample.py            # writes data/sample/{train,test}/<class>/<index>.png

The sample is balanced: 400 training images per class drawn from Fashion-MNIST's training split and 100 test
images per class from its test split (5,000 PNGs, 28x28 grayscale, about 2.5 MB). The draw is seeded, so the
same source files always give the same sample; each PNG is named after its index in the original split, so any
image can be traced back. The script needs only numpy and Pillow (both come with torchvision).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parent / "sample"

#: Fashion-MNIST's label i is CLASS_NAMES[i] (the README's table), spelled as folder names.
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "ankle_boot")

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
SEED = 0

#: The upstream licence (github.com/zalandoresearch/fashion-mnist, README "License"; Debian: Expat).
LICENSE_TEXT = """\
The MIT License (MIT) Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
to permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of
the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO
THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
IN THE SOFTWARE.
"""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not: a big-endian header, then the uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:  # 0x08: unsigned bytes, the only type Fashion-MNIST uses
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()}).")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} bytes of data.")
    return array.reshape(shape)


def find_idx(source: Path, stem: str) -> Path:
    for candidate in (source / f"{stem}.gz", source / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{source / stem}[.gz] not found. Install the Debian package with "
        f"`sudo apt-get install dataset-fashion-mnist`, or pass --source with a folder holding the four IDX files "
        f"from https://github.com/zalandoresearch/fashion-mnist (data/fashion)."
    )


def load_split(source: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of one split: prefix "train" or "t10k"."""
    images = read_idx(find_idx(source, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(source, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels.")
    return images, labels


def choose_balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """label -> `per_class` indices of that label, drawn without replacement and sorted."""
    chosen = {}
    for label in range(len(CLASS_NAMES)):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise ValueError(f"class {CLASS_NAMES[label]} has {len(candidates)} images, fewer than {per_class}.")
        chosen[label] = np.sort(rng.choice(candidates, size=per_class, replace=False))
    return chosen


def write_split(images: np.ndarray, chosen: dict[int, np.ndarray], split_dir: Path) -> None:
    for label, indices in chosen.items():
        class_dir = split_dir / CLASS_NAMES[label]
        class_dir.mkdir(parents=True)
        for index in indices:
            # optimize=True: smallest zlib settings; PNG carries no timestamp, so the bytes are reproducible.
            Image.fromarray(images[index], mode="L").save(class_dir / f"{index:05d}.png", optimize=True)


def content_fingerprint(sample_dir: Path) -> str:
    """sha256 over every image's relative path and bytes, in sorted order: equal fingerprints, equal samples."""
    digest = hashlib.sha256()
    for path in sorted(sample_dir.glob("*/*/*.png")):
        digest.update(path.relative_to(sample_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def write_provenance(out: Path, source_hashes: dict[str, str], seed: int, train_per_class: int,
                     test_per_class: int) -> None:
    total = sum(p.stat().st_size for p in out.glob("*/*/*.png"))
    num_images = len(CLASS_NAMES) * (train_per_class + test_per_class)
    breakdown = f"{len(CLASS_NAMES)} classes x ({train_per_class} train + {test_per_class} test)"
    hashes = "\n".join(f"    {name}  sha256 of the pixel/label bytes (after the header) {digest}"
                       for name, digest in sorted(source_hashes.items()))
    (out / "PROVENANCE.md").write_text(f"""\
# Provenance of data/sample

A balanced subset of **Fashion-MNIST** (Han Xiao, Kashif Rasul, Roland Vollgraf, "Fashion-MNIST: a Novel Image
Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017;
https://github.com/zalandoresearch/fashion-mnist), copyright 2017 Zalando SE, MIT licence (see LICENSE).

Source files: Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/):

{hashes}

Selection: numpy `default_rng({seed})`; for each label 0..9 in turn, `choice` without replacement of
{train_per_class} indices from the training split (train-*) and then, with the same generator, {test_per_class}
from the test split (t10k-*). `train/` holds only training-split images and `test/` only test-split images.
Each file is `<split>/<class>/<index in the original split, 5 digits>.png`, 28x28 8-bit grayscale, unchanged
pixels. Labels 0..9 are {", ".join(CLASS_NAMES)}.

Images: {num_images} ({breakdown}), {total:,} bytes of PNG.

Rebuild: `python data/make_sample.py` (byte-identical; the fingerprint below is checked by tests/test_datasets.py).

fingerprint: {content_fingerprint(out)}
""")


def build_sample(source: Path = DEBIAN_SOURCE, out: Path = DEFAULT_OUT, seed: int = SEED,
                 train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS) -> Path:
    """Write the sample into a temporary sibling of `out`, then swap it into place (never a half-written sample)."""
    out = Path(out).resolve()
    rng = np.random.default_rng(seed)
    source_hashes = {}
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
            images, labels = load_split(Path(source), prefix)
            source_hashes[f"{prefix}-images-idx3-ubyte"] = hashlib.sha256(images.tobytes()).hexdigest()
            source_hashes[f"{prefix}-labels-idx1-ubyte"] = hashlib.sha256(labels.tobytes()).hexdigest()
            write_split(images, choose_balanced(labels, per_class, rng), staging / split)
        (staging / "LICENSE").write_text(LICENSE_TEXT)
        write_provenance(staging, source_hashes, seed, train_per_class, test_per_class)
        staging.chmod(0o755)  # mkdtemp makes it private; the sample is meant to be read by everyone
        if out.exists():
            retired = out.with_name(f".{out.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            out.rename(retired)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_SOURCE, help="folder with the four IDX files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS)
    args = parser.parse_args(argv)
    out = build_sample(args.source, args.out, args.seed, args.train_per_class, args.test_per_class)
    images = sorted(out.glob("*/*/*.png"))
    print(f"wrote {out}: {len(images)} images, {sum(p.stat().st_size for p in images) / 1e6:.2f} MB of PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
