"""scripts/gpu_checks.py, the one script every GPU session runs: it must work the first time on the device, so
its `--smoke` mode runs every check here on the CPU, on a small archive laid out like the CIFAR-10 JPEG one."""

import dataclasses
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image


pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """cifar10/{train,test}/<class>/<n>.jpg, 10 per class and split, plus entries that must be ignored."""
    path = tmp_path_factory.mktemp("archive") / "cifar10-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for label, name in enumerate(CLASSES):
                for index in range(10):
                    add_file(tar, f"cifar10/{split}/{name}/{index:04d}.jpg", jpeg_bytes(label * 100 + index))
        add_file(tar, "cifar10/README.txt", b"not an image")
        add_file(tar, "cifar10/train/cat/.DS_Store", b"hidden")
        add_file(tar, "../../escaped/train/cat/9999.jpg", jpeg_bytes(9999))  # a name that points outside dest
    return path


def test_unpack_keeps_the_split_class_file_layout_and_stays_inside(gpu_checks, archive, tmp_path):
    dest = gpu_checks.unpack_cifar_jpegs(archive, tmp_path / "work" / "cifar", train_per_class=4, test_per_class=2)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert len(files) == 10 * (4 + 2)
    assert {f.split("/")[0] for f in files} == {"train", "test"}
    assert {f.split("/")[1] for f in files} == set(CLASSES)
    assert not any(".DS_Store" in f or "README" in f for f in files)
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and dest not in p.parents]
    assert outside == []
    assert not (tmp_path / "work" / "cifar.partial").exists()  # the staging folder was renamed


def test_smoke_run_measures_every_check_and_saves_them(gpu_checks, archive, tmp_path, capsys):
    results_path = tmp_path / "results.json"
    code = gpu_checks.main(["--smoke", "--checks", "all", "--device", "cpu", "--cifar-archive", str(archive),
                            "--work-dir", str(tmp_path / "work"), "--json", str(results_path),
                            "--sweep-epochs", "1"])  # six processes on two cores: one epoch each is enough here
    output = capsys.readouterr().out
    assert code == 0, output
    results = json.loads(results_path.read_text())
    assert results["matmul_ceiling_tflops"] > 0
    measured = {(r["implementation"], r["mode"]) for r in results["models"]["results"] if r["images_per_second"]}
    assert {("ours", "train"), ("ours", "inference")} <= measured
    assert results["data"]["synthetic_images_per_second"] > 0 and results["data"]["ratio"] > 0
    assert results["cifar"]["epochs_done"] == 1 and 0 <= results["cifar"]["test_accuracy"] <= 1
    runs = results["pace"]["runs"]  # the default --pace-runs, each at batch 16 in smoke mode
    assert [(run["batch_size"], run["compile_mode"]) for run in runs] == \
        [(16, None), (16, "reduce-overhead"), (16, None)]
    # Two epochs in smoke mode, the second resumed from a checkpoint on the same model, as the cifar check does
    assert all(run["ms_per_step"] > 0 and [r["epoch"] for r in run["history"]] == [1, 2] for run in runs)
    assert not (tmp_path / "work" / "pace_checkpoint.pt").exists()
    assert set(results["pace"]["loader_ms_per_batch"]) == {"16", "16 compiled"}  # the loader alone, both ways
    assert results["pace"]["augmentation_agreement"]["16"] > 0.999  # compiled = plain augmentation
    [same_run] = [row for row in results["summary"] if "reduce-overhead mode's run vs default" in row[1]]
    assert same_run[3:] == ["loss 1%, acc 0.01/0.02, weights 5%", "(smoke)"]  # a verdict, shown as (smoke) here
    assert runs[1]["weights_relative_difference"] == 0.0  # on the CPU no mode compiles: the very same run
    suggested = results["pace"]["suggested_cifar_settings"]  # nothing is faster on the CPU: the third branch
    # the recipe's own settings (whether the compiled augmentation is asked for depends on this machine's timing)
    assert suggested["flags"] in ("--cifar-set epochs=1000", "--cifar-set epochs=1000 --cifar-set compile_augment=true")
    # The same seeds, so the same run whatever the batch size's place in the list (on the CPU no mode compiles)
    assert len({(run["train_loss"], run["test_accuracy"]) for run in runs}) == 1
    checks = {row[0] for row in results["summary"]}
    assert checks == {"matmul", "models", "data", "attention", "pace", "cifar", "sweep"}
    # On the CPU: PyTorch's choice and the math kernel, the only one the CPU has, and the recipe's model either way
    assert [row["attention_kernel"] for row in results["attention"]["results"]] == [None, "math"]
    assert all(row["images_per_second"] > 0 for row in results["attention"]["results"])
    assert json.loads(results["attention"]["model_overrides"])["num_layers"] == 9
    assert {variant["name"] for variant in results["sweep"]["variants"]} == {spec[0] for spec in
                                                                             gpu_checks.DEFAULT_SWEEP}
    # The target as a verdict: ours / timm from the same run (timm is a dev dependency, so measured here)
    assert ("timm", "train") in measured
    speed = {(r["implementation"], r["mode"]): r["images_per_second"] for r in results["models"]["results"]}
    verdicts = {row[1]: row[2] for row in results["summary"] if row[1].startswith("ours / timm")}
    assert verdicts["ours / timm, train eager"] == f"{speed['ours', 'train'] / speed['timm', 'train']:.2f}x"
    assert not [row for row in results["summary"] if row[1] == "error"]
    table = output[output.rindex("\ncheck "):].splitlines()[1:]  # the summary printed at the end
    assert table[0].split() == ["check", "measurement", "value", "target", "verdict"]
    assert [line.split()[0] for line in table[1:] if line.strip() and not line.startswith("saved")] == \
        [row[0] for row in results["summary"]]


def test_pace_rows_flag_a_mode_that_trains_differently(gpu_checks):
    def run(batch, mode, loss=2.0, train_acc=0.30, test_acc=0.35, weights=0.0):
        return {"batch_size": batch, "compile_mode": mode, "train_loss": loss, "train_accuracy": train_acc,
                "test_accuracy": test_acc, "weights_relative_difference": weights}

    runs = [run(512, None),
            run(512, "reduce-overhead", loss=2.015, train_acc=0.305, weights=0.004),  # rounding
            run(2048, None, loss=2.3),  # another batch size: nothing to compare with
            {"batch_size": 2048, "compile_mode": "reduce-overhead", "error": "BackendCompilerFailed: ..."},
            run(512, "max-autotune", loss=2.1),  # 5% off in loss
            run(512, "max-autotune", test_acc=0.25),  # an evaluation graph that read old weights
            run(512, "max-autotune", weights=0.3)]  # stale gradients: same loss, other weights
    rows = gpu_checks.same_run_in_every_mode(runs)
    assert [row[4] for row in rows] == ["PASS", "FAIL", "FAIL", "FAIL"]
    assert all(row[1].startswith("batch 512: ") and row[1].endswith("vs default mode's") for row in rows)
    assert rows[0][2] == "loss 0.75%, acc 0.005/0.000, weights 0.40% apart"


def test_pace_suggests_the_cifar_settings_by_its_rule(gpu_checks):
    from vit_helpers.recipes import get_recipe

    recipe = gpu_checks.with_changes(get_recipe("cifar10", "cuda"), ["batch_size=512", "lr=1e-3", "warmup_epochs=5"])

    def run(batch, mode, speed):
        return {"batch_size": batch, "compile_mode": mode, "train_images_per_second": speed, "train_loss": 2.0,
                "train_accuracy": 0.3, "test_accuracy": 0.35, "weights_relative_difference": 0.0}

    def suggest(runs, agreement=1.0, ms=(5.0, 1.0), fell_back=False):
        return gpu_checks.suggest_cifar_settings(runs, {512: agreement}, {"512": ms[0], "512 compiled": ms[1]},
                                                 fell_back, recipe)

    graphs, why = suggest([run(512, None, 23000), run(512, "reduce-overhead", 80000), run(2048, None, 60000)])
    assert graphs == ("--cifar-set epochs=1000 --cifar-set compile_mode=reduce-overhead "
                      "--cifar-set compile_augment=true") and why.startswith("CUDA graphs: 3.48x")
    stale = run(512, "reduce-overhead", 80000) | {"weights_relative_difference": 0.3}  # fast but not the same run
    large, why = suggest([run(512, None, 23000), stale, run(2048, None, 60000)], agreement=0.9)
    # The recipe's own CUDA graphs and compiled augmentation (on a GPU) are turned off where they were not chosen
    assert large == ("--cifar-set epochs=1000 --cifar-set compile_mode=none --cifar-set batch_size=2048 "
                     "--cifar-set lr=0.002 --cifar-set warmup_epochs=20 --cifar-set compile_augment=false")
    assert why.endswith("augmentation plain")  # 0.9: disagreed
    neither, _ = suggest([run(512, None, 23000), run(512, "reduce-overhead", 30000), run(2048, None, 40000)],
                         ms=(1.0, 5.0))  # and the compiled augmentation was slower
    assert neither == "--cifar-set epochs=1000 --cifar-set compile_mode=none --cifar-set compile_augment=false"
    assert suggest([run(512, None, 23000), run(2048, None, 90000)], fell_back=True)[0].endswith(
        "warmup_epochs=20 --cifar-set compile_augment=false")
    on_cpu, _ = gpu_checks.suggest_cifar_settings([run(512, None, 23000)], {512: 1.0}, {"512": 1.0, "512 compiled":
                                                                                       5.0}, False,
                                                  get_recipe("cifar10", "cpu"))
    assert on_cpu == "--cifar-set epochs=1000"  # the CPU recipe compiles nothing
    failed = {"batch_size": 512, "compile_mode": None, "error": "BackendCompilerFailed: ..."}
    assert suggest([failed, run(2048, None, 90000)]) == ("", "batch 512 in the default mode failed: fix that first")
    # Only CUDA graphs asked for (as the plan's second call does): nothing failed, there is just nothing to compare
    assert suggest([run(512, "reduce-overhead", 58000)]) == ("", "none: no run of batch 512 in the default mode was "
                                                                 "asked for (--pace-runs), to compare with")


def test_the_pace_profile_times_the_engines_own_steps(gpu_checks):
    from torch.utils.data import DataLoader, TensorDataset

    from vit_helpers.training import TrainConfig

    torch.manual_seed(0)
    model = gpu_checks.ViT(gpu_checks.ViTConfig.named("ViT-Ti/16", embed_dim=32, num_layers=1, num_heads=2,
                                                      mlp_dim=64, image_size=16, patch_size=8, num_classes=3))
    data = TensorDataset(torch.rand(40, 3, 16, 16), torch.arange(40) % 3)
    config = TrainConfig(device="cpu", compile=False, mixup_alpha=0.4, mix_probability=0.5)
    profile = gpu_checks.profile_training_steps(model, DataLoader(data, batch_size=8), torch.device("cpu"), config,
                                                rows=5, steps=4)
    assert profile["steps"] == 4 and profile["wall_ms_per_step"] > 0  # 4 of the loader's 5 batches, profiled
    assert 0 < profile["host_operator_ms_per_step"] <= profile["wall_ms_per_step"]
    assert profile["device_busy_ms_per_step"] is None and profile["device_table"] == ""  # no device on the CPU
    assert "aten::" in profile["host_table"]
    assert gpu_checks.profile_summary(profile).endswith(
        f"no device profiled, host in operators {profile['host_operator_ms_per_step']:.2f} ms, waiting for the device "
        f"{profile['host_waiting_ms_per_step']:.2f} ms")
    busy = dict(profile, wall_ms_per_step=5.0, device_busy_ms_per_step=1.25, host_operator_ms_per_step=2.0,
                host_waiting_ms_per_step=0.5)
    assert gpu_checks.profile_summary(busy) == ("5.00 ms/step under the profiler, device busy 1.25 ms (25%), host in "
                                                "operators 2.00 ms, waiting for the device 0.50 ms")
    assert "more than the wall time" in gpu_checks.profile_summary(dict(busy, device_busy_ms_per_step=6.0))


def test_the_profiles_device_time_counts_each_kernel_once_and_the_hosts_waits_apart(gpu_checks):
    """What a CUDA profile holds (the GPU's own arithmetic, unmeasured here): kernels, and user annotations, the
    device-side copies of ranges such as Optimizer.step, which span kernels already counted; and on the host,
    operators and the calls that wait for the device."""
    from types import SimpleNamespace

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(key, device_type, cpu_us=0.0, device_us=0.0, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_cpu_time_total=cpu_us,
                               self_device_time_total=device_us, is_user_annotation=annotation)

    events = [event("aten::mm", cpu, cpu_us=300.0), event("cudaLaunchKernel", cpu, cpu_us=100.0),
              event("cudaStreamSynchronize", cpu, cpu_us=2000.0), event("cudaDeviceSynchronize", cpu, cpu_us=400.0),
              event("sm90_xmma_gemm", cuda, device_us=3000.0), event("triton_poi_fused_add", cuda, device_us=1000.0),
              event("Optimizer.step#AdamW.step", cuda, device_us=800.0, annotation=True),
              event("## Call CompiledFxGraph ##", cuda, device_us=3900.0, annotation=True)]
    figures = gpu_checks.step_figures(events, steps=2)
    assert figures == {"device_busy_ms_per_step": 2.0, "host_operator_ms_per_step": 0.2,
                       "host_waiting_ms_per_step": 1.2}
    assert gpu_checks.step_figures(events[:4], steps=2)["device_busy_ms_per_step"] is None  # the CPU alone


def test_the_pace_check_profiles_each_run_and_keeps_a_runs_figures_when_its_profile_fails(gpu_checks, archive,
                                                                                          tmp_path, monkeypatch):
    profile, calls = gpu_checks.profile_training_steps, []

    def second_fails(*args, **kwargs):
        calls.append(args[3].compile_mode)  # the run's TrainConfig
        if len(calls) == 2:
            raise RuntimeError("profiler unavailable")
        return profile(*args, **kwargs)

    monkeypatch.setattr(gpu_checks, "profile_training_steps", second_fails)
    results_path = tmp_path / "pace.json"
    assert gpu_checks.main(["--smoke", "--device", "cpu", "--checks", "pace", "--pace-runs", "16,16:reduce-overhead",
                            "--profile", "3", "--cifar-archive", str(archive), "--work-dir", str(tmp_path / "work"),
                            "--json", str(results_path)]) == 0
    assert calls == [None, "reduce-overhead"]  # each run's own settings, profiled after it
    saved = json.loads(results_path.read_text())
    first, second = saved["pace"]["runs"]
    assert first["profile"]["steps"] > 0 and "aten::" in first["profile"]["host_table"]
    assert second["ms_per_step"] > 0 and second["profile_error"] == "RuntimeError: profiler unavailable"
    verdicts = {row[1]: row[4] for row in saved["summary"] if row[1].endswith("profiled step")}
    assert list(verdicts.values()) == ["", "FAIL"]


def test_the_default_checks_fit_one_device_command_and_all_means_all(gpu_checks):
    assert gpu_checks.parse_args([]).checks == ["matmul", "models", "data"]  # cifar alone takes its 10 minutes
    assert gpu_checks.parse_args(["--checks", "all"]).checks == ["matmul", "models", "data", "attention", "pace",
                                                                 "cifar", "sweep"]


@pytest.mark.parametrize("device, speeds, fastest", [
    ("cpu", {None: 100.0, "math": 120.0}, "math"),  # 1.2x: the cifar check is told to use it
    ("cpu", {None: 100.0, "math": 104.0}, None),  # under ATTENTION_MIN_SPEEDUP: PyTorch's own choice stays
    ("cpu", {None: None, "math": 120.0}, None),  # PyTorch's choice failed: nothing to compare with, no suggestion
    # On CUDA every kernel, compiled; the fastest wins, even where another also clears the bar
    ("cuda", {None: 100.0, "math": 130.0, "efficient": 110.0, "flash": 140.0, "cudnn": None}, "flash"),
])
def test_the_attention_check_suggests_the_fastest_kernel_only_well_ahead_of_pytorchs(gpu_checks, monkeypatch, device,
                                                                                      speeds, fastest):
    timed, fast_math = [], []

    def bench_one(implementation, mode, config, batch_size, device, timing, ceiling):
        timed.append((config.attention_kernel, batch_size, timing.compile, timing.profile_rows > 0))
        speed = speeds[config.attention_kernel]
        return gpu_checks.bench.BenchResult(implementation, mode, batch_size, timing.compile, ms_per_step=1.0,
                                            images_per_second=speed, note="" if speed else "failed: no kernel")

    monkeypatch.setattr(gpu_checks.bench, "bench_one", bench_one)
    monkeypatch.setattr(gpu_checks.bench, "measure_matmul_ceiling", lambda device: 1e12)
    monkeypatch.setattr(gpu_checks.training, "_enable_fast_math", lambda device: fast_math.append(device.type))
    args = gpu_checks.parse_args(["--checks", "attention", "--cifar-set", "batch_size=64"])
    results = {}
    rows = gpu_checks.check_attention(args, torch.device(device), results)
    # 4x the recipe's batch, each profiled; compiled on CUDA only; TF32 as in training
    assert timed == [(kernel, 256, device == "cuda", True) for kernel in speeds] and fast_math == [device]
    recipe_overrides = gpu_checks.get_recipe("cifar10").model_overrides
    assert results["attention"]["fastest"] == fastest
    assert json.loads(results["attention"]["model_overrides"]) == (
        {**recipe_overrides, "attention_kernel": fastest} if fastest else recipe_overrides)
    suggestion = rows[-1][2]
    assert (f'"attention_kernel": "{fastest}"' in suggestion) == (fastest is not None)
    assert rows[-1][1] == "for the cifar check" and ("failed" in suggestion) == (speeds[None] is None)
    assert [row[4] for row in rows[:-1]] == ["FAIL" if speed is None else "" for speed in speeds.values()]


def test_unknown_check_is_refused(gpu_checks, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_checks.main(["--checks", "matmul,speed"])
    assert exit_info.value.code == 2
    assert "unknown check(s) speed" in capsys.readouterr().err


def test_recipe_changes_are_parsed_as_the_fields_types(gpu_checks, capsys):
    from vit_helpers.recipes import get_recipe

    recipe = gpu_checks.with_changes(get_recipe("cifar10"), ["lr=2e-3", "epochs=150", "augment=basic",
                                                             'model_overrides={"num_layers": 6}',
                                                             "crop_scale=0.5,1", "augment_magnitude=27",
                                                             "random_erasing=0.25", "mix_probability=0.5",
                                                             "repeated_augmentation=3"])
    assert (recipe.lr, recipe.epochs, recipe.augment, recipe.crop_scale) == (2e-3, 150, "basic", (0.5, 1.0))
    assert (recipe.augment_magnitude, recipe.random_erasing, recipe.mix_probability) == (27, 0.25, 0.5)
    assert recipe.repeated_augmentation == 3
    with pytest.raises(SystemExit):  # checked before any image is unpacked
        gpu_checks.parse_args(["--cifar-set", "augment=false", "--cifar-set", "random_erasing=0.25"])
    assert "choose augment 'basic', 'strong' or 'autoaugment', or random_erasing 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a share of batches mixed, in a run that mixes none
        gpu_checks.parse_args(["--cifar-set", "mixup_alpha=0", "--cifar-set", "cutmix_alpha=0", "--cifar-set",
                               "mix_probability=0.5"])
    assert "and mixing is off" in capsys.readouterr().err
    config = recipe.model_config(10)  # the dict replaces the recipe's whole: ViT-Ti/4 with 6 layers
    assert (config.num_layers, config.embed_dim, config.num_heads, config.mlp_dim) == (6, 192, 3, 768)
    with pytest.raises(SystemExit):
        gpu_checks.parse_args(["--cifar-set", "learning_rate=1"])
    assert "no field 'learning_rate'" in capsys.readouterr().err
    # A kind of crop replaces the other, as on the command line; "none" restores an optional field's default.
    shifted = gpu_checks.with_changes(get_recipe("cifar10"), ["crop_padding=4"])
    assert (shifted.crop_padding, shifted.crop_scale) == (4, None)
    resized = gpu_checks.with_changes(shifted, ["crop_scale=0.5,1"])
    assert (resized.crop_padding, resized.crop_scale) == (None, (0.5, 1.0))
    assert gpu_checks.with_changes(resized, ["crop_scale=none"]).crop_scale is None
    # Values the loaders or the model would refuse are refused here, before the device unpacks any image.
    for bad, message in ((["crop_scale=0.5,1", "crop_padding=4"], "choose between two kinds of crop"),
                         (["crop_padding=-2"], "crop_padding must be a whole number of pixels"),
                         (["crop_scale=2,3"], "crop_scale must be"), (["augment=strnog"], "strnog"),
                         (['model_overrides={"num_heads": 5}'], "num_heads"),
                         (["augment_magnitude=40"], "augment_magnitude must be a whole number from 0 to 30"),
                         (["repeated_augmentation=0"], "repeated_augmentation must be a whole number of copies"),
                         (["compile_augment=Flase"], "compile_augment is true or false, not 'Flase'"),
                         (["cached=no"], "cached is true or false, not 'no'")):
        with pytest.raises(SystemExit):
            gpu_checks.parse_args([arg for value in bad for arg in ("--cifar-set", value)])
        assert message in capsys.readouterr().err, bad


def test_cifar_check_probes_then_finishes_the_schedule(gpu_checks, archive, tmp_path):
    results_path = tmp_path / "results.json"
    assert gpu_checks.main(["--smoke", "--device", "cpu", "--checks", "cifar", "--cifar-epochs", "3",
                            "--cifar-archive", str(archive), "--work-dir", str(tmp_path / "work"),
                            "--cifar-set", "compile_augment=true", "--json", str(results_path)]) == 0
    cifar = json.loads(results_path.read_text())["cifar"]
    assert cifar["epochs_done"] == 3 and [r["epoch"] for r in cifar["history"]] == [1, 2, 3]
    assert cifar["compile_augment"] is True and cifar["recipe"]["compile_augment"] is True  # the recipe's field
    assert not (tmp_path / "work" / "cifar_check_checkpoint.pt").exists()


def test_cifar_check_stops_after_the_probe_when_the_schedule_cannot_fit(gpu_checks, archive, tmp_path):
    results_path = tmp_path / "results.json"
    gpu_checks.main(["--smoke", "--device", "cpu", "--checks", "cifar", "--cifar-epochs", "500",
                     "--cifar-minutes", "0.05", "--cifar-archive", str(archive), "--work-dir", str(tmp_path / "work"),
                     "--json", str(results_path)])
    saved = json.loads(results_path.read_text())
    cifar = saved["cifar"]
    # The probe: the first 4 of the recipe's 5 warm-up epochs, each evaluated (the recipe evaluates every 5th)
    assert cifar["epochs_done"] == 4 and cifar["projected_seconds"] > 3  # 500 epochs cannot fit in 3 s
    history = cifar["history"]
    assert all(record["test_accuracy"] is not None for record in history)
    # The pace: epochs 2-4's median training, and a fifth of their median evaluation
    trained = sorted(record["seconds"] - record["evaluation_seconds"] for record in history[1:])[1]
    evaluation = sorted(record["evaluation_seconds"] for record in history[1:])[1]
    assert cifar["seconds_per_epoch"] == pytest.approx(trained + evaluation / 5)
    assert cifar["epochs_that_fit"] < 500
    assert "projected" in saved["summary"][0][1] and "epochs that fit" in saved["summary"][1][1]


def test_the_pace_counts_each_evaluation_once_per_eval_every_epochs(gpu_checks):
    def record(seconds, evaluated):
        return {"seconds": seconds + (0.5 if evaluated else 0.0), "evaluation_seconds": 0.5 if evaluated else 0.0,
                "test_accuracy": 0.5 if evaluated else None}

    history = [record(30.0, True), record(2.0, False), record(2.2, False), record(2.1, True)]
    assert gpu_checks.seconds_per_epoch(history, 5) == pytest.approx(2.1 + 0.5 / 5)
    assert gpu_checks.seconds_per_epoch(history[:3], 5) == pytest.approx(2.1 + 0.5 / 5)  # epoch 1's evaluation
    every = [record(30.0, True), record(2.0, True), record(2.2, True)]
    assert gpu_checks.seconds_per_epoch(every, 1) == pytest.approx(2.1 + 0.5)
    old = [{"seconds": 30.0, "test_accuracy": 0.5}, {"seconds": 2.6, "test_accuracy": 0.5}]  # before the split
    assert gpu_checks.seconds_per_epoch(old, 1) == pytest.approx(2.6)


def test_epochs_that_fit_the_budget_at_the_measured_pace(gpu_checks):
    # 2 epochs took 60 s, each further one 10 s: (600 * 0.98 - 60) // 10 = 52 more, and never more than planned.
    assert gpu_checks.epochs_that_fit(200, 2, 60.0, 10.0, 600.0) == 54
    assert gpu_checks.epochs_that_fit(40, 2, 60.0, 10.0, 600.0) == 40
    assert gpu_checks.epochs_that_fit(200, 2, 700.0, 10.0, 600.0) == 2  # already past the budget


TINY_CIFAR_MODEL = 'model_overrides={"embed_dim": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64}'


def test_cifar_check_shortens_a_schedule_that_cannot_fit_and_finishes_it(gpu_checks, archive, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(gpu_checks, "epochs_that_fit", lambda planned, *_: 4)  # as if only 4 of 50 fitted
    results_path = tmp_path / "results.json"
    assert gpu_checks.main(["--smoke", "--device", "cpu", "--checks", "cifar", "--cifar-epochs", "50",
                            "--cifar-set", "warmup_epochs=2", "--cifar-set", TINY_CIFAR_MODEL,
                            "--cifar-archive", str(archive), "--work-dir", str(tmp_path / "work"),
                            "--json", str(results_path)]) == 0
    saved = json.loads(results_path.read_text())
    cifar = saved["cifar"]
    assert (cifar["epochs_planned"], cifar["epochs_scheduled"], cifar["epochs_done"]) == (50, 4, 4)
    assert cifar["history"][-1]["lr"] == 0.0  # the shortened cosine ran to its end; 50 epochs' would be near 1e-3
    assert "of 50 planned: --cifar-set epochs=4" in saved["summary"][0][1]


def test_cifar_check_does_not_shorten_a_schedule_past_its_warm_up(gpu_checks, archive, tmp_path, monkeypatch):
    # With a 1-epoch warm-up, the probe's second epoch already decays on the 50-epoch cosine: a 4-epoch schedule
    # from the start would differ, so the check stops and says how many epochs fit instead.
    monkeypatch.setattr(gpu_checks, "epochs_that_fit", lambda planned, *_: 4)
    results_path = tmp_path / "results.json"
    gpu_checks.main(["--smoke", "--device", "cpu", "--checks", "cifar", "--cifar-epochs", "50",
                     "--cifar-set", "warmup_epochs=1", "--cifar-set", TINY_CIFAR_MODEL,
                     "--cifar-archive", str(archive), "--work-dir", str(tmp_path / "work"),
                     "--json", str(results_path)])
    saved = json.loads(results_path.read_text())
    assert saved["cifar"]["epochs_done"] == 2 and saved["cifar"]["epochs_that_fit"] == 4
    assert "epochs that fit" in saved["summary"][1][1]


def test_an_implementation_that_fails_is_noted_and_the_others_are_still_measured_and_saved(gpu_checks, tmp_path,
                                                                                          monkeypatch):
    # As with a compiler error on the device, or a timm that lacks an argument the benchmark passes: the run must
    # go on to the next implementation and check, and keep what it measured.
    build = gpu_checks.bench.build_model

    def build_model(implementation, config):
        if implementation == "timm":
            raise TypeError("VisionTransformer.__init__() got an unexpected keyword argument 'class_token'")
        return build(implementation, config)

    monkeypatch.setattr(gpu_checks.bench, "build_model", build_model)
    saves = []
    save_results = gpu_checks.save_results
    monkeypatch.setattr(gpu_checks, "save_results", lambda path, results: saves.append(set(results)) or
                        save_results(path, results))
    results_path = tmp_path / "results.json"
    assert gpu_checks.main(["--smoke", "--device", "cpu", "--checks", "models", "--modes", "train",
                            "--implementations", "ours,timm", "--json", str(results_path)]) == 0
    saved = json.loads(results_path.read_text())
    by_name = {r["implementation"]: r for r in saved["models"]["results"]}
    assert by_name["ours"]["images_per_second"] > 0
    assert by_name["timm"]["images_per_second"] is None and "class_token" in by_name["timm"]["note"]
    rows = {row[1]: row for row in saved["summary"]}
    assert rows["ViT-Ti/16 train timm eager"][4] == "FAIL"
    assert rows["ours / timm, train eager"][2] == "not measured"
    assert len(saves) >= 2 and "models" in saves[0]  # saved within the check, before its end


def test_cifar_check_times_its_pace_on_epochs_resumed_after_the_first(gpu_checks, archive, tmp_path, monkeypatch):
    # On the H200 with CUDA graphs, the first fit's epochs ran at half the pace of every epoch after a resume: the
    # pace that plans the schedule is timed as the rest of the run trains, after a resume.
    calls, fit = [], gpu_checks.training.fit

    def recording_fit(*args, **kwargs):
        calls.append((kwargs.get("resume", False), kwargs.get("stop_after_epoch")))
        return fit(*args, **kwargs)

    monkeypatch.setattr(gpu_checks.training, "fit", recording_fit)
    results_path = tmp_path / "results.json"
    assert gpu_checks.main(["--smoke", "--device", "cpu", "--checks", "cifar", "--cifar-epochs", "5",
                            "--cifar-set", TINY_CIFAR_MODEL, "--cifar-archive", str(archive),
                            "--work-dir", str(tmp_path / "work"), "--json", str(results_path)]) == 0
    assert calls == [(False, 1), (True, 4), (True, None)]  # epoch 1; epochs 2-4, timed; the rest
    cifar = json.loads(results_path.read_text())["cifar"]
    assert [r["epoch"] for r in cifar["history"]] == [1, 2, 3, 4, 5]
    probe = cifar["history"][1:4]  # epochs 2-4, each evaluated; after them the recipe's every 5th (and the last)
    assert [record["test_accuracy"] is not None for record in cifar["history"]] == [True] * 5
    trained = sorted(record["seconds"] - record["evaluation_seconds"] for record in probe)[1]
    evaluation = sorted(record["evaluation_seconds"] for record in probe)[1]
    assert cifar["probe_seconds_per_epoch"] == pytest.approx(trained + evaluation / 5)


def test_sweep_trains_every_variant_side_by_side_and_tables_them(gpu_checks, archive, tmp_path):
    results_path = tmp_path / "out" / "results.json"
    assert gpu_checks.main(["--smoke", "--device", "cpu", "--checks", "sweep", "--cifar-archive", str(archive),
                            "--work-dir", str(tmp_path / "work"), "--json", str(results_path),
                            "--cifar-set", "warmup_epochs=1",
                            "--sweep", "tiny", TINY_CIFAR_MODEL.replace('"num_heads": 2', '"num_heads": 4'),
                            "--sweep", "cnn", "reference=resnet18"]) == 0
    saved = json.loads(results_path.read_text())
    variants = {variant["name"]: variant for variant in saved["sweep"]["variants"]}
    assert set(variants) == {"tiny", "cnn"} and saved["sweep"]["cifar_set"] == ["warmup_epochs=1"]
    # Each process trained what its variant asked for: a 1-layer ViT of width 32 (four heads), and ResNet-18 with
    # its 32 px stem (3x3, stride 1: 64*3*3*3 weights instead of 64*3*7*7) and a 10-class head.
    tiny = json.loads((tmp_path / "out" / "sweep_tiny.json").read_text())
    assert tiny["recipe"]["model_overrides"]["num_heads"] == 4 and tiny["recipe"]["warmup_epochs"] == 1
    assert variants["tiny"]["parameters"] == sum(p.numel() for p in gpu_checks.ViT(
        gpu_checks.get_recipe("cifar10").model_config(10).__class__.named(
            "ViT-S/4", embed_dim=32, num_layers=1, num_heads=4, mlp_dim=64, image_size=32, num_classes=10)
    ).parameters())
    assert variants["cnn"]["model"] == "resnet18" and variants["cnn"]["parameters"] == 11_689_512 - 512 * 990 - 990 \
        - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    for variant in variants.values():
        assert variant["epochs_done"] == 2 and [r["epoch"] for r in variant["history"]] == [1, 2]
        assert 0 <= variant["test_accuracy"] <= 1
    rows = [row for row in saved["summary"] if row[0] == "sweep"]
    assert rows[0][1].startswith("tiny (model_overrides=") and rows[1][1] == "cnn (reference=resnet18)"
    # The ViT is judged against the cifar10 target (a verdict, "(smoke)" at these sizes); the CNN is not a ViT
    assert rows[0][3:] == [gpu_checks.CIFAR_TARGET, "(smoke)"] and rows[1][3:] == ["", ""]  # JSON: lists
    assert all("2/2 epochs" in row[2] for row in rows[:2])
    assert rows[2][1] == "best test accuracy"
    assert (tmp_path / "out" / "sweep_cnn.log").read_text().count("epoch 2/2") >= 1
    for name in ("tiny", "cnn"):  # each waited for the other's first epoch before timing its pace
        assert "waited" in (tmp_path / "out" / f"sweep_{name}.log").read_text()
        assert "gave up" not in (tmp_path / "out" / f"sweep_{name}.log").read_text()


def test_a_sweep_process_waits_for_the_others_first_epochs_and_not_forever(gpu_checks, tmp_path):
    import threading
    import time

    args = gpu_checks.parse_args(["--work-dir", str(tmp_path)])
    names = ["a", "b", "c"]
    gpu_checks.sibling_marker(args, "c", mark=True)  # c is done (or failed) already; b finishes its first epoch later
    later = threading.Timer(0.5, lambda: gpu_checks.sibling_marker(args, "b", mark=True))
    later.start()
    waited = gpu_checks.wait_for_siblings(args, "a", names, timeout=30)
    later.join()
    assert 0.4 < waited < 10 and gpu_checks.sibling_marker(args, "a").exists()
    gpu_checks.sibling_marker(args, "b").unlink()  # b died without a word: a waits out the timeout, then goes on
    started = time.perf_counter()
    assert gpu_checks.wait_for_siblings(args, "a", names, timeout=0.5) >= 0.5
    assert time.perf_counter() - started < 10


def test_a_sweep_process_that_fails_says_why_and_frees_the_others(gpu_checks, tmp_path, monkeypatch):
    """A variant that raises (a NaN loss at a high learning rate, memory) leaves its reason for the parent's table
    in its JSON, and its marker, so that the others do not wait for its first epoch."""
    import time

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(gpu_checks, "train_sweep_variant", out_of_memory)
    json_path = tmp_path / "out" / "results.json"
    args = gpu_checks.parse_args(["--work-dir", str(tmp_path / "work"), "--json", str(json_path), "--checks", "sweep",
                                  "--sweep-child", "0", "--sweep-deadline", str(time.time() + 60)])
    gpu_checks.sweep_log_dir(args).mkdir(parents=True, exist_ok=True)
    name = gpu_checks.DEFAULT_SWEEP[0][0]
    assert gpu_checks.run_sweep_child(args, torch.device("cpu")) == 1
    saved = json.loads((gpu_checks.sweep_log_dir(args) / f"sweep_{name}.json").read_text())
    assert saved["error"] == "RuntimeError: CUDA out of memory" and saved["name"] == name
    assert gpu_checks.sibling_marker(args, name).exists()


def test_a_sweep_variant_shortens_its_schedule_to_end_by_the_deadline(gpu_checks, archive, tmp_path, monkeypatch):
    """Each variant's process plans its schedule as the cifar check does (`fit_within_budget`): a probe, then the
    epochs that end by the sweep's deadline, so it ends its schedule, learning rate decayed, instead of being cut
    off in the middle. Run here in-process, as the sweep starts it (--sweep-child)."""
    import time

    monkeypatch.setattr(gpu_checks, "epochs_that_fit", lambda planned, *_: 4)  # as if only 4 of 50 fitted
    out = tmp_path / "out"
    assert gpu_checks.main(["--device", "cpu", "--checks", "sweep", "--cifar-archive", str(archive),  # not --smoke,
                            "--work-dir", str(tmp_path / "work"), "--json", str(out / "results.json"),  # which would
                            "--sweep-epochs", "50", "--cifar-set", "warmup_epochs=2",  # cap the schedule at 2 epochs
                            "--cifar-set", "batch_size=16", "--sweep", "tiny", TINY_CIFAR_MODEL,
                            "--sweep-child", "0", "--sweep-deadline", str(time.time() + 600)]) == 0
    saved = json.loads((out / "sweep_tiny.json").read_text())
    assert (saved["epochs_scheduled"], len(saved["history"])) == (4, 4)
    assert saved["history"][-1]["lr"] == 0.0  # the shortened cosine ran to its end
    assert not list(out.glob("*.pt")) and not list((tmp_path / "work").glob("*.pt"))  # the probe's, removed
    row = gpu_checks.sweep_result(saved, 50, 1.0)
    assert "4/4 epochs (of 50: shortened to fit)" in row and "budget hit" not in row
    stopped = dict(saved, epochs_scheduled=None, epochs_that_fit=3, history=saved["history"][:2])
    assert "2/50 epochs (stopped after the probe: 3 fit)" in gpu_checks.sweep_result(stopped, 50, 1.0)
    cut = dict(saved, history=saved["history"][:3])
    assert "3/4 epochs (budget hit) (of 50: shortened to fit)" in gpu_checks.sweep_result(cut, 50, 1.0)
    # The probe (epochs 1-2) evaluates each epoch, then the recipe's every 5th and the last: epoch 3 is not. A
    # history that ended elsewhere shows its last test accuracy with its epoch.
    assert [record["test_accuracy"] is not None for record in saved["history"]] == [True, True, False, True]
    accuracy = saved["history"][1]["test_accuracy"]
    assert f"test acc {accuracy:.4f} (epoch 2), train acc" in gpu_checks.sweep_result(cut, 50, 1.0)


def test_a_sweep_variant_meets_the_cifar10_target_only_at_090_with_its_schedule_ended_within_10_minutes(gpu_checks):
    def saved(accuracy, done=40, scheduled=40):
        return {"history": [{"test_accuracy": 0.5}] * (done - 1) + [{"test_accuracy": accuracy}],
                "epochs_scheduled": scheduled}

    assert gpu_checks.sweep_verdict(saved(0.9), 8.5) == "PASS"
    assert gpu_checks.sweep_verdict(saved(0.8999), 8.5) == "FAIL"
    assert gpu_checks.sweep_verdict(saved(0.95, done=30), 8.5) == "FAIL"  # the budget cut its schedule short
    assert gpu_checks.sweep_verdict(saved(0.95, done=3, scheduled=None), 8.5) == "FAIL"  # stopped after the probe
    assert gpu_checks.sweep_verdict(saved(0.95), 12) == "FAIL"  # a sweep longer than the target's 10 minutes
    # Where the variant says when it ended, that is what counts: decoding and a slow start included
    assert gpu_checks.sweep_verdict(dict(saved(0.95), seconds_since_sweep_start=599.0), 12) == "PASS"
    assert gpu_checks.sweep_verdict(dict(saved(0.95), seconds_since_sweep_start=601.0), 8.5) == "FAIL"


def test_sweep_variants_are_checked_when_the_arguments_are_parsed(gpu_checks, capsys):
    args = gpu_checks.parse_args(["--checks", "sweep", "--cifar-set", "compile_mode=none"])
    assert args.sweep == list(gpu_checks.DEFAULT_SWEEP)
    # Built for the device the sweep runs on: on a GPU the recipe's compiled augmentation, and the compile mode
    # --cifar-set gives all
    by_name = {variant["name"]: variant for variant in gpu_checks.sweep_variants(args.sweep, args.cifar_set, "cuda")}
    # The recipe as it is, and at batch 256 with the learning rate scaled by the square root of the batch
    assert set(by_name) == {"recipe", "b256"} and by_name["recipe"]["changes"] == []
    recipe = gpu_checks.get_recipe("cifar10", "cuda")
    assert by_name["recipe"]["recipe"] == dataclasses.replace(recipe, compile_mode=None)
    assert by_name["b256"]["recipe"] == dataclasses.replace(recipe, compile_mode=None, batch_size=256, lr=1.4e-3)
    reference = gpu_checks.sweep_variants([("cnn", "reference=resnet18")], [], "cuda")[0]
    assert reference["reference"] == "resnet18" and reference["changes"] == ["reference=resnet18"]
    assert all(variant["recipe"].compile_augment for variant in by_name.values())
    assert not any(variant["recipe"].compile_mode for variant in by_name.values())  # --cifar-set's, given to all
    on_cpu = gpu_checks.sweep_variants(args.sweep, [], "cpu")
    assert not any(variant["recipe"].compile_augment or variant["recipe"].compile_mode for variant in on_cpu)
    assert gpu_checks.parse_args(["--checks", "cifar"]).sweep == []  # not asked for: nothing built
    for bad, message in ((["--sweep", "a", "lr=0.002", "--sweep", "a", "lr=0.003"], "must differ"),
                         (["--sweep", "../a"], "must differ"),
                         (["--sweep", "a", "reference=vgg"], "reference= takes one of resnet18"),
                         (["--sweep", "a", "speed=2"], "no field 'speed'")):
        with pytest.raises(SystemExit):
            gpu_checks.parse_args(["--checks", "sweep", *bad])
        assert message in capsys.readouterr().err, bad
