"""Data: from an image folder to the batches a ViT trains on: reading images, transforms, splits and loaders.

    train_loader, test_loader, class_names = make_dataloaders("sample", image_size=32, batch_size=64)

A dataset is an ImageFolder tree, `<root>/<class>/<image>`, either with `train/` and `test/` inside (the split is
given) or without (a seeded split, stratified by class). Getting the datasets onto disk, and the names "sample",
"animals10" and "cifar10" that stand for them, is `vit_helpers.datasets`' job. For GPUs,
`vit_helpers.gpu_data.make_cached_loaders` decodes every image once and augments on the device.

Preprocessing follows the paper's code: pixels are scaled to [-1, 1] (mean = std = 0.5 per channel), and the
training images get a random resized crop and a horizontal flip (Appendix B.1 and the AugReg follow-up,
Steiner et al. 2021, "How to train your ViT?", which adds RandAugment: `augment="strong"`). `augment="autoaugment"`
adds AutoAugment's CIFAR-10 policy instead (Cubuk et al. 2019), as the published small-ViT CIFAR-10 recipes do.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2
from tqdm.auto import tqdm

from vit_helpers.datasets import IMAGE_EXTENSIONS, DatasetError, resolve_dataset
from vit_helpers.files import atomic_write, read_json
from vit_helpers.training import distributed_info

# --------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------

#: Per-channel mean and std for normalisation. 0.5 maps pixels from [0, 1] to [-1, 1], the preprocessing of the
#: paper's own code (google-research/vision_transformer) and of the original ViT checkpoints that timm and our
#: `weights` module load; ImageNet's statistics are kept below for torchvision's ViT weights, which expect them.
NORMALIZE_MEAN = (0.5, 0.5, 0.5)
NORMALIZE_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: RandomResizedCrop keeps 35-100% of the image's area. Inception's 8% suits 224-pixel ImageNet photos; on a
#: 28-pixel garment or a small dataset such crops leave too little to recognise.
RANDOM_CROP_SCALE = (0.35, 1.0)
#: RandAugment's strength (augment="strong"), on torchvision's scale: bins 0 to 30, each op at magnitude / 30 of its
#: largest change (rotation 30 degrees, shear 0.3, colour factors 1 +- 0.9, ...). 9 is torchvision's default, about a
#: third. timm's and DeiT's "rand-m9" counts in tenths (timm's _LEVEL_DENOM = 10), so it is 27 here: three times ours.
RANDAUGMENT_MAGNITUDE = 9
RANDAUGMENT_MAGNITUDE_BINS = 31
#: Random erasing (Zhong et al. 2020; DeiT erases with probability 0.25): torchvision's RandomErasing boxes, each
#: 2-33% of the image's area with an aspect ratio from 0.3 to 3.3, filled with 0 after normalisation (mid-grey,
#: the centre of the normalisation, not the data's mean colour; DeiT's timm fills noise). torchvision's defaults,
#: which the cached loaders' batched boxes follow too.
RANDOM_ERASING_SCALE = (0.02, 0.33)
RANDOM_ERASING_RATIO = (0.3, 3.3)


# --------------------------------------------------------------------------------------------------------------
# Reading images: every file becomes RGB; unreadable files are found once, when the dataset is built
# --------------------------------------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 3-channel RGB. Transparent pixels become white, as a browser would show them."""
    # P, L and RGB PNGs may name one transparent colour (a tRNS chunk) instead of carrying an alpha channel.
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        # Dropping alpha would expose whatever colour is stored under transparent pixels (often black).
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # 16-bit or float pixels: convert("RGB") would clip everything above 255 to white; scale them instead.
        # I;16 is 0-65535 by definition, whatever this image's brightest pixel; I and F name no range, so the
        # brightest pixel decides: above 255, 16-bit; at most 1, a 0-1 image; else already 0-255.
        sixteen_bit = image.mode.startswith("I;16")
        image = image.convert("F")
        high = image.getextrema()[1]
        scale = 255 / 65535 if sixteen_bit or high > 255 else 255 if high <= 1 else 1
        image = image.point(lambda value: value * scale + 0.5).convert("L")  # + 0.5: round, not truncate
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ... all have a defined conversion


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB, upright: a phone photo stored sideways with an EXIF orientation tag is turned
    the way its viewer shows it (torchvision's own loader ignores the tag, and PIL leaves it to the caller)."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def check_image(path: str | Path) -> str | None:
    """None if the file decodes completely, else why not. JPEGs are decoded at 1/8 scale: fast, yet every byte
    is still read, so a truncated file is caught."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(exc).__name__}: {exc}"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _EachPath(Dataset):
    """`function(path)` for each of `paths`: the work `map_paths` hands to its worker processes."""

    def __init__(self, function, paths: list[str]):
        self.function, self.paths = function, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.function(self.paths[index])


def _as_list(batch: list) -> list:  # a module-level function: workers started by forkserver or spawn unpickle it
    return batch


def _workers_start_by_fork() -> bool:
    """Whether worker processes start by fork here (Linux before Python 3.14): in a moment, with this process's
    imports. Spawn and forkserver (macOS, Windows, Linux from 3.14) import torch again in each worker, seconds each,
    and need the calling script's `if __name__ == "__main__":` guard."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return method == "fork"


def default_path_workers(count: int) -> int:
    """`map_paths`' worker processes for `count` paths: none for 5,000 or fewer (the shipped sample's size: a few
    seconds' work either way), on 2 cores or fewer (measured on 2: this process alone decoded about as fast as two
    workers beside it, BENCHMARKS.md) or where workers do not start by fork; else one per core this process may use
    (under torchrun, its share of them), at most 8."""
    cores = _cpu_count() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if count <= 5000 or cores <= 2 or not _workers_start_by_fork():
        return 0
    return min(8, cores)


def map_paths(function, paths: list[str], *, stack: bool = False, item_bytes: int = 0, workers: int | None = None,
              desc: str | None = None, disable: bool = False):
    """Yield `function(path)` for every path, in order, in batches: tensors stacked into one (`stack=True`) or
    lists. The work runs in a DataLoader's worker processes (`workers`; None: `default_path_workers`), else in this
    process.

    Why processes and not threads: opening a small image is mostly Python (PIL's header parsing, the transforms),
    which holds the GIL. Measured (BENCHMARKS.md, "Reading a data set"): 16 threads on the H200's host decoded
    CIFAR-10's 32x32 JPEGs at 1,550 img/s, under a third of what one thread did on the 2-core CI machine.
    `function` must be picklable (a module-level function or a class instance). `item_bytes` (the size of one
    result) keeps a batch near 1 MB: with 8 workers and 2 batches each in flight, 16 MB of shared memory, a quarter
    of a container's default 64 MB. The global random state is left as it was: the loader draws its workers' seeds
    from a generator of its own, so that building a data set with a cold cache or a warm one seeds alike."""
    if workers is None:
        workers = default_path_workers(len(paths))
    batch_size = max(1, min(256, (1 << 20) // item_bytes)) if item_bytes else 256
    loader = DataLoader(_EachPath(function, paths), batch_size=batch_size, num_workers=workers,
                        collate_fn=None if stack else _as_list, generator=torch.Generator())
    batches = iter(loader)
    try:
        with tqdm(total=len(paths), desc=desc, unit="img", disable=disable) as bar:
            for batch in batches:
                bar.update(len(batch))
                yield batch
    finally:
        del batches  # the workers stop now, also after an error (whose traceback would keep this frame alive)


def verify_images(paths: list[str], root: str | Path, cache_file: Path | None = None,
                  workers: int | None = None) -> dict[str, str]:
    """path -> reason, for each file among `paths` (all under `root`) that cannot be decoded.

    Decoding 26k photos takes a minute, so verdicts are kept in `cache_file` (JSON: path relative to root ->
    [size, mtime, reason or null]); only new or changed files are opened again.
    `workers`: `map_paths`' worker processes (None: as many as pay).
    """
    cache = read_json(cache_file) if cache_file else {}
    verdicts, to_check = {}, []
    for path in paths:
        key = os.path.relpath(path, root)
        try:
            stat = os.stat(path)
        except OSError as exc:  # e.g. a dangling symbolic link
            verdicts[key] = [0, 0, f"{type(exc).__name__}: {exc}"]
            continue
        stamp = [stat.st_size, stat.st_mtime_ns]
        cached = cache.get(key)
        if isinstance(cached, list) and cached[:2] == stamp:
            verdicts[key] = cached
        else:
            to_check.append((path, key, stamp))
    if to_check:
        batches = map_paths(check_image, [path for path, _, _ in to_check], workers=workers, desc="checking images",
                            disable=len(to_check) < 2000)
        errors = (error for batch in batches for error in batch)
        for (path, key, stamp), error in zip(to_check, errors, strict=True):
            verdicts[key] = stamp + [error]
        if cache_file:
            _write_json_quietly(cache_file, verdicts)
    return {path: verdicts[os.path.relpath(path, root)][2] for path in paths
            if verdicts[os.path.relpath(path, root)][2]}


def _write_json_quietly(path: Path, data: dict) -> None:
    """Write atomically; a read-only data folder just goes without a cache."""
    with contextlib.suppress(OSError), atomic_write(path, "w") as file:
        json.dump(data, file)


def cache_folder(image_folder: str | Path) -> Path:
    """Where what is worked out from a folder of images (`<folder>/<class>/<image>`) is kept: `.cache/<name>/` beside
    it, never inside it. The folder then stays what torchvision's ImageFolder reads: it would take a `.cache` folder
    inside for a class, find no images in it and fail."""
    image_folder = Path(os.path.abspath(image_folder))  # "." and ".." have no name of their own
    return image_folder.parent / ".cache" / image_folder.name


def split_folders(root: Path) -> dict[str, Path]:
    """split name -> folder of images: "train" and "test" for a folder with train/ and test/ inside, else "all" (the
    folder itself, which the loaders split with `stratified_split`)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {"train": root / "train", "test": root / "test"}
    return {"all": root}


def check_split_classes(root: Path, train_classes: list[str], test_classes: list[str]) -> None:
    """A DatasetError naming the classes that only one of root/train and root/test has: a model trained on one list
    of classes and tested on another would count right answers as wrong (labels are indices into the list)."""
    if train_classes != test_classes:
        only = {split: sorted(set(mine) - set(theirs)) for split, mine, theirs in
                (("train", train_classes, test_classes), ("test", test_classes, train_classes))}
        listed = "; ".join(f"only in {split}/: {', '.join(names)}" for split, names in only.items() if names)
        raise DatasetError(f"{root}/train and {root}/test have different class folders ({listed}): give both the "
                           f"same classes, each with images in both.")


def adopt_old_cache(old: Path, new: Path) -> None:
    """Move a cache file from where earlier versions kept it, `.cache/` inside the folder of images, to `new`, where
    it is kept now (dropped if a newer one is there already), and remove that `.cache/` once it is empty: torchvision's
    ImageFolder then reads the folder again, and nothing is decoded twice or left behind. A file that cannot move
    (another disk, a read-only folder) stays where it is."""
    with contextlib.suppress(OSError):
        if old.is_file():
            if new.exists():
                old.unlink()
            else:
                new.parent.mkdir(parents=True, exist_ok=True)
                os.replace(old, new)
        old.parent.rmdir()  # only if empty


def _has_subfolders(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_dir() and not entry.name.startswith(".") for entry in entries)


class VerifiedImageFolder(ImageFolder):
    """torchvision's ImageFolder that opens every file once when built and leaves out the unreadable ones.

    Also: hidden folders and files (`.cache`, `.ipynb_checkpoints`, macOS `._x.jpg`) are ignored, every image
    loads as RGB (`load_rgb`), and an empty folder or an empty class is a clear error. The verdicts are kept in
    `cache_folder(root)`, outside the folder, so torchvision's own ImageFolder reads it the same afterwards.
    """

    def __init__(self, root: str | Path, transform=None):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root} is not a folder: expected a folder of images as <folder>/<class>/<image>.")
        self.check_cache_file = cache_folder(root) / "image_check.json"
        adopt_old_cache(root / ".cache" / "image_check.json", self.check_cache_file)
        super().__init__(str(root), transform=transform, loader=load_rgb, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DatasetError(f"{directory} holds no class folders: put the images in {directory}/<class>/<image> "
                               f"(one folder per class).")
        if "train" in classes and "test" not in classes and _has_subfolders(Path(directory) / "train"):
            # train/<class>/ beside val/<class>/: read as one tree, the classes would be "train" and "val".
            raise DatasetError(f"{directory} has class folders inside train/ but no test/ beside it, so its "
                               f"classes would be the split names {classes}. Rename the held-out split (val/, "
                               f"valid/, ...) to test/, or give the folder with the class folders themselves for "
                               f"a seeded split.")
        return classes, {name: index for index, name in enumerate(classes)}

    @property
    def files(self) -> list[str]:
        """Each image's path relative to the folder, '/'-separated, in the samples' order: what a resumed run
        compares (`cli.image_files`), wherever the folder now lives."""
        return [Path(os.path.relpath(path, self.root)).as_posix() for path, _ in self.samples]

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty=True)
        samples = [(path, target) for path, target in samples
                   if not any(part.startswith(".") for part in Path(os.path.relpath(path, directory)).parts)]
        bad = verify_images([path for path, _ in samples], directory, self.check_cache_file)
        if bad:
            listed = "\n".join(f"  {path} ({reason})" for path, reason in sorted(bad.items())[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            warnings.warn(f"skipping {len(bad)} unreadable image file(s) in {directory}:\n{listed}{more}",
                          stacklevel=2)
        samples = [(path, target) for path, target in samples if path not in bad]
        counts = Counter(target for _, target in samples)
        empty = [name for name, index in class_to_idx.items() if counts[index] == 0]
        if empty:
            raise DatasetError(f"no readable images for class(es) {', '.join(empty)} in {directory}; add images "
                               f"({', '.join(IMAGE_EXTENSIONS)}) or remove the empty folder(s).")
        return samples


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------

def build_transforms(image_size: int, augment: bool | str = True, mean=NORMALIZE_MEAN, std=NORMALIZE_STD, *,
                     crop_scale: tuple[float, float] | None = None, crop_padding: int | None = None,
                     magnitude: int = RANDAUGMENT_MAGNITUDE, erasing: float = 0.0, fill: int = 0):
    """(train transform, test transform) for PIL images -> normalised float tensors (3, image_size, image_size).

    Test: resize the short side, centre crop, normalise (deterministic). Train: a random crop, then a horizontal
    flip half of the time; augment="strong" adds torchvision's RandAugment (2 ops at `magnitude` of 30: 9, its
    default, is a third of the strength of DeiT's rand-m9, which is 27 here: RANDAUGMENT_MAGNITUDE);
    augment="autoaugment" adds torchvision's AutoAugment with its CIFAR-10 policy instead;
    augment=False gives train the test transform. The crop is a random resized crop keeping a crop_scale fraction
    of the area (None: RANDOM_CROP_SCALE), or, with crop_padding=P, the test transform's square shifted by up to P
    pixels with black coming in from outside (RandomCrop(image_size, padding=P): CIFAR's usual augmentation).
    `erasing` > 0: torchvision's RandomErasing with that probability, after normalisation (RANDOM_ERASING_SCALE).
    `fill`: the grey level (0-255) that RandAugment's and AutoAugment's shears, shifts and rotations bring in from
    outside the image (torchvision's `fill`; 0, black, its default; the published CIFAR-10 ViT runs' PIL policy
    used 128).
    """
    crop_scale, crop_padding = checked_crop(crop_scale, crop_padding)
    magnitude = checked_magnitude(magnitude)
    fill = checked_fill(fill)
    erasing = checked_erasing(erasing, augment)
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    test = v2.Compose([*resize_and_crop(image_size).transforms, *to_tensor])
    policy = _augment_policy(augment)
    if policy == "none":
        return test, test
    if crop_padding is None:
        crop = [v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True)]
    else:
        crop = [*resize_and_crop(image_size).transforms, v2.RandomCrop(image_size, padding=crop_padding)]
    train = [*crop, v2.RandomHorizontalFlip()]
    if policy == "strong":
        train.append(v2.RandAugment(num_ops=2, magnitude=magnitude, num_magnitude_bins=RANDAUGMENT_MAGNITUDE_BINS,
                                    fill=fill))
    elif policy == "autoaugment":
        train.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill))
    # On the normalised tensor, where 0 is mid-grey (torchvision's default fill; timm's, in DeiT, is noise).
    erase = [v2.RandomErasing(p=erasing, scale=RANDOM_ERASING_SCALE, ratio=RANDOM_ERASING_RATIO, value=0)]
    return v2.Compose([*train, *to_tensor, *(erase if erasing else [])]), test


def checked_crop_scale(crop_scale=None) -> tuple[float, float]:
    """crop_scale as a (low, high) pair of floats (None: RANDOM_CROP_SCALE), or a ValueError saying what to pass."""
    crop_scale = RANDOM_CROP_SCALE if crop_scale is None else crop_scale
    try:
        low, high = (float(value) for value in crop_scale)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, the smallest and largest "
                         f"fraction of the image's area a random crop keeps (default {RANDOM_CROP_SCALE}); got "
                         f"{crop_scale!r}.")
    return low, high


def checked_crop_padding(crop_padding=None) -> int | None:
    """crop_padding as None (random resized crops) or a whole number of pixels, 0 or more; else a ValueError."""
    if crop_padding is None:
        return None
    if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
        raise ValueError(f"crop_padding must be a whole number of pixels, 0 or more, by which random crops shift "
                         f"the image (4 is CIFAR's usual), or None for random resized crops; got {crop_padding!r}.")
    return crop_padding


def checked_fill(fill=0) -> int:
    """The policies' fill as a whole grey level from 0 to 255, or a ValueError saying what to pass."""
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
        raise ValueError(f"augment_fill must be a whole grey level from 0 (black, torchvision's default) to 255: what "
                         f"RandAugment's and AutoAugment's shears, shifts and rotations bring in (128, mid-grey, "
                         f"is what the published CIFAR-10 ViT runs used); got {fill!r}.")
    return fill


def checked_magnitude(magnitude=RANDAUGMENT_MAGNITUDE) -> int:
    """RandAugment's magnitude as a whole number of bins from 0 to 30, or a ValueError saying what to pass."""
    top = RANDAUGMENT_MAGNITUDE_BINS - 1
    if isinstance(magnitude, bool) or not isinstance(magnitude, int) or not 0 <= magnitude <= top:
        raise ValueError(f"augment_magnitude must be a whole number from 0 to {top}, RandAugment's strength on "
                         f"torchvision's scale ({RANDAUGMENT_MAGNITUDE}, the default, is about a third of each op's "
                         f"largest change; DeiT's rand-m9 is 27); got {magnitude!r}.")
    return magnitude


def checked_erasing(erasing=0.0, augment: bool | str = True) -> float:
    """Random erasing's probability as a float from 0 to 1, or a ValueError saying what to pass: also where
    there is no training augmentation for it to join (augment "none")."""
    if isinstance(erasing, bool) or not isinstance(erasing, (int, float)) or not 0 <= erasing <= 1:
        raise ValueError(f"random_erasing must be a probability from 0 to 1, the share of training images that get "
                         f"a box erased (DeiT's is 0.25; 0 turns it off); got {erasing!r}.")
    if erasing and _augment_policy(augment) == "none":
        raise ValueError(f"random_erasing {erasing} erases boxes from augmented training images, and augment is "
                         f"{augment!r}: choose augment 'basic', 'strong' or 'autoaugment', or random_erasing 0.")
    return float(erasing)


def checked_repeats(repeats=1) -> int:
    """Repeated augmentation's copies per image as a whole number, at least 1 (1: off); else a ValueError."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeated_augmentation must be a whole number of copies of each image per epoch, at least "
                         f"1 (1 turns it off; DeiT's is 3); got {repeats!r}.")
    return repeats


class RepeatedAugmentationSampler(DistributedSampler):
    """Repeated augmentation (Hoffer et al. 2020, "Augment your batch"; DeiT's RASampler): each epoch draws a
    `repeats`-th of the training images and shows each one `repeats` times, every copy augmented on its own, so
    that a batch holds several views of one image. An epoch is as long as without it (`len(self)` images per
    process, DistributedSampler's), and its order a function of (seed, epoch): resuming and several processes stay
    exact. Under torch.distributed the copies of an image go to neighbouring processes, as in DeiT; in one process
    they stand side by side in one batch."""

    def __init__(self, dataset, repeats: int = 3, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeats = checked_repeats(repeats)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # as DistributedSampler seeds its shuffle
        copies = torch.randperm(len(self.dataset), generator=generator).repeat_interleave(self.repeats)
        wanted = self.num_samples * self.num_replicas  # every process's epoch
        copies = copies.repeat(-(-wanted // len(copies)))[:wanted]  # from the start again if too few (tiny sets)
        return iter(copies[self.rank:wanted:self.num_replicas].tolist())


def training_sampler(dataset, seed: int, repeats: int = 1, num_replicas: int | None = None,
                     rank: int | None = None) -> DistributedSampler:
    """The training order of both kinds of loader: DistributedSampler's shuffle (world size 1 outside
    torch.distributed), or with `repeats` > 1 `RepeatedAugmentationSampler`'s."""
    if checked_repeats(repeats) == 1:
        return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    return RepeatedAugmentationSampler(dataset, repeats, num_replicas=num_replicas, rank=rank, seed=seed)


def check_augmentation(augment: bool | str = True, crop_scale=None, crop_padding=None,
                       magnitude=RANDAUGMENT_MAGNITUDE, erasing=0.0, fill=0, repeats=1) -> None:
    """Every augmentation setting at once, as the loaders will check them (a ValueError that says what): for a
    recipe or a command line, before any image is read."""
    _augment_policy(augment), checked_crop(crop_scale, crop_padding), checked_magnitude(magnitude)
    checked_erasing(erasing, augment), checked_fill(fill), checked_repeats(repeats)


def checked_crop(crop_scale=None, crop_padding=None) -> tuple[tuple[float, float], int | None]:
    """(crop_scale, crop_padding) checked, the scale's default filled in. They choose between two kinds of
    random crop, so giving both is an error."""
    if crop_scale is not None and crop_padding is not None:
        raise ValueError(f"crop_scale {crop_scale!r} (random resized crops) and crop_padding {crop_padding!r} "
                         f"(shifted crops) choose between two kinds of crop: give one of them.")
    return checked_crop_scale(crop_scale), checked_crop_padding(crop_padding)


def resize_and_crop(image_size: int) -> v2.Compose:
    """The resize and centre crop of the test transform (the cached GPU path stores exactly this)."""
    return v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


def _augment_policy(augment: bool | str | None) -> str:
    if augment is None or augment is False or augment == "none":
        return "none"
    if augment is True or augment == "basic":
        return "basic"
    if augment in ("strong", "autoaugment"):
        return augment
    raise ValueError(f"augment must be True, False, 'basic', 'strong' (RandAugment) or 'autoaugment' (AutoAugment's "
                     f"CIFAR-10 policy), got {augment!r}.")


def example_photo(size: int = 224) -> torch.Tensor:
    """Grace Hopper's portrait, which ships with matplotlib (so it is there offline): the top square (her face
    and cap) resized to size x size with bicubic filtering. Returns (3, size, size) float32 in [0, 1]."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        photo = Image.open(file).convert("RGB")  # 512 wide, 600 high
    photo = photo.crop((0, 0, photo.width, photo.width)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).float() / 255  # (channels, height, width)


def denormalize(images: torch.Tensor, mean=NORMALIZE_MEAN, std=NORMALIZE_STD) -> torch.Tensor:
    """Undo the normalisation for display: (..., 3, H, W) -> values in [0, 1]. For matplotlib, permute(1, 2, 0)."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def spread_examples(loader, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, images, labels) of `count` samples spread evenly over an unshuffled loader's dataset, on the CPU:
    every (len / count)-th one, so a class-sorted test set shows every class. Stops reading once it has them."""
    stride = max(1, len(loader.dataset) // count)
    images, labels, seen = [], [], 0
    for batch_images, batch_labels in loader:
        keep = torch.arange(seen, seen + len(batch_labels)) % stride == 0
        images.append(batch_images.cpu()[keep])
        labels.append(batch_labels.cpu()[keep])
        seen += len(batch_labels)
        if sum(map(len, labels)) >= count:
            break
    return torch.arange(0, seen, stride)[:count], torch.cat(images)[:count], torch.cat(labels)[:count]


# --------------------------------------------------------------------------------------------------------------
# Splits and loaders
# --------------------------------------------------------------------------------------------------------------

def stratified_split(targets, test_fraction: float = 0.15, seed: int = 42) -> tuple[list[int], list[int]]:
    """(train indices, test indices): test_fraction of every class, chosen by a seeded shuffle.

    numpy's RandomState is frozen by design (its streams never change across versions or machines), and the
    indices come from a sorted file list, so a seed always gives the same split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    train, test = [], []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        num_test = min(len(members) - 1, max(1, round(len(members) * test_fraction))) if len(members) > 1 else 0
        test.extend(members[:num_test].tolist())
        train.extend(members[num_test:].tolist())
    return sorted(train), sorted(test)


class TransformedSubset(Dataset):
    """Part of an image folder, with its own transform (train and test share files but not transforms)."""

    def __init__(self, folder: VerifiedImageFolder, indices: list[int], transform=None):
        self.folder, self.indices, self.transform = folder, list(indices), transform
        self.classes = folder.classes
        self.class_to_idx = folder.class_to_idx
        self.samples = [folder.samples[i] for i in self.indices]
        self.targets = [target for _, target in self.samples]

    @property
    def files(self) -> list[str]:
        """This part's images, relative to the whole folder (`VerifiedImageFolder.files`)."""
        files = self.folder.files
        return [files[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), target


def load_image_datasets(data_dir, test_fraction: float = 0.15, seed: int = 42, train_transform=None,
                        test_transform=None) -> tuple[Dataset, Dataset, list[str]]:
    """(train set, test set, class names) from a dataset name or folder; both sets have .targets and .classes.

    A folder with train/ and test/ inside is split that way; any other folder is split by `stratified_split`.
    """
    root = resolve_dataset(data_dir)
    splits = split_folders(root)
    if "all" not in splits:
        train = VerifiedImageFolder(splits["train"], transform=train_transform)
        test = VerifiedImageFolder(splits["test"], transform=test_transform)
        check_split_classes(root, train.classes, test.classes)
        return train, test, train.classes
    folder = VerifiedImageFolder(root)
    train_indices, test_indices = stratified_split(folder.targets, test_fraction, seed)
    return (TransformedSubset(folder, train_indices, train_transform),
            TransformedSubset(folder, test_indices, test_transform), folder.classes)


def default_num_workers(num_images: int) -> int:
    """Worker processes for decoding: none for tiny sets (starting workers costs more than it saves), else one
    per spare core, at most 8."""
    return 0 if num_images <= 5000 else min(8, max(0, _cpu_count() - 1))


def make_dataloaders(data_dir, image_size: int = 224, batch_size: int = 32, test_fraction: float = 0.15,
                     seed: int = 42, num_workers: int | None = None, augment: bool | str = True, *,
                     mean=NORMALIZE_MEAN, std=NORMALIZE_STD, crop_scale: tuple[float, float] | None = None,
                     crop_padding: int | None = None, augment_magnitude: int = RANDAUGMENT_MAGNITUDE,
                     random_erasing: float = 0.0, repeated_augmentation: int = 1, augment_fill: int = 0,
                     ) -> tuple[DataLoader, DataLoader, list[str]]:
    """(train loader, test loader, class names) for a dataset name ("sample", "animals10", "cifar10") or folder.

    Train: a DistributedSampler (world size 1 outside torch.distributed) shuffling with `seed`; call
    `train_loader.sampler.set_epoch(epoch)` each epoch and the order is a function of (seed, epoch), which makes
    resumed and multi-GPU training exact. Full batches only (drop_last). The random resized crop keeps a
    crop_scale = (low, high) fraction of each image's area (None: RANDOM_CROP_SCALE); crop_padding=P shifts the
    image by up to P pixels instead (`build_transforms`); augment="strong" adds RandAugment at
    `augment_magnitude` (0-30, RANDAUGMENT_MAGNITUDE), "autoaugment" AutoAugment's CIFAR-10 policy;
    random_erasing=p erases a box from that share of the training images (torchvision's RandomErasing);
    repeated_augmentation=k shows a k-th of the images per epoch, each k times (`RepeatedAugmentationSampler`);
    augment_fill: the grey level the policies' geometric ops bring in (`build_transforms`' fill).
    Test: every image, in order, unaugmented.
    Batches are (images float32 (B, 3, S, S) normalised with mean/std, labels int64 (B,)).
    """
    train_transform, test_transform = build_transforms(image_size, augment, mean, std, crop_scale=crop_scale,
                                                       crop_padding=crop_padding, magnitude=augment_magnitude,
                                                       erasing=random_erasing, fill=augment_fill)
    train_set, test_set, classes = load_image_datasets(data_dir, test_fraction, seed, train_transform,
                                                       test_transform)
    rank, world_size = distributed_info()
    sampler = training_sampler(train_set, seed, repeated_augmentation, num_replicas=world_size, rank=rank)
    if len(sampler) < batch_size:
        raise ValueError(f"the training set has {len(sampler)} images per process, fewer than batch_size "
                         f"{batch_size}: lower batch_size.")
    workers = default_num_workers(len(train_set)) if num_workers is None else num_workers
    # Workers are restarted each epoch (persistent_workers=False): the training engine reseeds the loader's
    # generator per epoch, and fresh workers take their random streams from it, so a resumed run draws the same
    # augmentations as an uninterrupted one. Persistent workers would keep streams that a resume cannot restore.
    common = dict(batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=False)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(seed), **common)
    test_loader = DataLoader(test_set, shuffle=False, **common)
    return train_loader, test_loader, classes
