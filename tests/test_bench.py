"""`python -m vit_helpers bench`: the table and its columns, the compared models are the same size, no timing."""

import json

import pytest
import torch

from vit_helpers import bench
from vit_helpers.cli import main
from vit_helpers.model import ViTConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = ["--model", "ViT-Ti/16", "--image-size", "32", "--num-classes", "10", "--batch-size", "2", "--steps", "1",
        "--warmup-steps", "0", "--device", "cpu"]


def test_bench_prints_a_table_for_ours_timm_and_torchvision(tmp_path, capsys):
    pytest.importorskip("timm")
    path = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--compare", "timm,torchvision", "--json", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("implementation"))
    assert header.split() == ["implementation", "mode", "compiled", "batch", "img/s", "ms/step", "TFLOP/s", "MFU"]
    assert any(line.startswith("matmul ceiling:") for line in lines)
    rows = [line.split() for line in lines[lines.index(header) + 1:] if not line.startswith("saved")]
    assert [(row[0], row[1]) for row in rows] == [(name, mode) for name in ("ours", "timm", "torchvision")
                                                  for mode in ("train", "inference")]
    assert all(float(row[4]) > 0 and row[7].endswith("%") for row in rows)

    saved = json.loads(path.read_text())
    config = ViTConfig.named("ViT-Ti/16", image_size=32, num_classes=10)
    for result in saved["results"]:  # the FLOP/s follow from img/s and the analytic FLOPs
        flops = config.training_flops() if result["mode"] == "train" else config.forward_flops()
        assert result["tflops"] * 1e12 == pytest.approx(result["images_per_second"] * flops)
        assert result["mfu"] == pytest.approx(result["tflops"] * 1e12 / saved["ceiling_flops"])


def test_compared_models_have_exactly_our_parameter_count():
    pytest.importorskip("timm")
    config = ViTConfig.named("ViT-S/16", image_size=64, num_classes=7)
    counts = {name: sum(p.numel() for p in bench.build_model(name, config).parameters())
              for name in bench.IMPLEMENTATIONS}
    assert counts["timm"] == counts["ours"] == counts["torchvision"] == counts["ours-all-tokens"]


def test_ours_all_tokens_is_the_same_function():
    model = bench.build_model("ours-all-tokens", ViTConfig.named("ViT-Ti/8", image_size=32, num_classes=5))
    torch.nn.init.normal_(model.vit.head.weight)  # a zero head would make any two models agree
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), model.vit(images), rtol=1e-5, atol=1e-5)


def test_unknown_implementation_gives_one_line_and_exit_code_2(capsys):
    assert main(["bench", *TINY, "--compare", "timm,flax"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown implementation(s) flax" in error[0]


def test_profile_prints_each_implementations_top_operators(capsys):
    assert main(["bench", *TINY, "--modes", "train", "--profile", "5"]) == 0
    output = capsys.readouterr().out
    section = output[output.index("profile of ours train (eager, 3 steps of batch 2):"):]
    assert "Self CPU" in section and "aten::" in section  # torch.profiler's table, by operator
    operator_rows = [line for line in section.splitlines() if line.strip().startswith(("aten::", "Optimizer"))]
    assert 1 <= len(operator_rows) <= 5


def test_out_of_memory_becomes_a_note_also_when_the_compiler_wraps_it(monkeypatch):
    config = ViTConfig.named("ViT-Ti/16", image_size=32, num_classes=10)
    timing = bench.Timing(steps=1, warmup_steps=0)

    def failing_with(error):
        def make_step(*args, **kwargs):
            raise error
        return make_step

    try:  # how torch.compile reports an error raised while it compiles: its own exception, the original as cause
        raise torch.OutOfMemoryError("CUDA out of memory")
    except torch.OutOfMemoryError as out_of_memory:
        wrapped = RuntimeError("backend compiler failed")
        wrapped.__cause__ = out_of_memory
    for error in (torch.OutOfMemoryError("CUDA out of memory"), wrapped):
        monkeypatch.setattr(bench, "make_step", failing_with(error))
        result = bench.bench_one("ours", "train", config, 2, torch.device("cpu"), timing, ceiling=1e12)
        assert result.note == "out of memory: lower --batch-size" and result.images_per_second is None
    monkeypatch.setattr(bench, "make_step", failing_with(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is a bug: it is not hidden
        bench.bench_one("ours", "train", config, 2, torch.device("cpu"), timing, ceiling=1e12)
