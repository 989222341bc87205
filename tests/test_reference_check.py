"""scripts/reference_check.py: our engine against the plain way (timm's ViT, torchvision's transforms, a loop written
out), on the same data and schedule. Its figures are in BENCHMARKS.md; here, that it runs and compares like with
like."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reference_check.py"


@pytest.fixture(scope="module")
def reference_check():
    pytest.importorskip("timm")
    spec = importlib.util.spec_from_file_location("reference_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_run_trains_on_the_same_images_and_the_histories_are_saved(reference_check, tmp_path, capsys):
    results = reference_check.main(["--smoke", "--threads", "1", "--work-dir", str(tmp_path), "--device", "cpu",
                                    "--workers", "1", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["runs"].keys() == set(reference_check.RUNS)
    for run in reference_check.RUNS:
        history = results["runs"][run]["history"]
        assert [record["epoch"] for record in history] == [1, 2]
        assert all(0 <= record["test_accuracy"] <= 1 for record in history)
    table = capsys.readouterr().out.splitlines()[-5:]
    assert table[0].split()[:2] == ["run", "final"] and [line.split()[0] for line in table[1:]] == \
        list(reference_check.RUNS)
    # What the plain ImageFolder reads is what the cached loaders read (nothing of ours is left inside the tree)
    from torchvision.datasets import ImageFolder

    from vit_helpers.gpu_data import make_cached_loaders

    folder = tmp_path / "reference_check_smoke"
    _, test, classes = make_cached_loaders(folder, image_size=32, batch_size=8, device="cpu")
    assert ImageFolder(folder / "test").targets == test.dataset.targets and len(classes) == 10


def test_ours_from_reference_starts_from_the_references_very_weights(reference_check):
    """So that, between those two runs, only the engine differs."""
    from vit_helpers.weights import vit_from_timm

    args = reference_check.parse_args(["--smoke", "--seed", "3"])
    theirs, ours = reference_check.timm_vit(args).state_dict(), vit_from_timm(reference_check.timm_vit(args))
    assert ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(ours.state_dict()[name], tensor) for name, tensor in theirs.items())
    assert not torch.equal(reference_check.timm_vit(reference_check.parse_args(["--smoke"])).state_dict()[
        "pos_embed"], theirs["pos_embed"])  # the seed draws them


def test_bad_arguments_say_what_to_give(reference_check, capsys):
    for argv, message in ((["--runs", "ours,theirs"], "unknown run(s) theirs"),
                          ([], "give the images: --data FOLDER or --cifar-archive PATH"),
                          (["--data", "x", "--cifar-archive", "y"], "give the images")):
        with pytest.raises(SystemExit):
            reference_check.parse_args(argv)
        assert message in capsys.readouterr().err
