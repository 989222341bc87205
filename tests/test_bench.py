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
    assert any(line.startswith("matmul ceiling (float32 1024x1024x1024): ") for line in lines)
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


def test_analytic_flops_equal_flop_counter_mode_for_vit_b16():
    """ViTConfig's count against torch's own, op by op, on ViT-B/16 at 224 (on the meta device: no arithmetic).
    SDPA's math backend, so that QK^T and AV are counted as the matrix products they are."""
    pytest.importorskip("timm")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = ViTConfig.named("ViT-B/16")
    assert config.forward_flops() == pytest.approx(35.13e9, rel=1e-3)  # 17.56 GMACs
    assert config.training_flops() == 3 * config.forward_flops()
    for name in bench.IMPLEMENTATIONS:
        with torch.device("meta"):
            model = bench.build_model(name, config)
            images, labels = torch.randn(2, 3, 224, 224), torch.zeros(2, dtype=torch.long)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
            logits = model(images)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as backward:
            torch.nn.functional.cross_entropy(logits, labels).backward()
        counted_forward = forward.get_total_flops() / 2
        counted_training = counted_forward + backward.get_total_flops() / 2
        if name == "ours":  # the last layer's unread tokens skipped: what the table's caveat says
            assert counted_forward == config.forward_flops() - 2 * config.unread_macs()
        else:
            assert counted_forward == config.forward_flops()
            # 3 x forward; the real backward skips only the images' gradient (patch embedding, 0.2% of it)
            assert counted_training == pytest.approx(config.training_flops(), rel=3e-3)
            assert counted_training < config.training_flops()


def test_compared_models_are_configured_alike():
    """No dropout anywhere, and timm's attention is its fused kernel (F.scaled_dot_product_attention), as ours."""
    pytest.importorskip("timm")
    config = ViTConfig.named("ViT-Ti/16", image_size=32, num_classes=10)
    for name in bench.IMPLEMENTATIONS:
        model = bench.build_model(name, config)
        assert all(module.p == 0 for module in model.modules() if isinstance(module, torch.nn.Dropout)), name
        if name == "timm":
            assert all(block.attn.fused_attn for block in model.blocks)
        if name == "torchvision":
            assert all(layer.self_attention.dropout == 0 for layer in model.encoder.layers)


def test_cuda_events_are_recorded_on_the_stream_of_the_measured_device(monkeypatch):
    """With --device cuda:1 the work runs on cuda:1's stream; events on the current device's (cuda:0) would time
    an idle stream, and report absurd speeds. Faked: no GPU needed."""
    recorded = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            recorded.append(stream)

        def elapsed_time(self, end):
            return 2.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    device = torch.device("cuda", 1)
    assert bench.median_step_seconds(lambda: None, steps=3, warmup_steps=1, device=device) == pytest.approx(2e-3)
    assert recorded == [("stream of", device)] * 6


def test_out_of_memory_while_moving_the_model_to_the_device_becomes_a_note(monkeypatch):
    class TooBig(torch.nn.Linear):
        def to(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "build_model", lambda implementation, config: TooBig(2, 2))
    config = ViTConfig.named("ViT-Ti/16", image_size=32, num_classes=10)
    result = bench.bench_one("ours", "train", config, 2, torch.device("cpu"), bench.Timing(steps=1, warmup_steps=0),
                             ceiling=1e12)
    assert result.note == "out of memory: lower --batch-size" and result.images_per_second is None


def test_a_model_that_ran_out_of_memory_is_freed_before_the_cache_is_emptied(monkeypatch):
    """Else its weights, gradients and optimizer state stay allocated while the next implementation is measured."""
    import gc
    import types
    import weakref

    built, alive_after_collect = [], []
    real_build = bench.build_model

    def build_model(implementation, config):
        model = real_build(implementation, config)
        built.append(weakref.ref(model))
        return model

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    def collect():  # bench_one's gc.collect(), just before it empties the CUDA cache
        gc.collect()
        alive_after_collect.append(built[0]() is not None)

    monkeypatch.setattr(bench, "build_model", build_model)
    monkeypatch.setattr(bench, "median_step_seconds", out_of_memory)
    monkeypatch.setattr(bench, "gc", types.SimpleNamespace(collect=collect))
    config = ViTConfig.named("ViT-Ti/16", image_size=32, num_classes=10)
    result = bench.bench_one("ours", "train", config, 2, torch.device("cpu"), bench.Timing(steps=1, warmup_steps=0),
                             ceiling=1e12)
    assert result.note == "out of memory: lower --batch-size"
    assert alive_after_collect == [False]


def test_a_missing_library_is_a_note_in_the_table(monkeypatch, capsys):
    import sys

    for name in [name for name in sys.modules if name == "timm" or name.startswith("timm.")] + ["timm"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import timm...` now raises ModuleNotFoundError
    assert main(["bench", *TINY, "--modes", "inference", "--compare", "timm"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[-2].split()[:2] == ["ours", "inference"] and float(rows[-2].split()[4]) > 0
    assert rows[-1].split()[:4] == ["timm", "inference", "no", "2"] and "not installed (timm" in rows[-1]


def test_table_says_how_it_was_timed_the_compile_mode_and_the_ceilings_matmul(monkeypatch):
    def bench_one(implementation, mode, config, batch_size, device, timing, ceiling):  # no compiling here
        return bench.BenchResult(implementation, mode, batch_size, timing.compile, ms_per_step=10.0,
                                 images_per_second=100 * batch_size, tflops=1.0, mfu=0.5)

    monkeypatch.setattr(bench, "bench_one", bench_one)
    monkeypatch.setattr(bench, "measure_matmul_ceiling", lambda device: 2e12)
    tiny = dict(image_size=32, num_classes=10, steps=7, warmup_steps=3, device="cpu")
    table = bench.format_table(*bench.run_bench("ViT-Ti/16", 2, compile=True, compile_mode="reduce-overhead", **tiny))
    assert "median of 7 timed steps after 3 warm-up steps" in table
    assert "torch.compile mode reduce-overhead" in table
    assert "matmul ceiling (float32 1024x1024x1024): 2.00 TFLOP/s" in table
    assert "torch.compile mode default" in bench.format_table(*bench.run_bench("ViT-Ti/16", 2, compile=True, **tiny))
    assert "torch.compile" not in bench.format_table(*bench.run_bench("ViT-Ti/16", 2, **tiny))


def test_ours_is_measured_first_unless_the_order_names_it(monkeypatch):
    measured = []

    def fake_bench_one(implementation, mode, *args):
        measured.append(implementation)
        return bench.BenchResult(implementation, mode, 2, False)

    monkeypatch.setattr(bench, "bench_one", fake_bench_one)
    monkeypatch.setattr(bench, "measure_matmul_ceiling", lambda device: 1e12)
    for text, order in [("timm,torchvision", ["ours", "timm", "torchvision"]), ("timm,ours", ["timm", "ours"]),
                        ("ours,timm,ours", ["ours", "timm"])]:
        measured.clear()
        bench.run_bench("ViT-Ti/16", 2, compare=bench.parse_names(text), modes=["train"], device="cpu")
        assert measured == order, text


def test_an_error_is_raised_or_with_keep_going_noted_while_the_others_are_measured(monkeypatch):
    build = bench.build_model

    def build_model(implementation, config):
        if implementation == "torchvision":
            raise TypeError("an argument this torchvision does not take")
        return build(implementation, config)

    monkeypatch.setattr(bench, "build_model", build_model)
    settings = dict(compare=["torchvision", "ours-all-tokens"], steps=1, warmup_steps=0, modes=["inference"],
                    device="cpu")
    with pytest.raises(TypeError):  # by default a bug shows itself
        bench.run_bench("ViT-Ti/16", 2, image_size=32, **settings)
    results, _ = bench.run_bench("ViT-Ti/16", 2, image_size=32, keep_going=True, **settings)
    by_name = {r.implementation: r for r in results}
    assert by_name["torchvision"].note.startswith("failed: TypeError") and by_name["torchvision"].ms_per_step is None
    assert by_name["ours"].ms_per_step > 0 and by_name["ours-all-tokens"].ms_per_step > 0
