"""Decode once, augment on the device: loaders that keep up with a GPU.

An H100 trains ViT-B/16 at about 3,500 images/s, while one CPU core decodes about 400 JPEGs/s. So every image
is decoded and resized once (in worker processes where there are many, with a progress bar) into a uint8 tensor
(N, 3, S, S) saved beside the data; each epoch then only gathers rows, and the augmentation runs on the device in
batched tensor ops, on several batches at a time (`CachedImageLoader.images_augmented_at_once`: 2,048 images at 32 px):

    random resized crop + horizontal flip   one affine sampling grid per image, `F.grid_sample` for the batch
      (or crop_padding=P: shifts of up to P whole pixels, black coming in: CIFAR's usual crop, by indexing, so
      every pixel is copied as it is; the policies' geometric ops then act on the shifted image)
    augment="strong"                        + two RandAugment-style ops per image at augment_magnitude (9 of 30
                                              by default; geometric ops are a nearest-neighbour grid per image,
                                              colour ops are masked tensor ops)
    augment="autoaugment"                   or AutoAugment's CIFAR-10 policy: one of its 25 pairs of ops per
                                              image, each op applied with its probability at its strength
    augment_fill=v                          the grey level the policies' geometric ops bring in (0: black)
    random_erasing=p                        + a box erased from that share of the images (torchvision's
                                              RandomErasing boxes, one mask for the batch)
    repeated_augmentation=k                 a k-th of the images per epoch, each k times in a batch, every copy
                                              augmented on its own (DeiT's sampler, `data.training_sampler`)

    train_loader, test_loader, classes = make_cached_loaders("animals10", image_size=224, batch_size=256)
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)               # order and augmentation: a function of (seed, epoch)
        for images, labels in train_loader: ...     # float32 (B, 3, S, S) normalised, int64 (B,), on device

The stored images are the test transform's resize and centre crop, so test batches equal `make_dataloaders`'s.
Training crops are taken from that square, where the plain loader crops the full image: the sides of a wide photo
that the centre crop cut off are never seen here. The crops are otherwise torchvision's RandomResizedCrop (area and
aspect ratio drawn up to 10 times until the crop fits, else the whole square), though not rounded to whole pixels.
The strong policy draws from torchvision's 14 RandAugment ops, each with its probability; the autoaugment policy
from torchvision's own table of AutoAugment's CIFAR-10 policy. The geometric ops are torchvision's pixel for pixel
(nearest-neighbour, shifts of whole pixels, shears about the top-left corner, black coming in, or augment_fill's
grey), and so are the colour ops on the same input. The differences from torchvision's, small for training:
- the colour ops run after all geometric ones whatever order they were drawn in (so a grey fill takes the colour
  op too where it was drawn first), and act on float values: after a resized crop (bilinear) those are not
  rounded to uint8 first;
- a resized crop is one bilinear resampling, not rounded to whole pixels, and without antialiasing.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vit_helpers.data import (
    NORMALIZE_MEAN,
    NORMALIZE_STD,
    RANDAUGMENT_MAGNITUDE,
    RANDAUGMENT_MAGNITUDE_BINS,
    RANDOM_CROP_SCALE,
    RANDOM_ERASING_RATIO,
    RANDOM_ERASING_SCALE,
    VerifiedImageFolder,
    _augment_policy,
    adopt_old_cache,
    cache_folder,
    check_split_classes,
    checked_crop,
    checked_erasing,
    checked_fill,
    checked_magnitude,
    load_rgb,
    map_paths,
    resize_and_crop,
    split_folders,
    stratified_split,
    training_sampler,
)
from vit_helpers.datasets import rank_zero_first, resolve_dataset
from vit_helpers.files import atomic_write
from vit_helpers.training import distributed_info

#: Bumped whenever the stored pixels would change (decoder, resize), so old caches are rebuilt.
#: 2: 16-bit images scaled from their full range, single-colour (tRNS) transparency composited on white.
CACHE_FORMAT = 2

# --------------------------------------------------------------------------------------------------------------
# The decoded-image cache
# --------------------------------------------------------------------------------------------------------------

def folder_fingerprint(folder: VerifiedImageFolder, image_size: int) -> str:
    """Changes when any file is added, removed or modified, or the size or format changes."""
    files = [[os.path.relpath(path, folder.root), os.stat(path).st_size, os.stat(path).st_mtime_ns, target]
             for path, target in folder.samples]
    text = json.dumps({"format": CACHE_FORMAT, "image_size": image_size, "classes": folder.classes, "files": files})
    return hashlib.sha256(text.encode()).hexdigest()


class _DecodeAt:
    """path -> the image as RGB, resized and centre-cropped like the test transform: uint8 (3, S, S). A class, not a
    closure: `map_paths` sends it to worker processes."""

    def __init__(self, image_size: int):
        self.geometry = resize_and_crop(image_size)

    def __call__(self, path: str) -> torch.Tensor:
        return TF.pil_to_tensor(self.geometry(load_rgb(path)))


def decode_images(paths: list[str], image_size: int, workers: int | None = None) -> torch.Tensor:
    """Every image as RGB, resized and centre-cropped like the test transform: uint8 (N, 3, S, S), decoded in worker
    processes where there are many images and cores (`data.map_paths`)."""
    images = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    start = 0
    for batch in map_paths(_DecodeAt(image_size), paths, stack=True, item_bytes=3 * image_size * image_size,
                           workers=workers, desc=f"decoding at {image_size}px"):
        images[start:start + len(batch)] = batch
        start += len(batch)
    if start != len(paths):
        raise RuntimeError(f"decoded {start} of {len(paths)} images: the decoding stopped early.")
    return images


def load_or_build_cache(folder: VerifiedImageFolder, image_size: int, cache_file: Path) -> dict:
    """{"images": uint8 (N, 3, S, S), "targets": int64 (N,), "classes": [...]}, from cache_file when it matches
    the folder's fingerprint, else decoded now and saved atomically (temp file + rename)."""
    fingerprint = folder_fingerprint(folder, image_size)
    if cache_file.is_file():
        try:
            cached = torch.load(cache_file, map_location="cpu", weights_only=True, mmap=True)
            if cached.get("fingerprint") == fingerprint:
                return cached
        except Exception as exc:  # an unreadable or foreign file: rebuild it, and say why
            print(f"could not read the image cache {cache_file} ({type(exc).__name__}: {exc}); decoding again.")
    cached = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "image_size": image_size,
              "classes": list(folder.classes),
              "images": decode_images([path for path, _ in folder.samples], image_size),
              "targets": torch.tensor(folder.targets, dtype=torch.int64)}
    try:
        with atomic_write(cache_file) as file:
            torch.save(cached, file)
    except OSError as exc:  # a read-only data folder: go on without a saved cache
        print(f"could not save the image cache to {cache_file} ({exc}); pass cache_dir= to keep it elsewhere.")
    return cached


def default_cache_dir(root: Path) -> Path:
    """Where the decoded images of the data set in `root` are saved: `root/.cache` beside its train/ and test/, or,
    where `root` holds the class folders itself, `data.cache_folder(root)` beside it. Never inside a folder of class
    folders, which torchvision's ImageFolder would then fail to read."""
    return root / ".cache" if "all" not in split_folders(root) else cache_folder(root)


def _build_caches(root: Path, image_size: int, cache_dir: Path) -> dict[str, dict]:
    """split name -> cache: "train" and "test" for a folder with train/ and test/, else "all"."""
    folders = {name: VerifiedImageFolder(path) for name, path in split_folders(root).items()}
    if "train" in folders:  # before decoding anything
        check_split_classes(root, folders["train"].classes, folders["test"].classes)
    # The files' names as well (not saved: the folder lists them), for what a resumed run compares
    return {name: dict(load_or_build_cache(folder, image_size, cache_dir / f"vit_cache_{name}_{image_size}.pt"),
                       files=folder.files) for name, folder in folders.items()}


# --------------------------------------------------------------------------------------------------------------
# Augmentation on the device, batched: one sampling grid per image, masked colour operations
# --------------------------------------------------------------------------------------------------------------

# RandAugment's operations (Cubuk et al. 2020), torchvision's 14 in its order, at a magnitude on torchvision's scale
# of 31 bins (0-30; default data.RANDAUGMENT_MAGNITUDE, 9: 30% of each op's largest change). Each image's op is
# applied by an "amount": the signed share of the op's largest change (+-magnitude / 30 here). Each op equals
# torchvision's at the same magnitude and sign (tests/test_data.py); equalize is torchvision's own function, which
# takes a batch.
RANDAUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                   "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
#: Every op the device applies: RandAugment's, and invert, which only AutoAugment uses.
DEVICE_OPS = (*RANDAUGMENT_OPS, "invert")
_OP = {name: index for index, name in enumerate(DEVICE_OPS)}
_BY_TORCHVISION_NAME = {name.replace("_", ""): index for name, index in _OP.items()}  # "shearx": shear_x's
#: AutoAugment counts each op's strength in 10 bins, 0 to 9, up to the same largest changes as RandAugment's.
AUTOAUGMENT_BINS = 10


def torchvision_op(name: str) -> int:
    """The index in DEVICE_OPS of the op torchvision's policies call `name` ("ShearX": shear_x's)."""
    return _BY_TORCHVISION_NAME[name.lower()]


@functools.cache
def autoaugment_table() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAugment's CIFAR-10 policy (Cubuk et al. 2019), read from torchvision's own table: 25 pairs of
    (op, probability, strength bin). As tensors (25, 2): the ops (indices into DEVICE_OPS), their probabilities,
    their amounts (the share of the op's largest change, bin / 9; 0 for ops without one) and whether they are signed
    (drawn with a random sign, as torchvision does)."""
    space = v2.AutoAugment._AUGMENTATION_SPACE  # name -> (strengths for num_bins, signed)
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies  # [((name, p, bin), (name, p, bin)), ...]
    ops = [[torchvision_op(name) for name, _, _ in pair] for pair in policy]
    probabilities = [[p for _, p, _ in pair] for pair in policy]
    amounts = [[0.0 if level is None else level / (AUTOAUGMENT_BINS - 1) for _, _, level in pair] for pair in policy]
    signed = [[space[name][1] for name, _, _ in pair] for pair in policy]
    return torch.tensor(ops), torch.tensor(probabilities), torch.tensor(amounts), torch.tensor(signed)


def op_strength(magnitude: int) -> float:
    """The share of each op's largest change at `magnitude` (torchvision's linspace over 31 bins: magnitude / 30)."""
    return magnitude / (RANDAUGMENT_MAGNITUDE_BINS - 1)


def crop_flip_matrices(batch: int, generator: torch.Generator, scale=RANDOM_CROP_SCALE, tries: int = 10,
                       ) -> torch.Tensor:
    """(batch, 3, 3) affine maps from output to input coordinates ([-1, 1], as affine_grid uses) of a square
    image: each a random crop of `scale` of the area and aspect ratio in [3/4, 4/3] (RandomResizedCrop), mirrored
    half of the time. Like torchvision, a crop that does not fit is drawn again, and after `tries` draws the whole
    image is taken (the centre crop of a square, as the ratios include 1); shrinking it to fit instead would give
    crops outside `scale` and more large crops than torchvision draws."""
    area = torch.empty(tries, batch).uniform_(*scale, generator=generator)
    ratio = torch.empty(tries, batch).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).exp()
    width, height = (area * ratio).sqrt(), (area / ratio).sqrt()  # fractions of a side, (tries, batch)
    fits = (width <= 1) & (height <= 1)
    first = fits.int().argmax(0, keepdim=True)  # the first draw that fits (index 0 where none does)
    found = fits.any(0)
    width = torch.where(found, width.gather(0, first)[0], 1.0)
    height = torch.where(found, height.gather(0, first)[0], 1.0)
    centre_x = width / 2 + torch.rand(batch, generator=generator) * (1 - width)
    centre_y = height / 2 + torch.rand(batch, generator=generator) * (1 - height)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    matrices = torch.zeros(batch, 3, 3)
    matrices[:, 0, 0], matrices[:, 0, 2] = width * flip, 2 * centre_x - 1
    matrices[:, 1, 1], matrices[:, 1, 2] = height, 2 * centre_y - 1
    matrices[:, 2, 2] = 1
    return matrices


def shifted_crop_flip_matrices(batch: int, generator: torch.Generator, padding: int, size: int) -> torch.Tensor:
    """(batch, 3, 3) affine maps like `crop_flip_matrices`'s for torchvision's RandomCrop(size, padding=padding)
    of a square `size` image, then a horizontal flip half of the time: each image shifted by a whole number of
    pixels from -padding to padding, across and down, every shift equally likely. `shift_and_flip` applies them
    exactly, by indexing: every pixel copied as it is (no blur), black where the shift brings in the outside."""
    shifts = torch.randint(-padding, padding + 1, (2, batch), generator=generator) * (2 / size)  # [-1, 1] is 2 wide
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    matrices = torch.zeros(batch, 3, 3)
    matrices[:, 0, 0], matrices[:, 0, 2] = flip, shifts[0]
    matrices[:, 1, 1], matrices[:, 1, 2] = 1, shifts[1]
    matrices[:, 2, 2] = 1
    return matrices


def geometric_op_matrices(ops: torch.Tensor, amounts: torch.Tensor, size: int) -> torch.Tensor:
    """(batch, 3, 3): shear, translate or rotate for the images whose op is one of those, identity for the rest,
    each by its `amounts` (batch,): the signed share of the op's largest change, +-magnitude / 30 for RandAugment.
    Maps from output to input coordinates of a square `size` image, as `F.affine_grid` takes them ([-1, 1] from
    edge to edge), built as torchvision's `F.affine` builds its own for the op (v2.RandAugment, v2.AutoAugment):
    rotations of up to 30 degrees about the centre (anticlockwise for a positive amount, as torchvision's angle),
    shears by up to 0.3 about the top-left corner (x' = x + m y), shifts of up to 150/331 of the side rounded
    towards zero to whole pixels (torchvision's int()). The same amount means the same change as torchvision's
    magnitude, sign included."""
    matrices = torch.eye(3).repeat(len(ops), 1, 1)
    shear = 0.3 * amounts
    shift = (150 / 331 * size * amounts).trunc() * (2 / size)  # torchvision's int() pixels; [-1, 1] is 2 wide
    # Output pixel (x, y) shows input pixel (x + m (y - top), y) for a shear, (x - t, y) for a shift of t; in
    # [-1, 1] units the top edge is at -1. The same along y, with the axes swapped.
    for axis, (shear_op, shift_op) in enumerate((("shear_x", "translate_x"), ("shear_y", "translate_y"))):
        sheared, shifted = ops == _OP[shear_op], ops == _OP[shift_op]
        matrices[:, axis, 1 - axis] = torch.where(sheared, shear, 0)
        matrices[:, axis, 2] = torch.where(sheared, shear, torch.where(shifted, -shift, 0))
    # Anticlockwise as seen (y points down): output (x, y) shows input (x cos - y sin, x sin + y cos), so what was
    # just below the right edge's middle comes up to it. Angle 0, the identity, for the other ops.
    angle = torch.where(ops == _OP["rotate"], math.radians(30) * amounts, 0)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (batch, 2, 2)
    matrices[:, :2, :2] = rotation @ matrices[:, :2, :2]
    return matrices


def colour_ops(images: torch.Tensor, ops: torch.Tensor, amounts: torch.Tensor) -> torch.Tensor:
    """One colour op per image, chosen by `ops`, by its `amounts` (B,): the signed share of the op's largest change
    (RandAugment at magnitude M: +-M / 30); images (B, 3, H, W) in [0, 1].

    Brightness, color, contrast and sharpness are PIL's ImageEnhance: blend the image with a "degenerate"
    version (black, gray, mean gray, blurred) by a factor 1 + 0.9 x amount (1 +- 0.27 at magnitude 9); one blend
    serves all four. Posterize keeps 8 - round(4 x |amount|) bits (7 at 9), solarize inverts from 1 - |amount|.
    Autocontrast, equalize and invert take no amount. Every op is computed for the whole batch and kept where chosen:
    asking which images chose it would make the GPU wait for the answer.
    """
    strength = amounts.abs().view(-1, 1, 1, 1)
    # torchvision's 8 - (bin / 7.5).round() bits at RandAugment's magnitude bin: never a tie for a whole bin
    dropped_bits = (4 * strength).round()

    def chosen(name: str) -> torch.Tensor:
        return (ops == _OP[name]).view(-1, 1, 1, 1)

    gray = 0.2989 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]  # (B, 1, H, W), torchvision's
    # PIL's SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, as a 3x3 box sum plus 4x the centre. Like PIL and
    # torchvision, only the interior is blurred: the border pixels stay as they are.
    blurred = images.clone()
    blurred[..., 1:-1, 1:-1] = (9 * F.avg_pool2d(images, kernel_size=3, stride=1) + 4 * images[..., 1:-1, 1:-1]) / 13
    degenerate = torch.where(chosen("brightness"), 0.0, images)
    degenerate = torch.where(chosen("color"), gray, degenerate)
    degenerate = torch.where(chosen("contrast"), gray.mean(dim=(1, 2, 3), keepdim=True), degenerate)
    degenerate = torch.where(chosen("sharpness"), blurred, degenerate)
    factor = (1 + 0.9 * amounts).view(-1, 1, 1, 1)
    out = (degenerate + factor * (images - degenerate)).clamp(0, 1)  # the other ops: degenerate is the image
    # Posterize clears the low bits: steps of 2^dropped_bits pixel values; with none dropped, the image as it is. A
    # whole pixel value (a shifted crop copies them) can come out of the float arithmetic a hair below itself, and a
    # bare floor would then take it down a whole step: the 1e-3 of a step keeps it. (Rounding to whole values first
    # would put a threshold at every half value, where interpolation between two pixels often lands, and rounding
    # error would decide the side.)
    step = 2 ** dropped_bits
    posterized = torch.floor(images * (255 / step) + 1e-3) * step / 255
    out = torch.where(chosen("posterize") & (dropped_bits > 0), posterized, out)
    out = torch.where(chosen("solarize") & (images >= 1 - strength), 1 - images, out)
    low, high = images.amin(dim=(2, 3), keepdim=True), images.amax(dim=(2, 3), keepdim=True)
    stretched = (images - low) / (high - low).clamp(min=1 / 255)
    # A channel flat to within half a uint8 step stays as it is, as a flat uint8 channel does in torchvision;
    # "high > low" would stretch the rounding noise of interpolation (1e-7) into black and white.
    out = torch.where(chosen("autocontrast") & (high - low >= 0.5 / 255), stretched, out)
    out = torch.where(chosen("invert"), 1 - images, out)
    # torchvision's equalize takes a batch: a histogram per image and channel, of the values rounded down to uint8.
    # Clamped first: interpolation can give 1 + 1e-7, which would turn into 256, and wrap round to 0, in uint8.
    return torch.where(chosen("equalize"), TF.equalize(images.clamp(0, 1)), out)


def shift_and_flip(images: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """images (B, C, S, S) shifted and mirrored as `crops` (B, 3, 3, from `shifted_crop_flip_matrices`) say:
    output pixel (y, x) is input pixel (y + dy, x' + dx), x' = x or S - 1 - x when mirrored, and black where that
    falls outside. Two gathers, so every pixel is copied exactly, at any size (a resampling at whole-pixel offsets
    is exact only up to the grid's float rounding, which grows with the image)."""
    batch, channels, height, width = images.shape
    shift_x = (crops[:, 0, 2] * (width / 2)).round().long().view(batch, 1)  # whole pixels, from [-1, 1] units
    shift_y = (crops[:, 1, 2] * (height / 2)).round().long().view(batch, 1)
    across = torch.arange(width, device=images.device).expand(batch, width)
    across = torch.where(crops[:, 0, 0].view(batch, 1) < 0, width - 1 - across, across) + shift_x  # (B, W)
    down = torch.arange(height, device=images.device).expand(batch, height) + shift_y  # (B, H)
    inside = ((down >= 0) & (down < height)).view(batch, 1, height, 1) & \
        ((across >= 0) & (across < width)).view(batch, 1, 1, width)
    rows = images.gather(2, down.clamp(0, height - 1).view(batch, 1, height, 1).expand(-1, channels, -1, width))
    out = rows.gather(3, across.clamp(0, width - 1).view(batch, 1, 1, width).expand(-1, channels, height, -1))
    return out * inside


def warp(images: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) resampled (bilinear, as RandomResizedCrop) through `crops` (B, 3, 3, from
    `crop_flip_matrices`), in one `F.grid_sample`."""
    grid = F.affine_grid(crops[:, :2], list(images.shape), align_corners=False)  # (B, H, W, 2)
    # "border": a crop's outer samples can fall in the last half pixel before the image's edge, where "zeros"
    # would blend in black; "border" repeats the edge instead, as a crop of the image itself would.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def apply_geometric_ops(images: torch.Tensor, ops: tuple[torch.Tensor, ...], fill: float = 0.0) -> torch.Tensor:
    """images (B, C, H, W) through the ops `ops` ((B, 3, 3) each, from `geometric_op_matrices`, in the order
    applied), one `F.grid_sample` each, as torchvision applies them: nearest-neighbour (every pixel one of the
    image's own, no blur), `fill` (black by default, torchvision's) for what an op brings in from outside the image
    it was given (so a shift to the right and one back leave a strip of it). The same pixels as torchvision's,
    except where a pixel's source lies exactly halfway between two pixels: float rounding picks one of the two, in
    torchvision as here."""
    for op in ops:
        grid = F.affine_grid(op[:, :2], list(images.shape), align_corners=False)  # (B, H, W, 2)
        # Sampling zeros outside, so the image minus the fill, and the fill added back: the fill outside.
        offset = images - fill if fill else images
        images = F.grid_sample(offset, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        images = images + fill if fill else images
    return images


def send(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`, without making the CPU wait. A plain copy from ordinary CPU memory to a GPU
    waits for every kernel already queued (PyTorch synchronises the stream); once per batch, that stall would let
    the GPU run dry while the CPU queues the next step. A copy from pinned (page-locked) memory does not wait."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        # A no-op, or a copy between devices. Not asynchronous into the CPU: the result could be read unfilled.
        return tensor.to(device, non_blocking=device.type == "cuda")
    # contiguous first: a strided source would be copied again, into ordinary memory, before the transfer.
    # PyTorch keeps the pinned buffer alive until the copy has run.
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)


def erasing_boxes(count: int, generator: torch.Generator, size: int, probability: float,
                  scale=RANDOM_ERASING_SCALE, ratio=RANDOM_ERASING_RATIO, tries: int = 10) -> torch.Tensor:
    """(count, 4) boxes (top, left, height, width, in pixels, as floats) to erase from square `size` images: each
    image's with `probability`, else height 0. torchvision's RandomErasing boxes, drawn for a batch: an area of
    `scale` of the image and an aspect ratio in `ratio` (uniform in log), the sides rounded to whole pixels and
    drawn again until both are shorter than the image's, at most `tries` times (none fits: nothing erased); then a
    place where it fits, every one equally likely."""
    area = torch.empty(tries, count).uniform_(*scale, generator=generator) * size * size
    aspect = torch.empty(tries, count).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    height, width = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # half to even, as round()
    fits = (height < size) & (width < size)
    first = fits.int().argmax(0, keepdim=True)  # the first draw that fits (index 0 where none does)
    height, width = height.gather(0, first)[0], width.gather(0, first)[0]
    top = (torch.rand(count, generator=generator) * (size - height + 1)).floor()
    left = (torch.rand(count, generator=generator) * (size - width + 1)).floor()
    erased = fits.any(0) & (torch.rand(count, generator=generator) < probability)
    return torch.stack([top, left, torch.where(erased, height, 0.0), width], dim=1)


def erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """`images` (B, C, H, W) with each one's box of `boxes` ((B, 4) from `erasing_boxes`) set to 0: one mask built
    by comparisons for the whole batch, where torchvision's RandomErasing takes one box for a whole tensor."""
    top, left, height, width = boxes.T.reshape(4, -1, 1, 1)
    rows = torch.arange(images.shape[-2], device=images.device).view(1, -1, 1)
    columns = torch.arange(images.shape[-1], device=images.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + height) & (columns >= left) & (columns < left + width)  # (B, H, W)
    return images.masked_fill(inside.unsqueeze(1), 0.0)


class DeviceAugment:
    """uint8 (B, 3, S, S) on any device -> float32 normalised, augmented with `policy` ("none", "basic", "strong",
    "autoaugment"). Random numbers come from a CPU generator, so results depend on (seed, epoch), not on the
    device. The crops are random resized crops keeping a `scale` share of the area, or with `padding` = P shifts of
    up to P pixels (`data.build_transforms`). `erasing` > 0: then a box erased from that share of the images, after
    normalisation (`erasing_boxes`: torchvision's RandomErasing, as `data.build_transforms` uses it). `fill`: the
    grey level (0-255) the policies' shears, shifts and rotations bring in (torchvision's `fill`; 0, black, its
    default).

    `compile=True` runs the device part (resampling, colour ops, normalisation) through `torch.compile`: a few
    fused kernels instead of about 150 small ones per strong batch, which matters where launching kernels, not
    arithmetic, bounds a step (a small model at 32 px). The first batch compiles it; if that fails, a warning says
    why and the plain version is used from then on (an error in a later batch is raised as it is). Results equal
    the plain version's to float rounding. With policy "none" there is nothing to compile.
    """

    def __init__(self, policy: str = "basic", mean=NORMALIZE_MEAN, std=NORMALIZE_STD, scale=None,
                 compile: bool = False, *, padding: int | None = None, magnitude: int = RANDAUGMENT_MAGNITUDE,
                 erasing: float = 0.0, fill: int = 0):
        self.policy = _augment_policy(policy)
        self.scale, self.padding = checked_crop(scale, padding)
        self.magnitude = checked_magnitude(magnitude)
        self.erasing = checked_erasing(erasing, self.policy)
        self.fill = checked_fill(fill)
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.compiled = compiled_augment_on_device() if compile and self.policy != "none" else None
        self._compiled_ran = False  # after one batch ran compiled, its errors are real errors, not the compiler's

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """`images` augmented with parameters drawn from `generator` now."""
        return self.apply(images, self.draw(len(images), generator, images.shape[-1], images.device))

    def draw(self, count: int, generator: torch.Generator | None, size: int, device) -> tuple | None:
        """The random parameters of `count` images of `size` px: drawn on the CPU, sent to `device` in at most three
        copies. (matrices (1 or 3, count, 3, 3): the crops, then the policy's two geometric ops; ops_and_amounts
        (2, 2, count) or None: its two ops, as floats, and their amounts (signed shares of each op's largest change:
        `colour_ops`); boxes (count, 4) or None: the boxes to erase); None for policy "none". Nothing is drawn for
        erasing when it is off, so the other draws are the same as without it.

        A draw costs about 200 small CPU operations whatever the count, plus a little per image: 0.68 ms for 512
        strong resized crops on one core, 7.8 ms for 16,384 (0.24 ms per 512). So `CachedImageLoader` draws many
        batches' parameters at once and gives each chunk of batches it augments together its slice (`draws_slice`):
        where a small model's step takes milliseconds, the saving counts."""
        if self.policy == "none":
            return None
        device = torch.device(device)
        crops = (shifted_crop_flip_matrices(count, generator, self.padding, size) if self.padding is not None
                 else crop_flip_matrices(count, generator, self.scale))
        if self.policy == "basic":
            return send(crops.unsqueeze(0), device), None, self._boxes(count, generator, size, device)
        if self.policy == "strong":
            ops = torch.randint(len(RANDAUGMENT_OPS), (2, count), generator=generator)
            signs = torch.where(torch.rand(2, count, generator=generator) < 0.5, -1.0, 1.0)
            amounts = signs * op_strength(self.magnitude)
        else:  # autoaugment: one pair of the policy per image, each op applied with its probability
            table = autoaugment_table()
            pair = torch.randint(len(table[0]), (count,), generator=generator)
            table_ops, probabilities, table_amounts, signed = (part[pair].T for part in table)  # each (2, count)
            applied = torch.rand(2, count, generator=generator) < probabilities
            signs = torch.where(torch.rand(2, count, generator=generator) < 0.5, -1.0, 1.0)
            ops = torch.where(applied, table_ops, _OP["identity"])
            amounts = torch.where(applied, table_amounts * torch.where(signed, signs, 1.0), 0.0)
        matrices = torch.stack([crops, *(geometric_op_matrices(ops[i], amounts[i], size) for i in range(2))])
        return (send(matrices, device), send(torch.stack([ops.float(), amounts]), device),  # (3, N, 3, 3), (2, 2, N)
                self._boxes(count, generator, size, device))

    def _boxes(self, count: int, generator: torch.Generator | None, size: int, device) -> torch.Tensor | None:
        return send(erasing_boxes(count, generator, size, self.erasing), device) if self.erasing else None

    def apply(self, images: torch.Tensor, draws: tuple | None, compiled: bool = True) -> torch.Tensor:
        """`images` (uint8 (B, 3, S, S)) augmented with `draws` (`draw`'s, for these B images, on their device);
        `compiled=False`: uncompiled even where compiling is on (a batch of a size seen once in a while)."""
        device = images.device
        if self.mean.device != device:
            self.mean, self.std = send(self.mean, device), send(self.std, device)
        if draws is None:
            return augment_on_device(images, None, None, self.mean, self.std)
        matrices, ops_and_amounts, boxes = draws
        shifted = self.padding is not None
        if self.compiled is not None and compiled:
            try:
                out = self.compiled(images, matrices, ops_and_amounts, self.mean, self.std, shifted, boxes,
                                    self.fill / 255)
            except Exception as error:
                if self._compiled_ran or isinstance(error, torch.OutOfMemoryError):
                    raise  # not the compiler's doing: the plain version would fail the same way
                warnings.warn(f"compiling the augmentation failed, so it runs uncompiled ({type(error).__name__}: "
                              f"{error})", stacklevel=3)
                self.compiled = None
            else:
                self._compiled_ran = True
                return out
        return augment_on_device(images, matrices, ops_and_amounts, self.mean, self.std, shifted, boxes,
                                 self.fill / 255)


def draws_slice(draws: tuple | None, start: int, stop: int) -> tuple | None:
    """Images start to stop of `DeviceAugment.draw`'s parameters: views, no copy and no kernel."""
    if draws is None:
        return None
    matrices, ops_and_amounts, boxes = draws
    return (matrices[:, start:stop], None if ops_and_amounts is None else ops_and_amounts[..., start:stop],
            None if boxes is None else boxes[start:stop])


def augment_on_device(images: torch.Tensor, matrices: torch.Tensor | None, ops_and_amounts: torch.Tensor | None,
                      mean: torch.Tensor, std: torch.Tensor, shifted: bool = False,
                      boxes: torch.Tensor | None = None, fill: float = 0.0) -> torch.Tensor:
    """`DeviceAugment`'s arithmetic on the device: uint8 `images` (B, 3, S, S) -> float32, cropped and moved by
    `matrices` ((1 or 3, B, 3, 3): the crops, then the two geometric ops, `apply_geometric_ops` with `fill` in
    [0, 1] coming in; None: neither; `shifted`: the crops are whole-pixel shifts, applied exactly by
    `shift_and_flip`, else resized crops, `warp`), recoloured by `ops_and_amounts` ((2, 2, B): the policy's two
    ops, as floats, and their amounts; None: none; the geometric ops' are in their matrices already), normalised,
    and with `boxes` ((B, 4) or None) erased."""
    x = images.float().div_(255)
    if matrices is not None:
        x = shift_and_flip(x, matrices[0]) if shifted else warp(x, matrices[0])
        if len(matrices) > 1:  # the ops see the crop as their image, black strips of a shift and all
            x = apply_geometric_ops(x, tuple(matrices[1:]), fill)
    if ops_and_amounts is not None:
        ops, amounts = ops_and_amounts[0].long(), ops_and_amounts[1]
        x = colour_ops(colour_ops(x, ops[0], amounts[0]), ops[1], amounts[1])
    x = (x - mean) / std
    return x if boxes is None else erase(x, boxes)


@functools.cache
def compiled_augment_on_device():
    """One compiled `augment_on_device` for every DeviceAugment of the process: it depends on its tensors alone,
    so loaders built again (a notebook, the pace check) reuse its graphs instead of compiling one more each time
    (past torch.compile's limit of 8 per function it would quietly run uncompiled)."""
    return torch.compile(augment_on_device, dynamic=False)


# --------------------------------------------------------------------------------------------------------------
# The loaders
# --------------------------------------------------------------------------------------------------------------

class ShardSampler(Sampler):
    """Evaluation order: every index once, in order, split round-robin across processes (rank, rank + world, ...)."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, size, num_replicas))
        self.epoch = 0

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the order never changes


class CachedImages:
    """What `loader.dataset` is for a cached loader: len(), .targets (a list, like ImageFolder's), .classes and
    .files (`VerifiedImageFolder.files`'s names, or None where the loader was built without them)."""

    def __init__(self, targets: list[int], classes: list[str], files: list[str] | None = None):
        self.targets, self.classes, self.files = targets, classes, files

    def __len__(self) -> int:
        return len(self.targets)


#: How many training images' augmentation parameters a cached loader draws at once (2 MB of them, strong policy).
IMAGES_DRAWN_AT_ONCE = 16384
#: The most memory a cached loader's augmented images (float32) take at once: it augments whole batches together, as
#: many as fit (2,048 images at 32 px, 25 MB; one batch at a time at 224 px). Not more: on the H200 the compiled
#: augmentation took 2.37 ms for 2,048 images against 0.93 for 512 (seventh session), and on 2 CPU cores 4,096 at
#: once took about twice as long per image as 2,048, whose working set still fitted the cache (BENCHMARKS.md).
AUGMENTED_BYTES_AT_ONCE = 32 * 2**20


class CachedImageLoader:
    """Batches (images float32 (B, 3, S, S) normalised, labels int64 (B,)) on `device` from decoded images.

    `images` (uint8 (N, 3, S, S)) is on the device, or in CPU memory and copied per batch; `rows` picks
    this split's rows. Training order comes from `make_dataloaders`'s sampler (`training_sampler`: the same order
    for the same seed, epoch and `repeats`), full batches only; evaluation covers every image once across
    processes.
    """

    def __init__(self, images, targets, rows, classes, batch_size, device, *, train: bool, augment: DeviceAugment,
                 seed: int = 42, num_replicas: int = 1, rank: int = 0, repeats: int = 1,
                 files: list[str] | None = None):
        self.images, self.targets, self.rows = images, targets, rows
        self.batch_size, self.device, self.train, self.augment = batch_size, torch.device(device), train, augment
        self.seed, self.rank = seed, rank
        self.dataset = CachedImages(targets.cpu()[rows].tolist(), list(classes), files)
        self.sampler = (training_sampler(range(len(rows)), seed, repeats, num_replicas=num_replicas, rank=rank)
                        if train else ShardSampler(len(rows), num_replicas, rank))
        self.drop_last = train

    @property
    def dataset_size(self) -> int:
        return len(self.rows)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch  # loader.set_epoch(e) and loader.sampler.set_epoch(e) are the same

    def set_epoch(self, epoch: int) -> None:
        """Order and augmentation of the coming pass become a function of (seed, epoch)."""
        self.sampler.set_epoch(epoch)

    def whole(self) -> "CachedImageLoader":
        """This test loader over the whole split, in order, though under DDP this process's share is every
        world_size-th image: for what one process shows of the test set (the CLI's example predictions)."""
        if self.train:
            raise ValueError("whole() reads a test loader's whole split; a training loader's order is its own.")
        whole = copy.copy(self)
        whole.sampler = ShardSampler(len(self.rows))
        return whole

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        epoch_rows = self.rows[order]  # this epoch's store rows, in order
        epoch_labels = self.targets[send(epoch_rows, self.targets.device)]
        epoch_rows = send(epoch_rows, self.images.device)
        # An independent stream per (seed, epoch, rank): resuming at an epoch replays it exactly.
        stream = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(stream))
        size, draws, draw_size = self.images.shape[-1], None, self.images_drawn_at_once
        chunk = self.images_augmented_at_once
        end = min(len(self) * self.batch_size, len(epoch_rows))  # training: full batches only
        for start in range(0, end, chunk):
            offset = start % draw_size  # chunks divide draws: none straddles two
            if offset == 0:
                draws = self.augment.draw(draw_size, generator, size, self.device)
            rows = epoch_rows[start:min(start + chunk, end)]
            # A compiled augmentation has a graph for a whole chunk. The epoch's last, shorter chunk (1 batch of 97
            # at 512 a batch on CIFAR-10) runs uncompiled: a graph for its size would cost a compilation, seconds,
            # for what takes milliseconds once an epoch.
            images = self.augment.apply(self._gather(rows), draws_slice(draws, offset, offset + len(rows)),
                                        compiled=len(rows) == chunk)
            for first in range(0, len(rows), self.batch_size):  # views of the augmented images: no copy
                yield (images[first:first + self.batch_size],
                       epoch_labels[start + first:start + first + self.batch_size])

    @property
    def images_drawn_at_once(self) -> int:
        """The augmentation's parameters are drawn for several batches at a time (DeviceAugment.draw), always this
        many images' worth, so that every chunk's slice of them has the same memory layout: one compiled graph
        serves every chunk."""
        return max(1, IMAGES_DRAWN_AT_ONCE // self.batch_size) * self.batch_size

    @property
    def images_augmented_at_once(self) -> int:
        """The loader augments whole batches together, in chunks of this many images: the most batches that divide
        a draw (`images_drawn_at_once`) and whose augmented images fit AUGMENTED_BYTES_AT_ONCE (at least one). Each
        call of the augmentation costs a fixed part (its kernels' launches, the compiled graph's checks) besides
        its arithmetic; where a step takes milliseconds (a small model at 32 px), paying it once per chunk instead
        of once per batch counts. The images are the same, batched either way."""
        batches_per_draw = self.images_drawn_at_once // self.batch_size
        batch_bytes = 4 * self.images[0].numel() * self.batch_size  # float32
        fitting = max(1, min(batches_per_draw, AUGMENTED_BYTES_AT_ONCE // batch_bytes))
        return max(n for n in range(1, fitting + 1) if batches_per_draw % n == 0) * self.batch_size

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The images of `rows` on the device: uint8 (B, 3, S, S)."""
        if self.images.device == self.device:
            return self.images.index_select(0, rows)
        # The store is in CPU memory: gather straight into pinned memory so the copy runs asynchronously.
        pinned = self.device.type == "cuda"
        batch = torch.empty((len(rows), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=pinned)
        torch.index_select(self.images, 0, rows, out=batch)
        return batch.to(self.device, non_blocking=pinned)


def _place(parts: list[torch.Tensor], device: torch.device, keep_on_device: bool | None) -> torch.Tensor:
    """The image stores `parts` (memory-mapped caches) one after another in one tensor: on the device when it fits
    in a third of its free memory (or keep_on_device=True), else in CPU memory (each batch is then gathered into
    pinned memory and copied asynchronously). Each part is copied once, straight into its slice: no second
    in-memory copy of the whole store on the way."""
    if device.type == "cuda" and keep_on_device is None:
        free, _ = torch.cuda.mem_get_info(device)
        keep_on_device = sum(part.numel() * part.element_size() for part in parts) < free / 3
    where = device if device.type != "cpu" and keep_on_device else torch.device("cpu")
    if len(parts) == 1:
        return parts[0].to(where)  # on the CPU: the memory-mapped cache itself, read as needed
    store = torch.empty((sum(len(part) for part in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, device=where)
    start = 0
    for part in parts:
        store[start:start + len(part)].copy_(part)
        start += len(part)
    return store


def make_cached_loaders(data_dir, image_size: int = 224, batch_size: int = 256, device=None,
                        test_fraction: float = 0.15, seed: int = 42, augment: bool | str = True,
                        cache_dir=None, *, crop_scale: tuple[float, float] | None = None,
                        crop_padding: int | None = None, mean=NORMALIZE_MEAN, std=NORMALIZE_STD,
                        keep_on_device: bool | None = None, num_replicas: int | None = None,
                        rank: int | None = None, compile_augment: bool = False,
                        augment_magnitude: int = RANDAUGMENT_MAGNITUDE, random_erasing: float = 0.0,
                        repeated_augmentation: int = 1, augment_fill: int = 0,
                        ) -> tuple[CachedImageLoader, CachedImageLoader, list[str]]:
    """(train loader, test loader, class names) that decode every image once and augment on `device`.

    `data_dir`: a folder or a name understood by `resolve_dataset`. The decoded images are saved in
    `cache_dir` (default `default_cache_dir`: <data>/.cache, outside the folders of class folders) as
    vit_cache_<split>_<size>.pt and reused while the files are unchanged.
    The split of a folder without train/ and test/ is `stratified_split`'s, as in `make_dataloaders`.
    `crop_scale`: the training crops' share of the area (default RANDOM_CROP_SCALE), or `crop_padding`: shifted
    crops instead, as in `make_dataloaders`; `augment_magnitude`: the strong policy's RandAugment magnitude (0-30);
    `random_erasing`: the share of training images with a box erased (`DeviceAugment(erasing=)`);
    `repeated_augmentation` k > 1: a k-th of the images per epoch, each k times (`RepeatedAugmentationSampler`);
    `augment_fill`: the grey level the policies' geometric ops bring in (`DeviceAugment(fill=)`).
    `compile_augment`: the training augmentation through `torch.compile` (`DeviceAugment(compile=True)`). Under
    torch.distributed each process gets its shard (num_replicas and rank override that, e.g. for tests); rank 0
    builds the cache while the others wait.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # so that tensor.device compares equal
    world_rank, world_size = distributed_info()
    num_replicas = world_size if num_replicas is None else num_replicas
    rank = world_rank if rank is None else rank
    root = resolve_dataset(data_dir)
    if cache_dir is None:
        cache_dir = default_cache_dir(root)
        if cache_dir != root / ".cache":  # a folder of class folders: earlier versions kept its caches inside it
            for old in sorted(root.glob(".cache/vit_cache_all_*.pt")):
                adopt_old_cache(old, cache_dir / old.name)
    cache_dir = Path(cache_dir)
    # Rank 0 decodes and saves while the others wait, then they load its cache; if it fails, every rank raises.
    caches = rank_zero_first(lambda: _build_caches(root, image_size, cache_dir))
    if "all" in caches:
        all_images = caches["all"]
        train_rows, test_rows = stratified_split(all_images["targets"].tolist(), test_fraction, seed)
        images, targets = _place([all_images["images"]], device, keep_on_device), all_images["targets"]
        train_files = [all_images["files"][row] for row in train_rows]
        test_files = [all_images["files"][row] for row in test_rows]
        train_rows, test_rows = torch.tensor(train_rows), torch.tensor(test_rows)
    else:  # one tensor for both splits: test rows follow the train rows
        images = _place([caches["train"]["images"], caches["test"]["images"]], device, keep_on_device)
        targets = torch.cat([caches["train"]["targets"], caches["test"]["targets"]])
        num_train = len(caches["train"]["targets"])
        train_rows, test_rows = torch.arange(num_train), torch.arange(num_train, len(targets))
        train_files, test_files = caches["train"]["files"], caches["test"]["files"]
    classes = next(iter(caches.values()))["classes"]
    targets = targets.to(device)
    shared = dict(seed=seed, num_replicas=num_replicas, rank=rank)
    train = CachedImageLoader(images, targets, train_rows, classes, batch_size, device, train=True,
                              augment=DeviceAugment(augment, mean, std, crop_scale, compile=compile_augment,
                                                    padding=crop_padding, magnitude=augment_magnitude,
                                                    erasing=random_erasing, fill=augment_fill),
                              repeats=repeated_augmentation, files=train_files, **shared)
    if len(train) == 0:
        raise ValueError(f"the training set has {len(train.sampler)} images per process, fewer than batch_size "
                         f"{batch_size}: lower batch_size.")
    test = CachedImageLoader(images, targets, test_rows, classes, batch_size, device, train=False,
                             augment=DeviceAugment("none", mean, std), files=test_files, **shared)
    return train, test, classes
