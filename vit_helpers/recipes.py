"""Named training recipes: configurations anyone can rerun with `python -m vit_helpers train --recipe NAME`.

A recipe fixes the model (a `ViTConfig.named` name plus overrides), the image size, the optimisation
(epochs, batch size, learning rate, weight decay, warm-up, label smoothing), the augmentation, whether the
images are cached on the device, and how it is compiled (`compile_mode`, `compile_augment`). Flags given on the
command line override the recipe's values; `--model` with another model replaces the recipe's model,
`model_overrides` included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vit_helpers.data import RANDAUGMENT_MAGNITUDE, check_augmentation
from vit_helpers.model import ViTConfig
from vit_helpers.training import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str = "default"
    description: str = "no recipe: ViT-Ti/16 at 224 px with the engine's defaults"
    data: str | None = None  # the data set the recipe was tuned on, used when --data is not given
    model: str = "ViT-Ti/16"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # any ViTConfig field, e.g. num_layers
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # > 0: MixUp on each batch (TrainConfig.mixup_alpha)
    cutmix_alpha: float = 0.0  # > 0: CutMix; with both, one of the two per batch
    mix_probability: float = 1.0  # the share of batches mixed (TrainConfig.mix_probability)
    # True/"basic": random resized crop + flip; "strong": + RandAugment; "autoaugment": + AutoAugment's CIFAR-10
    # policy; False: none
    augment: bool | str = True
    augment_magnitude: int = RANDAUGMENT_MAGNITUDE  # "strong": RandAugment's strength, 0-30 (DeiT's m9 is 27)
    # "strong", "autoaugment": the grey level (0-255) their shears, shifts and rotations bring in; 0 (black) is
    # torchvision's default, 128 (mid-grey) the PIL policy's of the published CIFAR-10 ViT runs
    augment_fill: int = 0
    random_erasing: float = 0.0  # the share of training images with a box erased (DeiT's: 0.25)
    repeated_augmentation: int = 1  # k > 1: a k-th of the images per epoch, each k times (DeiT's: 3)
    crop_scale: tuple[float, float] | None = None  # the random crops' share of the area; None: data.RANDOM_CROP_SCALE
    crop_padding: int | None = None  # pixels: shifted crops (CIFAR's usual, 4) instead of random resized crops
    cached: bool = False  # decode once and augment on the device (vit_helpers.gpu_data.make_cached_loaders)
    compile_augment: bool = False  # with cached: the augmentation through torch.compile (a few fused kernels)
    compile_mode: str | None = None  # torch.compile's mode, e.g. "reduce-overhead" (CUDA graphs); None: default
    cpu_threads: int | None = None  # torch threads when training on the CPU; None leaves PyTorch's default
    checkpoint_every: int = 1  # epochs between checkpoints (the last one is always written)
    eval_every: int = 1  # epochs between evaluations on the test set (the last one is always evaluated)
    on_gpu: dict[str, Any] = field(default_factory=dict)  # fields replaced when training on a CUDA GPU

    def model_config(self, num_classes: int) -> ViTConfig:
        """The recipe's ViT for a data set of `num_classes` classes."""
        return ViTConfig.named(self.model, **self.model_overrides, image_size=self.image_size,
                               num_classes=num_classes)

    def train_config(self, **overrides) -> TrainConfig:
        """The recipe's optimisation as a `training.TrainConfig`; `overrides` set any other of its fields."""
        return dataclasses.replace(TrainConfig.from_settings(dataclasses.asdict(self)), **overrides)

    def for_device(self, device_type: str) -> "Recipe":
        """The recipe as it runs on `device_type` ("cpu" or "cuda"): `on_gpu` applied on CUDA."""
        return dataclasses.replace(self, **self.on_gpu) if device_type == "cuda" and self.on_gpu else self

    def check(self) -> "Recipe":
        """The recipe, once what the model, the optimiser or the loaders would refuse has been found now, before
        any data is read: a ValueError that says what."""
        self.model_config(num_classes=2), self.train_config()
        check_augmentation(self.augment, self.crop_scale, self.crop_padding, self.augment_magnitude,
                           self.random_erasing, self.augment_fill, self.repeated_augmentation)
        return self


def one_kind_of_crop(changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` to a recipe's fields, with the other kind of crop cleared where they set one kind (`crop_scale`:
    random resized crops; `crop_padding`: shifted crops), so that choosing a kind replaces the recipe's kind
    instead of clashing with it. Both set: left for `data.checked_crop` to refuse."""
    scale, padding = (changes.get(name) is not None for name in ("crop_scale", "crop_padding"))
    return {**changes, ("crop_padding" if scale else "crop_scale"): None} if scale != padding else changes


RECIPES: dict[str, Recipe] = {
    "demo": Recipe(
        name="demo",
        description=("the shipped Fashion-MNIST sample (4,000 training images, 28x28) on the CPU in under 3 "
                     "minutes: measured 0.817 test accuracy in 33 s on 2 shared cores. On a CUDA GPU a larger "
                     "ViT-S/4 (6 layers, 30 epochs, augmented); that variant is unmeasured"),
        data="sample",
        model="ViT-Ti/7",  # 7x7 patches of a 28x28 image: 16 patches + the class token
        model_overrides=dict(embed_dim=128, num_layers=4, num_heads=4, mlp_dim=256),
        image_size=28,
        epochs=8,
        batch_size=64,
        lr=2e-3,
        weight_decay=0.05,
        warmup_epochs=1.0,
        label_smoothing=0.1,
        augment=False,  # measured: random crops + flips cost 12 points in 8 epochs (0.695 vs 0.819, 2026-11-26)
        cached=True,  # decode the 5,000 PNGs once instead of every epoch
        # Matrices this small gain little from a second thread, and lose ~20x when another process holds the
        # other core (each op then waits for a thread that is not scheduled): one thread is fastest and steady.
        cpu_threads=1,
        on_gpu=dict(model="ViT-S/4", model_overrides=dict(num_layers=6), image_size=28, epochs=30,
                    batch_size=256, lr=1e-3, augment=True),
    ),
    "cifar10": Recipe(
        name="cifar10",
        description=("CIFAR-10 from scratch on one H100/H200: the paper's architecture at 32 px with 4x4 patches, "
                     "the images cached and augmented on the GPU. The goal, >= 90% test accuracy within 10 minutes, "
                     "is met: measured on an H200, 2026-11-28 (BENCHMARKS.md), these 457 epochs ended at 0.9164 "
                     "test accuracy 501 s (8.35 minutes) after checking the images began, compiling and every "
                     "evaluation included (0.95 s an epoch; 0.900 first at epoch 300). A slower card's check "
                     "shortens the schedule to what fits. Check: scripts/gpu_checks.py --checks cifar; variants side "
                     "by side: --checks sweep"),
        data="cifar10",
        # Lee et al. 2021 ("Vision Transformer for Small-Size Datasets"), whose plain ViT is published at 93.6% on
        # CIFAR-10: their model (4x4 patches, D=192, 9 layers of 12 heads, MLP 384: 2,697,610 parameters) with
        # DeiT's regularisers as they set them (stochastic depth 0.1, random erasing 0.25, MixUp and CutMix on half
        # the batches, label smoothing 0.1), AutoAugment's CIFAR-10 policy after shifted crops and flips, and their
        # 1e-3 at batch 128 scaled by the square root of the batch to 512, with timm's initialisation. Ours differs
        # in bf16, the JPEG copy of the data, and passes: their "100 epochs with repeated augmentation 3" are 300
        # passes at batch 128, ours as many as fit the 10 minutes. On the H200 side by side (2026-11-28), batch 512
        # ended higher than batch 256 (0.882 against 0.874) and ran more epochs.
        model="ViT-Ti/4",
        model_overrides=dict(num_layers=9, num_heads=12, mlp_dim=384, init="timm", drop_path=0.1),
        image_size=32,
        # What fitted 9 of the 10 minutes alone on the H200 (2026-11-28): 550 were planned at the 0.87 s an epoch
        # of an earlier sweep; the check timed epochs 2-4 at 1.03 s and shortened the cosine to 457, which ran at a
        # median 0.95 s, after 9 s of checking and decoding (2.4 s of it decoding in 8 worker processes) and a first
        # epoch of 49 s that compiled. This is that measured run. Its test accuracy gained 0.13 points in the last 57
        # epochs (0.9151 at epoch 400): more epochs alone would add little.
        epochs=457,
        batch_size=512,
        lr=2e-3,
        weight_decay=0.05,
        warmup_epochs=30.0,  # their 10 epochs of 3 passes
        label_smoothing=0.1,
        mixup_alpha=1.0,
        cutmix_alpha=1.0,
        mix_probability=0.5,
        augment="autoaugment",
        augment_fill=128,  # the grey their PIL policy's shears, shifts and rotations bring in
        random_erasing=0.25,
        # Shifts of up to 4 whole pixels (black coming in) and flips: CIFAR's usual crop.
        crop_padding=4,
        cached=True,
        checkpoint_every=10,  # an epoch takes about a second here; a checkpoint after each would cost a share of it
        # Evaluating the 10,000 test images took about 6% of an epoch on the H200 (0.05 of 0.88 s, 2026-11-28):
        # every 5th epoch (and the last) keeps most of that for training. It changes nothing in what is learned.
        eval_every=5,
        # Uncompiled, a step of this small model is bound by launching kernels. On the H200 (pace check, 2026-11-27,
        # the earlier recipe's model): CUDA graphs took a step of batch 512 from 19.3 ms to 8.7 ms and trained the
        # same (loss 0.06% apart after 3 epochs); the compiled augmentation gave the same images. This recipe's
        # model with both: 8.5 ms a step, 60,000 img/s (2026-11-28). On the CPU neither applies (nothing is
        # compiled there by default).
        on_gpu=dict(compile_mode="reduce-overhead", compile_augment=True),
    ),
}


def get_recipe(name: str, device_type: str = "cpu") -> Recipe:
    """The recipe called `name`, as it runs on `device_type`. Raises ValueError for an unknown name."""
    try:
        recipe = RECIPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}.") from None
    return recipe.for_device(device_type)
