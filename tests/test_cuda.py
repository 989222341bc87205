"""What only a CUDA GPU runs: the engine's bf16 autocast and fused AdamW, augmentation and the image store on the
device, and checkpoints carried from a GPU to a laptop. Skipped where there is no GPU (CI has none); the GPU sessions
run them first (BENCHMARKS.md), in a minute or two. They stay small: tiny models, uncompiled but for the check of
CUDA graphs and of the compiled augmentation (scripts/gpu_checks.py compiles and times the real sizes).

`VIT_HELPERS_CUDA_TESTS_DEVICE=cpu` runs them on the CPU instead, only to check the test code itself: there the
comparisons with the CPU are trivially true.
"""

import dataclasses
import os
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vit_helpers import gpu_data
from vit_helpers.gpu_data import DeviceAugment, make_cached_loaders
from vit_helpers.model import ViT, ViTConfig
from vit_helpers.training import TrainConfig, evaluate, fit, load_checkpoint

from test_cli import make_image_folders  # noisy PNGs whose class is their colour
from test_training import NUM_CLASSES, coloured_images  # noisy images whose class is their colour

DEVICE = torch.device(os.environ.get("VIT_HELPERS_CUDA_TESTS_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run on the device machine: see BENCHMARKS.md)")


def tiny_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(ViTConfig(image_size=8, patch_size=4, num_classes=NUM_CLASSES, embed_dim=32, num_layers=2,
                         num_heads=2, mlp_dim=64))


def loaders():
    return (DataLoader(coloured_images(256), batch_size=16, shuffle=True),
            DataLoader(coloured_images(64, seed=1), batch_size=32))


# compile=False: the tests check the numerics of autocast and the fused optimiser, not the compiler's speed.
CONFIG = TrainConfig(lr=3e-3, warmup_epochs=0.5, device=str(DEVICE), compile=False, log_every=4)


def test_bf16_training_on_the_gpu_learns_and_resumes_like_an_uninterrupted_run(tmp_path):
    straight = fit(tiny_vit(), *loaders(), 4, config=CONFIG, progress=False, checkpoint_path=tmp_path / "a.pt")
    assert straight[-1]["train_loss"] < 0.7 * straight[0]["train_loss"]
    assert straight[-1]["test_accuracy"] >= 0.9  # chance is 0.25
    fit(tiny_vit(), *loaders(), 4, config=CONFIG, progress=False, checkpoint_path=tmp_path / "b.pt",
        stop_after_epoch=2)
    resumed = fit(tiny_vit(seed=5), *loaders(), 4, config=CONFIG, progress=False, checkpoint_path=tmp_path / "b.pt",
                  resume=True)
    # The same seeds and data order; GPU kernels may sum in another order from run to run (attention's backward
    # among them), so equal up to that rounding, not bit for bit as on the CPU.
    for a, b in zip(straight, resumed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-3)
    a, b = load_checkpoint(tmp_path / "a.pt")["model"], load_checkpoint(tmp_path / "b.pt")["model"]
    for name in a:
        assert a[name].device.type == "cpu"  # load_checkpoint maps to the CPU
        torch.testing.assert_close(b[name], a[name], rtol=1e-2, atol=1e-3, msg=name)


def test_a_checkpoint_written_on_the_gpu_gives_the_same_predictions_on_the_cpu(tmp_path):
    model = tiny_vit()
    fit(model, *loaders(), 1, config=CONFIG, progress=False, checkpoint_path=tmp_path / "gpu.pt")
    images = coloured_images(32, seed=2).tensors[0]
    with torch.no_grad():
        on_gpu = model.to(DEVICE).eval()(images.to(DEVICE)).cpu()  # float32, no autocast
        on_cpu = ViT(model.config).eval()
        on_cpu.load_state_dict(load_checkpoint(tmp_path / "gpu.pt")["model"])  # what a notebook on a laptop does
        # fit allowed TF32 matrix products on the GPU (10-bit mantissas): close, not equal. Weights that were not
        # carried over would differ by the whole logit.
        torch.testing.assert_close(on_cpu(images), on_gpu, rtol=1e-2, atol=1e-2)


def test_augmentation_on_the_gpu_equals_the_same_augmentation_on_the_cpu():
    # DeviceAugment draws its random numbers on the CPU, so (seed, epoch) decide the result on any device.
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # padding: shifted crops; erasing: a box erased from half of the images; fill: grey where the ops shift in
    for policy, crop in (("basic", {}), ("strong", {}), ("strong", {"padding": 4, "erasing": 0.5}),
                         ("autoaugment", {"padding": 4}), ("autoaugment", {"padding": 4, "fill": 128})):
        on_cpu = DeviceAugment(policy, **crop)(images, torch.Generator().manual_seed(7))
        for compiled in (False, True):  # compiled: a few fused kernels (torch.compile), the same draws
            augment = DeviceAugment(policy, compile=compiled, **crop)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a compiled version that fell back to the plain one fails here
                on_device = augment(images.to(DEVICE), torch.Generator().manual_seed(7))
            assert on_device.device.type == DEVICE.type
            # Interpolation rounds differently on the GPU; a value at a posterize, solarize or equalize threshold
            # may then land on the other side (a step of 1/255 or more): rare pixels, not the draws.
            close = ((on_device.cpu() - on_cpu).abs() < 1e-4).float().mean()
            assert close > 0.999, f"{policy} {crop}, compiled={compiled}: only {close:.4f} of the values agree"


def test_training_with_cuda_graphs_matches_the_default_compiled_run():
    """compile_mode="reduce-overhead" replays CUDA graphs of the same kernels, whose outputs the next replay
    overwrites (the engine marks each step): the same losses and weights as the default mode, not a run that
    quietly read stale gradients or logits. It compiles the tiny model twice (a minute or so)."""
    runs = {}
    for mode in (None, "reduce-overhead"):
        model = tiny_vit()
        config = dataclasses.replace(CONFIG, epochs=2, compile=True, compile_mode=mode)
        history = fit(model, *loaders(), config=config, progress=False)
        runs[mode] = (history, {name: value.detach().cpu() for name, value in model.state_dict().items()})
    (default, default_weights), (graphs, graph_weights) = runs[None], runs["reduce-overhead"]
    for expected, got in zip(default, graphs):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-3)
        assert got["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1 / 64)
    for name, value in default_weights.items():
        torch.testing.assert_close(graph_weights[name], value, rtol=1e-2, atol=1e-3, msg=name)


def test_deits_regularisers_train_under_cuda_graphs():
    """What the next cifar10 run adds (BENCHMARKS.md): stochastic depth, whose random draws run inside the CUDA
    graphs, MixUp and CutMix on each batch outside them, and timm's start. The model still learns, and in eval
    mode the compiled model equals the plain one."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, num_classes=NUM_CLASSES, embed_dim=32, num_layers=3,
                          num_heads=2, mlp_dim=64, drop_path=0.2, init="timm"))
    config = dataclasses.replace(CONFIG, epochs=6, compile=True, compile_mode="reduce-overhead", mixup_alpha=0.8,
                                 cutmix_alpha=1.0)
    history = fit(model, *loaders(), config=config, progress=False)
    assert history[-1]["test_accuracy"] >= 0.75  # chance is 0.25
    images = next(iter(loaders()[1]))[0].to(DEVICE)
    with torch.no_grad():
        plain = model.eval()(images)
        compiled = torch.compile(model)(images)
    torch.testing.assert_close(compiled, plain, rtol=1e-3, atol=1e-3)


def write_tree(root, images_per_class=6):
    generator = torch.Generator().manual_seed(3)
    for split in ("train", "test"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(images_per_class):
                pixels = torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8, generator=generator).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def test_the_image_store_on_the_gpu_or_in_pinned_cpu_memory_gives_the_same_batches(tmp_path):
    root = write_tree(tmp_path / "data")
    batches = {}
    for keep_on_device in (True, False):
        train, test, _ = make_cached_loaders(root, image_size=8, batch_size=4, device=DEVICE, augment="strong",
                                             keep_on_device=keep_on_device)
        assert (train.images.device.type == DEVICE.type) == keep_on_device or DEVICE.type == "cpu"
        train.set_epoch(3)
        batches[keep_on_device] = [torch.cat(part) for part in zip(*train)] + [torch.cat(part) for part in zip(*test)]
        assert all(batch.device.type == DEVICE.type for batch in batches[keep_on_device])
    for on_device, in_cpu_memory in zip(batches[True], batches[False]):
        assert torch.equal(on_device, in_cpu_memory)  # the same rows gathered, the same ops on the same device


def test_cuda_graphs_from_chunked_cached_batches_evaluating_every_other_epoch_read_the_current_weights(
        tmp_path, monkeypatch):
    """The cifar10 recipe's way, small (thirteenth session, unmeasured until a GPU runs this): batches from the GPU
    cache augmented in chunks by the compiled augmentation (the epoch's last, shorter chunk uncompiled), a step
    under CUDA graphs, and an evaluation only every other epoch and after the last. The evaluation after skipped
    ones must read the weights as they are, not a graph's stale outputs: it equals the plain model's."""
    monkeypatch.setattr(gpu_data, "IMAGES_DRAWN_AT_ONCE", 32)  # chunks of 4 batches of 8: 13 batches an epoch
    make_image_folders(tmp_path, {"red": (200, 40, 40), "blue": (40, 40, 200)}, train=52, test=20, size=8)
    train, test, classes = make_cached_loaders(tmp_path, image_size=8, batch_size=8, device=DEVICE, augment="strong",
                                               compile_augment=True, crop_padding=1)
    assert train.images_augmented_at_once == 32 and len(train) == 13
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, num_classes=2, embed_dim=32, num_layers=2, num_heads=2,
                          mlp_dim=64))
    config = dataclasses.replace(CONFIG, epochs=5, compile=True, compile_mode="reduce-overhead", eval_every=2)
    history = fit(model, train, test, config=config, class_names=classes, progress=False)
    assert [record["test_accuracy"] is not None for record in history] == [False, True, False, True, True]
    assert history[-1]["test_accuracy"] >= 0.9  # told apart by colour; chance is 0.5
    plain = evaluate(model, test, DEVICE)
    assert plain["accuracy"] == pytest.approx(history[-1]["test_accuracy"], abs=1 / 40)
    assert plain["loss"] == pytest.approx(history[-1]["test_loss"], rel=2e-2)


@pytest.mark.parametrize("kernel", ["math", "efficient", "flash", "cudnn"])
def test_each_attention_kernel_runs_as_named_and_gives_pytorchs_logits_and_gradients(kernel):
    """The cifar10 recipe's heads (D_h = 16) over 65 tokens, under bf16 autocast as the engine trains: each kernel
    computes what PyTorch's own choice computes, to bf16 rounding, and is the one that ran (its name in the profile;
    "math" has no kernel of its own)."""
    config = ViTConfig(image_size=32, patch_size=4, num_classes=10, embed_dim=64, num_layers=2, num_heads=4,
                       mlp_dim=128, init="timm")  # a head that is not zero: every weight gets a gradient
    torch.manual_seed(0)
    chosen = ViT(config).to(DEVICE)
    model = ViT(dataclasses.replace(config, attention_kernel=kernel)).to(DEVICE)
    model.load_state_dict(chosen.state_dict())
    images = torch.randn(8, 3, 32, 32, device=DEVICE)
    results = []
    for network in (chosen, model):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16), torch.profiler.profile() as profile:
            logits = network(images)
            logits.float().square().sum().backward()
        names = " ".join(event.name.lower() for event in profile.events())
        results.append((logits.float(), torch.cat([p.grad.flatten() for p in network.parameters()]), names))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0.05, atol=0.05)
    assert torch.nn.functional.cosine_similarity(results[1][1], results[0][1], dim=0) > 0.99
    if DEVICE.type == "cuda":  # the named kernel's operators ran, and no other kernel's
        ran = {name for name, operator in ATTENTION_OPERATORS.items() if operator in results[1][2]}
        assert ran == {kernel}, ran


#: The name each kernel's forward (and backward) operator has in a profile, as `aten::<name>`.
ATTENTION_OPERATORS = {"math": "_scaled_dot_product_attention_math",
                       "efficient": "_scaled_dot_product_efficient_attention",
                       "flash": "_scaled_dot_product_flash_attention",
                       "cudnn": "_scaled_dot_product_cudnn_attention"}
