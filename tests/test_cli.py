"""`python -m vit_helpers train | download`: the files a run writes, resuming, and one-line errors."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vit_helpers.cli import main
from vit_helpers.model import ViTConfig
from vit_helpers.training import load_checkpoint

from test_training import without_timings  # a history less its wall-clock figures


pytestmark = pytest.mark.usefixtures("one_torch_thread")


REPO = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (30, 40, 220), "red": (220, 40, 30), "green": (40, 200, 40)}


def make_image_folders(root: Path, colours: dict, train: int = 16, test: int = 5, size: int = 16) -> Path:
    """train/ and test/ ImageFolders of noisy size x size PNGs (`train` and `test` per class), a class per colour."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                noise = torch.randint(-30, 30, (size, size, 3), generator=generator)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """Three classes told apart by colour."""
    return make_image_folders(tmp_path_factory.mktemp("tiny_images"), COLOURS)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A small, fast run: the demo recipe's small ViT on 16x16 images with 8x8 patches."""
    return ["train", "--data", str(data), "--recipe", "demo", "--image-size", "16", "--patch-size", "8",
            "--batch-size", "8", "--epochs", "2", "--out", str(out), *extra]


def test_train_writes_metrics_checkpoint_and_plots(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["world_size"] == 1 and metrics["images_per_second"] > 0
    # MFU as `bench` and notebook 07 count it: what the model computes per second over a measured matrix product
    flops_per_image = ViTConfig(**metrics["model_config"]).executed_training_flops()
    assert metrics["training_flops_per_second"] == pytest.approx(metrics["images_per_second"] * flops_per_image)
    assert metrics["mfu"] == pytest.approx(metrics["training_flops_per_second"] / metrics["matmul_flops_per_second"])
    assert 0 < metrics["mfu"] < 1
    assert [record["epoch"] for record in metrics["history"]] == [1, 2]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert all(key in record for record in metrics["history"])
    assert metrics["model_config"]["patch_size"] == 8 and metrics["model_config"]["num_classes"] == 3
    assert metrics["train_config"]["epochs"] == 2 and metrics["train_config"]["batch_size"] == 8
    matrix = torch.tensor(metrics["confusion_matrix"])
    assert matrix.sum() == 15 and matrix.trace() / 15 == pytest.approx(metrics["test_accuracy"])
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "config", "class_names"} <= set(checkpoint)
    assert checkpoint["epoch"] == 2 and checkpoint["class_names"] == sorted(COLOURS)
    for name in ("loss_curves.png", "confusion_matrix.png", "predictions.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert str(out / "metrics.json") in printed and str(out / "loss_curves.png") in printed
    assert f"MFU {metrics['mfu']:.1%} of a measured matrix product's" in printed


def test_train_with_plain_loaders_and_no_recipe(tiny_folder, tmp_path):
    out = tmp_path / "plain"
    args = ["train", "--data", str(tiny_folder), "--model", "ViT-Ti/16", "--image-size", "16", "--epochs", "1",
            "--batch-size", "16", "--augment", "basic", "--no-cached", "--num-workers", "0", "--out", str(out),
            "--mixup", "0.4", "--cutmix", "1.0", "--mix-probability", "0.5"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["cached"] is False and metrics["model_config"]["embed_dim"] == 192
    train_config = load_checkpoint(out / "checkpoint.pt")["train_config"]
    assert (train_config["mixup_alpha"], train_config["cutmix_alpha"], train_config["mix_probability"]) == \
        (0.4, 1.0, 0.5)
    assert len(metrics["history"]) == 1


def test_eval_every_evaluates_less_often_and_may_change_on_resume(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--epochs", "3", "--eval-every", "2", "--stop-after-epoch", "1")) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[0]["test_accuracy"] is not None  # a session is evaluated where it stops
    assert main(["train", "--out", str(out), "--resume", "--eval-every", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [record["test_accuracy"] is not None for record in metrics["history"]] == [True, False, True]
    assert metrics["settings"]["eval_every"] == 3 and metrics["train_config"]["eval_every"] == 3
    assert metrics["best_test_accuracy"] == max(metrics["history"][0]["test_accuracy"], metrics["test_accuracy"])
    assert (out / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    assert main(train_args(tiny_folder, tmp_path / "bad", "--eval-every", "0")) == 2
    assert "--eval-every" in capsys.readouterr().err


def assert_same_weights(first: Path, second: Path) -> None:
    first, second = load_checkpoint(first)["model"], load_checkpoint(second)["model"]
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("loaders", [(), ("--no-cached", "--augment", "basic", "--num-workers", "1")],
                         ids=["cached", "augmenting-workers"])
def test_resume_continues_the_run_as_if_it_had_never_stopped(tiny_folder, tmp_path, loaders):
    assert main(train_args(tiny_folder, tmp_path / "straight", *loaders)) == 0
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, *loaders, "--stop-after-epoch", "1")) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 1
    assert main(["train", "--out", str(out), "--resume"]) == 0  # settings, data included, come from the run
    metrics = json.loads((out / "metrics.json").read_text())
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert without_timings(metrics["history"]) == without_timings(straight["history"])
    assert_same_weights(out / "checkpoint.pt", tmp_path / "straight" / "checkpoint.pt")


def test_the_number_of_loader_workers_is_recorded_and_cannot_change_on_resume(tiny_folder, tmp_path, capsys):
    """Each worker draws its own augmentations: another number of them would train on other images. Not given, the
    number is chosen for the machine, and a resume elsewhere keeps the run's."""
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--no-cached", "--augment", "basic", "--stop-after-epoch", "1")) == 0
    recorded = json.loads((out / "metrics.json").read_text())["settings"]["num_workers"]
    assert isinstance(recorded, int)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--num-workers", str(recorded + 1)]) == 2
    assert "--num-workers cannot change" in one_error_line(capsys)


def test_resume_refuses_data_with_other_images_even_where_the_steps_per_epoch_agree(tiny_folder, tmp_path, capsys):
    """One image more per class: still 6 full batches of 8 an epoch, but a folder split by stratified_split would
    split anew, and some test images would be trained on."""
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--stop-after-epoch", "1")) == 0
    assert load_checkpoint(out / "checkpoint.pt")["metadata"]["images"] == {"train": 48, "test": 15}
    grown = make_image_folders(tmp_path / "grown", COLOURS, train=17)  # the same classes, 51 training images
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--data", str(grown)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the new data's decoding bar
    assert "holds 51 training and 15 test images, but this run had 48 and 15: images were added or removed" in error
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("flags", [(), ("--no-cached",)])
def test_resume_refuses_data_whose_files_were_renamed_and_takes_the_same_files_moved(tiny_folder, tmp_path, capsys,
                                                                                       flags):
    """As many images, but one of them renamed: the same counts and steps, yet a folder split by stratified_split
    would split otherwise. The same files in another folder are the run's data."""
    data = shutil.copytree(tiny_folder, tmp_path / "data")
    out = tmp_path / "run"
    assert main(train_args(data, out, "--stop-after-epoch", "1", *flags)) == 0
    assert set(load_checkpoint(out / "checkpoint.pt")["metadata"]["image_files"]) == {"train", "test"}
    renamed = shutil.copytree(data, tmp_path / "renamed")
    (renamed / "test" / "red" / "0.png").rename(renamed / "test" / "red" / "9.png")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--data", str(renamed)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the new data's decoding bar
    assert "the test images of --data" in error and "are not the files this run had" in error
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    moved = shutil.copytree(data, tmp_path / "moved")
    assert main(["train", "--out", str(out), "--resume", "--data", str(moved)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_resume_refuses_data_that_gives_another_number_of_steps_per_epoch(tiny_folder, tmp_path, capsys):
    """The schedule counts steps: from fewer steps per epoch the learning rate would run off its schedule. Here
    a checkpoint that does not record its image counts and names (as before they were), resumed on half the images;
    under torchrun another number of processes changes the steps per epoch the same way."""
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--stop-after-epoch", "1")) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    del checkpoint["metadata"]["images"], checkpoint["metadata"]["image_files"]
    torch.save(checkpoint, out / "checkpoint.pt")
    smaller = make_image_folders(tmp_path / "smaller", COLOURS, train=8)  # the same classes, half the images
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--data", str(smaller)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "this run took 6 steps per epoch on 1 process, and with --data" in error and "would take 3;" in error


def test_init_flag_starts_the_model_as_timm_does_and_cannot_change_on_resume(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--init", "timm", "--epochs", "1")) == 0
    assert json.loads((out / "metrics.json").read_text())["model_config"]["init"] == "timm"
    assert load_checkpoint(out / "checkpoint.pt")["config"]["init"] == "timm"
    capsys.readouterr()  # the run's own output
    assert main(train_args(tiny_folder, out, "--init", "official", "--resume")) == 2
    assert "--init cannot change" in one_error_line(capsys)
    assert main(train_args(tiny_folder, out, "--init", "xavier")) == 2
    assert "argument --init: invalid choice: 'xavier'" in one_error_line(capsys)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--model", "ViT-X/16"], "unknown model 'ViT-X/16'"),
    (["--image-size", "30"], "image_size 30 is not a multiple of patch_size 8"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--epochs", "two"], "argument --epochs: expected a whole number of at least 1, got 'two'"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--mixup", "-0.2"], "argument --mixup: expected a number, 0 or more, got '-0.2'"),
    (["--cutmix", "nan"], "argument --cutmix: expected a number, 0 or more, got 'nan'"),
    (["--compile-mode", "reduce_overhead"], "compile_mode 'reduce_overhead' is not one of torch.compile's modes: "),
    (["--mixup", "0.8", "--mix-probability", "0"], "argument --mix-probability: expected a number above 0 and at "
                                                   "most 1, got '0'"),
    (["--mix-probability", "0.5"], "--mix-probability sets the share of batches that MixUp or CutMix mixes, and "
                                   "this run mixes none: add --mixup 0.8 and/or --cutmix 1.0"),
    # Each of these was a traceback (epochs, lr, label smoothing, cpu threads) or silently ignored (patch size,
    # cpu threads and stop-after-epoch 0) before the flags checked their values.
    (["--epochs", "-1"], "argument --epochs: expected a whole number of at least 1, got '-1'"),
    (["--epochs", "0"], "argument --epochs: expected a whole number of at least 1, got '0'"),
    (["--lr", "-0.001"], "argument --lr: expected a positive number, got '-0.001'"),
    (["--lr", "nan"], "argument --lr: expected a positive number, got 'nan'"),
    (["--label-smoothing", "2"], "argument --label-smoothing: expected a number from 0 to 1, got '2'"),
    (["--patch-size", "0"], "argument --patch-size: expected a whole number of at least 1, got '0'"),
    (["--cpu-threads", "-1"], "argument --cpu-threads: expected a whole number of at least 1, got '-1'"),
    (["--cpu-threads", "0"], "argument --cpu-threads: expected a whole number of at least 1, got '0'"),
    (["--stop-after-epoch", "0"], "argument --stop-after-epoch: expected a whole number of at least 1, got '0'"),
    (["--compile-augment", "--no-cached"], "--compile-augment compiles the cached loaders' augmentation, and this "
                                            "run does not use them: add --cached (a new run) or --no-compile-augment"),
    (["--augment", "strong", "--augment-magnitude", "31"], "augment_magnitude must be a whole number from 0 to 30"),
    (["--drop-path", "1"], "argument --drop-path: expected a number from 0 up to, not including, 1, got '1'"),
    (["--augment", "basic", "--augment-magnitude", "27"], "--augment-magnitude sets RandAugment's strength, and this "
                                                          "run does not use RandAugment: add --augment strong"),
    (["--augment", "autoaugment", "--augment-magnitude", "27"], "--augment-magnitude sets RandAugment's strength, "
                                                                "and this run does not use RandAugment"),
    (["--augment", "autoaugment", "--augment-fill", "256"], "augment_fill must be a whole grey level from 0"),
    (["--augment", "basic", "--augment-fill", "128"], "--augment-fill sets what RandAugment's and AutoAugment's "
                                                      "shears, shifts and rotations bring in, and this run uses "
                                                      "neither: add --augment strong or autoaugment"),
    (["--random-erasing", "1.5"], "argument --random-erasing: expected a number from 0 to 1, got '1.5'"),
    (["--augment", "none", "--random-erasing", "0.25"], "--random-erasing erases boxes from augmented training "
                                                        "images, and this run does not augment them"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(tiny_folder, tmp_path, capsys, extra, message):
    assert main(train_args(tiny_folder, tmp_path / "run", *extra)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_missing_data_folder_gives_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(train_args(tmp_path / "no_such_folder", tmp_path / "run")) == 2
    assert "no_such_folder is not a folder" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_gives_one_line(tiny_folder, tmp_path, capsys):
    assert main(train_args(tiny_folder, tmp_path / "run", "--device", "cuda")) == 2
    assert "no CUDA GPU" in one_error_line(capsys)


def test_resume_refuses_to_change_the_run_and_needs_a_checkpoint(tiny_folder, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint at" in one_error_line(capsys)
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--stop-after-epoch", "1")) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "--lr cannot change" in one_error_line(capsys)


def test_download_animals10_without_credentials_gives_one_clear_line(tmp_path, monkeypatch, capsys):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kaggle here
    assert main(["download", "animals10", "--dest", str(tmp_path / "animals10")]) == 1
    line = one_error_line(capsys)
    assert "Kaggle" in line and "KAGGLE_USERNAME" in line and "kaggle.json" in line
    assert not (tmp_path / "animals10").exists()


def test_download_sample_prints_its_counts_in_one_line(capsys):
    assert main(["download", "sample"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "5,000 images (train 4,000, test 1,000)" in lines[0]


def test_torchrun_with_two_processes_writes_one_set_of_results(tiny_folder, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vit_helpers",
               *train_args(tiny_folder, out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["history"]) == 2
    assert torch.tensor(metrics["confusion_matrix"]).sum() == 15  # every test image once, from both ranks
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "confusion_matrix.png", "loss_curves.png",
                                                     "metrics.json", "predictions.png"]
    assert result.stdout.count("test accuracy") == 1  # printed by rank 0 only


def test_python_dash_m_entry_point_reports_bad_model_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vit_helpers", "train", "--data", "sample", "--model",
                             "ViT-Q/16", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown model 'ViT-Q/16'" in result.stderr and "Traceback" not in result.stderr


def test_torchrun_stopped_by_a_nan_loss_says_so_once_and_leaves_cleanly(tiny_folder, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "vit_helpers",
               *train_args(tiny_folder, tmp_path / "ddp"), "--lr", "1e30"]  # the first update overflows
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    reports = [line for line in result.stderr.splitlines() if "NaN or infinite" in line or "loss became" in line]
    assert len(reports) == 1, result.stderr[-2000:]  # from rank 0 only
    assert "destroy_process_group" not in result.stderr  # PyTorch's warning for a process group left open


@pytest.mark.parametrize("setting, value, other, augment", [
    ("augment_magnitude", 27, 9, "strong"),  # RandAugment's strength
    ("random_erasing", 0.25, 0.0, "basic"),  # the share of images with a box erased
    ("augment_fill", 128, 0, "autoaugment"),  # what the policy's geometric ops bring in
])
def test_an_augmentation_setting_reaches_the_cached_loader_and_cannot_change_on_resume(
        tiny_folder, tmp_path, monkeypatch, capsys, setting, value, other, augment):
    from vit_helpers import gpu_data

    seen, make = [], gpu_data.make_cached_loaders
    attribute = {"augment_magnitude": "magnitude", "random_erasing": "erasing", "augment_fill": "fill"}[setting]

    def recording(*args, **kwargs):
        loaders = make(*args, **kwargs)
        seen.append(getattr(loaders[0].augment, attribute))  # the training loader's augmentation
        return loaders

    monkeypatch.setattr(gpu_data, "make_cached_loaders", recording)
    out, flag = tmp_path / "run", "--" + setting.replace("_", "-")
    assert main(train_args(tiny_folder, out, "--augment", augment, flag, str(value), "--stop-after-epoch", "1")) == 0
    assert json.loads((out / "metrics.json").read_text())["settings"][setting] == value
    assert main(["train", "--out", str(out), "--resume", flag, str(other)]) == 2
    assert f"{flag} cannot change" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0 and seen == [value, value]


def test_autoaugment_and_random_erasing_reach_the_plain_loader(tiny_folder, tmp_path, monkeypatch):
    from vit_helpers import data

    seen, make = [], data.make_dataloaders

    def recording(*args, **kwargs):
        loaders = make(*args, **kwargs)
        seen.extend(type(t).__name__ for t in loaders[0].dataset.transform.transforms)
        return loaders

    monkeypatch.setattr(data, "make_dataloaders", recording)
    assert main(train_args(tiny_folder, tmp_path / "plain", "--augment", "autoaugment", "--random-erasing", "0.5",
                           "--no-cached", "--epochs", "1")) == 0
    assert "AutoAugment" in seen and seen[-1] == "RandomErasing"
    settings = json.loads((tmp_path / "plain" / "metrics.json").read_text())["settings"]
    assert (settings["augment"], settings["random_erasing"]) == ("autoaugment", 0.5)


def test_drop_path_reaches_the_model_overrides_a_recipe_and_cannot_change_on_resume(tiny_folder, tmp_path,
                                                                                     monkeypatch, capsys):
    import dataclasses

    from vit_helpers import recipes

    monkeypatch.setitem(recipes.RECIPES, "demo", dataclasses.replace(
        recipes.RECIPES["demo"], model_overrides={**recipes.RECIPES["demo"].model_overrides, "drop_path": 0.2}))
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--stop-after-epoch", "1")) == 0  # the recipe's
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["config"]["drop_path"] == 0.2
    assert main(train_args(tiny_folder, tmp_path / "off", "--drop-path", "0", "--epochs", "1")) == 0  # 0 turns it off
    assert torch.load(tmp_path / "off" / "checkpoint.pt", weights_only=False)["config"]["drop_path"] == 0
    assert main(["train", "--out", str(out), "--resume", "--drop-path", "0.1"]) == 2
    assert "--drop-path cannot change" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["drop_path"] == 0.2


def test_crop_scale_reaches_the_loader_and_resumes_with_the_same_flag(tiny_folder, tmp_path, monkeypatch):
    from vit_helpers import gpu_data

    seen, make = [], gpu_data.make_cached_loaders

    def recording(*args, **kwargs):
        loaders = make(*args, **kwargs)
        seen.append(loaders[0].augment.scale)  # the training loader's random resized crop
        return loaders

    monkeypatch.setattr(gpu_data, "make_cached_loaders", recording)
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--crop-scale", "0.5", "1", "--stop-after-epoch", "1")) == 0
    assert main(["train", "--out", str(out), "--resume", "--crop-scale", "0.5", "1"]) == 0  # the same: allowed
    assert seen == [(0.5, 1.0), (0.5, 1.0)]
    assert json.loads((out / "metrics.json").read_text())["settings"]["crop_scale"] == [0.5, 1.0]
    assert main(train_args(tiny_folder, tmp_path / "bad", "--crop-scale", "0", "1")) == 2  # one clear line


def test_repeated_augmentation_reaches_both_loaders_and_cannot_change_on_resume(tiny_folder, tmp_path,
                                                                                  monkeypatch, capsys):
    from vit_helpers import data, gpu_data

    seen = []
    for module, name in ((gpu_data, "make_cached_loaders"), (data, "make_dataloaders")):
        def recording(*args, _make=getattr(module, name), **kwargs):
            loaders = _make(*args, **kwargs)
            seen.append(getattr(loaders[0].sampler, "repeats", 1))  # the training order's copies per image
            return loaders
        monkeypatch.setattr(module, name, recording)
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--repeated-augmentation", "2", "--stop-after-epoch", "1")) == 0
    assert json.loads((out / "metrics.json").read_text())["settings"]["repeated_augmentation"] == 2
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--repeated-augmentation", "3"]) == 2
    assert "--repeated-augmentation cannot change" in one_error_line(capsys)
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert main(train_args(tiny_folder, tmp_path / "plain", "--repeated-augmentation", "2", "--no-cached",
                           "--num-workers", "0", "--epochs", "1")) == 0
    assert seen == [2, 2, 2]  # the cached run, its resume, and the plain loaders
    capsys.readouterr()  # their progress bars
    assert main(train_args(tiny_folder, tmp_path / "bad", "--repeated-augmentation", "0")) == 2
    assert "argument --repeated-augmentation: expected a whole number of at least 1, got '0'" in \
        one_error_line(capsys)


def test_crop_padding_reaches_the_loader_replaces_a_recipes_crop_scale_and_cannot_change_on_resume(
        tiny_folder, tmp_path, monkeypatch, capsys):
    import dataclasses

    from vit_helpers import gpu_data, recipes
    from vit_helpers.cli import build_parser, run_settings

    seen, make = [], gpu_data.make_cached_loaders

    def recording(*args, **kwargs):
        loaders = make(*args, **kwargs)
        seen.append(loaders[0].augment.padding)  # the training loader's shifted crops
        return loaders

    monkeypatch.setattr(gpu_data, "make_cached_loaders", recording)
    monkeypatch.setitem(recipes.RECIPES, "demo", dataclasses.replace(recipes.RECIPES["demo"], crop_scale=(0.8, 1.0)))
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--augment", "basic", "--crop-padding", "2",
                           "--stop-after-epoch", "1")) == 0
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert (settings["crop_padding"], settings["crop_scale"]) == (2, None)  # the flag chose the kind of crop
    assert main(["train", "--out", str(out), "--resume", "--crop-padding", "3"]) == 2
    assert "--crop-padding cannot change" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0 and seen == [2, 2]

    def parsed(*flags):
        return run_settings(build_parser().parse_args(["train", "--recipe", "demo", "--out", "x", *flags]), "cpu")

    assert (parsed()["crop_scale"], parsed()["crop_padding"]) == ((0.8, 1.0), None)
    monkeypatch.setitem(recipes.RECIPES, "demo", dataclasses.replace(recipes.RECIPES["demo"], crop_padding=4))
    assert (parsed("--crop-scale", "0.5", "1")["crop_scale"], parsed("--crop-scale", "0.5", "1")["crop_padding"]
            ) == ((0.5, 1.0), None)
    assert main(train_args(tiny_folder, tmp_path / "both", "--crop-scale", "0.5", "1", "--crop-padding", "4")) == 2
    assert "choose between two kinds of crop" in capsys.readouterr().err
    assert main(train_args(tiny_folder, tmp_path / "negative", "--crop-padding", "-1")) == 2


def test_out_that_is_a_file_gives_one_line(tiny_folder, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        assert main(train_args(tiny_folder, out)) == 2
        assert f"{tmp_path / 'file'} is a file, not a folder" in one_error_line(capsys)


def test_resume_refuses_other_classes_and_fewer_epochs_and_lengthens_a_finished_run(tiny_folder, tmp_path, capsys):
    import re

    from vit_helpers.cli import build_parser

    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out)) == 0  # finished: 2 epochs of 2
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    other = make_image_folders(tmp_path / "other", {"cyan": (0, 200, 200), "magenta": (200, 0, 200),
                                                    "yellow": (200, 200, 0)})
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--data", str(other)]) == 2
    error = capsys.readouterr().err  # the refusal, after the progress bars of reading the other data
    line = error.strip().splitlines()[-1]
    assert "Traceback" not in error and line.startswith("python -m vit_helpers train: error: --resume: ")
    assert "has the classes cyan, magenta, yellow, but this run was trained on blue, green, red" in line
    assert main(["train", "--out", str(out), "--resume", "--epochs", "1"]) == 2
    assert "completed 2 epochs already, more than --epochs 1" in one_error_line(capsys)
    assert main(["train", "--out", str(out), "--resume", "--mixup", "0.3", "--mix-probability", "0.5"]) == 2
    line = one_error_line(capsys)
    assert "--mixup, --mix-probability cannot change" in line and "--no-compile" in line
    train_flags = {flag for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                   for flag in action.option_strings}
    assert set(re.findall(r"--[a-z-]+", line)) <= train_flags  # every flag it names exists
    assert (out / "metrics.json").read_bytes() == before  # a refused resume leaves the run as it was

    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 0  # a longer schedule
    metrics = json.loads((out / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["history"]] == [1, 2, 3]
    assert metrics["settings"]["epochs"] == 3 and load_checkpoint(out / "checkpoint.pt")["epoch"] == 3


def test_a_new_run_that_fails_leaves_no_results_of_the_run_it_replaces(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--epochs", "1")) == 0
    assert main(train_args(tiny_folder, out, "--lr", "1e30")) == 1  # a new run in the same --out: a NaN loss
    assert "holds an earlier run" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.pt"]  # metrics.json and plots are gone


def test_plots_are_written_whole_or_not_at_all(tiny_folder, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(figure, target, **kwargs):  # the disk fills up half-way through the first plot
        with open(target, "wb") if isinstance(target, (str, os.PathLike)) else contextlib.nullcontext(target) as file:
            file.write(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        main(train_args(tiny_folder, out, "--epochs", "1"))
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.pt", "metrics.json"]


def test_model_flag_replaces_the_recipes_model_with_its_overrides(tmp_path):
    from vit_helpers.cli import build_parser, model_config, run_settings

    def config(*flags):
        args = build_parser().parse_args(["train", "--recipe", "demo", "--out", str(tmp_path), *flags])
        return model_config(run_settings(args, "cpu"), num_classes=10)

    assert config().embed_dim == 128 and config().num_layers == 4  # the recipe's own ViT-Ti/7, made smaller
    assert config("--model", "vit-ti/7").embed_dim == 128  # the recipe's model, however it is spelled
    b16 = config("--model", "ViT-B/16", "--image-size", "32")
    assert (b16.embed_dim, b16.num_layers, b16.num_heads, b16.mlp_dim) == (768, 12, 12, 3072)


def test_resume_accepts_the_recipe_however_spelt_and_refuses_a_stop_already_past(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(tiny_folder, out, "--stop-after-epoch", "1")
    args[args.index("demo")] = "Demo"  # get_recipe takes any case; the run records the recipe's own name
    assert main(args) == 0
    assert load_checkpoint(out / "checkpoint.pt")["metadata"]["settings"]["recipe"] == "demo"
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--stop-after-epoch", "1"]) == 2
    assert "completed 1 epochs already, so --stop-after-epoch 1 is past" in one_error_line(capsys)
    assert main(["train", "--out", str(out), "--resume", "--recipe", "DEMO"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2


def test_resume_gives_settings_added_since_a_checkpoint_was_written_their_defaults(tiny_folder, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--stop-after-epoch", "1")) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    del checkpoint["metadata"]["settings"]["crop_scale"]  # as written before crop_scale existed
    torch.save(checkpoint, out / "checkpoint.pt")
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["settings"]["crop_scale"] is None


def test_compiled_augmentation_reaches_the_loader_and_may_change_on_resume(tiny_folder, tmp_path, monkeypatch):
    from vit_helpers import gpu_data

    seen, make = [], gpu_data.make_cached_loaders

    def recording(*args, **kwargs):
        loaders = make(*args, **kwargs)
        seen.append(loaders[0].augment.compiled is not None)  # the training loader's augmentation
        return loaders

    monkeypatch.setattr(gpu_data, "make_cached_loaders", recording)
    out = tmp_path / "run"
    assert main(train_args(tiny_folder, out, "--augment", "basic", "--compile-augment", "--stop-after-epoch",
                           "1")) == 0
    assert main(["train", "--out", str(out), "--resume", "--no-compile-augment"]) == 0  # a speed setting
    assert seen == [True, False]
    assert json.loads((out / "metrics.json").read_text())["settings"]["compile_augment"] is False


def test_a_recipes_compile_settings_reach_the_run_and_flags_override_them(tmp_path, monkeypatch):
    import dataclasses

    from vit_helpers import recipes
    from vit_helpers.cli import build_parser, run_settings, train_config

    monkeypatch.setitem(recipes.RECIPES, "demo", dataclasses.replace(recipes.RECIPES["demo"], compile_augment=True,
                                                                     compile_mode="reduce-overhead"))

    def settings(*flags):
        args = build_parser().parse_args(["train", "--recipe", "demo", "--out", str(tmp_path), *flags])
        return run_settings(args, "cpu")

    assert settings()["compile_augment"] is True and train_config(settings()).compile_mode == "reduce-overhead"
    overridden = settings("--no-compile-augment", "--compile-mode", "default")
    assert overridden["compile_augment"] is False and train_config(overridden).compile_mode == "default"
    assert train_config(run_settings(build_parser().parse_args(["train", "--out", str(tmp_path)]), "cpu")
                        ).compile_mode is None  # no recipe: torch.compile's default
