"""How fast does a ViT train and infer, and how close is that to what the hardware can do?

    python -m vit_helpers bench --model ViT-B/16 --batch-size 256 --compile --compare timm,torchvision

For each implementation (ours, and timm's and torchvision's `VisionTransformer` built with the same sizes,
randomly initialised), on synthetic input: images/s, ms per step, achieved TFLOP/s and MFU, the model FLOPs
utilisation (as nanoGPT's `estimate_mfu`). FLOPs are analytic (`ViTConfig.training_flops()` = 3 x forward for
a training step, for every implementation alike, although ours skips the share that Eq. 4 never reads, 7% for
ViT-B/16: see `ViT.forward`), and the ceiling they are compared with is measured here: a large bf16 (CUDA) or
float32 (CPU) matrix multiply. A training step is forward, loss, backward and a fused AdamW update under bf16 autocast
on CUDA; inference is a forward pass under `torch.inference_mode()`. Warm-up steps (and compilation) are not
timed; each step is timed with CUDA events on GPUs, and the median step is reported.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vit_helpers.files import atomic_write
from vit_helpers.model import ViT, ViTConfig
from vit_helpers.training import mark_new_iteration, resolve_device

#: "ours-all-tokens" is our ViT computing every token in the last layer, as timm and torchvision do: measured beside
#: "ours", it shows how much of our speed comes from skipping what Eq. 4 never reads (`ViT.forward`).
IMPLEMENTATIONS = ("ours", "ours-all-tokens", "timm", "torchvision")
MODES = ("train", "inference")


@dataclass
class BenchResult:
    implementation: str
    mode: str  # "train" or "inference"
    batch_size: int
    compiled: bool
    ms_per_step: float | None = None
    images_per_second: float | None = None
    tflops: float | None = None  # achieved, from the analytic FLOPs
    mfu: float | None = None  # achieved / measured matmul ceiling
    note: str = ""
    profile: str = ""  # with profile_rows: the operators that took the most time, as torch.profiler's table


@dataclass(frozen=True)
class Timing:
    """How each implementation is run and timed."""

    steps: int = 20  # timed steps; the median is reported
    warmup_steps: int = 5  # untimed steps first (compilation happens in the first)
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode, e.g. "reduce-overhead" (CUDA graphs)
    profile_rows: int = 0  # > 0: then profile PROFILED_STEPS more steps and keep this many operators
    keep_going: bool = False  # an error (not only running out of memory) becomes the row's note; the others run


PROFILED_STEPS = 3


def parse_names(text: str) -> list[str]:
    names = [name.strip().lower() for name in (text or "").split(",") if name.strip()]
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if unknown:
        raise ValueError(f"--compare: unknown implementation(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(IMPLEMENTATIONS[1:])}.")
    return list(dict.fromkeys(names))  # in the order given, once each; run_bench adds ours first if absent


def parse_modes(text: str) -> list[str]:
    modes = [mode.strip().lower() for mode in text.split(",") if mode.strip()]
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"--modes: expected train, inference or both, got {text!r}.")
    return modes


class AllTokensViT(nn.Module):
    """Our ViT with every token computed up to the end, `head(forward_features(x)[:, 0])`: the same function."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.vit = ViT(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.head(self.vit.forward_features(images)[:, 0])


def build_model(implementation: str, config: ViTConfig) -> nn.Module:
    """Our ViT, or timm's / torchvision's VisionTransformer with the same sizes. ImportError if not installed."""
    if implementation == "ours":
        return ViT(config)
    if implementation == "ours-all-tokens":
        return AllTokensViT(config)
    if implementation == "timm":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=config.image_size, patch_size=config.patch_size,
                                 in_chans=config.in_channels, num_classes=config.num_classes,
                                 embed_dim=config.embed_dim, depth=config.num_layers, num_heads=config.num_heads,
                                 mlp_ratio=config.mlp_dim / config.embed_dim, qkv_bias=True, class_token=True,
                                 global_pool="token")
    if implementation == "torchvision":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=config.image_size, patch_size=config.patch_size,
                                 num_layers=config.num_layers, num_heads=config.num_heads,
                                 hidden_dim=config.embed_dim, mlp_dim=config.mlp_dim, num_classes=config.num_classes)
    raise ValueError(f"unknown implementation {implementation!r}: choose from {', '.join(IMPLEMENTATIONS)}.")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_seconds(step: Callable[[], None], steps: int, warmup_steps: int, device: torch.device) -> float:
    """Run `step` warmup_steps times untimed, then `steps` times; the median step time in seconds."""
    for _ in range(warmup_steps):
        step()
    synchronize(device)
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)  # the work's stream, also when `device` is not the current device
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record(stream)
            step()
            end.record(stream)
        synchronize(device)
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ceiling_matmul(device: torch.device) -> tuple[int, torch.dtype]:
    """The size and dtype of the matrix multiply `measure_matmul_ceiling` times on `device`."""
    return (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)


def measure_matmul_ceiling(device: torch.device | str = "cpu", size: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of one large square matrix multiply: bf16 8192^3 on CUDA, float32 1024^3 on the CPU."""
    device = torch.device(device)
    default_size, dtype = ceiling_matmul(device)
    size = size or default_size
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    # An idle GPU runs at a fraction of its clock until load raises it: a few milliseconds of warm-up could time
    # part of the ramp and give a low ceiling (an MFU too high). 100 products of 8192^3 keep it busy ~0.15 s first.
    warmup_steps = 100 if device.type == "cuda" else 3
    seconds = median_step_seconds(lambda: torch.mm(a, b), repeats, warmup_steps=warmup_steps, device=device)
    return 2 * size ** 3 / seconds


def make_step(model: nn.Module, mode: str, batch_size: int, config: ViTConfig, device: torch.device,
              compile_model: bool, compile_mode: str | None = None) -> Callable[[], None]:
    images = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size, device=device)
    labels = torch.randint(0, config.num_classes, (batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    forward = torch.compile(model, mode=compile_mode) if compile_model else model
    if mode == "inference":
        model.eval()

        def step():
            mark_new_iteration(forward)  # as the training engine does: CUDA graphs (reduce-overhead) reuse outputs
            with torch.inference_mode(), autocast:
                forward(images)

        return step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        mark_new_iteration(forward)
        with autocast:
            loss = F.cross_entropy(forward(images).float(), labels)
        loss.backward()
        optimizer.step()

    return step


def profile_table(step: Callable[[], None], device: torch.device, rows: int) -> str:
    """torch.profiler's table of the operators (and, on CUDA, kernels) of PROFILED_STEPS steps, the `rows` that
    took the most time on the device (on the CPU, of CPU time) themselves first: where a step's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(PROFILED_STEPS):
            step()
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def _caused_by_out_of_memory(error: BaseException | None) -> bool:
    """True for torch.OutOfMemoryError, also where the compiler re-raised it wrapped in an error of its own."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _failed(result: BenchResult, error: Exception) -> BenchResult:
    traceback.print_exc()  # the whole story in the log; the table gets one line
    result.note = f"failed: {type(error).__name__}: {error}"[:160]
    return result


def bench_one(implementation: str, mode: str, config: ViTConfig, batch_size: int, device: torch.device,
              timing: Timing, ceiling: float) -> BenchResult:
    result = BenchResult(implementation, mode, batch_size, timing.compile)
    try:
        model = build_model(implementation, config)
    except ImportError as error:
        result.note = f"not installed ({error.name})"
        return result
    except Exception as error:  # e.g. an installed timm without an argument passed here
        if not timing.keep_going:
            raise
        return _failed(result, error)
    step = None
    try:
        model.to(device)
        step = make_step(model, mode, batch_size, config, device, timing.compile, timing.compile_mode)
        seconds = median_step_seconds(step, timing.steps, timing.warmup_steps, device)
        if timing.profile_rows > 0:
            result.profile = profile_table(step, device, timing.profile_rows)
    except Exception as error:
        if _caused_by_out_of_memory(error):
            result.note = "out of memory: lower --batch-size"
            return result
        if not timing.keep_going:
            raise
        return _failed(result, error)
    finally:
        del model, step  # step holds the model, its optimizer state and the compiled graphs, also after an error
        if timing.compile:
            # Forget the compiled graphs (and free CUDA graphs' memory pools): the next model would otherwise
            # count as a recompilation of the same forward and, past torch._dynamo's limit, run uncompiled.
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = (config.training_flops() if mode == "train" else config.forward_flops()) * batch_size
    result.ms_per_step = seconds * 1e3
    result.images_per_second = batch_size / seconds
    result.tflops = flops / seconds / 1e12
    result.mfu = flops / seconds / ceiling
    return result


def run_bench(model: str = "ViT-B/16", batch_size: int = 256, *, image_size: int | None = None,
              patch_size: int | None = None, num_classes: int = 1000, compare=(), steps: int = 20,
              warmup_steps: int = 5, modes=MODES, device: str = "auto",
              compile: bool = False, compile_mode: str | None = None,
              profile_rows: int = 0, keep_going: bool = False) -> tuple[list[BenchResult], dict]:
    """Measure ours (and `compare`) in every mode. Returns (results, context: model, device, ceiling, ...).

    Ours is measured first unless `compare` names it elsewhere: e.g. ("timm", "ours") measures timm first, to see
    whether the order (a GPU that warms up or heats up over the run) moved a close result.

    `profile_rows` > 0 also profiles a few steps of each and keeps that many rows of torch.profiler's table
    (`BenchResult.profile`, printed by `format_profiles`): profile before guessing what to speed up."""
    overrides = {key: value for key, value in (("image_size", image_size), ("patch_size", patch_size))
                 if value is not None}
    config = ViTConfig.named(model, num_classes=num_classes, **overrides)
    if batch_size < 1 or steps < 1 or warmup_steps < 0:
        raise ValueError("--batch-size and --steps must be positive and --warmup-steps not negative.")
    device = resolve_device(device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    ceiling = measure_matmul_ceiling(device)
    size, dtype = ceiling_matmul(device)
    timing = Timing(steps, warmup_steps, compile, compile_mode, profile_rows, keep_going)
    results = [bench_one(implementation, mode, config, batch_size, device, timing, ceiling)
               for implementation in (compare if "ours" in compare else ("ours", *compare)) for mode in modes]
    context = {"model": model, "config": dataclasses.asdict(config), "device": device_name(device),
               "precision": "bf16 autocast" if device.type == "cuda" else "float32",
               "ceiling_flops": ceiling, "ceiling_matmul": f"{str(dtype).removeprefix('torch.')} {size}x{size}x{size}",
               "steps": steps, "warmup_steps": warmup_steps,
               "training_gflops_per_image": config.training_flops() / 1e9,
               "forward_gflops_per_image": config.forward_flops() / 1e9, "torch": torch.__version__,
               "compiled": compile, "compile_mode": compile_mode if compile else None}
    return results, context


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def format_table(results: list[BenchResult], context: dict) -> str:
    config = context["config"]
    lines = [f"{context['model']} at {config['image_size']} px (patch {config['patch_size']}), "
             f"{context['forward_gflops_per_image']:.2f} GFLOPs forward / image, on {context['device']}, "
             f"{context['precision']}",
             f"median of {context['steps']} timed steps after {context['warmup_steps']} warm-up steps"
             + (f", torch.compile mode {context['compile_mode'] or 'default'}" if context["compiled"] else ""),
             f"matmul ceiling ({context['ceiling_matmul']}): {context['ceiling_flops'] / 1e12:.2f} TFLOP/s; "
             f"TFLOP/s and MFU count every token's FLOPs for every implementation (ours skips the last layer's "
             f"unread ones), so they rank as img/s does",
             f"{'implementation':<16} {'mode':<10} {'compiled':<9} {'batch':>6} {'img/s':>10} {'ms/step':>9} "
             f"{'TFLOP/s':>8} {'MFU':>7}"]
    for r in results:
        head = f"{r.implementation:<16} {r.mode:<10} {'yes' if r.compiled else 'no':<9} {r.batch_size:>6}"
        if r.images_per_second is None:
            lines.append(f"{head} {r.note}")
        else:
            lines.append(f"{head} {r.images_per_second:>10.1f} {r.ms_per_step:>9.2f} {r.tflops:>8.3f} "
                         f"{100 * r.mfu:>6.1f}%")
    return "\n".join(lines)


def format_profiles(results: list[BenchResult]) -> str:
    """Every result's profile table under a heading, in the order measured; "" when nothing was profiled."""
    return "\n".join(f"\nprofile of {r.implementation} {r.mode} ({'compiled' if r.compiled else 'eager'}, "
                     f"{PROFILED_STEPS} steps of batch {r.batch_size}):\n{r.profile}" for r in results if r.profile)


def save_json(results: list[BenchResult], context: dict, path: str | os.PathLike) -> None:
    with atomic_write(path, "w") as file:
        json.dump({**context, "results": [dataclasses.asdict(r) for r in results]}, file, indent=2)
