"""The command line: `python -m vit_helpers train | download | bench`.

    python -m vit_helpers train --data sample --recipe demo --out runs/demo
    python -m vit_helpers train --data animals10 --model ViT-B/16 --epochs 10 --batch-size 64 --out runs/b16
    torchrun --nproc_per_node=4 -m vit_helpers train --data cifar10 --recipe cifar10 --out runs/cifar10
    python -m vit_helpers download animals10
    python -m vit_helpers bench --model ViT-B/16 --batch-size 256 --compile --compare timm,torchvision

Mistakes in the arguments (an unknown model, an image size the patch size does not divide, missing data, a
device that is not there) end with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work on servers without a display

import torch  # noqa: E402

from vit_helpers import plots, training  # noqa: E402
from vit_helpers.files import atomic_write  # noqa: E402
from vit_helpers.model import INITS, ViT, ViTConfig  # noqa: E402
from vit_helpers.recipes import RECIPES, Recipe, get_recipe, one_kind_of_crop  # noqa: E402

#: What `--resume` may change; everything else comes from the checkpoint, so the run continues as it began.
#: Not num_workers: each DataLoader worker draws its own random stream, so the number of workers decides which
#: augmentations each image gets (the run records the number it used, as chosen for its machine).
RESUMABLE_FLAGS = ("data", "epochs", "device", "compile", "compile_mode", "compile_augment", "cpu_threads",
                   "eval_every")
#: The files a finished run writes into OUT besides its checkpoint.
RESULT_FILES = ("metrics.json", "loss_curves.png", "confusion_matrix.png", "predictions.png")


class UsageError(Exception):
    """Bad arguments or missing data: reported as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def flag_name(setting: str) -> str:
    """The flag that sets `setting` (--no-compile sets compile, --mixup sets mixup_alpha, ...)."""
    flags = {"compile": "--no-compile", "mixup_alpha": "--mixup", "cutmix_alpha": "--cutmix"}
    return flags.get(setting, "--" + setting.replace("_", "-"))


def one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _number(kind, test, wanted: str):
    """An argparse type: `kind` (int or float) for which `test(value)` holds, else the flag's error says `wanted`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda value: value >= 1, "a whole number of at least 1")
non_negative_int = _number(int, lambda value: value >= 0, "a whole number, 0 or more")
positive_float = _number(float, lambda value: math.isfinite(value) and value > 0, "a positive number")
non_negative_float = _number(float, lambda value: math.isfinite(value) and value >= 0, "a number, 0 or more")
fraction = _number(float, lambda value: 0 <= value <= 1, "a number from 0 to 1")
probability = _number(float, lambda value: 0 <= value < 1, "a number from 0 up to, not including, 1")
share_of_batches = _number(float, lambda value: 0 < value <= 1, "a number above 0 and at most 1")


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m vit_helpers", description=__doc__.split("\n\n")[0],
                           epilog="examples:\n" + __doc__.split("\n\n")[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_train_arguments(commands.add_parser("train", help="train a ViT on a folder of images or a named data set"))
    download = commands.add_parser("download", help="download and prepare a data set")
    download.add_argument("dataset", choices=("animals10", "cifar10", "sample"))
    download.add_argument("--dest", help="folder to prepare it in (default: data/<dataset>)")
    download.add_argument("--force", action="store_true", help="download and prepare again")
    add_bench_arguments(commands.add_parser("bench", help="training and inference throughput, TFLOP/s and MFU"))
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults are None so that a recipe's values apply unless the flag is given.
    parser.add_argument("--data", help="image folder (<folder>/<class>/<image>, optionally split into train/ "
                                       "and test/) or a name: sample, animals10, cifar10")
    parser.add_argument("--model", help="ViT-Ti/16, ViT-S/16, ViT-B/16, ViT-B/32, ViT-L/16, ... (ViTConfig.named); "
                                        "with --recipe, that model as named, without the recipe's changes to it")
    parser.add_argument("--image-size", type=positive_int)
    parser.add_argument("--patch-size", type=positive_int, help="overrides the patch size of --model")
    parser.add_argument("--init", choices=INITS, help="how the weights start: official (the paper's JAX code, the "
                                                      "default unless a recipe sets it) or timm (std 0.02, as timm "
                                                      "and DeiT)")
    parser.add_argument("--drop-path", type=probability, metavar="P",
                        help="stochastic depth (DeiT's, not the paper's): in training each layer's branches are "
                             "skipped per image, the last layer's with probability P, earlier ones' less (default 0)")
    parser.add_argument("--epochs", type=positive_int, help="the length of the schedule; with --resume, "
                                                            "a longer one continues a finished run")
    parser.add_argument("--batch-size", type=positive_int, help="per process")
    parser.add_argument("--lr", type=positive_float, help="peak learning rate")
    parser.add_argument("--weight-decay", type=non_negative_float)
    parser.add_argument("--warmup-epochs", type=non_negative_float)
    parser.add_argument("--label-smoothing", type=fraction)
    parser.add_argument("--mixup", dest="mixup_alpha", type=non_negative_float, metavar="ALPHA",
                        help="MixUp on every batch with Beta(ALPHA, ALPHA) weights (0: off, the default)")
    parser.add_argument("--cutmix", dest="cutmix_alpha", type=non_negative_float, metavar="ALPHA",
                        help="CutMix on every batch (0: off); with --mixup too, each batch gets one of the two")
    parser.add_argument("--mix-probability", type=share_of_batches, metavar="P",
                        help="with --mixup or --cutmix: mix only this share of the batches, the rest trained on as "
                             "they are (default 1, every batch, as DeiT; the small-data ViT recipes mix half)")
    parser.add_argument("--augment", choices=("none", "basic", "strong", "autoaugment"),
                        help="training augmentation: none; basic (random crop and flip); strong (+ RandAugment); "
                             "autoaugment (+ AutoAugment's CIFAR-10 policy, as the published CIFAR-10 ViT recipes)")
    parser.add_argument("--augment-magnitude", type=int, metavar="M",
                        help="with --augment strong: RandAugment's strength on torchvision's scale, 0-30 (default 9, "
                             "a third of each op's range; DeiT's rand-m9 is 27)")
    parser.add_argument("--augment-fill", type=int, metavar="V",
                        help="with --augment strong or autoaugment: the grey level, 0-255, that their shears, shifts "
                             "and rotations bring in from outside the image (default 0, black, torchvision's; 128, "
                             "mid-grey, is what the published CIFAR-10 ViT runs used)")
    parser.add_argument("--random-erasing", type=fraction, metavar="P",
                        help="with --augment basic, strong or autoaugment: erase a random box (2-33%% of the area) "
                             "from this share of the training images, as torchvision's RandomErasing (default 0; "
                             "DeiT's 0.25)")
    parser.add_argument("--repeated-augmentation", type=positive_int, metavar="K",
                        help="each epoch, a K-th of the training images, each shown K times in a batch and "
                             "augmented on its own (default 1: off; DeiT's 3); the epoch keeps its length")
    parser.add_argument("--crop-scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="the random resized crops' share of the image area, e.g. 0.8 1.0 (default: the "
                             "loaders', vit_helpers.data.RANDOM_CROP_SCALE); replaces a recipe's --crop-padding")
    parser.add_argument("--crop-padding", type=non_negative_int, metavar="PIXELS",
                        help="random crops that shift the image by up to PIXELS (black comes in), e.g. 4, CIFAR's "
                             "usual, instead of random resized crops; replaces a recipe's --crop-scale")
    parser.add_argument("--cached", action=argparse.BooleanOptionalAction,
                        help="decode the images once and augment them on the device (fast on GPUs)")
    parser.add_argument("--num-workers", type=non_negative_int,
                        help="data-loading processes (default: by data-set size)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--cpu-threads", type=positive_int, help="torch threads when training on the CPU")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                        help="do not torch.compile the model (it is compiled on CUDA by default)")
    parser.add_argument("--compile-mode", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs: for small "
                                               "models, whose steps are short enough for kernel launches to matter)")
    parser.add_argument("--compile-augment", action=argparse.BooleanOptionalAction, default=None,
                        help="with --cached: run the augmentation through torch.compile (fewer, fused kernels; "
                             "nothing to compile with --augment none)")
    parser.add_argument("--recipe", help=f"a named configuration: {', '.join(RECIPES)}; flags override it")
    parser.add_argument("--eval-every", type=positive_int, metavar="N",
                        help="evaluate on the test set every N epochs (default 1), and always after the last")
    parser.add_argument("--out", required=True, help="folder for checkpoint.pt, metrics.json and the plots")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue from OUT/checkpoint.pt with the run's own settings; only "
                             f"{', '.join(flag_name(name) for name in RESUMABLE_FLAGS)} may be given anew")
    parser.add_argument("--stop-after-epoch", type=positive_int, help="end this session after that epoch of the "
                                                                      "schedule; --resume finishes it")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B/16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--compile-mode", help="torch.compile's mode (implies --compile), e.g. reduce-overhead "
                                               "(CUDA graphs) or max-autotune-no-cudagraphs")
    parser.add_argument("--compare", default="",
                        help="also measure these implementations: timm, torchvision, ours-all-tokens (ours without "
                             "skipping the last layer's unread tokens); ours comes first unless named, e.g. "
                             "timm,ours measures timm first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--modes", default="train,inference", help="train, inference or both")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also profile a few steps of each and print the ROWS operators that took the most time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", dest="json_path", help="also save the results as JSON here")


# --------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------

#: The settings only the command line sets (a recipe has no say in them), with their defaults.
COMMAND_LINE_DEFAULTS = {"patch_size": None, "init": None, "drop_path": None, "num_workers": None,
                         "device": "auto", "seed": 42, "compile": None}
#: Recipe fields that describe the recipe itself, not the run.
RECIPE_ONLY_FIELDS = ("name", "description", "on_gpu")


def run_settings(args, device_type: str) -> dict:
    """The run's settings: the recipe's fields (or the defaults), the command line's own defaults, then every flag
    that was given."""
    recipe = get_recipe(args.recipe, device_type) if args.recipe else Recipe()
    settings = {"recipe": recipe.name if args.recipe else None, **recipe_settings(recipe), **COMMAND_LINE_DEFAULTS}
    given = given_flags(args)
    if "model" in given and not same_model(given["model"], recipe.model):
        settings["model_overrides"] = {}  # the recipe's changes to its own model: --model names another one
    settings.update(one_kind_of_crop(given))  # a crop flag chooses the kind of crop, not the recipe
    return settings


def same_model(name: str, other: str) -> bool:
    """Whether two `ViTConfig.named` names name the same preset ("vit-ti" and "ViT-Ti/16" do)."""
    try:
        return ViTConfig.named(name) == ViTConfig.named(other)
    except ValueError:
        return False


def recipe_settings(recipe: Recipe) -> dict:
    return {name: value for name, value in dataclasses.asdict(recipe).items() if name not in RECIPE_ONLY_FIELDS}


def given_flags(args) -> dict:
    """The settings given as flags (every setting has its flag, named after it, but model_overrides and
    checkpoint_every, which only a recipe sets)."""
    names = set(recipe_settings(Recipe())) | set(COMMAND_LINE_DEFAULTS)
    given = {name: value for name, value in vars(args).items() if name in names and value is not None}
    if given.get("augment") in ("none", "basic"):  # as data.make_dataloaders spells them
        given["augment"] = given["augment"] == "basic"
    if "crop_scale" in given:
        given["crop_scale"] = tuple(given["crop_scale"])  # as a recipe spells it, so that --resume compares equal
    return given


def model_config(settings: dict, num_classes: int) -> ViTConfig:
    overrides = dict(settings["model_overrides"], image_size=settings["image_size"], num_classes=num_classes)
    for name in ("patch_size", "init", "drop_path"):  # flags that change the model the recipe or --model gives
        if settings.get(name) is not None:
            overrides[name] = settings[name]
    return ViTConfig.named(settings["model"], **overrides)


def train_config(settings: dict) -> training.TrainConfig:
    return training.TrainConfig.from_settings(settings)


def resumed_settings(args, checkpoint_path: Path) -> tuple[dict, dict]:
    """The settings of the run being resumed, with the flags that may change (RESUMABLE_FLAGS) applied, and what
    its checkpoint says of its data: class_names, steps_per_epoch, world_size (None where not recorded)."""
    if not checkpoint_path.is_file():
        raise UsageError(f"--resume: no checkpoint at {checkpoint_path}; drop --resume to start a new run.")
    checkpoint = training.load_checkpoint(checkpoint_path)
    settings = checkpoint.get("metadata", {}).get("settings")
    if settings is None:
        raise UsageError(f"--resume: {checkpoint_path} was not written by `python -m vit_helpers train`.")
    # A setting added to the program after this run was written takes its default: what that run did.
    settings = {**recipe_settings(Recipe()), **COMMAND_LINE_DEFAULTS, **settings}
    given = given_flags(args)
    if args.recipe:
        given["recipe"] = get_recipe(args.recipe).name  # as run_settings records it: --recipe Demo is demo
    fixed = {name: value for name, value in given.items() if name not in RESUMABLE_FLAGS
             and value != settings.get(name)}
    if fixed:
        listed = ", ".join(flag_name(name) for name in fixed)
        raise UsageError(f"--resume continues the run as it was set up; {listed} cannot change (only "
                         f"{', '.join(flag_name(name) for name in RESUMABLE_FLAGS)} can). Use a new --out.")
    settings = dict(settings, **{name: given[name] for name in RESUMABLE_FLAGS if name in given})
    if settings["epochs"] < checkpoint["epoch"]:
        raise UsageError(f"--resume: this run has completed {checkpoint['epoch']} epochs already, more than "
                         f"--epochs {settings['epochs']}; give --epochs {checkpoint['epoch'] + 1} or more to train on.")
    if args.stop_after_epoch is not None and args.stop_after_epoch <= checkpoint["epoch"]:
        raise UsageError(f"--resume: this run has completed {checkpoint['epoch']} epochs already, so "
                         f"--stop-after-epoch {args.stop_after_epoch} is past; give a later epoch, or drop it.")
    run = {key: checkpoint.get(key) for key in ("class_names", "steps_per_epoch", "world_size")}
    metadata = checkpoint.get("metadata", {})
    return settings, dict(run, images=metadata.get("images"), image_files=metadata.get("image_files"))


def image_counts(train_loader, test_loader) -> dict[str, int]:
    """How many images the run's training and test splits hold (every process's, together)."""
    return {"train": len(train_loader.dataset), "test": len(test_loader.dataset)}


def image_files(train_loader, test_loader) -> dict[str, str] | None:
    """A digest of each split's file names, in order (`VerifiedImageFolder.files`: relative to the data folder, so a
    folder moved elsewhere gives the same), or None where a loader's data set does not list them."""
    splits = {"train": train_loader.dataset, "test": test_loader.dataset}
    if any(getattr(dataset, "files", None) is None for dataset in splits.values()):
        return None
    return {split: hashlib.sha256("\n".join(dataset.files).encode()).hexdigest() for split, dataset in splits.items()}


def check_same_run_data(run: dict | None, class_names, train_loader, test_loader, settings: dict) -> None:
    """--resume: the data must have the classes the run was trained on, in the same order; as many training and
    test images, with the same names (a folder split by `data.stratified_split` splits anew when an image is added,
    removed or renamed, and test images would then be trained on); and give as many steps per epoch
    (`training.fit` refuses otherwise: its schedule counts steps)."""
    if run is None:
        return
    run_class_names, data = run["class_names"], settings["data"]
    if run_class_names is not None and list(class_names) != list(run_class_names):
        def listed(names):
            return ", ".join(names[:5]) + (f", ... ({len(names)} classes)" if len(names) > 5 else "")

        raise UsageError(f"--resume: --data {data} has the classes {listed(list(class_names))}, but this run was "
                         f"trained on {listed(list(run_class_names))}; give the run's data, or start a new run "
                         f"with a new --out.")
    counts, files = image_counts(train_loader, test_loader), image_files(train_loader, test_loader)
    if run["images"] is not None and run["images"] != counts:
        raise UsageError(f"--resume: --data {data} holds {counts['train']} training and {counts['test']} test images, "
                         f"but this run had {run['images']['train']} and {run['images']['test']}: images were added or "
                         f"removed, and the split would not be the run's (test images could be trained on). Give the "
                         f"run's data, or start a new run with a new --out.")
    if run.get("image_files") is not None and files is not None and run["image_files"] != files:
        changed = " and ".join(split for split in files if files[split] != run["image_files"][split])
        raise UsageError(f"--resume: the {changed} images of --data {data} are not the files this run had (some "
                         f"renamed, replaced by others, or moved to another class), so the split would not be the "
                         f"run's (test images could be trained on). Give the run's data, or start a new run with a "
                         f"new --out.")
    steps, processes = run["steps_per_epoch"], run["world_size"]
    if steps is not None and steps != len(train_loader):
        world_size = training.distributed_info()[1]
        raise UsageError(f"--resume: this run took {steps} steps per epoch"
                         + (f" on {processes} process{'es' * (processes != 1)}" if processes else "")
                         + f", and with --data {data} on {world_size} process{'es' * (world_size != 1)} it would take "
                         f"{len(train_loader)}; resume with the run's data and number of processes (torchrun "
                         f"--nproc_per_node), or start a new run with a new --out.")


def check_out_folder(out: Path) -> None:
    """OUT must be a folder, or a path where one can be made."""
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder; choose another --out.")


def build_loaders(settings: dict, device: torch.device):
    from vit_helpers import data

    if settings["data"] is None:
        raise UsageError("--data is required: an image folder, or sample, animals10, cifar10.")
    if settings["cached"]:
        from vit_helpers.gpu_data import make_cached_loaders

        return make_cached_loaders(settings["data"], image_size=settings["image_size"],
                                   batch_size=settings["batch_size"], device=device, seed=settings["seed"],
                                   augment=settings["augment"], crop_scale=settings["crop_scale"],
                                   crop_padding=settings["crop_padding"],
                                   augment_magnitude=settings["augment_magnitude"],
                                   augment_fill=settings["augment_fill"],
                                   random_erasing=settings["random_erasing"],
                                   repeated_augmentation=settings["repeated_augmentation"],
                                   compile_augment=settings["compile_augment"])
    return data.make_dataloaders(settings["data"], image_size=settings["image_size"],
                                 batch_size=settings["batch_size"], seed=settings["seed"],
                                 num_workers=settings["num_workers"], augment=settings["augment"],
                                 crop_scale=settings["crop_scale"], crop_padding=settings["crop_padding"],
                                 augment_magnitude=settings["augment_magnitude"],
                                 augment_fill=settings["augment_fill"],
                                 random_erasing=settings["random_erasing"],
                                 repeated_augmentation=settings["repeated_augmentation"])


def prepare_run(args):
    """Everything before training, where any failure is a usage error: settings, device, data, model."""
    from vit_helpers.data import _augment_policy, check_augmentation
    from vit_helpers.datasets import DatasetError

    out = Path(args.out)
    check_out_folder(out)
    run = None  # with --resume: what the checkpoint says of the run's data
    try:
        if args.resume:
            settings, run = resumed_settings(args, out / "checkpoint.pt")
        else:
            settings = run_settings(args, training.resolve_device(args.device or "auto").type)
        model_config(settings, num_classes=2)  # checks the model name and sizes before the data is read
        if args.mix_probability is not None and not (settings["mixup_alpha"] or settings["cutmix_alpha"]):
            # before TrainConfig's own refusal, which names its fields, not the flags
            raise ValueError("--mix-probability sets the share of batches that MixUp or CutMix mixes, and this run "
                             "mixes none: add --mixup 0.8 and/or --cutmix 1.0, or drop --mix-probability.")
        train_config(settings)  # and the optimisation settings
        # The flags that a run's augmentation would ignore, by their flag names, before the shared checks' own
        # messages (which name the settings)
        policy = _augment_policy(settings["augment"])
        if args.augment_magnitude is not None and policy != "strong":
            raise ValueError("--augment-magnitude sets RandAugment's strength, and this run does not use RandAugment: "
                             "add --augment strong, or drop --augment-magnitude.")
        if args.augment_fill is not None and policy not in ("strong", "autoaugment"):
            raise ValueError("--augment-fill sets what RandAugment's and AutoAugment's shears, shifts and rotations "
                             "bring in, and this run uses neither: add --augment strong or autoaugment, or drop "
                             "--augment-fill.")
        if settings["random_erasing"] and policy == "none":
            raise ValueError("--random-erasing erases boxes from augmented training images, and this run does not "
                             "augment them: add --augment basic, strong or autoaugment, or drop --random-erasing.")
        check_augmentation(settings["augment"], settings["crop_scale"], settings["crop_padding"],
                           settings["augment_magnitude"], settings["random_erasing"], settings["augment_fill"],
                           settings["repeated_augmentation"])
        if settings["compile_augment"] and not settings["cached"]:
            raise ValueError("--compile-augment compiles the cached loaders' augmentation, and this run does not "
                             "use them: add --cached (a new run) or --no-compile-augment.")
        device = training.init_distributed(settings["device"])
        if device.type == "cpu" and settings.get("cpu_threads"):
            torch.set_num_threads(settings["cpu_threads"])
        train_loader, test_loader, class_names = build_loaders(settings, device)
        if not settings["cached"]:
            settings["num_workers"] = train_loader.num_workers  # chosen for this machine when not given
    except (ValueError, TypeError, FileNotFoundError, DatasetError) as error:
        raise UsageError(one_line(error)) from None
    check_same_run_data(run, class_names, train_loader, test_loader, settings)
    torch.manual_seed(settings["seed"])
    model = ViT(model_config(settings, num_classes=len(class_names)))
    return settings, device, train_loader, test_loader, class_names, model


def train(args) -> int:
    threads = torch.get_num_threads()
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)  # a recipe's cpu_threads must not outlive an in-process call


def _train(args) -> int:
    try:
        return _prepared_train(args, *prepare_run(args))
    except BaseException:
        training.cleanup_distributed(wait=False)  # NCCL warns about a process group never destroyed
        raise


def _prepared_train(args, settings, device, train_loader, test_loader, class_names, model) -> int:
    rank, world_size = training.distributed_info()
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            remove_earlier_results(out)
        print(f"training {settings['model']} ({model.num_parameters() / 1e6:.2f}M parameters, "
              f"{model.config.image_size}px, patch {model.config.patch_size}) on {settings['data']} "
              f"({len(class_names)} classes) on {device}"
              + (f" x {world_size} processes" if world_size > 1 else "")
              + (f", recipe {settings['recipe']}" if settings["recipe"] else ""), flush=True)
    started = time.perf_counter()
    history = training.fit(model, train_loader, test_loader, config=train_config(settings),
                           class_names=class_names, checkpoint_path=out / "checkpoint.pt", resume=args.resume,
                           stop_after_epoch=args.stop_after_epoch,
                           metadata={"settings": settings, "images": image_counts(train_loader, test_loader),
                                     "image_files": image_files(train_loader, test_loader)})
    probabilities, labels = training.predict(model, test_loader, device)
    if rank == 0:
        write_results(out, settings, model, history, class_names, probabilities, labels, test_loader,
                      world_size, time.perf_counter() - started)
    training.cleanup_distributed()
    return 0


def remove_earlier_results(out: Path) -> None:
    """A new run in a folder that holds another one: that run's metrics and plots go at once, so that none of
    them passes for this run's if it stops early. Its checkpoint stays until this run writes its own."""
    if (out / "checkpoint.pt").is_file():
        print(f"{out} holds an earlier run: this new run replaces it (--resume would have continued it)")
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)


def write_results(out: Path, settings, model, history, class_names, probabilities, labels, test_loader,
                  world_size: int, seconds: float) -> None:
    from vit_helpers.bench import measure_matmul_ceiling
    from vit_helpers.data import denormalize, spread_examples

    matrix = training.confusion_matrix(probabilities.argmax(dim=-1), labels, len(class_names))
    steady = [record["images_per_second"] for record in history[1:]] or [history[-1]["images_per_second"]]
    device = next(model.parameters()).device
    # MFU, as `bench` and notebook 07 report it: the model's arithmetic per second (what ViT.forward computes,
    # forward and backward) over a large matrix product's, measured now on this process's device (rank 0's under
    # DDP, counted once for each process).
    training_flops = statistics.median(steady) * model.config.executed_training_flops()
    matmul_flops = measure_matmul_ceiling(device) * world_size
    metrics = {
        "test_accuracy": history[-1]["test_accuracy"],
        "test_loss": history[-1]["test_loss"],
        "best_test_accuracy": max(record["test_accuracy"] for record in training.evaluated(history)),
        "epochs_completed": history[-1]["epoch"],
        "images_per_second": statistics.median(steady),  # training, all processes, after the first epoch
        "training_flops_per_second": training_flops,
        "matmul_flops_per_second": matmul_flops,  # the ceiling: bench.measure_matmul_ceiling, x world_size
        "mfu": training_flops / matmul_flops,
        "world_size": world_size,
        "device": str(device),
        "wall_time_seconds": seconds,
        "num_parameters": model.num_parameters(),
        "model": settings["model"],
        "model_config": dataclasses.asdict(model.config),
        "train_config": train_config(settings).to_dict(),
        "settings": settings,
        "class_names": list(class_names),
        "confusion_matrix": matrix.tolist(),
        "history": history,
    }
    with atomic_write(out / "metrics.json", "w") as file:
        json.dump(metrics, file, indent=2)
    figures = {"loss_curves.png": plots.plot_history(history),
               "confusion_matrix.png": plots.plot_confusion_matrix(matrix, class_names)}
    # Under DDP a cached test loader holds this process's share: the examples come from the whole test set.
    whole = test_loader.whole() if hasattr(test_loader, "whole") else test_loader
    _, images, example_labels = spread_examples(whole, count=16)
    model.eval()
    with torch.no_grad():
        example_probabilities = model(images.to(device)).float().softmax(dim=-1).cpu()
    figures["predictions.png"] = plots.plot_predictions(images, example_probabilities, class_names,
                                                        example_labels, denormalize=denormalize)
    for name, figure in figures.items():
        with atomic_write(out / name) as file:
            figure.savefig(file, format="png", dpi=110, bbox_inches="tight")  # as notebooks show them: no label cut off
    print(f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs_completed']} epochs "
          f"({seconds:.0f} s, {metrics['images_per_second']:.0f} img/s, {training_flops / 1e12:.3g} TFLOP/s: "
          f"MFU {metrics['mfu']:.1%} of a measured matrix product's)")
    print(f"metrics:    {out / 'metrics.json'}\ncheckpoint: {out / 'checkpoint.pt'}\n"
          f"plots:      {', '.join(str(out / name) for name in figures)}")


# --------------------------------------------------------------------------------------------------------------
# download, bench
# --------------------------------------------------------------------------------------------------------------

def download(args) -> int:
    from vit_helpers import datasets

    try:
        if args.dataset == "animals10":
            # quiet: the one line below replaces the table of counts; kaggle's progress bar still shows.
            folder = datasets.download_animals10(args.dest or datasets.DATA_ROOT / "animals10", force=args.force,
                                                 quiet=True, progress=True)
        else:
            folder = datasets.download_dataset(args.dataset, args.dest, force=args.force)
    except datasets.DatasetError as error:
        print(f"download {args.dataset}: {one_line(error)}", file=sys.stderr)
        return 1
    counts = datasets.count_images(folder)
    if (Path(folder) / "train").is_dir():
        counts = {split: sum(datasets.count_images(Path(folder) / split).values()) for split in ("train", "test")}
    listed = ", ".join(f"{name} {count:,}" for name, count in counts.items())
    print(f"{args.dataset} is ready in {folder}: {sum(counts.values()):,} images ({listed})")
    return 0


def bench(args) -> int:
    from vit_helpers import bench as benchmark

    try:
        results, context = benchmark.run_bench(
            args.model, args.batch_size, image_size=args.image_size, patch_size=args.patch_size,
            num_classes=args.num_classes, compare=benchmark.parse_names(args.compare), steps=args.steps,
            warmup_steps=args.warmup_steps, modes=benchmark.parse_modes(args.modes), device=args.device,
            compile=args.compile or args.compile_mode is not None, compile_mode=args.compile_mode,
            profile_rows=args.profile)
    except ValueError as error:
        raise UsageError(one_line(error)) from None
    print(benchmark.format_table(results, context))
    if args.profile:
        print(benchmark.format_profiles(results))
    if args.json_path:
        benchmark.save_json(results, context, args.json_path)
        print(f"saved {args.json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    prefix = parser.prog
    try:
        args = parser.parse_args(argv)
        prefix = f"{parser.prog} {args.command}"
        return {"train": train, "download": download, "bench": bench}[args.command](args)
    except UsageError as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return 2
    except training.NonFiniteLossError as error:
        if _first_process():  # every process stops at the same step, for the same reason: say it once
            print(f"{prefix}: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        if _first_process():
            detail = f" ({interrupt})" if str(interrupt) else ""
            print(f"\ninterrupted{detail}; run the same command with --resume to continue.", file=sys.stderr)
        return 130


def _first_process() -> bool:
    """Rank 0, or the only process. From torchrun's RANK, which holds also after the process group is left."""
    return int(os.environ.get("RANK", "0")) == 0
