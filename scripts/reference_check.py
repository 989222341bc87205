"""Does our engine train a ViT as well as the plain way? The same small ViT, data and schedule, four ways:

    ours                 our ViT (the official initialisation), `make_cached_loaders` (decoded once, augmented
                         as tensors) and `training.fit`
    ours-timm-init       the same with ViTConfig(init="timm"): our ViT started as timm starts its own
    ours-from-reference  the same, started from the reference's very first weights (converted): only the engine
                         differs from the reference
    reference            timm's VisionTransformer, torchvision's transforms on the image files through a
                         DataLoader, and a plain AdamW loop written here (the same parameter groups, warm-up and
                         cosine, label smoothing, gradient clipping)

    python scripts/reference_check.py --cifar-archive ../shared/data/cifar10-jpeg.tar.gz   # 1,000 + 500 per class
    python scripts/reference_check.py --data FOLDER --runs ours,reference --epochs 12 --seed 1
    python scripts/reference_check.py --smoke                                               # seconds, a tiny tree
    python3 scripts/reference_check.py --cifar-archive .bench_data/cifar10-jpeg.tar.gz --per-class 5000 1000 \
        --device cuda --workers 12 --runs ours-from-reference,reference --epochs 40          # the full set, a GPU

Augmentation: CIFAR's shifted crops (4 pixels) and flips. Each run prints its accuracies after every epoch, and a
table at the end; --json saves the histories. On 2 CPU cores a run of the default size takes about 13 minutes. On a
GPU (--device cuda) every run trains in float32 (TF32 matrix products, which our engine turns on there) and
uncompiled, ours as the plain loop does, so that only the engine differs: a check at full size of whether our engine
holds a long run back, not a measure of its speed.
What it measured is in BENCHMARKS.md ("Which initialisation").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_checks import unpack_cifar_jpegs  # noqa: E402
from vit_helpers.data import NORMALIZE_MEAN, NORMALIZE_STD  # noqa: E402
from vit_helpers.files import atomic_write  # noqa: E402
from vit_helpers.gpu_data import make_cached_loaders  # noqa: E402
from vit_helpers.model import ViT, ViTConfig  # noqa: E402
from vit_helpers.training import TrainConfig, fit  # noqa: E402
from vit_helpers.weights import vit_from_timm  # noqa: E402

RUNS = ("ours", "ours-timm-init", "ours-from-reference", "reference")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a folder with train/<class>/ and test/<class>/ image files")
    parser.add_argument("--cifar-archive", type=Path, help="or the CIFAR-10 JPEG archive, unpacked into --work-dir")
    parser.add_argument("--per-class", type=int, nargs=2, default=(1000, 500), metavar=("TRAIN", "TEST"),
                        help="images per class unpacked from the archive (default 1000 500)")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".bench_data", help="default .bench_data/")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--model", type=int, nargs=4, default=(192, 6, 3, 384),
                        metavar=("DIM", "LAYERS", "HEADS", "MLP_DIM"), help="the ViT, 4x4 patches (default a "
                        "6-layer ViT-Ti: 192 6 3 384)")
    parser.add_argument("--seed", type=int, default=0, help="the weights' seed; the data order's is 42 + seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every run trains")
    parser.add_argument("--workers", type=int, default=0,
                        help="the reference's DataLoader processes, which decode and augment the files (default 0)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 2 epochs, on a tree of 8 + 4 images a "
                        "class made here: tests the script")
    parser.add_argument("--json", type=Path, help="save the histories here")
    args = parser.parse_args(argv)
    args.runs = [run.strip() for run in args.runs.split(",") if run.strip()]
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown or not args.runs:
        parser.error(f"--runs: unknown run(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(RUNS)}")
    if not args.smoke and (args.data is None) == (args.cifar_archive is None):
        parser.error("give the images: --data FOLDER or --cifar-archive PATH (or --smoke)")
    if args.smoke:
        args.model, args.epochs, args.batch_size = (16, 1, 2, 32), 2, 8
    return args


def smoke_tree(folder: Path) -> Path:
    """folder/{train,test}/<class>/ with 8 and 4 random 32x32 JPEGs of each of 10 classes."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("test", 4)):
        for label in range(10):
            (folder / split / f"class{label}").mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / split / f"class{label}" / f"{index}.jpg")
    return folder


def timm_vit(args) -> nn.Module:
    """timm's VisionTransformer of the chosen size, with timm's own initialisation, drawn from the seed."""
    from timm.models.vision_transformer import VisionTransformer

    dim, layers, heads, mlp_dim = args.model
    torch.manual_seed(args.seed)
    return VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=dim, depth=layers,
                             num_heads=heads, mlp_ratio=mlp_dim / dim, class_token=True, global_pool="token")


def train_ours(args, folder: Path, run: str) -> list[dict]:
    train_loader, test_loader, classes = make_cached_loaders(
        folder, image_size=32, batch_size=args.batch_size, device=args.device, augment="basic", crop_padding=4,
        seed=42 + args.seed, cache_dir=args.work_dir / "reference_check_cache")
    dim, layers, heads, mlp_dim = args.model
    torch.manual_seed(args.seed)
    model = vit_from_timm(timm_vit(args)) if run == "ours-from-reference" else ViT(ViTConfig.named(
        "ViT-Ti/4", embed_dim=dim, num_layers=layers, num_heads=heads, mlp_dim=mlp_dim, image_size=32,
        num_classes=len(classes), init="timm" if run == "ours-timm-init" else "official"))
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_epochs=1, label_smoothing=0.1, clip_norm=1.0, device=args.device, compile=False,
                         amp=False, seed=42 + args.seed)  # float32, uncompiled: as the reference's loop
    return fit(model, train_loader, test_loader, config=config, class_names=classes)  # a bar, a line per epoch


def train_reference(args, folder: Path) -> list[dict]:
    """The plain way, written out: nothing from vit_helpers but the normalisation's constants. As in most
    tutorials, the shuffling, crops and flips draw from PyTorch's global generator (after the model is drawn)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    normalise = T.Normalize(NORMALIZE_MEAN, NORMALIZE_STD)
    train_set = ImageFolder(folder / "train", T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                                         T.ToTensor(), normalise]))
    test_set = ImageFolder(folder / "test", T.Compose([T.ToTensor(), normalise]))
    loading = dict(num_workers=args.workers, pin_memory=args.device != "cpu")
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True, **loading)
    test_loader = torch.utils.data.DataLoader(test_set, 500, **loading)
    model = timm_vit(args).to(args.device)
    # No weight decay on LayerNorms, biases, the class token and the position embeddings, as DeiT and timm
    decays = {name: parameter.ndim > 1 and name not in ("cls_token", "pos_embed")
              for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if decays[n]], "weight_decay": args.weight_decay},
         {"params": [p for n, p in model.named_parameters() if not decays[n]], "weight_decay": 0.0}], lr=args.lr)
    warmup, steps = len(train_loader), args.epochs * len(train_loader)  # one epoch of linear warm-up, then cosine
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup
                                                  else 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                                                           / max(1, steps - warmup))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    history = []
    for epoch in range(args.epochs):
        started, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(args.device, non_blocking=True), labels.to(args.device, non_blocking=True)
            logits = model(images)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            seen, correct = seen + len(labels), correct + (logits.argmax(1) == labels).sum().item()
            loss_sum += loss.item() * len(labels)
        model.eval()
        test_seen = test_correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                test_seen, test_correct = test_seen + len(labels), test_correct + (
                    model(images.to(args.device)).argmax(1).cpu() == labels).sum().item()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "test_accuracy": test_correct / test_seen, "seconds": time.perf_counter() - started})
        print(f"  epoch {epoch + 1}: test accuracy {history[-1]['test_accuracy']:.4f}", flush=True)
    return history


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":  # what `fit` sets there, for the reference's loop too
        torch.set_float32_matmul_precision("high")
    if args.smoke:
        folder = smoke_tree(args.work_dir / "reference_check_smoke")
    elif args.data is not None:
        folder = args.data
    else:
        train, test = args.per_class
        folder = unpack_cifar_jpegs(args.cifar_archive, args.work_dir / f"cifar10-jpeg-{train}-{test}", train, test)
    results = {"settings": {key: str(value) if isinstance(value, Path) else value
                            for key, value in vars(args).items()}, "runs": {}}
    for run in args.runs:
        print(f"{run}:", flush=True)
        started = time.perf_counter()
        history = train_reference(args, folder) if run == "reference" else train_ours(args, folder, run)
        results["runs"][run] = {"history": history, "minutes": (time.perf_counter() - started) / 60}
        if args.json:
            with atomic_write(args.json, "w") as file:
                json.dump(results, file, indent=1)
    print(f"\n{'run':<21}{'final test accuracy':>20}{'best':>8}{'minutes':>9}")
    for run, result in results["runs"].items():
        accuracies = [record["test_accuracy"] for record in result["history"]]
        print(f"{run:<21}{accuracies[-1]:>20.4f}{max(accuracies):>8.4f}{result['minutes']:>9.1f}")
    return results


if __name__ == "__main__":
    main()
