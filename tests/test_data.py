"""The data layer: reading images, splits, transforms, loaders and the cached device loaders. Local fixtures only,
built in tmp_path. Getting the datasets onto disk (Animals-10, CIFAR-10, names, the shipped sample):
tests/test_datasets.py."""

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_datasets import write_image, write_truncated_jpeg
from vit_helpers import data, gpu_data
from vit_helpers.data import make_dataloaders, stratified_split
from vit_helpers.datasets import DatasetError
from vit_helpers.gpu_data import make_cached_loaders


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------------------
# Splits, transforms, loaders
# --------------------------------------------------------------------------------------------------------------

def make_tree(root: Path, classes=("ant", "bee", "cat"), per_class=10, size=(12, 10)) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i:03d}.png", size=size, seed=100 * c + i)
    return root


def test_stratified_split_is_seeded_stratified_and_frozen():
    targets = [0] * 10 + [1] * 20 + [2] * 5
    train, test = stratified_split(targets, 0.2, seed=42)
    assert (train, test) == stratified_split(targets, 0.2, seed=42)
    assert test != stratified_split(targets, 0.2, seed=7)[1]
    assert sorted(train + test) == list(range(35))
    assert Counter(targets[i] for i in test) == {0: 2, 1: 4, 2: 1}
    # numpy's RandomState never changes its streams: this split is the same on every machine and version.
    assert test == [1, 8, 16, 18, 19, 23, 31]


def test_loaders_split_a_single_tree_identically_on_every_call(tmp_path):
    root = make_tree(tmp_path / "tree")
    first = make_dataloaders(root, image_size=8, batch_size=4, test_fraction=0.3, seed=1, num_workers=0)
    again = make_dataloaders(root, image_size=8, batch_size=4, test_fraction=0.3, seed=1, num_workers=0)
    other = make_dataloaders(root, image_size=8, batch_size=4, test_fraction=0.3, seed=2, num_workers=0)
    assert first[0].dataset.samples == again[0].dataset.samples
    assert first[1].dataset.samples == again[1].dataset.samples
    assert first[1].dataset.samples != other[1].dataset.samples
    assert Counter(first[1].dataset.targets) == {0: 3, 1: 3, 2: 3}
    assert not set(first[0].dataset.samples) & set(first[1].dataset.samples)


def batches(loader, epoch=None):
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def test_test_loader_is_unaugmented_and_in_order_and_train_is_augmented(tmp_path):
    root = make_tree(tmp_path / "tree")
    train, test, _ = make_dataloaders(root, image_size=8, batch_size=4, test_fraction=0.3, seed=0, num_workers=0)
    first, labels = batches(test)
    assert torch.equal(first, batches(test)[0])
    assert labels.tolist() == test.dataset.targets
    assert isinstance(train.sampler, torch.utils.data.DistributedSampler)
    assert (train.sampler.num_replicas, train.sampler.rank, train.sampler.seed) == (1, 0, 0)
    assert not torch.equal(batches(train, epoch=0)[0], batches(train, epoch=0)[0])  # random crops and flips


def test_augmentations_drawn_in_worker_processes_are_a_function_of_seed_and_epoch(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=4)
    loaders = [make_dataloaders(root, image_size=8, batch_size=4, num_workers=1, seed=3)[0] for _ in range(2)]
    # Workers restart every epoch, taking fresh random streams from the loader's seeded generator (exact resume).
    assert loaders[0].num_workers == 1 and not loaders[0].persistent_workers
    assert loaders[0].pin_memory == torch.cuda.is_available()
    first, first_labels = batches(loaders[0], epoch=2)
    again, again_labels = batches(loaders[1], epoch=2)  # another loader, same seed and epoch: the same crops
    assert torch.equal(first, again) and torch.equal(first_labels, again_labels)
    other, other_labels = batches(loaders[1], epoch=2)  # its next pass: same order, new random crops and flips
    assert torch.equal(other_labels, first_labels) and not torch.equal(other, first)
    assert not torch.equal(batches(loaders[0], epoch=3)[1], first_labels)  # another epoch, another order


def test_train_order_is_a_function_of_seed_and_epoch_and_augment_false_is_deterministic(tmp_path):
    root = make_tree(tmp_path / "tree")
    train, test, _ = make_dataloaders(root, image_size=8, batch_size=4, augment=False, num_workers=0)
    images, labels = batches(train, epoch=3)
    again_images, again_labels = batches(train, epoch=3)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert not torch.equal(batches(train, epoch=4)[1], labels)
    assert len(images) == len(train) * 4  # full batches only
    # Unaugmented, a training image is exactly its test-transform view.
    _, test_transform = data.build_transforms(8, augment=False)
    train.sampler.set_epoch(3)
    order = list(train.sampler)
    assert torch.equal(images[0], test_transform(data.load_rgb(train.dataset.samples[order[0]][0])))


def test_repeated_augmentation_shows_a_kth_of_the_images_k_times_in_an_epoch_of_the_usual_length():
    plain = data.training_sampler(range(10), seed=1, num_replicas=1, rank=0)
    one = data.training_sampler(range(10), seed=1, repeats=3, num_replicas=1, rank=0)
    assert isinstance(one, data.RepeatedAugmentationSampler) and type(plain) is data.DistributedSampler
    for epoch in (0, 1):
        one.set_epoch(epoch)
        order = list(one)
        assert len(order) == len(one) == len(plain) == 10  # the epoch keeps its length
        triples = [order[i:i + 3] for i in range(0, 9, 3)]
        assert all(len(set(triple)) == 1 for triple in triples)  # each image 3 times, side by side
        assert len({triple[0] for triple in triples} | {order[9]}) == 4  # so a third of the images (and one more)
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first  # a new draw each epoch ...
    one.set_epoch(0)
    assert list(one) == first  # ... and the same one again for the same (seed, epoch): resuming stays exact
    # Two processes: each an epoch of the usual length, the copies of an image on neighbouring processes (DeiT's)
    ranks = [data.RepeatedAugmentationSampler(range(10), 3, num_replicas=2, rank=rank, seed=1) for rank in (0, 1)]
    orders = [list(sampler) for sampler in ranks]
    assert [len(order) for order in orders] == [5, 5]
    generator = torch.Generator().manual_seed(1)
    expected = torch.randperm(10, generator=generator).repeat_interleave(3)[:10].tolist()
    assert orders == [expected[0::2], expected[1::2]]
    # A set smaller than the processes: the copies are drawn again from the start, so every process has its epoch
    assert [list(data.RepeatedAugmentationSampler(range(1), 2, num_replicas=4, rank=r)) for r in range(4)] == \
        [[0], [0], [0], [0]]
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="repeated_augmentation must be a whole number of copies"):
            data.training_sampler(range(10), seed=1, repeats=bad)


def test_both_loaders_repeat_the_same_images_and_augment_each_copy_on_its_own(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=12)
    plain, _, _ = make_dataloaders(root, image_size=8, batch_size=6, num_workers=0, augment="strong",
                                   repeated_augmentation=3)
    cached, _, _ = make_cached_loaders(root, image_size=8, batch_size=6, device="cpu", augment="strong",
                                       repeated_augmentation=3)
    for loader in (plain, cached):
        assert isinstance(loader.sampler, data.RepeatedAugmentationSampler) and loader.sampler.repeats == 3
        loader.sampler.set_epoch(2)
        order = list(loader.sampler)
        assert order[0] == order[1] == order[2] and order[3] == order[4] == order[5]
        images, labels = next(iter(loader))
        assert labels[0] == labels[1] == labels[2]
        assert not (torch.equal(images[0], images[1]) and torch.equal(images[1], images[2]))  # augmented apart
    assert list(plain.sampler) == list(cached.sampler)  # the same order, whichever loader


def test_crop_scale_reaches_the_random_resized_crop_and_bad_values_are_refused(tmp_path):
    root = make_tree(tmp_path / "tree")
    train, _, _ = make_dataloaders(root, image_size=8, batch_size=4, num_workers=0, crop_scale=(0.5, 0.9))
    crops = [t for t in train.dataset.transform.transforms if isinstance(t, data.v2.RandomResizedCrop)]
    assert len(crops) == 1 and tuple(crops[0].scale) == (0.5, 0.9)
    default = data.build_transforms(8)[0].transforms[0]
    assert tuple(default.scale) == data.RANDOM_CROP_SCALE == data.checked_crop_scale(None)
    for bad in [(0, 1), (0.8, 0.5), (0.5, 1.2), (-0.1, 0.5), (0.5,), (0.1, 0.2, 0.3), "0.5", (float("nan"), 1)]:
        with pytest.raises(ValueError, match=r"crop_scale must be \(low, high\) with 0 < low <= high <= 1"):
            make_dataloaders(root, image_size=8, batch_size=4, num_workers=0, crop_scale=bad)


def test_strong_augmentation_and_the_constants(tmp_path):
    root = make_tree(tmp_path / "tree")
    train, _, _ = make_dataloaders(root, image_size=8, batch_size=4, augment="strong", num_workers=0)
    randaugment, = (t for t in train.dataset.transform.transforms if type(t).__name__ == "RandAugment")
    assert (randaugment.num_ops, randaugment.magnitude) == (2, data.RANDAUGMENT_MAGNITUDE) == (2, 9)
    with pytest.raises(ValueError, match="augment"):
        make_dataloaders(root, augment="heavy")
    images = torch.rand(2, 3, 8, 8)
    mean, std = torch.tensor(data.NORMALIZE_MEAN).view(3, 1, 1), torch.tensor(data.NORMALIZE_STD).view(3, 1, 1)
    normalised = (images - mean) / std
    assert torch.allclose(data.denormalize(normalised), images, atol=1e-6)
    assert data.NORMALIZE_MEAN == data.NORMALIZE_STD == (0.5, 0.5, 0.5)


def randaugment_space(magnitude: int) -> dict[str, float]:
    """What torchvision's RandAugment does at `magnitude` (31 bins), read from torchvision itself: each op's
    largest change at that bin."""
    from torchvision.transforms import v2

    space = v2.RandAugment._AUGMENTATION_SPACE  # name -> (values of the 31 bins for an image size, signed)
    return {name: float(values(31, 32, 32)[magnitude]) for name, (values, _) in space.items()
            if name not in ("Identity", "AutoContrast", "Equalize")}


def test_the_strong_policys_magnitude_reaches_both_loaders_and_bad_ones_are_refused(tmp_path):
    """augment_magnitude (RandAugment's strength on torchvision's 0-30 scale): torchvision's RandAugment gets it on
    the CPU path; on the device, the same draws at magnitude 27 shear and shift three times as far as at 9."""
    root = make_tree(tmp_path / "tree")
    train, _, _ = make_dataloaders(root, image_size=8, batch_size=4, augment="strong", num_workers=0,
                                   augment_magnitude=27)
    assert [t.magnitude for t in train.dataset.transform.transforms if type(t).__name__ == "RandAugment"] == [27]
    cached, _, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", augment="strong",
                                       augment_magnitude=27)
    assert cached.augment.magnitude == 27
    (matrices, ops_and_amounts, _), (base_matrices, base_ops_and_amounts, _) = (
        gpu_data.DeviceAugment("strong", magnitude=magnitude).draw(1000, torch.Generator().manual_seed(0), 8, "cpu")
        for magnitude in (27, 9))
    assert torch.equal(ops_and_amounts[0], base_ops_and_amounts[0])  # the same two ops per image
    torch.testing.assert_close(ops_and_amounts[1], 3 * base_ops_and_amounts[1])  # the same signs, 3x the amounts
    assert torch.equal(base_ops_and_amounts[1].abs(), torch.full((2, 1000), 0.3))  # magnitude 9 of 30
    assert torch.equal(matrices[0], base_matrices[0])  # the same crops
    ops = ops_and_amounts[0].long()  # (2, images)
    space = randaugment_space(27)
    for index in range(2):  # the two geometric ops: shears and shifts move these entries (rotations the diagonal)
        stronger, base = (m[1 + index] for m in (matrices, base_matrices))
        shears = (ops[index] == gpu_data.RANDAUGMENT_OPS.index("shear_x")) | (
            ops[index] == gpu_data.RANDAUGMENT_OPS.index("shear_y"))
        assert shears.sum() > 100
        torch.testing.assert_close(stronger[shears][:, [0, 1], [1, 0]], 3 * base[shears][:, [0, 1], [1, 0]])
        shifts = (ops[index] == gpu_data.RANDAUGMENT_OPS.index("translate_x")) | (
            ops[index] == gpu_data.RANDAUGMENT_OPS.index("translate_y"))
        pixels = stronger[shifts][:, :2, 2].abs().sum(1) * 8 / 2  # whole pixels: torchvision's int() of the shift
        assert shifts.sum() > 100 and torch.equal(pixels, torch.full_like(pixels, int(space["TranslateX"] / 4)))
    for bad in (-1, 31, 9.5, True, "9"):
        with pytest.raises(ValueError, match="augment_magnitude must be a whole number from 0 to 30"):
            make_dataloaders(root, image_size=8, batch_size=4, augment="strong", num_workers=0, augment_magnitude=bad)
        with pytest.raises(ValueError, match="augment_magnitude"):
            gpu_data.DeviceAugment("strong", magnitude=bad)


def torchvision_erasing_boxes(count: int, size: int) -> torch.Tensor:
    """(count, 4) boxes (top, left, height, width) that torchvision's RandomErasing erases from a size x size
    image, read off its output: the zeros it leaves in an image of ones. Height 0 where it erased nothing."""
    from torchvision.transforms import v2

    erasing, ones, boxes = v2.RandomErasing(p=1.0, value=0), torch.ones(1, size, size), []
    torch.manual_seed(0)
    for _ in range(count):
        rows, columns = (erasing(ones)[0] == 0).nonzero(as_tuple=True)
        if len(rows) == 0:
            boxes.append([0, 0, 0, 0])
        else:
            boxes.append([rows.min(), columns.min(), rows.max() - rows.min() + 1, columns.max() - columns.min() + 1])
    return torch.tensor(boxes, dtype=torch.float32)


@pytest.mark.parametrize("size", [32, 7])
def test_device_erasing_boxes_are_torchvisions_random_erasing_boxes(size):
    """Per image, the boxes torchvision's RandomErasing draws (one per call): the same distribution of heights,
    widths, areas and places, and the same share of images where no box fitted in 10 tries (many at 7 px)."""
    count = 6000
    ours = gpu_data.erasing_boxes(count, torch.Generator().manual_seed(0), size, probability=1.0)
    theirs = torchvision_erasing_boxes(count, size)
    for boxes in (ours, theirs):
        top, left, height, width = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + height <= size).all() and (left + width <= size).all()
        assert torch.equal(top, top.round()) and torch.equal(height, height.round())  # whole pixels
    erased = [boxes[:, 2] > 0 for boxes in (ours, theirs)]
    assert abs(erased[0].float().mean() - erased[1].float().mean()) < 0.02
    ours, theirs = (boxes[mask] for boxes, mask in zip((ours, theirs), erased))
    measures = {"height": lambda b: b[:, 2], "width": lambda b: b[:, 3], "area": lambda b: b[:, 2] * b[:, 3],
                "centre row": lambda b: b[:, 0] + b[:, 2] / 2, "centre column": lambda b: b[:, 1] + b[:, 3] / 2}
    for name, measure in measures.items():
        for quantile in (0.1, 0.5, 0.9):
            mine, reference = (measure(boxes).quantile(torch.tensor(quantile)) for boxes in (ours, theirs))
            assert abs(mine - reference) <= max(1.0, 0.06 * reference), (name, quantile, mine, reference)


def test_device_erasing_sets_each_images_own_box_to_zero_as_torchvisions_erase():
    from torchvision.transforms.v2 import functional as TF

    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    boxes = gpu_data.erasing_boxes(64, torch.Generator().manual_seed(1), 16, probability=0.5)
    assert 0 < (boxes[:, 2] > 0).sum() < 64  # some erased, some not
    erased = gpu_data.erase(images, boxes)
    for image, box, actual in zip(images, boxes.long().tolist(), erased):
        top, left, height, width = box
        expected = TF.erase(image, top, left, height, width, torch.zeros(1, 1, 1)) if height else image
        assert torch.equal(actual, expected)


def test_random_erasing_reaches_both_loaders_leaves_the_other_draws_alone_and_bad_values_are_refused(tmp_path):
    root = make_tree(tmp_path / "tree")
    train, test, _ = make_dataloaders(root, image_size=8, batch_size=4, augment="basic", num_workers=0,
                                      random_erasing=0.25)
    erasing = [t for t in train.dataset.transform.transforms if type(t).__name__ == "RandomErasing"]
    assert [(t.p, t.scale, t.ratio, t.value) for t in erasing] == [(0.25, data.RANDOM_ERASING_SCALE,
                                                                    data.RANDOM_ERASING_RATIO, [0.0])]
    assert type(train.dataset.transform.transforms[-1]).__name__ == "RandomErasing"  # after normalising
    assert not any(type(t).__name__ == "RandomErasing" for t in test.dataset.transform.transforms)
    cached, cached_test, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", augment="strong",
                                                 random_erasing=0.25)
    assert (cached.augment.erasing, cached_test.augment.erasing) == (0.25, 0.0)
    for policy in ("basic", "strong"):  # erasing draws after the rest: the crops and ops are the same
        plain, with_boxes = (gpu_data.DeviceAugment(policy, erasing=p).draw(500, torch.Generator().manual_seed(0),
                                                                             8, "cpu") for p in (0.0, 0.5))
        assert plain[2] is None and with_boxes[2].shape == (500, 4)
        for a, b in zip(plain[:2], with_boxes[:2]):
            assert (a is None and b is None) or torch.equal(a, b)
    images = torch.randint(0, 256, (500, 3, 8, 8), dtype=torch.uint8)
    augment = gpu_data.DeviceAugment("basic", erasing=0.5)
    draws = augment.draw(500, torch.Generator().manual_seed(0), 8, "cpu")
    torch.testing.assert_close(augment.apply(images, draws),
                               gpu_data.erase(gpu_data.DeviceAugment("basic").apply(images, draws[:2] + (None,)),
                                              draws[2]))
    for bad in (-0.1, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match="random_erasing must be a probability from 0 to 1"):
            make_dataloaders(root, image_size=8, batch_size=4, num_workers=0, random_erasing=bad)
        with pytest.raises(ValueError, match="random_erasing must be a probability"):
            gpu_data.DeviceAugment("basic", erasing=bad)
    for make in (make_dataloaders, make_cached_loaders):
        with pytest.raises(ValueError, match="choose augment 'basic', 'strong' or 'autoaugment', or random_erasing 0"):
            make(root, image_size=8, batch_size=4, augment=False, random_erasing=0.25)


@pytest.mark.parametrize("magnitude", [9, 2, 27, 30])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cached_strong_colour_ops_equal_torchvisions_randaugment_ops(sign, magnitude):
    """Each colour op of the on-device policy is torchvision's at the same RandAugment magnitude: 9 of 30 (the
    default), 27 (DeiT's rand-m9 on torchvision's scale), 30 (the largest), 2 (posterize keeps all 8 bits)."""
    from torchvision.transforms.v2 import functional as TF

    space = randaugment_space(magnitude)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=generator)
    pixels[:, :, :6] //= 4  # uneven histograms, for equalize to change something
    images = pixels.float() / 255
    expected = {
        "identity": images,
        "brightness": TF.adjust_brightness(images, 1 + space["Brightness"] * sign),
        "color": TF.adjust_saturation(images, 1 + space["Color"] * sign),
        "contrast": TF.adjust_contrast(images, 1 + space["Contrast"] * sign),
        "sharpness": TF.adjust_sharpness(images, 1 + space["Sharpness"] * sign),
        "posterize": TF.posterize(pixels, int(space["Posterize"])).float() / 255,
        "solarize": TF.solarize(images, space["Solarize"]),
        "autocontrast": TF.autocontrast(images),
        "equalize": TF.equalize(pixels).float() / 255,
    }
    for name, reference in expected.items():
        ops = torch.full((4,), gpu_data.RANDAUGMENT_OPS.index(name))
        actual = gpu_data.colour_ops(images, ops, torch.full((4,), sign * magnitude / 30))
        torch.testing.assert_close(actual, reference, rtol=0, atol=1e-5, msg=name)
        unchanged = name == "identity" or (name == "posterize" and space["Posterize"] == 8)  # all 8 bits kept
        assert unchanged or not torch.equal(actual, images), f"{name} changed nothing: a weak check"


def test_the_device_policy_draws_torchvisions_randaugment_ops():
    """The same 14 ops as torchvision's RandAugment, in its order, each drawn with its probability: 2 per image."""
    from torchvision.transforms import v2

    assert [op.replace("_", "") for op in gpu_data.RANDAUGMENT_OPS] == [
        name.lower() for name in v2.RandAugment._AUGMENTATION_SPACE]
    _, ops_and_amounts, _ = gpu_data.DeviceAugment("strong").draw(14000, torch.Generator().manual_seed(0), 8, "cpu")
    counts = torch.bincount(ops_and_amounts[0].long().flatten(), minlength=14)
    assert len(counts) == 14 and counts.min() > 1800 and counts.max() < 2200  # 2,000 each expected, sd 43


def test_autoaugment_reaches_both_loaders(tmp_path):
    """augment="autoaugment": torchvision's AutoAugment with its CIFAR-10 policy on the CPU path, the device's
    version of it in the cached loaders; the test transform as ever."""
    from torchvision.transforms import v2

    root = make_tree(tmp_path / "tree")
    train, test, _ = make_dataloaders(root, image_size=8, batch_size=4, augment="autoaugment", num_workers=0)
    policies = [t.policy for t in train.dataset.transform.transforms if isinstance(t, v2.AutoAugment)]
    assert policies == [v2.AutoAugmentPolicy.CIFAR10]
    assert repr(test.dataset.transform) == repr(data.build_transforms(8, augment=False)[1])
    cached, cached_test, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", augment="autoaugment")
    assert (cached.augment.policy, cached_test.augment.policy) == ("autoaugment", "none")


@pytest.mark.parametrize("augment, policy_type", [("strong", "RandAugment"), ("autoaugment", "AutoAugment")])
def test_the_policies_fill_reaches_both_loaders_and_bad_ones_are_refused(tmp_path, augment, policy_type):
    """augment_fill: what the policy's shears, shifts and rotations bring in, on both paths: a grey image shifted
    by the policy keeps the fill's grey where the outside came in (black by default, as torchvision)."""
    root = make_tree(tmp_path / "tree")
    train, _, _ = make_dataloaders(root, image_size=8, batch_size=4, augment=augment, num_workers=0,
                                   augment_fill=128)
    (policy,) = [t for t in train.dataset.transform.transforms if type(t).__name__ == policy_type]
    assert set(policy._fill.values()) == {128}  # torchvision's fill, for every kind of image
    cached, _, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", augment=augment,
                                       augment_fill=128)
    assert cached.augment.fill == 128
    for bad in (-1, 256, 127.5, True, "128"):
        with pytest.raises(ValueError, match="augment_fill must be a whole grey level from 0"):
            make_dataloaders(root, image_size=8, batch_size=4, augment=augment, num_workers=0, augment_fill=bad)
        with pytest.raises(ValueError, match="augment_fill"):
            gpu_data.DeviceAugment(augment, fill=bad)
    # Shifts of a white image: what comes in is the fill (128, or 0 by default), never anything else
    white = torch.full((400, 3, 8, 8), 255, dtype=torch.uint8)
    for fill in (0, 128):
        device = gpu_data.DeviceAugment(augment, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), padding=0, fill=fill)
        draws = device.draw(len(white), torch.Generator().manual_seed(0), 8, "cpu")
        ops = draws[1][0].long()
        shifted = ((ops == gpu_data.DEVICE_OPS.index("translate_x")) | (ops == gpu_data.DEVICE_OPS.index(
            "translate_y"))).any(0) & (ops <= gpu_data.DEVICE_OPS.index("rotate")).all(0)  # geometric ops only
        out = device.apply(white, draws)[shifted] * 255
        assert shifted.sum() > 10 and ((out - fill).abs() < 1e-3).any() and \
            (((out - fill).abs() < 1e-3) | ((out - 255).abs() < 1e-3)).all(), fill
    images, labels = next(iter(cached))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32 and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="'autoaugment' \\(AutoAugment's CIFAR-10 policy\\), got 'auto'"):
        make_dataloaders(root, image_size=8, batch_size=4, augment="auto", num_workers=0)


def test_device_autoaugment_draws_torchvisions_cifar10_policy():
    """One of the policy's 25 pairs per image, each op applied with its probability at its bin's strength (bin / 9
    of the op's largest change), signed ops with either sign: read from torchvision's table, and drawn so."""
    from torchvision.transforms import v2

    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)._policies
    ops, probabilities, amounts, signed = gpu_data.autoaugment_table()
    assert [[gpu_data.DEVICE_OPS[op].replace("_", "") for op in pair] for pair in ops.tolist()] == [
        [name.lower() for name, _, _ in pair] for pair in policy]
    torch.testing.assert_close(probabilities, torch.tensor([[p for _, p, _ in pair] for pair in policy]))
    torch.testing.assert_close(amounts, torch.tensor([[(level or 0) / 9 for _, _, level in pair] for pair in policy]))
    count, identity = 50000, gpu_data.DEVICE_OPS.index("identity")
    _, ops_and_amounts, _ = gpu_data.DeviceAugment("autoaugment").draw(count, torch.Generator().manual_seed(0), 32,
                                                                       "cpu")
    drawn_ops, drawn_amounts = ops_and_amounts[0].long(), ops_and_amounts[1]
    for slot in range(2):
        expected = torch.zeros(len(gpu_data.DEVICE_OPS))
        expected.index_add_(0, ops[:, slot], probabilities[:, slot] / len(policy))  # each pair 1/25 of the time
        expected[identity] += 1 - expected.sum()  # an op not applied leaves the image as it is
        share = torch.bincount(drawn_ops[slot], minlength=len(expected)) / count
        torch.testing.assert_close(share, expected, rtol=0, atol=0.006)  # standard errors of 0.002 at most
    for op in ops.unique().tolist():
        levels = amounts[ops == op].unique()
        drawn = drawn_amounts[drawn_ops == op].abs()
        assert torch.isclose(drawn[:, None], levels[None]).any(1).all(), gpu_data.DEVICE_OPS[op]  # its bins only
    is_signed = torch.zeros(len(gpu_data.DEVICE_OPS), dtype=torch.bool)
    is_signed[ops[signed]] = True
    negative = (drawn_amounts < 0)[is_signed[drawn_ops]].float().mean()
    assert 0.47 < negative < 0.53 and not (drawn_amounts < 0)[~is_signed[drawn_ops]].any()


def test_device_autoaugment_colour_ops_equal_torchvisions_at_every_strength_of_the_policy():
    """Each colour op of the CIFAR-10 policy at each bin it uses, with each sign, is torchvision's AutoAugment op:
    its own code (`_apply_image_or_video_transform`), on float images or, for posterize and equalize, which work
    on uint8 values, on the same pixels as uint8."""
    from torchvision.transforms import v2

    augment = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    pixels = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels[:, :, :6] //= 4  # uneven histograms, for equalize to change something
    images = pixels.float() / 255
    colour = ("Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
              "Invert")
    used = sorted({(name, level or 0) for pair in augment._policies for name, _, level in pair if name in colour})
    assert {name for name, _ in used} == set(colour)
    for name, level in used:
        strengths, signed = augment._AUGMENTATION_SPACE[name]
        for sign in (1.0, -1.0) if signed else (1.0,):
            values = strengths(10, 12, 12)
            magnitude = 0.0 if values is None else float(values[level]) * sign
            as_uint8 = name in ("Posterize", "Equalize")
            reference = augment._apply_image_or_video_transform(pixels if as_uint8 else images, name, magnitude,
                                                                augment.interpolation, augment._fill)
            reference = reference.float() / 255 if as_uint8 else reference
            ops = torch.full((4,), gpu_data.DEVICE_OPS.index(name.lower()))
            actual = gpu_data.colour_ops(images, ops, torch.full((4,), sign * level / 9))
            torch.testing.assert_close(actual, reference, rtol=0, atol=1e-5, msg=f"{name} bin {level} {sign:+}")


GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def halfway_pixels(ops: tuple[torch.Tensor, ...], size: int) -> torch.Tensor:
    """(B, size, size): the output pixels of `ops` (geometric_op_matrices, applied one after another) that copy a
    pixel whose source lay exactly halfway between two pixels in some op. Nearest-neighbour then picks either, by
    float rounding, in torchvision as on the device; every other pixel has one right answer."""
    ties = None
    for op in ops:
        grid = torch.nn.functional.affine_grid(op[:, :2].double(), [len(op), 1, size, size], align_corners=False)
        position = ((grid + 1) * size - 1) / 2  # in pixels: pixel centres at whole numbers
        here = ((position - position.floor() - 0.5).abs() < 1e-4).any(-1)
        moved = None if ties is None else gpu_data.apply_geometric_ops(ties.unsqueeze(1).float(), (op,))[:, 0] > 0
        ties = here if ties is None else here | moved
    return ties


def assert_same_pixels(actual: torch.Tensor, expected: torch.Tensor, ties: torch.Tensor, message: str) -> None:
    """Every pixel equal, except those in `ties` (which may be either neighbour)."""
    differ = (actual - expected).abs().amax(1) > 1e-6  # (B, H, W)
    assert not (differ & ~ties).any(), f"{message}: {int((differ & ~ties).sum())} pixels differ"


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("policy", ["randaugment 9", "randaugment 27", "autoaugment"])
def test_device_geometric_ops_are_torchvisions_pixel_for_pixel(policy, size):
    """Each shear, shift and rotation at each strength the policy uses (RandAugment at magnitude 9 or 27 of 30;
    AutoAugment's CIFAR-10 policy at each of its bins), with each sign, is torchvision's own op (its
    `_apply_image_or_video_transform`: nearest-neighbour, shifts of int() pixels, shears about the top-left corner,
    black coming in), pixel for pixel, except where a source lies exactly halfway between two pixels."""
    from torchvision.transforms import v2

    if policy == "autoaugment":
        augment, bins = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), 10
        used = sorted({(name, level) for pair in augment._policies for name, _, level in pair
                       if name in GEOMETRIC_OPS})
        assert {name for name, _ in used} == set(GEOMETRIC_OPS) - {"ShearX"}  # the CIFAR-10 policy never shears x
        used += [("ShearX", level) for name, level in used if name == "ShearY"]  # at the same strengths
    else:
        magnitude = int(policy.split()[1])
        augment, bins = v2.RandAugment(magnitude=magnitude, num_magnitude_bins=31), 31
        used = [(name, magnitude) for name in GEOMETRIC_OPS]
    pixels = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name, level in used:
        strengths, _ = augment._AUGMENTATION_SPACE[name]
        for sign in (1.0, -1.0):
            magnitude = float(strengths(bins, size, size)[level]) * sign
            expected = augment._apply_image_or_video_transform(pixels, name, magnitude, augment.interpolation,
                                                               augment._fill)
            op = gpu_data.geometric_op_matrices(torch.tensor([gpu_data.torchvision_op(name)]),
                                                torch.tensor([sign * level / (bins - 1)]), size)
            actual = gpu_data.apply_geometric_ops(pixels.float() / 255, (op,))
            assert_same_pixels(actual, expected.float() / 255, halfway_pixels((op,), size), f"{name} {level} {sign}")


def test_two_device_geometric_ops_are_torchvisions_one_after_the_other():
    """Each image's two ops, as torchvision applies them: the second moves the first's output, black strips
    included. The CIFAR-10 policy's pairs with a geometric op (its other op left out) and RandAugment's pairs
    drawn at random, at 32 px."""
    from torchvision.transforms import v2

    size = 32
    autoaugment = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    randaugment = v2.RandAugment(magnitude=9, num_magnitude_bins=31)
    pairs = [(autoaugment, 10, [(name, level) if name in GEOMETRIC_OPS else ("Identity", 0)
                                for name, _, level in pair])
             for pair in autoaugment._policies if any(name in GEOMETRIC_OPS for name, _, _ in pair)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        drawn = torch.randint(len(GEOMETRIC_OPS), (2,), generator=generator).tolist()
        pairs.append((randaugment, 31, [(GEOMETRIC_OPS[index], 9) for index in drawn]))
    pixels = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=generator)
    for augment, bins, pair in pairs:
        for signs in ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0)):
            expected, ops = pixels, []
            for (name, level), sign in zip(pair, signs):
                if name == "Identity":
                    continue
                magnitude = float(augment._AUGMENTATION_SPACE[name][0](bins, size, size)[level]) * sign
                expected = augment._apply_image_or_video_transform(expected, name, magnitude, augment.interpolation,
                                                                   augment._fill)
                ops.append(gpu_data.geometric_op_matrices(torch.tensor([gpu_data.torchvision_op(name)]),
                                                          torch.tensor([sign * level / (bins - 1)]), size))
            actual = gpu_data.apply_geometric_ops(pixels.float() / 255, tuple(ops))
            assert_same_pixels(actual, expected.float() / 255, halfway_pixels(tuple(ops), size), f"{pair} {signs}")


@pytest.mark.parametrize("fill", [0, 128])
def test_the_cifar10_recipes_device_augmentation_is_torchvisions_pipeline_image_for_image(fill):
    """Shifted crops of 4 pixels, flips and AutoAugment's CIFAR-10 policy on the device (the cifar10 recipe) give,
    for the crops and ops drawn, the images torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip and
    AutoAugment give, on the same float images (posterize, whose float version differs, on uint8). The device runs
    the colour ops after the geometric ones; in this policy the one pair with a colour op first (Color, TranslateX)
    commutes, and the policy's strengths never land a source halfway between two pixels at 32 px, so every image
    is fixed by its draws. With fill 128 (the published runs' PIL policy's grey) what the ops bring in is that grey,
    in torchvision as on the device."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    count, size, padding = 256, 32, 4
    pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    pixels[: count // 2, :, : size // 2] //= 4  # uneven histograms, for equalize and autocontrast to change a lot
    device = gpu_data.DeviceAugment("autoaugment", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), padding=padding,
                                    fill=fill)
    draws = device.draw(count, torch.Generator().manual_seed(1), size, "cpu")
    actual = device.apply(pixels, draws)
    matrices, (ops, amounts), _ = draws
    assert not halfway_pixels(tuple(matrices[1:]), size).any()
    autoaugment = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill / 255)  # on float images: [0, 1]
    names = {gpu_data.torchvision_op(name): name for name in autoaugment._AUGMENTATION_SPACE}
    for index in range(count):
        dx, dy = (round(float(matrices[0, index, row, 2]) * size / 2) for row in (0, 1))
        expected = TF.crop(TF.pad(pixels[index], [padding]), padding + dy, padding + dx, size, size).float() / 255
        expected = TF.horizontal_flip(expected) if matrices[0, index, 0, 0] < 0 else expected
        for slot in range(2):
            if ops[slot, index] == gpu_data.DEVICE_OPS.index("identity"):  # an op not applied (its probability)
                continue
            name = names[int(ops[slot, index])]
            strengths = autoaugment._AUGMENTATION_SPACE[name][0](10, size, size)
            amount = float(amounts[slot, index])
            magnitude = 0.0 if strengths is None else (
                float(strengths[round(abs(amount) * 9)]) * math.copysign(1.0, amount))
            as_uint8 = name == "Posterize"  # only ever after a shear here: whole uint8 values
            image = (expected * 255).round().to(torch.uint8) if as_uint8 else expected
            image = autoaugment._apply_image_or_video_transform(image, name, magnitude, autoaugment.interpolation,
                                                                autoaugment._fill)
            expected = image.float() / 255 if as_uint8 else image
        # 1e-4: Color on a grey fill leaves it grey only up to its weights, which sum to 0.9999 (a 40th of a step)
        torch.testing.assert_close(actual[index], expected, rtol=0, atol=1e-4,
                                   msg=f"image {index}: ops {ops[:, index].tolist()}, {amounts[:, index].tolist()}")
    drawn = set(ops.flatten().long().tolist())
    assert len(drawn) == len(gpu_data.DEVICE_OPS) - 1  # every op but shear_x, which the policy does not use


def test_device_crops_are_torchvisions_random_resized_crops():
    """Area and ratio redrawn until the crop fits (at most 10 times, then the whole square), never shrunk to fit:
    the area stays within crop_scale and its distribution is torchvision's."""
    from torchvision.transforms import RandomResizedCrop

    generator = torch.Generator().manual_seed(0)
    for scale in [(0.35, 1.0), (0.9, 1.0), (1.0, 1.0)]:
        matrices = gpu_data.crop_flip_matrices(20000, generator, scale)
        width, height = matrices[:, 0, 0].abs(), matrices[:, 1, 1]
        area, ratio = width * height, width / height
        assert area.min() >= scale[0] - 1e-6 and area.max() <= 1 + 1e-6, scale
        assert ratio.min() >= 3 / 4 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6, scale
        assert (matrices[:, 0, 2].abs() + width <= 1 + 1e-6).all()  # inside the image
        assert (matrices[:, 1, 2].abs() + height <= 1 + 1e-6).all()
    assert torch.equal(area, torch.ones_like(area))  # crop_scale (1, 1): always the whole image, as in torchvision
    square = torch.zeros(3, 224, 224)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = torch.tensor([h * w / 224 ** 2 for _, _, h, w in (RandomResizedCrop.get_params(
            square, list(data.RANDOM_CROP_SCALE), [3 / 4, 4 / 3]) for _ in range(5000))])
    matrices = gpu_data.crop_flip_matrices(20000, generator)
    ours = matrices[:, 0, 0].abs() * matrices[:, 1, 1]
    assert abs(ours.mean() - reference.mean()) < 0.015  # ~0.62 both; clamping to fit gave 0.67


@pytest.mark.parametrize("size", [12, 224])
def test_shifted_device_crops_are_torchvisions_padded_random_crops_pixel_for_pixel(size):
    """crop_padding=P: each image shifted by whole pixels, every shift in [-P, P] equally likely, black coming in,
    then mirrored half of the time: exactly torchvision's pad, crop and flip for the shifts drawn, every pixel
    copied as it is, at any size (a resampling at whole-pixel offsets drifts by 3e-5 at 224 px)."""
    from torchvision.transforms.v2 import functional as TF

    padding = 4
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64 if size < 100 else 8, 3, size, size), dtype=torch.uint8, generator=generator)
    matrices = gpu_data.shifted_crop_flip_matrices(len(images), generator, padding, size)
    out = gpu_data.shift_and_flip(images, matrices)
    for image, matrix, actual in zip(images, matrices, out):
        dx, dy = (round(float(matrix[row, 2]) * size / 2) for row in (0, 1))
        expected = TF.crop(TF.pad(image, [padding]), padding + dy, padding + dx, size, size)  # RandomCrop's
        if matrix[0, 0] < 0:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(actual, expected), (dx, dy)
    many = gpu_data.shifted_crop_flip_matrices(18000, generator, padding, size)
    shifts = (many[:, :2, 2] * size / 2).round().long()
    torch.testing.assert_close(many[:, :2, 2], shifts * 2 / size)  # whole pixels
    counts = Counter(shifts.flatten().tolist())
    assert sorted(counts) == list(range(-padding, padding + 1))
    assert max(counts.values()) / min(counts.values()) < 1.15  # 4,000 each expected
    assert 0.48 < (many[:, 0, 0] < 0).float().mean() < 0.52 and torch.equal(many[:, 1, 1], torch.ones(18000))


def test_strong_ops_after_a_shifted_crop_see_the_shifted_image_as_their_crop():
    """torchvision's order: RandomCrop(padding) and the flip, then RandAugment's ops on that image, black coming
    in from outside it. So: the exact shift first, then the ops on the shifted image (`apply_geometric_ops`), not
    one resampling of the original through all three (which would bring the image's pixels from beyond the
    shifted crop into its border)."""
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=generator)
    crops = gpu_data.shifted_crop_flip_matrices(32, generator, 4, 16)
    op_names = ["translate_x", "rotate", "shear_y", "translate_y"]
    ops = torch.tensor([gpu_data.RANDAUGMENT_OPS.index(name) for name in op_names] * 8)
    amounts = torch.where(torch.rand(32, generator=generator) < 0.5, -0.3, 0.3)  # magnitude 9 of 30
    first = gpu_data.geometric_op_matrices(ops, amounts, 16)
    second = gpu_data.geometric_op_matrices(ops.roll(1), -amounts, 16)
    identity = (0.0,) * 3, (1.0,) * 3
    mean, std = (torch.tensor(value).view(1, 3, 1, 1) for value in identity)
    got = gpu_data.augment_on_device(images, torch.stack([crops, first, second]), None, mean, std, shifted=True)
    shifted = gpu_data.shift_and_flip(images, crops).float() / 255
    expected = gpu_data.apply_geometric_ops(shifted, (first, second))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # What the ops bring in from outside the shifted image is black, however close the original's pixels were
    white = torch.full((32, 3, 16, 16), 255, dtype=torch.uint8)
    once = gpu_data.augment_on_device(white, torch.stack([crops, first, second]), None, mean, std, shifted=True)
    black_strips = gpu_data.apply_geometric_ops(gpu_data.shift_and_flip(white, crops).float() / 255, (first, second))
    torch.testing.assert_close(once, black_strips, rtol=0, atol=1e-6)
    assert (once < 1e-6).any(dim=(1, 2, 3)).float().mean() > 0.5  # most images show black somewhere


def test_shifted_crops_reach_both_loaders_and_agree(tmp_path):
    """crop_padding in make_dataloaders (torchvision's RandomCrop, then the flip) and make_cached_loaders
    (DeviceAugment): on both paths a white image comes out white, with black strips at most P pixels wide where
    the shift brought in the outside, and nothing in between (no blur); with "strong", RandAugment follows."""
    root = make_tree(tmp_path / "tree", per_class=4, size=(8, 8))
    train, _, _ = make_dataloaders(root, image_size=8, batch_size=4, num_workers=0, augment="strong", crop_padding=3)
    names = [type(t).__name__ for t in train.dataset.transform.transforms]
    assert names.index("RandomCrop") < names.index("RandomHorizontalFlip") < names.index("RandAugment")
    assert "RandomResizedCrop" not in names
    train, _, _ = make_dataloaders(root, image_size=8, batch_size=4, num_workers=0, crop_padding=3)
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    torch.manual_seed(0)
    plain = torch.stack([train.dataset.transform(white) for _ in range(200)]).mul(0.5).add(0.5)  # [0, 1]
    cached, _, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", crop_padding=3,
                                       cache_dir=tmp_path / "cache")
    assert cached.augment.padding == 3
    on_device = cached.augment(torch.full((200, 3, 8, 8), 255, dtype=torch.uint8), torch.Generator().manual_seed(0))
    for name, batch in (("make_dataloaders", plain), ("make_cached_loaders", on_device.mul(0.5).add(0.5))):
        assert ((batch - 0).abs() < 1e-5).logical_or((batch - 1).abs() < 1e-5).all(), name  # black or white
        white_columns, white_rows = batch[:, 0].amax(dim=1), batch[:, 0].amax(dim=2)  # (200, 8) each
        assert (white_columns.sum(1) >= 5).all() and (white_rows.sum(1) >= 5).all(), name  # shifts of <= 3 px
        assert (white_columns.sum(1) < 8).float().mean() > 0.6, name  # most images shifted across (6 of 7 are)
    unshifted = gpu_data.DeviceAugment("basic", mean=(0.0,) * 3, std=(1.0,) * 3, padding=0)  # only mirrors
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for image, out in zip(images.float(), unshifted(images, torch.Generator().manual_seed(0)).mul(255)):
        assert torch.allclose(out, image, atol=1e-3) or torch.allclose(out, image.flip(-1), atol=1e-3)


def test_crop_padding_is_checked_and_excludes_crop_scale(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=4, size=(8, 8))
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(ValueError, match="crop_padding must be a whole number of pixels, 0 or more"):
            make_dataloaders(root, image_size=8, batch_size=4, num_workers=0, crop_padding=bad)
        with pytest.raises(ValueError, match="crop_padding must be a whole number of pixels"):
            gpu_data.DeviceAugment("basic", padding=bad)
    with pytest.raises(ValueError, match="choose between two kinds of crop: give one of them"):
        make_dataloaders(root, image_size=8, batch_size=4, num_workers=0, crop_scale=(0.5, 1), crop_padding=4)
    with pytest.raises(ValueError, match="choose between two kinds of crop"):
        gpu_data.DeviceAugment("strong", scale=(0.5, 1), padding=4)


def test_every_image_mode_becomes_rgb_and_transparency_becomes_white(tmp_path):
    for mode, suffix in (("L", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("CMYK", ".jpg"), ("1", ".png"),
                         ("LA", ".png"), ("I;16", ".png")):
        image = data.load_rgb(write_image(tmp_path / f"{mode.replace(';', '_')}{suffix}", mode))
        assert image.mode == "RGB" and image.size == (20, 14), mode
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert data.to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    sixteen_bit = Image.new("I;16", (4, 4), 30000)  # PIL's own convert("RGB") would give white
    assert data.to_rgb(sixteen_bit).getpixel((0, 0)) == (117, 117, 117)


def test_sixteen_bit_images_keep_their_brightness_and_a_transparent_colour_becomes_white(tmp_path):
    # I;16 spans 0-65535 whatever the brightest pixel: a dark image stays dark (it was scaled by its own maximum).
    for value, grey in ((1, 0), (200, 1), (30000, 117), (65535, 255)):
        assert data.to_rgb(Image.new("I;16", (4, 4), value)).getpixel((0, 0)) == (grey,) * 3, value
    Image.new("I;16", (4, 4), 200).save(tmp_path / "dark16.png")
    assert data.load_rgb(tmp_path / "dark16.png").getpixel((0, 0)) == (1, 1, 1)
    # PNG's tRNS chunk: one colour of an L or RGB image is transparent.
    for mode, key in (("RGB", (10, 20, 30)), ("L", 7)):
        image = Image.new(mode, (4, 4), key)
        image.paste(Image.new(mode, (2, 4), 90 if mode == "L" else (90, 90, 90)))
        image.save(tmp_path / f"{mode}.png", transparency=key)
        loaded = data.load_rgb(tmp_path / f"{mode}.png")
        assert loaded.getpixel((3, 0)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (90, 90, 90), mode


def test_a_phone_photo_stored_sideways_loads_upright(tmp_path):
    photo = Image.new("RGB", (40, 30), (200, 0, 0))
    photo.paste((0, 0, 200), (0, 0, 10, 30))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: show it turned 90 degrees clockwise
    photo.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = data.load_rgb(tmp_path / "phone.jpg")
    assert upright.size == (30, 40) and data.check_image(tmp_path / "phone.jpg") is None
    assert upright.getpixel((15, 3))[2] > 150 and upright.getpixel((15, 36))[0] > 150  # the left side is now on top


def test_worker_processes_decode_and_check_images_as_this_process_does(tmp_path):
    # Every kind of file the loaders meet, and more images than one batch holds (a batch is about 1 MB of pixels:
    # 5 images at 256 px), so that batches from two workers are put back in order.
    paths = [write_image(tmp_path / f"rgb{i}.jpg", seed=i, size=(20 + i, 14)) for i in range(21)]
    paths += [write_image(tmp_path / f"{mode}.png", mode, seed=30) for mode in ("L", "RGBA", "P")]
    paths += [write_image(tmp_path / "cmyk.jpg", "CMYK", seed=31)]
    Image.new("I;16", (6, 6), 30000).save(tmp_path / "sixteen.png")
    paths = [str(path) for path in paths + [tmp_path / "sixteen.png"]]
    torch.manual_seed(0)
    random_state = torch.get_rng_state()
    here = gpu_data.decode_images(paths, 256, workers=0)
    assert here.shape == (len(paths), 3, 256, 256)
    assert torch.equal(gpu_data.decode_images(paths, 256, workers=2), here)
    # No random number drawn from the global generator: a cold cache and a warm one leave the same seed behind
    assert torch.equal(torch.get_rng_state(), random_state)
    # Each image as the test transform's resize and crop gives it, in the order of the paths
    geometry = data.resize_and_crop(256)
    for index in (0, 12, 20, len(paths) - 1):
        expected = torch.from_numpy(np.array(geometry(data.load_rgb(paths[index])))).permute(2, 0, 1)
        assert torch.equal(here[index], expected), paths[index]

    broken = [str(write_truncated_jpeg(tmp_path / "broken.jpg")), str(tmp_path / "text.png")]
    (tmp_path / "text.png").write_text("hello")
    verdicts = data.verify_images(paths + broken, tmp_path, workers=2)
    assert verdicts == data.verify_images(paths + broken, tmp_path, workers=0) and sorted(verdicts) == sorted(broken)


def test_worker_processes_are_used_where_they_pay_and_start_by_fork(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(data, "_cpu_count", lambda: 16)
    monkeypatch.setattr(data, "_workers_start_by_fork", lambda: True)
    assert [data.default_path_workers(count) for count in (10, 5000, 5001, 60000)] == [0, 0, 8, 8]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes on this machine share its cores
    assert data.default_path_workers(60000) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data.default_path_workers(60000) == 0  # 2 cores each
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(data, "_cpu_count", lambda: 2)
    assert data.default_path_workers(60000) == 0
    monkeypatch.setattr(data, "_cpu_count", lambda: 16)
    monkeypatch.setattr(data, "_workers_start_by_fork", lambda: False)  # spawn would import torch in each worker
    assert data.default_path_workers(60000) == 0


def test_truncated_and_unreadable_files_are_skipped_with_a_warning_that_names_them(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree", per_class=3)
    write_truncated_jpeg(root / "bee" / "broken.jpg")
    (root / "cat" / "not_an_image.png").write_bytes(b"hello")
    with pytest.warns(UserWarning, match=r"broken\.jpg") as caught:
        folder = data.VerifiedImageFolder(root)
    assert "not_an_image.png" in str(caught[0].message)
    assert len(folder) == 9 and all(folder[i][0].mode == "RGB" for i in range(len(folder)))
    # The verdicts are cached: a second build opens nothing and still skips them.
    monkeypatch.setattr(data, "check_image", lambda path: pytest.fail(f"{path} was opened again"))
    with pytest.warns(UserWarning, match=r"broken\.jpg"):
        assert len(data.VerifiedImageFolder(root)) == 9


def test_a_train_folder_without_test_is_an_error_not_two_classes_named_train_and_val(tmp_path):
    root = tmp_path / "data"
    make_tree(root / "train", per_class=4)
    make_tree(root / "val", per_class=2)
    for make in (make_dataloaders, make_cached_loaders):
        with pytest.raises(DatasetError, match=r"no test/ beside it.*\['train', 'val'\]"):
            make(root, image_size=8, batch_size=2)
    # A class that happens to be called "train" (images directly inside) is fine.
    vehicles = make_tree(tmp_path / "vehicles", classes=("bus", "train"), per_class=4)
    assert make_dataloaders(vehicles, image_size=8, batch_size=2, num_workers=0)[2] == ["bus", "train"]


def test_train_and_test_with_different_classes_is_one_clear_error_before_any_decoding(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_tree(root / "train", classes=("ant", "bee", "cat"), per_class=4)
    make_tree(root / "test", classes=("ant", "bee", "dog"), per_class=2)
    monkeypatch.setattr(gpu_data, "decode_images", lambda *args, **kwargs: pytest.fail("decoded before the check"))
    for make in (make_dataloaders, make_cached_loaders):
        with pytest.raises(DatasetError, match=r"different class folders \(only in train/: cat; only in test/: dog\)"):
            make(root, image_size=8, batch_size=2)


def test_the_split_does_not_depend_on_the_order_the_file_system_lists_files(tmp_path, monkeypatch):
    import os

    root = make_tree(tmp_path / "tree")
    expected = [loader.dataset.samples for loader in make_dataloaders(root, image_size=8, batch_size=4,
                                                                        num_workers=0)[:2]]
    walk, scandir = os.walk, os.scandir

    class ReversedScandir:  # os.scandir's iterator, listing backwards
        def __init__(self, *args):
            with scandir(*args) as entries:
                self.entries = iter(list(entries)[::-1])

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def close(self):
            return None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(os, "walk", lambda *a, **k: [(top, dirs[::-1], files[::-1])
                                                     for top, dirs, files in list(walk(*a, **k))[::-1]])
    monkeypatch.setattr(os, "scandir", ReversedScandir)
    shuffled = [loader.dataset.samples for loader in make_dataloaders(root, image_size=8, batch_size=4,
                                                                        num_workers=0)[:2]]
    assert shuffled == expected


def test_empty_folders_and_empty_classes_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        make_dataloaders(tmp_path / "empty")
    root = make_tree(tmp_path / "tree", per_class=2)
    (root / "dog").mkdir()
    with pytest.raises(DatasetError, match="dog"):
        data.VerifiedImageFolder(root)
    write_truncated_jpeg(root / "dog" / "only.jpg")
    with pytest.raises(DatasetError, match="dog"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.VerifiedImageFolder(root)


# --------------------------------------------------------------------------------------------------------------
# Cached device loaders (on the CPU here)
# --------------------------------------------------------------------------------------------------------------

def make_split_tree(root: Path) -> Path:
    make_tree(root / "train", per_class=6, size=(14, 10))
    make_tree(root / "test", per_class=3, size=(10, 14))
    return root


def test_the_cache_is_written_once_and_reused_until_a_file_changes(tmp_path, monkeypatch):
    root = make_split_tree(tmp_path / "data")
    make_cached_loaders(root, image_size=8, batch_size=4, device="cpu")
    cache = root / ".cache" / "vit_cache_train_8.pt"
    stamp = cache.stat().st_mtime_ns
    monkeypatch.setattr(gpu_data, "decode_images", lambda *a, **k: pytest.fail("decoded again"))
    train, test, classes = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu")
    assert cache.stat().st_mtime_ns == stamp and classes == ["ant", "bee", "cat"]
    monkeypatch.undo()
    write_image(root / "train" / "ant" / "new.png", seed=7)
    train, _, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu")
    assert train.dataset_size == 19 and cache.stat().st_mtime_ns != stamp


def test_the_cache_is_rebuilt_for_a_new_format_and_kept_apart_per_image_size(tmp_path, monkeypatch):
    root = make_split_tree(tmp_path / "data")
    make_cached_loaders(root, image_size=8, batch_size=4, device="cpu")
    decoded = []
    decode = gpu_data.decode_images
    monkeypatch.setattr(gpu_data, "decode_images", lambda paths, size: decoded.append(size) or decode(paths, size))
    make_cached_loaders(root, image_size=6, batch_size=4, device="cpu")
    assert decoded == [6, 6] and (root / ".cache" / "vit_cache_train_8.pt").is_file()
    make_cached_loaders(root, image_size=8, batch_size=4, device="cpu")
    assert decoded == [6, 6]  # the 8-pixel cache is still there and valid
    monkeypatch.setattr(gpu_data, "CACHE_FORMAT", gpu_data.CACHE_FORMAT + 1)
    make_cached_loaders(root, image_size=8, batch_size=4, device="cpu")
    assert decoded == [6, 6, 8, 8]


def test_cached_batches_have_the_right_shapes_and_match_the_plain_loader(tmp_path):
    root = make_split_tree(tmp_path / "data")
    train, test, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", augment=False, seed=5)
    plain_train, plain_test, _ = make_dataloaders(root, image_size=8, batch_size=4, augment=False, seed=5,
                                                  num_workers=0)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert len(train) == 18 // 4 and len(test) == 3 and len(test.dataset) == 9
    assert train.dataset.targets == plain_train.dataset.targets
    cached, cached_labels = (torch.cat(t) for t in zip(*test))
    plain, plain_labels = batches(plain_test)
    assert torch.equal(cached_labels, plain_labels) and torch.allclose(cached, plain, atol=1e-6)
    train.set_epoch(2)
    cached, cached_labels = (torch.cat(t) for t in zip(*train))
    plain, plain_labels = batches(plain_train, epoch=2)  # same sampler: same order for the same seed and epoch
    assert torch.equal(cached_labels, plain_labels) and torch.allclose(cached, plain, atol=1e-6)


def test_a_cached_loader_draws_several_batches_augmentations_at_once_and_each_batch_gets_its_own(tmp_path,
                                                                                                   monkeypatch):
    """One draw of parameters per IMAGES_DRAWN_AT_ONCE images, always of that many (every batch's slice then has
    the same layout), each batch augmented with its own slice: here mirror-only crops (crop_padding 0), so each
    image comes out as itself or its mirror, as its slice's flip says."""
    root = make_tree(tmp_path / "tree", per_class=10, size=(8, 8))
    monkeypatch.setattr(gpu_data, "IMAGES_DRAWN_AT_ONCE", 8)
    train, _, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", crop_padding=0,
                                      cache_dir=tmp_path / "cache")
    draws, draw = [], train.augment.draw
    monkeypatch.setattr(train.augment, "draw", lambda *args: draws.append(draw(*args)) or draws[-1])
    train.set_epoch(3)
    batches = list(train)
    assert len(batches) == 6 and len(draws) == 3  # 25 training images: 6 batches of 4, two batches per draw
    assert all(matrices.shape == (1, 8, 3, 3) and ops is None and boxes is None for matrices, ops, boxes in draws)
    rows = train.rows[torch.tensor(list(train.sampler))]
    for index, (images, _) in enumerate(batches):
        flips = draws[index // 2][0][0, 4 * (index % 2):4 * (index % 2) + 4, 0, 0]
        originals = train.images[rows[4 * index:4 * index + 4]].float() / 255 * 2 - 1  # normalised as the loader does
        for flip, original, image in zip(flips, originals, images):
            torch.testing.assert_close(image, original.flip(-1) if flip < 0 else original, rtol=0, atol=1e-5)


def test_a_cached_loader_augments_as_many_whole_batches_at_once_as_divide_a_draw_and_fit_the_memory_cap():
    from types import SimpleNamespace

    def at_once(size, batch):
        loader = SimpleNamespace(images=torch.empty(1, 3, size, size, dtype=torch.uint8), batch_size=batch)
        loader.images_drawn_at_once = gpu_data.CachedImageLoader.images_drawn_at_once.fget(loader)
        return gpu_data.CachedImageLoader.images_augmented_at_once.fget(loader)

    # 32 MiB of float32 images: 5 batches of 512 at 32 px (6.3 MB each) fit, and 4 is the most that divide the 32
    # batches of a draw; 21 of 128, and 16 divide 128.
    assert at_once(32, 512) == 2048 and at_once(32, 256) == 2048 and at_once(32, 128) == 2048
    assert at_once(32, 384) == 7 * 384  # 42 batches of 384 per draw (16,384 rounded down to whole batches)
    assert at_once(224, 512) == 512 and at_once(224, 64) == 64  # at least one batch, even past the cap
    assert at_once(224, 8) == 4 * 8  # 6 batches of 4.8 MB fit, and 4 is the largest that divides 2,048 per draw


@pytest.mark.parametrize("augment", ["strong", "autoaugment"])
def test_augmenting_batches_together_gives_each_batch_the_images_it_gets_alone(tmp_path, monkeypatch, augment):
    """Whole chunks of batches augmented at once, or one batch at a time (a memory cap below one batch): the same
    batches, the last, shorter one of the test set included."""
    root = make_tree(tmp_path / "tree", per_class=10, size=(8, 8))
    monkeypatch.setattr(gpu_data, "IMAGES_DRAWN_AT_ONCE", 12)

    def epoch(loader):
        loader.set_epoch(3)
        return [(images.clone(), labels) for images, labels in loader]

    train, test, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", augment=augment,
                                         random_erasing=0.5, cache_dir=tmp_path / "cache", test_fraction=0.3)
    assert (train.images_augmented_at_once, test.images_augmented_at_once) == (12, 12)
    together = epoch(train), epoch(test)
    applied, apply = [], train.augment.apply
    monkeypatch.setattr(train.augment, "apply", lambda images, draws, compiled: applied.append(len(images)) or
                        apply(images, draws, compiled))
    monkeypatch.setattr(gpu_data, "AUGMENTED_BYTES_AT_ONCE", 1)
    assert (train.images_augmented_at_once, test.images_augmented_at_once) == (4, 4)
    alone = epoch(train), epoch(test)
    assert applied == [4] * len(train) and len(train) == 5 and [len(x) for x, _ in alone[1]] == [4, 4, 1]
    for split_together, split_alone in zip(together, alone):
        assert len(split_together) == len(split_alone)
        for (images, labels), (expected, expected_labels) in zip(split_together, split_alone):
            assert torch.equal(labels, expected_labels)
            torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_a_compiled_loader_augmentation_compiles_one_graph_for_its_chunks(tmp_path, monkeypatch):
    """Each chunk's slice of the parameters drawn at once has the same layout, so torch.compile (which guards on
    shapes and strides) builds one graph for all of them, not one more per slice or draw. The last chunk of an
    epoch holds fewer batches: it runs uncompiled, rather than compile a graph for it. The batches are the plain
    augmentation's."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    monkeypatch.setattr(gpu_data, "compiled_augment_on_device",
                        lambda: torch.compile(gpu_data.augment_on_device, backend=counter, dynamic=False))
    monkeypatch.setattr(gpu_data, "IMAGES_DRAWN_AT_ONCE", 18)
    root = make_tree(tmp_path / "tree", per_class=10, size=(8, 8))
    compiled, _, _ = make_cached_loaders(root, image_size=8, batch_size=6, device="cpu", augment="strong",
                                         cache_dir=tmp_path / "cache", compile_augment=True)
    plain, _, _ = make_cached_loaders(root, image_size=8, batch_size=6, device="cpu", augment="strong",
                                      cache_dir=tmp_path / "cache")
    assert compiled.images_augmented_at_once == 18 and len(compiled) == 4  # 25 images: chunks of 3 batches and 1
    applied, apply = [], compiled.augment.apply
    monkeypatch.setattr(compiled.augment, "apply", lambda images, draws, compiled: applied.append(
        (len(images), compiled)) or apply(images, draws, compiled))
    for epoch in (0, 1):
        compiled.set_epoch(epoch), plain.set_epoch(epoch)
        got, expected = list(compiled), list(plain)
        assert [len(images) for images, _ in got] == [6, 6, 6, 6]
        for (images, labels), (plain_images, plain_labels) in zip(got, expected):
            assert torch.equal(labels, plain_labels)
            torch.testing.assert_close(images, plain_images, rtol=0, atol=1e-5)
    assert applied == [(18, True), (6, False)] * 2 and counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("augment", [True, "strong"])
def test_cached_epochs_are_a_function_of_seed_and_epoch(tmp_path, augment):
    root = make_split_tree(tmp_path / "data")
    train, _, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", augment=augment)

    def epoch(number):
        train.set_epoch(number)
        return [torch.cat(t) for t in zip(*train)]

    first, again, other = epoch(1), epoch(1), epoch(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].isfinite().all() and first[0].min() >= -1 and first[0].max() <= 1
    fresh, _, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", augment=augment)
    fresh.sampler.set_epoch(1)  # what an engine written for make_dataloaders calls
    assert torch.equal(torch.cat([x for x, _ in fresh]), first[0])  # a resumed run replays the epoch


def test_cached_split_of_a_single_tree_matches_the_plain_split(tmp_path):
    root = make_tree(tmp_path / "tree")
    train, test, _ = make_cached_loaders(root, image_size=8, batch_size=4, device="cpu", test_fraction=0.3)
    plain_train, plain_test, _ = make_dataloaders(root, image_size=8, batch_size=4, test_fraction=0.3,
                                                  num_workers=0)
    assert (tmp_path / ".cache" / "tree" / "vit_cache_all_8.pt").is_file()  # beside the tree, not inside it
    assert test.dataset.targets == plain_test.dataset.targets
    assert torch.allclose(torch.cat([x for x, _ in test]), batches(plain_test)[0], atol=1e-6)


def test_nothing_is_written_inside_a_folder_of_class_folders_so_torchvision_reads_it_as_before(tmp_path):
    # torchvision's ImageFolder takes every subfolder for a class, hidden ones too: a .cache folder of ours inside
    # would be a class without images, and it would refuse the whole folder.
    from torchvision.datasets import ImageFolder

    tree, split = make_tree(tmp_path / "tree"), make_split_tree(tmp_path / "split")
    folders = [tree, split / "train", split / "test"]
    before = {folder: sorted(folder.rglob("*")) for folder in folders}
    for root in (tree, split):
        make_dataloaders(root, image_size=8, batch_size=4, num_workers=0)
        make_cached_loaders(root, image_size=8, batch_size=4, device="cpu")
    for folder in folders:
        assert sorted(folder.rglob("*")) == before[folder]
        assert ImageFolder(folder).samples == data.VerifiedImageFolder(folder).samples
    assert (tmp_path / ".cache" / "tree" / "image_check.json").is_file()
    assert (split / ".cache" / "train" / "image_check.json").is_file()
    assert (split / ".cache" / "vit_cache_train_8.pt").is_file()


def test_caches_kept_inside_the_folder_by_earlier_versions_move_out_and_are_reused(tmp_path, monkeypatch):
    from torchvision.datasets import ImageFolder

    tree = make_tree(tmp_path / "tree")
    make_cached_loaders(tree, image_size=8, batch_size=4, device="cpu", cache_dir=tree / ".cache")  # as before
    (tmp_path / ".cache" / "tree" / "image_check.json").rename(tree / ".cache" / "image_check.json")
    with pytest.raises(FileNotFoundError):  # what the old layout did to torchvision
        ImageFolder(tree)
    monkeypatch.setattr(gpu_data, "decode_images", lambda *a, **k: pytest.fail("decoded again"))
    monkeypatch.setattr(data, "check_image", lambda *a, **k: pytest.fail("checked again"))
    make_cached_loaders(tree, image_size=8, batch_size=4, device="cpu")
    assert not (tree / ".cache").exists() and len(ImageFolder(tree)) == 30
    assert sorted(path.name for path in (tmp_path / ".cache" / "tree").iterdir()) == ["image_check.json",
                                                                                      "vit_cache_all_8.pt"]


def test_rank_sharding_covers_the_test_set_exactly_once(tmp_path):
    root = make_split_tree(tmp_path / "data")
    world = 2
    shards = [make_cached_loaders(root, image_size=8, batch_size=2, device="cpu", num_replicas=world, rank=r)
              for r in range(world)]
    test_indices = [list(test.sampler) for _, test, _ in shards]
    assert sorted(sum(test_indices, [])) == list(range(9))
    assert sum(len(torch.cat([y for _, y in test])) for _, test, _ in shards) == 9
    for _, test, _ in shards:
        test.set_epoch(0)
    train_indices = []
    for train, _, _ in shards:
        train.set_epoch(4)
        train_indices.append(list(train.sampler))
    assert len(train_indices[0]) == len(train_indices[1]) == 9
    assert sorted(sum(train_indices, [])) == list(range(18))  # 18 images split evenly, none twice
    # One process's figures of the test set (the CLI's example predictions) read it whole, as one process alone does
    alone = make_cached_loaders(root, image_size=8, batch_size=2, device="cpu")[1]
    for _, test, _ in shards:
        batches, expected = list(test.whole()), list(alone)
        assert len(batches) == len(expected) == 5
        assert all(torch.equal(x, x_alone) and torch.equal(y, y_alone)
                   for (x, y), (x_alone, y_alone) in zip(batches, expected))
        assert len(test.sampler) < 9  # its own share is untouched
    with pytest.raises(ValueError, match="whole\\(\\) reads a test loader's whole split"):
        shards[0][0].whole()


def test_example_photo_is_the_square_portrait_at_any_size():
    photo = data.example_photo(224)
    assert photo.shape == (3, 224, 224) and photo.dtype == torch.float32
    assert 0.0 <= photo.min() and photo.max() <= 1.0 and photo.std() > 0.1  # a real photo, not a blank
    small = data.example_photo(32)
    assert small.shape == (3, 32, 32)
    # The same picture: the large one shrunk is close to the small one.
    shrunk = torch.nn.functional.interpolate(photo[None], size=32, mode="area")[0]
    assert (shrunk - small).abs().mean() < 0.05


def test_spread_examples_takes_every_nth_sample_of_an_unshuffled_loader():
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = torch.arange(100.0).view(100, 1, 1, 1), torch.arange(100) // 10  # 10 classes, sorted
    loader = DataLoader(TensorDataset(images, labels), batch_size=7)
    indices, chosen, chosen_labels = data.spread_examples(loader, 10)
    assert indices.tolist() == list(range(0, 100, 10))
    assert torch.equal(chosen.flatten(), images.flatten()[indices]) and chosen_labels.tolist() == list(range(10))


def test_strong_device_ops_fill_black_outside_their_crop_and_nothing_else_turns_black():
    """torchvision rotates, shears and shifts the cropped image, each op filling black what comes from outside the
    image it was given. On a uniform grey image: the geometric ops leave black pixels (even two that cancel, such
    as a shift and its reverse), and the colour ops leave it uniform."""
    count, scale = 1024, (0.3, 0.5)
    grey = torch.full((count, 3, 32, 32), 153, dtype=torch.uint8)  # 0.6: under solarize's threshold
    augment = gpu_data.DeviceAugment("strong", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=scale)
    out = augment(grey, torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)  # DeviceAugment's draws: crops, then ops
    gpu_data.crop_flip_matrices(count, replay, scale)
    ops = torch.randint(len(gpu_data.RANDAUGMENT_OPS), (2, count), generator=replay)
    geometric = torch.isin(ops, torch.tensor([gpu_data.RANDAUGMENT_OPS.index(name) for name in (
        "shear_x", "shear_y", "translate_x", "translate_y", "rotate")]))  # (2, count)
    only_geometric = (geometric | (ops == gpu_data.RANDAUGMENT_OPS.index("identity"))).all(0) & geometric.any(0)
    colour_only = ~geometric.any(0)
    assert only_geometric.sum() > 100 and colour_only.sum() > 200
    assert (out[only_geometric] == 0).flatten(1).any(1).all()  # a crop of grey is grey: the black is the fill
    flat = out[colour_only].flatten(1)
    assert (flat.amax(1) - flat.amin(1)).max() < 1e-5 and flat.min() > 0.2  # no black blended in at crop borders


def test_device_autocontrast_leaves_a_flat_channel_alone():
    """torchvision's autocontrast leaves a uint8 channel with one value as it is; interpolation's rounding noise
    (1e-7) on such a channel must not be stretched into black and white."""
    from torchvision.transforms.v2 import functional as TF

    noise = 1e-7 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = torch.full((2, 3, 8, 8), 153 / 255) + noise
    ops = torch.full((2,), gpu_data.RANDAUGMENT_OPS.index("autocontrast"))
    reference = TF.autocontrast(torch.full((2, 3, 8, 8), 153, dtype=torch.uint8)).float() / 255
    torch.testing.assert_close(gpu_data.colour_ops(flat, ops, torch.ones(2)), reference, rtol=0, atol=1e-5)


def test_basic_device_crops_never_blend_in_black_at_the_border():
    white = torch.full((512, 3, 32, 32), 255, dtype=torch.uint8)
    augment = gpu_data.DeviceAugment("basic", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    crops = augment(white, torch.Generator().manual_seed(0))
    torch.testing.assert_close(crops, torch.ones_like(crops))  # every pixel of a crop of white is white


@pytest.mark.parametrize("policy, crop", [("basic", {"scale": (0.5, 1.0)}), ("strong", {"scale": (0.5, 1.0)}),
                                          ("strong", {"padding": 4, "erasing": 0.5}), ("autoaugment", {"padding": 4}),
                                          ("autoaugment", {"padding": 4, "fill": 128})])
def test_compiled_device_augmentation_equals_the_plain_one(policy, crop):
    """DeviceAugment(compile=True): the same draws and the same images to float rounding (here torch.compile's CPU
    backend; on a GPU, tests/test_cuda.py compares it with the CPU's plain version)."""
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plain = gpu_data.DeviceAugment(policy, **crop)
    compiled = gpu_data.DeviceAugment(policy, compile=True, **crop)
    for seed in (0, 1):  # the second batch reuses the compiled graph
        expected = plain(images, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(compiled(images, torch.Generator().manual_seed(seed)), expected,
                                   rtol=1e-5, atol=1e-4)
    assert compiled.compiled is not None  # it did run compiled, not fall back


@pytest.mark.parametrize("policy, crop", [("basic", {"scale": (0.5, 1.0)}), ("strong", {"padding": 4, "erasing": 0.5}),
                                          ("autoaugment", {"padding": 4, "fill": 128, "erasing": 0.25})])
def test_the_device_augmentation_traces_as_one_graph_without_breaks(policy, crop):
    """torch.compile(fullgraph=True) fails on any graph break. A break would split the compiled augmentation into
    pieces with eager code between them: more kernel launches a chunk on a GPU, where launches, not arithmetic,
    bound it. The "eager" backend traces as inductor's front end does, without generating code (seconds)."""
    torch._dynamo.reset()
    augment = gpu_data.DeviceAugment(policy, **crop)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    matrices, ops_and_amounts, boxes = augment.draw(16, torch.Generator().manual_seed(0), 16, "cpu")
    arguments = (images, matrices, ops_and_amounts, augment.mean, augment.std, augment.padding is not None, boxes,
                 augment.fill / 255)
    traced = torch.compile(gpu_data.augment_on_device, fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(traced(*arguments), gpu_data.augment_on_device(*arguments))
    torch._dynamo.reset()


def test_an_augmentation_that_fails_to_compile_warns_and_runs_plain(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(gpu_data, "compiled_augment_on_device", lambda: broken)
    augment = gpu_data.DeviceAugment("strong", compile=True)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="compiling the augmentation failed, so it runs uncompiled .*no compiler here"):
        out = augment(images, torch.Generator().manual_seed(0))
    expected = gpu_data.DeviceAugment("strong")(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, expected) and augment.compiled is None


def test_a_compiled_augmentation_raises_what_is_not_the_compilers_doing(monkeypatch):
    """After a batch ran compiled, an error is the batch's (memory, input), not the compiler's: raised, not hidden
    behind a fall-back that would redo the batch uncompiled. Running out of memory is never the compiler's."""
    calls = []

    def first_works_then_fails(*args):
        calls.append(len(calls))
        if len(calls) > 1:
            raise RuntimeError("a later batch's own error")
        return gpu_data.augment_on_device(*args)

    monkeypatch.setattr(gpu_data, "compiled_augment_on_device", lambda: first_works_then_fails)
    augment = gpu_data.DeviceAugment("basic", compile=True)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    augment(images, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="a later batch's own error"):
        augment(images, torch.Generator().manual_seed(1))
    assert augment.compiled is first_works_then_fails  # still compiled

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_data, "compiled_augment_on_device", lambda: out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        gpu_data.DeviceAugment("basic", compile=True)(images, torch.Generator().manual_seed(0))


def test_every_compiled_augmentation_shares_one_compiled_function():
    """Loaders built again and again (a notebook, the pace check) reuse one compiled function, whose graphs depend
    on the tensors alone, instead of compiling one more per DeviceAugment up to torch.compile's limit."""
    first, second = gpu_data.DeviceAugment("basic", compile=True), gpu_data.DeviceAugment("strong", compile=True)
    assert first.compiled is second.compiled is gpu_data.compiled_augment_on_device()
    assert gpu_data.DeviceAugment("none", compile=True).compiled is None  # nothing to compile
