"""Training: `fit(model, train_loader, test_loader, epochs)` with the recipe of the paper's Appendix B.1.

What the paper does, and what we keep:
- "We train all models ... using Adam with beta_1 = 0.9, beta_2 = 0.999, ... a high weight decay of 0.1":
  AdamW here, with no decay on LayerNorm weights, biases, the class token and the position embeddings
  (`parameter_groups`), as timm and DeiT do.
- "linear learning rate warmup and decay": linear warm-up, then cosine decay to zero, stepped every batch
  (`build_scheduler`, a `LambdaLR`).
- "global gradient clipping at norm 1": `clip_norm=1.0`.
- Label smoothing (from DeiT, not the paper) helps when the data set is small; so can MixUp and CutMix
  (torchvision's, applied to whole batches on the device: `mixup_alpha`, `cutmix_alpha`, to a share
  `mix_probability` of the batches).

Speed habits, each switched on by default on CUDA: bf16 autocast, fused AdamW, TF32 matmuls, `torch.compile`,
`non_blocking` copies from pinned memory, and no host-device synchronisation per step (loss and accuracy add up
on the device and are read every `log_every` steps for the progress bar).

Checkpoints are written atomically every `checkpoint_every` epochs (1 by default) and wherever a session stops;
`resume=True` continues exactly, because every epoch's randomness is seeded from (seed, rank, epoch). It needs the
same steps per epoch (data, batch size, number of processes), and refuses a checkpoint that took other ones.
The same `fit` runs on many GPUs or nodes under `torchrun` (DistributedDataParallel; `init_distributed` joins
the process group).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset
from tqdm import tqdm

from vit_helpers.files import atomic_write


class NonFiniteLossError(RuntimeError):
    """The training loss, the gradients or the weights became NaN or infinite; training stopped and the last good
    checkpoint was kept (no checkpoint is ever written with non-finite weights)."""


def compile_modes() -> list[str]:
    """The modes this torch's `torch.compile` takes (imports its compiler, a few seconds: only when a mode is set)."""
    import torch._inductor

    return list(torch._inductor.list_mode_options())


@dataclass
class TrainConfig:
    """Every knob of a training run. The defaults are a sound start for a small ViT trained from scratch."""

    epochs: int = 10
    batch_size: int = 64  # per process; `fit` takes it from the loaders, the CLI builds them with it
    lr: float = 1e-3  # peak learning rate, reached at the end of the warm-up
    weight_decay: float = 0.05  # AdamW's decoupled weight decay (paper: 0.1 for pre-training)
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # if set, overrides warmup_epochs
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # > 0: MixUp (Zhang et al. 2018), each batch blended with itself rolled by one
    cutmix_alpha: float = 0.0  # > 0: CutMix (Yun et al. 2019); with both > 0 each batch gets one of the two
    # The share of batches mixed, the rest trained on as they are: DeiT and timm mix every batch (1.0); the
    # small-data ViT recipes (e.g. Lee et al. 2021, "Vision Transformer for Small-Size Datasets") half of them.
    mix_probability: float = 1.0
    clip_norm: float | None = 1.0  # global gradient norm clipping, Appendix B.1
    betas: tuple[float, float] = (0.9, 0.999)
    amp: bool = True  # bf16 autocast on CUDA (never on the CPU, where it is slower)
    compile: bool | None = None  # torch.compile; None means on CUDA only
    compile_mode: str | None = None  # e.g. "max-autotune-no-cudagraphs"
    seed: int = 42
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    log_every: int = 25  # steps between progress-bar updates (each one synchronises with the GPU)
    # Epochs between evaluations on the test set. The schedule's last epoch, and the last one of a session that
    # stops early, are always evaluated; the other epochs' records have test_loss and test_accuracy None. Where an
    # epoch takes a second (a small model, CIFAR-10), evaluating after each one costs several per cent of the run.
    eval_every: int = 1
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch of a session is always saved

    def __post_init__(self) -> None:
        for name, what in (("eval_every", "epochs between evaluations"), ("checkpoint_every", "epochs between "
                           "checkpoints"), ("log_every", "steps between progress-bar updates")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} is the number of {what}, a whole number of at least 1, got {value!r}.")
        if not all(math.isfinite(alpha) and alpha >= 0 for alpha in (self.mixup_alpha, self.cutmix_alpha)):
            raise ValueError(f"mixup_alpha and cutmix_alpha must be 0 (off) or positive, got {self.mixup_alpha} "
                             f"and {self.cutmix_alpha}.")
        if self.compile_mode is not None and self.compile_mode not in compile_modes():
            raise ValueError(f"compile_mode {self.compile_mode!r} is not one of torch.compile's modes: "
                             f"{', '.join(compile_modes())}.")
        if not 0 < self.mix_probability <= 1:
            raise ValueError(f"mix_probability is the share of batches mixed, above 0 and at most 1, got "
                             f"{self.mix_probability}; turn mixing off with mixup_alpha and cutmix_alpha 0.")
        if self.mix_probability != 1 and self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError(f"mix_probability {self.mix_probability} is the share of batches that MixUp or CutMix "
                             f"mixes, and mixing is off (mixup_alpha and cutmix_alpha are 0): set one of them "
                             f"(e.g. cutmix_alpha 1.0), or leave mix_probability at 1.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "TrainConfig":
        """The TrainConfig of a run described by `settings` (a recipe's fields, the CLI's settings): the entries
        named like a TrainConfig field are taken, every other entry (model, data, ...) is not this config's."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in settings.items() if name in names})


# --------------------------------------------------------------------------------------------------------------
# Devices and processes
# --------------------------------------------------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> this process's GPU if there is one, else the CPU. Raises ValueError for an unusable device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU "
                             f"(torch.cuda.is_available() is False); use --device cpu or auto.")
        index = local_rank if name == "cuda" else int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} asked for, but only {torch.cuda.device_count()} GPU(s) exist.")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N.")


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when launched by `torchrun` (it sets RANK, WORLD_SIZE and LOCAL_RANK).

    NCCL between GPUs, gloo on the CPU. Returns this process's device (cuda:LOCAL_RANK on GPUs). Without
    torchrun it only resolves the device. Call it before building the data loaders: their DistributedSampler
    reads the world size from the process group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (device or "").strip().lower().startswith("cuda:"):
        # Every process would take that one GPU, and NCCL would fail at the first all-reduce.
        raise ValueError(f"device {device!r} under torchrun would put every process on one GPU: give cuda or auto, "
                         f"and each process takes GPU LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES).")
    resolved = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
            dist.init_process_group("nccl", device_id=resolved)
        else:
            dist.init_process_group("gloo")
    return resolved


def distributed_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return distributed_info()[0] == 0


def cleanup_distributed(wait: bool = True) -> None:
    """Leave the process group. `wait`: first let every process (rank 0 writing its files) finish; pass False
    on the way out of an error, when other processes may be gone already and a barrier would never return."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        # A DistributedDataParallel wrapper left in a reference cycle holds the process group; collected only at
        # exit, it can take the group's threads down while the interpreter is finalising (gloo then aborts).
        gc.collect()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(seed % 2**32)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one epoch on one process: a function of (seed, rank, epoch) alone, so a resumed run draws
    the same augmentations and shuffles as an uninterrupted one, and every rank draws different ones."""
    digest = hashlib.sha256(f"{seed}/{rank}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _enable_fast_math(device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 matmuls for whatever runs in float32 (bf16 autocast covers the rest): ~8x faster, 10-bit mantissa.
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside `torch.compile` (`_orig_mod`) and DistributedDataParallel (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


# --------------------------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule
# --------------------------------------------------------------------------------------------------------------

NO_WEIGHT_DECAY_NAMES = ("cls_token", "pos_embed")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weights of Linear and Conv layers decay; LayerNorm weights, biases (every 1-D tensor),
    the class token and the position embeddings do not (shrinking them towards zero only hurts)."""
    skip = set(NO_WEIGHT_DECAY_NAMES) | set(getattr(model, "no_weight_decay", lambda: ())())  # timm's convention
    decay, no_decay = {"params": [], "names": []}, {"params": [], "names": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        group = no_decay if parameter.ndim <= 1 or name in skip or name.split(".")[-1] in skip else decay
        group["params"].append(parameter)
        group["names"].append(name)
    return [dict(decay, weight_decay=weight_decay), dict(no_decay, weight_decay=0.0)]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`; the fused CUDA kernel updates every parameter in one launch."""
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                             fused=device.type == "cuda")


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear from 1/(warmup+1) up to 1 at step `warmup_steps`, then a
    half cosine down to 0 at step `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine decay, stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))


def count_warmup_steps(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    steps = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * steps_per_epoch)
    return max(0, min(steps, total_steps - 1))


# --------------------------------------------------------------------------------------------------------------
# One epoch of training, one pass of evaluation
# --------------------------------------------------------------------------------------------------------------

@dataclass
class EpochTally:
    """Running sums of one epoch. Loss and correct stay on the device so that adding to them never waits."""

    step: int = 0
    count: int = 0
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    seconds: float = 0.0
    # The sum of the steps' gradient norms: NaN or infinite once any step's was, when the optimizer wrote
    # non-finite weights even where the loss itself was finite (an overflow in the backward pass). One addition per
    # step; identical on every process under DDP.
    gradient_norm_sum: torch.Tensor | float = 0.0

    def totals(self, distributed: bool) -> tuple[float, float, int]:
        """(loss_sum, correct, count), summed over every process. Reading them synchronises with the GPU."""
        device = self.loss_sum.device if isinstance(self.loss_sum, torch.Tensor) else torch.device("cpu")
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                              for v in (self.loss_sum, self.correct, self.count)])
        if distributed:
            dist.all_reduce(values)
        loss_sum, correct, count = values.tolist()
        return loss_sum, correct, int(count)


class GracefulStop:
    """Ctrl-C sets a flag that the training loop reads after each step, so the step in progress finishes and a
    consistent checkpoint can be written. A second Ctrl-C interrupts at once. Only in a single process."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "GracefulStop":
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


def _set_epoch(loader, epoch: int, seed: int) -> None:
    """Tell a loader (a GPU-cached one) or its DistributedSampler which epoch it is: the order depends on it.
    DataLoader workers draw their random seeds from the loader's generator: reseed it from the epoch too."""
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None),
                                                                      "sampler", None)):
        if owner is not None and hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
            return


def batch_mixer(config: TrainConfig, num_classes: int | None) -> Callable | None:
    """torchvision's MixUp and/or CutMix for whole batches, on the batch's own device; None when both alphas
    are 0. Called as `images, targets = mixer(images, labels)`: for a mixed batch the targets become
    (batch, num_classes) probabilities, which CrossEntropyLoss takes as they are (label smoothing included); with
    `mix_probability` below 1 the other batches come back as they were, class indices and all.
    The mixing weights and the choice of batches come from the global torch RNG, which `fit` reseeds every epoch:
    resuming stays exact."""
    if config.mixup_alpha == 0 and config.cutmix_alpha == 0:
        return None
    if not num_classes:
        raise ValueError("MixUp and CutMix need the number of classes: pass class_names to fit.")
    from torchvision.transforms import v2

    mixers = []
    if config.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    mixer = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
    return mixer if config.mix_probability == 1 else v2.RandomApply([mixer], p=config.mix_probability)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    # non_blocking overlaps the copy from pinned memory with compute; a no-op for tensors already there.
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss_fn: nn.Module, device: torch.device,
                    config: TrainConfig, epoch: int = 0, tally: EpochTally | None = None,
                    stop: GracefulStop | None = None, progress: bool = True,
                    mixer: Callable | None = None) -> EpochTally:
    """One pass over `loader`. Returns the epoch's tally; `tally.step < len(loader)` means it was stopped early.

    `mixer` (`batch_mixer`) mixes each batch before the step; training accuracy still counts each image's own
    label, the one it had before mixing.

    A `tally` carried over from an interrupted epoch resumes it: the batches it already trained on are read
    again (so the data order and augmentations continue as they were) but skipped.
    """
    rank, world_size = distributed_info()
    tally = tally or EpochTally()
    skip = tally.step
    tally.loss_sum = torch.as_tensor(tally.loss_sum, dtype=torch.float32, device=device)
    tally.correct = torch.as_tensor(tally.correct, dtype=torch.int64, device=device)
    tally.gradient_norm_sum = torch.as_tensor(tally.gradient_norm_sum, dtype=torch.float32, device=device)
    model.train()
    bar = tqdm(total=len(loader), initial=skip, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not progress or rank != 0, dynamic_ncols=True)
    started = time.perf_counter() - tally.seconds
    try:
        for index, (images, labels) in enumerate(loader):
            if index < skip:
                continue
            images, labels = _to_device(images, labels, device)
            targets = labels
            if mixer is not None:
                images, targets = mixer(images, labels)  # targets: (batch, num_classes) probabilities
            loss, logits, gradient_norm = _train_step(model, images, targets, optimizer, scheduler, loss_fn, device,
                                                      config)
            tally.loss_sum += loss * labels.shape[0]
            if gradient_norm is not None:
                tally.gradient_norm_sum += gradient_norm
            tally.correct += (logits.argmax(dim=-1) == labels).sum()
            tally.count += labels.shape[0]
            tally.step = index + 1
            bar.update(1)
            stopping = stop is not None and stop.requested
            if stopping or tally.step % config.log_every == 0 or tally.step == len(loader):
                # Also when stopping early: every tally this returns has been checked up to its last step.
                tally.seconds = time.perf_counter() - started
                _check_and_show(tally, bar, epoch, world_size > 1)
            if stopping:
                break
    except RuntimeError as error:
        # DataLoader workers get Ctrl-C too and exit; the main process then fails waiting for their batch.
        if isinstance(error, NonFiniteLossError) or stop is None or not stop.requested:
            raise
    finally:
        bar.close()
    tally.seconds = time.perf_counter() - started
    # The last step's gradients are done with. Freed now, they cannot be read after the evaluation that follows
    # (whose CUDA graphs, compile mode reduce-overhead, may reuse their memory), and the memory is free for it.
    optimizer.zero_grad(set_to_none=True)
    return tally


def _train_step(model, images, targets, optimizer, scheduler, loss_fn, device, config):
    optimizer.zero_grad(set_to_none=True)  # frees the gradients instead of writing zeros into them
    mark_new_iteration(model)
    with _autocast(device, config.amp):
        logits = model(images)  # (batch, num_classes)
    loss = loss_fn(logits.float(), targets)  # targets: class indices, or probabilities after mixing
    loss.backward()
    # The norm before clipping: NaN or infinite when any gradient is (clipping cannot repair that).
    gradient_norm = nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm) if config.clip_norm else None
    optimizer.step()
    scheduler.step()
    return loss.detach(), logits.detach(), gradient_norm


#: torch.compile's modes that replay CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def mark_new_iteration(model: nn.Module) -> None:
    """Before each call of a compiled model: with CUDA graphs (compile modes CUDA_GRAPH_MODES) a
    call's outputs live in memory the next replay writes over, and this tells PyTorch that the last step's outputs
    are done with, so it can replay its graphs instead of falling back to slower paths. Harmless without them."""
    if hasattr(model, "_orig_mod"):  # torch.compile's wrapper
        torch.compiler.cudagraph_mark_step_begin()


NON_FINITE_ADVICE = "Lower the learning rate (--lr), lengthen the warm-up, or look for NaNs in the data."


def _check_and_show(tally: EpochTally, bar, epoch: int, distributed: bool) -> None:
    """Stop on a NaN or infinite loss or gradient so far; show the running loss, accuracy and speed."""
    loss_sum, correct, count = tally.totals(distributed)
    if not math.isfinite(loss_sum):
        raise NonFiniteLossError(f"the training loss became {loss_sum / count} in epoch {epoch + 1} (by step "
                                 f"{tally.step}). {NON_FINITE_ADVICE}")
    if not math.isfinite(float(tally.gradient_norm_sum)):
        raise NonFiniteLossError(f"the gradients became NaN or infinite in epoch {epoch + 1} (by step "
                                 f"{tally.step}), so the weights did too. {NON_FINITE_ADVICE}")
    bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.4f}",
                    img_s=f"{count / max(tally.seconds, 1e-9):.0f}", refresh=False)


def _weights_are_finite(model: nn.Module) -> bool:
    """One check (one wait for the GPU) over every parameter."""
    return bool(torch.stack([parameter.isfinite().all() for parameter in model.parameters()]).all())


def evaluation_logits(model: nn.Module, loader, device: torch.device, amp: bool = True):
    """(logits (B, num_classes), labels (B,)) for each batch of `loader`, in eval mode, on `device`: the one loop
    under both `evaluate` and `predict`. The caller restores train mode and wraps it in torch.no_grad.

    For a compiled model it marks each call as a new iteration (CUDA graphs, `mark_new_iteration`) and pads the
    last, smaller batch to the full size with copies of its first image, so that the model runs the graph it has
    instead of compiling another for this one batch (tens of seconds on a GPU). In eval mode every image's logits
    depend on that image alone, so the padding changes nothing; its rows are cut off again here. Under CUDA graphs
    the next batch's replay writes over these logits: use them (or copy them) before asking for the next batch.
    """
    model.eval()
    full_batch = None
    compiled = hasattr(model, "_orig_mod")  # torch.compile's wrapper
    for images, labels in loader:
        images, labels = _to_device(images, labels, device)
        full_batch = full_batch or len(images)
        if compiled and len(images) < full_batch:
            padding = images[:1].expand(full_batch - len(images), *images.shape[1:])
            images = torch.cat([images, padding])
        mark_new_iteration(model)
        with _autocast(device, amp):
            logits = model(images)
        yield logits[:len(labels)], labels


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str | None = None, amp: bool = True,
             distributed: bool = False) -> dict[str, float]:
    """Mean cross-entropy (no label smoothing) and accuracy over every sample of `loader`.

    Both are sums over samples divided by the number of samples, never means of per-batch means (which would
    over-weight a short last batch). With `distributed=True` the sums of every process are added together.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for logits, labels in evaluation_logits(model, loader, device, amp):
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(dim=-1) == labels).sum()
        count += labels.shape[0]
    model.train(was_training)
    loss_sum, correct, count = EpochTally(loss_sum=loss_sum, correct=correct, count=count).totals(distributed)
    if count == 0:
        raise ValueError("the evaluation loader yielded no samples; is the test split empty?")
    return {"loss": loss_sum / count, "accuracy": correct / count, "count": count}


#: What a test loader split for DDP keeps of the user's loader (besides the dataset and the batching).
LOADER_SETTINGS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                   "generator", "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


def evaluation_loader(loader, rank: int, world_size: int):
    """(loader, sums_need_all_reduce): how this process takes part in an exact evaluation under DDP.

    A plain sequential DataLoader is split here, every world_size-th sample to each rank (no padding, so the
    sums over ranks are exact); one with batches of the user's own (a batch_sampler, or drop_last) is split by whole
    batches, every world_size-th batch to each rank. A loader that is already split without overlap (the GPU-cached
    one) is used as it is and its sums added up; one that holds the whole set on every rank is evaluated whole,
    everywhere.
    """
    if world_size == 1:
        return loader, False
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, SequentialSampler):
        settings = {name: getattr(loader, name) for name in LOADER_SETTINGS if hasattr(loader, name)}  # any torch
        batching = loader.batch_sampler
        # DataLoader's own batching (batch_size=N, or none) is redone over this rank's samples; any other is the
        # user's, and kept.
        if batching is None or (type(batching) is BatchSampler and batching.sampler is loader.sampler
                                and not batching.drop_last):
            shard = Subset(loader.dataset, range(rank, len(loader.dataset), world_size))
            return DataLoader(shard, batch_size=loader.batch_size, **settings), True
        batches = _same_batches_everywhere(list(batching))
        return DataLoader(loader.dataset, batch_sampler=batches[rank::world_size], **settings), True
    mine, size = len(loader.sampler), len(loader.dataset)
    total = _all_reduce(mine)[0]
    if int(total) == size:
        return loader, True
    if mine == size:
        return loader, False
    raise ValueError(f"the test loader's samplers cover {int(total)} samples for a test set of {size} (a "
                     f"DistributedSampler pads with repeats): give fit a sequential test loader.")


def _same_batches_everywhere(batches: list) -> list:
    """The batches, once every process has checked that they are the same everywhere: a batch_sampler that
    shuffles, or that is already split per process, would make the split miss some samples and count others twice."""
    # Every index spelled out: the repr of a long tensor or array would elide the middle ("...").
    spelled = repr([[int(index) for index in batch] for batch in batches])
    fingerprint = int(hashlib.sha256(spelled.encode()).hexdigest()[:13], 16)  # 52 bits: exact in float64
    highest, negated_lowest = _all_reduce(fingerprint, -fingerprint, op=dist.ReduceOp.MAX)
    if highest != -negated_lowest:
        raise ValueError("the test loader's batch_sampler gives different batches in different processes (it "
                         "shuffles, or is already split per process): give fit a sequential test loader, "
                         "DataLoader(test_set, batch_size=...), or the same batches in every process (they are "
                         "then split here, each batch to one process).")
    return batches


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device | str | None = None,
            amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (num_samples, num_classes), labels (num_samples,)) for every sample of `loader`, on the CPU.

    Under DDP every rank gets every sample (its share is computed here and gathered), grouped by rank.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world_size = distributed_info()
    loader, sharded = evaluation_loader(loader, rank, world_size)
    was_training = model.training
    probabilities, labels = [], []
    for logits, batch_labels in evaluation_logits(model, loader, device, amp):
        probabilities.append(logits.float().softmax(dim=-1).cpu())
        labels.append(batch_labels.cpu())
    model.train(was_training)
    # A process can have no test images at all (fewer images than processes): it still joins the gather below.
    probabilities = torch.cat(probabilities) if probabilities else torch.empty(0)
    labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
    if sharded:
        shares = [None] * world_size
        dist.all_gather_object(shares, (probabilities, labels))
        shares = [share for share in shares if len(share[1])]
        probabilities, labels = torch.cat([p for p, _ in shares]), torch.cat([l for _, l in shares])
    return probabilities, labels


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    index = labels.long().flatten() * num_classes + predictions.long().flatten()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------

def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save, atomically (`files.atomic_write`): a crash never leaves half a file."""
    with atomic_write(path) as file:
        torch.save(state, file)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train first, or drop --resume to start afresh.")
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(ViT with the checkpoint's weights in eval mode, class names) from a checkpoint that `fit` wrote."""
    from vit_helpers.model import ViT, ViTConfig

    checkpoint = load_checkpoint(path)
    model = ViT(ViTConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint.get("class_names")


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy

        kind, keys, position, has_gauss, gauss = numpy.random.get_state()
        states["numpy"] = (kind, keys.tolist(), position, has_gauss, gauss)  # plain types: weights_only loads it
    return states


def _checkpoint_state(model, optimizer, scheduler, config, epoch, history, class_names, metadata, steps_per_epoch,
                      world_size, tally: EpochTally | None = None) -> dict[str, Any]:
    model = unwrap_model(model)
    model_config = getattr(model, "config", None)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,  # epochs completed
        "steps_per_epoch": steps_per_epoch,  # a resumed run must take as many: the schedule counts steps
        "world_size": world_size,
        "config": dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else None,
        "train_config": config.to_dict(),
        "class_names": list(class_names) if class_names is not None else None,
        "history": history,
        "rng_state": _rng_states(),  # for inspection: each epoch reseeds from (seed, rank, epoch)
        "metadata": metadata or {},
        "interrupted": tally is not None,
    }
    if tally is not None:  # Ctrl-C in the middle of an epoch: where it stopped, and its sums so far
        loss_sum, correct, count = tally.totals(distributed=False)
        state["epoch_progress"] = {"step": tally.step, "count": count, "loss_sum": loss_sum,
                                   "correct": int(correct), "seconds": tally.seconds}
    return state


def _restore(checkpoint, model, optimizer, scheduler, lr_factor,
             steps_per_epoch: int) -> tuple[int, list, EpochTally | None]:
    # The scheduler counts steps; from other steps per epoch the rate would be off its schedule (and a
    # mid-epoch resume would skip the wrong batches). Checkpoints from before this was recorded are not checked.
    steps_before, processes_before = checkpoint.get("steps_per_epoch"), checkpoint.get("world_size")
    if steps_before is not None and steps_before != steps_per_epoch:
        processes = f" on {processes_before} process{'es' * (processes_before != 1)}" if processes_before else ""
        raise ValueError(f"this checkpoint's run took {steps_before} steps per epoch{processes}, and resumed it would "
                         f"take {steps_per_epoch}: the training data, the batch size or the number of processes "
                         f"differs. Resume with the run's own, or start a new run.")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    # The schedule may have been lengthened (more epochs than before): set this step's rate from the new one.
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * lr_factor(scheduler.last_epoch)
    progress = checkpoint.get("epoch_progress")
    tally = EpochTally(step=progress["step"], count=progress["count"], loss_sum=progress["loss_sum"],
                       correct=progress["correct"], seconds=progress["seconds"]) if progress else None
    return checkpoint["epoch"], list(checkpoint.get("history") or []), tally


# --------------------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------------------

def fit(model: nn.Module, train_loader, test_loader, epochs: int | None = None, *,
        config: TrainConfig | None = None, class_names=None, checkpoint_path: str | os.PathLike | None = None,
        resume: bool = False, stop_after_epoch: int | None = None, time_limit_s: float | None = None,
        progress: bool = True, metadata: dict | None = None) -> list[dict[str, float]]:
    """Train `model` for `epochs` (or `config.epochs`), evaluating after each epoch (or every
    `config.eval_every`, and always after the last). Returns the history: one dict per epoch with train/test loss
    and accuracy (None where not evaluated), learning rate, images/s, seconds and evaluation_seconds.

    - `checkpoint_path`: written atomically (by rank 0, the other processes waiting for it) every
      `config.checkpoint_every` epochs and at the end.
    - `resume=True`: continue from `checkpoint_path`; from an end-of-epoch checkpoint the result is identical
      to an uninterrupted run. With other `epochs` it continues on the longer or shorter schedule; resumed
      within the warm-up, a shorter one gives exactly the run it gives from the start.
    - `stop_after_epoch` / `time_limit_s`: end this session early (after that epoch / after the last epoch that,
      at the pace of the one before, ends within the limit) without shortening the schedule; `resume=True` later
      finishes it.
    - Ctrl-C (single process): the current step finishes, a checkpoint of this mid-epoch state is written and
      KeyboardInterrupt is raised. Resuming it re-reads the interrupted epoch's first batches without training
      on them, so data order and augmentations continue as in an uninterrupted run; only randomness drawn by
      the steps themselves (dropout, MixUp/CutMix) differs. (Augmentations drawn in the main process, with
      num_workers=0, share the global generator with those steps, so where the steps draw, they differ too;
      worker processes and the cached loaders draw from generators of their own.) Ctrl-C during an evaluation
      saves the epoch, evaluated or, when the loader's workers were stopped too, without its test figures; resuming
      from it is exact. Under torchrun Ctrl-C stops the processes; the last end-of-epoch checkpoint stays.
    - A NaN or infinite loss or gradient norm raises NonFiniteLossError and leaves the last checkpoint as it was.
    """
    config = dataclasses.replace(config or TrainConfig(), **({"epochs": epochs} if epochs else {}))
    rank, world_size = distributed_info()
    device = resolve_device(config.device)
    _enable_fast_math(device)
    model = unwrap_model(model).to(device)
    optimizer = build_optimizer(model, config, device)
    steps_per_epoch = len(train_loader)
    if world_size > 1:
        _check_same_steps_everywhere(steps_per_epoch)
    total_steps = config.epochs * steps_per_epoch
    lr_factor = warmup_cosine(count_warmup_steps(config, steps_per_epoch, total_steps), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_epoch, history, tally = 0, [], None
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path: the checkpoint to continue from.")
    if resume:
        start_epoch, history, tally = _restore(load_checkpoint(checkpoint_path, device), model, optimizer,
                                               scheduler, lr_factor, steps_per_epoch)
    train_model, eval_model = wrap_for_training(model, device, config, world_size)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    mixer = batch_mixer(config, len(class_names) if class_names is not None
                        else getattr(getattr(model, "config", None), "num_classes", None))
    eval_loader, eval_distributed = evaluation_loader(test_loader, rank, world_size)
    save = _saver(rank, world_size, checkpoint_path, optimizer, scheduler, config, class_names, metadata,
                  steps_per_epoch)
    # The last evaluation's duration, for the time limit's forecast (0 until one has been timed)
    # (A checkpoint written before evaluations were timed has none.)
    evaluation_seconds = next((record.get("evaluation_seconds", 0.0) for record in reversed(evaluated(history))), 0.0)
    started = time.perf_counter()
    with GracefulStop(enabled=world_size == 1) as stop:
        for epoch in range(start_epoch, config.epochs):
            epoch_started = time.perf_counter()
            seed = epoch_seed(config.seed, rank, epoch)
            seed_everything(seed)
            _set_epoch(train_loader, epoch, seed)
            try:
                tally = train_one_epoch(train_model, train_loader, optimizer, scheduler, loss_fn, device, config,
                                        epoch, tally, stop, progress, mixer)
                # The epoch checked its loss and gradients; this also catches NaN weights from a step it could
                # not check (no clipping, so no gradient norm), before any checkpoint is written.
                if not _weights_are_finite(model):
                    raise NonFiniteLossError(f"the weights became NaN or infinite in epoch {epoch + 1}. "
                                             f"{NON_FINITE_ADVICE}")
            except NonFiniteLossError as error:
                written = checkpoint_path is not None and Path(checkpoint_path).is_file()
                kept = f"the last good checkpoint, {checkpoint_path}, is unchanged" if written else \
                    "no checkpoint had been written yet"
                raise NonFiniteLossError(f"{error} Training stopped; {kept}.") from None
            if tally.step < steps_per_epoch:  # Ctrl-C
                save(model, epoch, history, tally)
                raise KeyboardInterrupt(f"stopped in epoch {epoch + 1} after step {tally.step}"
                                        + (f"; checkpoint saved to {checkpoint_path}" if checkpoint_path else ""))
            due = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
            # Would the next epoch end past the time limit? It trains as long as this one, and is evaluated if the
            # session stops after it; this epoch's own evaluation, if due, comes first.
            next_epoch_seconds = time.perf_counter() - epoch_started + evaluation_seconds * (1 + due)
            stopping = stop.requested or _should_stop(epoch, stop_after_epoch, time_limit_s, started,
                                                      next_epoch_seconds, world_size)
            test = None
            if due or stopping:  # the last epoch of a session is always evaluated: its accuracy is reported
                evaluation_started = time.perf_counter()
                test = _evaluate_unless_stopped(eval_model, eval_loader, device, config.amp, eval_distributed, stop)
                evaluation_seconds = time.perf_counter() - evaluation_started
            # Ctrl-C during the evaluation: the epoch's training is complete, so it is saved below whatever
            # checkpoint_every says (the message promises a checkpoint).
            stopping = stopping or stop.requested
            record = _epoch_record(epoch, tally, test, scheduler, world_size, epoch_started,
                                   evaluation_seconds if test else 0.0)
            history.append(record)
            tally = None
            if rank == 0 and progress:
                tqdm.write(_summary_line(record, config.epochs))
            if stopping or epoch + 1 == config.epochs or (epoch + 1) % config.checkpoint_every == 0:
                save(model, epoch + 1, history)
            if stop.requested:  # Ctrl-C during the epoch's last step: the epoch is complete and saved
                raise KeyboardInterrupt(f"stopped after epoch {epoch + 1}"
                                        + (f"; checkpoint saved to {checkpoint_path}" if checkpoint_path else ""))
            if stopping:
                break
    return history


def _evaluate_unless_stopped(model, loader, device, amp, distributed, stop: GracefulStop) -> dict | None:
    """`evaluate`, or None when Ctrl-C ended it: DataLoader workers started by spawn or forkserver (not fork) get
    the Ctrl-C too and exit, and the loader then fails waiting for their batch. The epoch is saved without it."""
    try:
        return evaluate(model, loader, device, amp, distributed)
    except RuntimeError:
        if not stop.requested:
            raise
        return None


def wrap_for_training(model, device, config, world_size):
    """(model to train: DDP and/or compiled, model to evaluate: compiled or not), as `fit` wraps them; a tool
    that times or profiles the engine's steps (scripts/gpu_checks.py) wraps the model the same way. Both share the
    parameters."""
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    compile_model = config.compile if config.compile is not None else device.type == "cuda"
    if not compile_model:
        return train_model, model
    if world_size > 1 and config.compile_mode in CUDA_GRAPH_MODES:
        warnings.warn(f"compile_mode={config.compile_mode!r} replays CUDA graphs, which this project has not tested "
                      "under DistributedDataParallel; if training fails or diverges, use the default mode.",
                      stacklevel=3)
    # dynamic=False: one static graph per batch shape (the full batches, then the last, smaller test batch).
    # Otherwise the second shape seen makes the compiler regenerate the graph with symbolic sizes, slower kernels.
    return (torch.compile(train_model, mode=config.compile_mode, dynamic=False),
            torch.compile(model, mode=config.compile_mode, dynamic=False))


def _saver(rank, world_size, checkpoint_path, optimizer, scheduler, config, class_names, metadata, steps_per_epoch):
    def save(model, epoch, history, tally=None):
        if rank == 0 and checkpoint_path is not None:
            save_checkpoint(_checkpoint_state(model, optimizer, scheduler, config, epoch, history, class_names,
                                              metadata, steps_per_epoch, world_size, tally), checkpoint_path)
        if world_size > 1 and checkpoint_path is not None:
            # The others wait for rank 0's file: a process that left fit early and resumed at once (a probe, then
            # resume=True) would otherwise read the previous checkpoint, or none, and go out of step.
            dist.barrier()

    return save


def _check_same_steps_everywhere(steps_per_epoch: int) -> None:
    """Under DDP every process must take the same number of steps: one that has more waits forever for the
    others in its gradient all-reduce. Raise instead, on every process."""
    most, negative_fewest = _all_reduce(steps_per_epoch, -steps_per_epoch, op=dist.ReduceOp.MAX)
    most, fewest = int(most), -int(negative_fewest)
    if most != fewest:
        raise ValueError(f"the training loader gives {steps_per_epoch} batches per epoch on this process, but "
                         f"between {fewest} and {most} across processes; under DDP every process must take the same "
                         f"number of steps. Use a DistributedSampler (it gives every process as many samples), as "
                         f"data.make_dataloaders does.")


def _epoch_record(epoch, tally, test, scheduler, world_size, epoch_started,
                  evaluation_seconds: float) -> dict[str, float | None]:
    """One epoch of the history. `test`: `evaluate`'s result, or None for an epoch not evaluated
    (`TrainConfig.eval_every`), whose test_loss and test_accuracy are then None."""
    loss_sum, correct, count = tally.totals(world_size > 1)  # checked finite by train_one_epoch
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / count,
        "train_accuracy": correct / count,
        "test_loss": test["loss"] if test else None,
        "test_accuracy": test["accuracy"] if test else None,
        "lr": scheduler.get_last_lr()[0],
        "images_per_second": count / max(tally.seconds, 1e-9),  # every process's images together
        "seconds": time.perf_counter() - epoch_started,  # training and evaluation
        "evaluation_seconds": evaluation_seconds,  # 0 when not evaluated
    }


def evaluated(history: list[dict]) -> list[dict]:
    """The records of `history` whose epoch was evaluated on the test set (every one, unless
    `TrainConfig.eval_every` > 1)."""
    return [record for record in history if record["test_accuracy"] is not None]


def _summary_line(record: dict[str, float], epochs: int) -> str:
    test = (f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}"
            if record["test_accuracy"] is not None else "test: not evaluated this epoch")
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} acc "
            f"{record['train_accuracy']:.4f} | {test} | lr {record['lr']:.2e} | {record['images_per_second']:.0f} "
            f"img/s | {record['seconds']:.1f} s")


def _should_stop(epoch, stop_after_epoch, time_limit_s, started, next_epoch_seconds, world_size) -> bool:
    """After `epoch`: stop at `stop_after_epoch`, or when the next epoch, taking `next_epoch_seconds`, would end
    past the time limit (stopping only once past it would overshoot by up to an epoch)."""
    stop = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
    stop = stop or (time_limit_s is not None and time.perf_counter() - started + next_epoch_seconds > time_limit_s)
    if world_size > 1:  # the clocks differ between ranks: stop if any rank says so
        stop = bool(_all_reduce(float(stop), op=dist.ReduceOp.MAX)[0])
    return stop


def _all_reduce(*values: float, op=None) -> list[float]:
    """Each value reduced (summed, or `op`) over the processes of the group in one all-reduce, on the GPU under
    NCCL (which reduces only there)."""
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.tolist()
