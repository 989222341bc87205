"""The training engine: it learns, its optimiser and schedule are the intended ones, it counts accuracy over
samples, it resumes exactly, it stops cleanly on NaN and Ctrl-C, and it trains under DDP with two processes."""

import dataclasses
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from vit_helpers import training
from vit_helpers.model import ViT, ViTConfig
from vit_helpers.recipes import get_recipe
from vit_helpers.training import (
    NonFiniteLossError,
    TrainConfig,
    build_scheduler,
    cleanup_distributed,
    confusion_matrix,
    evaluate,
    fit,
    init_distributed,
    load_checkpoint,
    parameter_groups,
    save_checkpoint,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


NUM_CLASSES = 4


def coloured_images(num_samples: int, seed: int = 0) -> TensorDataset:
    """Noisy 8x8 images whose class is their colour (red, green, blue or dark): separable in every patch."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=generator)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, -1.0, -1.0]])
    images = 0.5 * torch.randn(num_samples, 3, 8, 8, generator=generator) + colours[labels][:, :, None, None]
    return TensorDataset(images, labels)


class WithRandomNoise(Dataset):
    """An augmentation drawn from the global torch RNG, as torchvision's transforms do: resume must reseed it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        noise = 0.05 * torch.randn(image.shape)
        return image + noise, label


def tiny_vit(dropout: float = 0.0, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(ViTConfig(image_size=8, patch_size=4, num_classes=NUM_CLASSES, embed_dim=32, num_layers=1,
                         num_heads=2, mlp_dim=64, dropout=dropout))


def loaders(train_size=128, batch_size=16, augment=False):
    train = coloured_images(train_size)
    train = WithRandomNoise(train) if augment else train
    return (DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=0),
            DataLoader(coloured_images(60, seed=1), batch_size=32))


CONFIG = TrainConfig(lr=3e-3, warmup_epochs=0.5, device="cpu", log_every=4)


def test_fit_learns_a_separable_task():
    train_loader, test_loader = loaders(train_size=256)
    history = fit(tiny_vit(), train_loader, test_loader, 4, config=CONFIG, progress=False)
    assert len(history) == 4
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] >= 0.9  # chance is 0.25
    assert set(history[0]) >= {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr",
                               "images_per_second", "seconds", "evaluation_seconds"}


def test_no_weight_decay_on_norms_biases_class_token_and_position_embeddings():
    model = ViT(ViTConfig(image_size=16, patch_size=8, num_classes=3, embed_dim=16, num_layers=2, num_heads=2,
                          mlp_dim=32))
    decay, no_decay = parameter_groups(model, weight_decay=0.05)
    expected_no_decay = {"cls_token", "pos_embed"}
    expected_decay = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.LayerNorm):
            expected_no_decay |= {prefix + "weight", prefix + "bias"}
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            expected_decay.add(prefix + "weight")
            expected_no_decay.add(prefix + "bias")
    assert set(decay["names"]) == expected_decay and decay["weight_decay"] == 0.05
    assert set(no_decay["names"]) == expected_no_decay and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=5, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rates.append(optimizer.param_groups[0]["lr"])  # after the last step
    assert rates[:6] == pytest.approx([0.1 * (step + 1) / 6 for step in range(6)])  # linear up to the peak
    assert rates[5] == pytest.approx(0.1)
    assert all(later < earlier for earlier, later in zip(rates[5:], rates[6:]))  # then strictly down
    assert rates[12] == pytest.approx(0.05, rel=0.2)  # about halfway down halfway through the decay
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


class FixedPredictions(nn.Module):
    """Predicts class 0 for the first 8 samples and class 1 for the last 2, whatever the input."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, sample_index):
        predicted = (sample_index[:, 0] >= 8).long()
        return nn.functional.one_hot(predicted, 2).float() * 10 + self.dummy


def test_accuracy_is_counted_over_samples_not_averaged_over_batches():
    labels = torch.ones(10, dtype=torch.long)  # only the last 2 predictions are right: 2 / 10
    loader = DataLoader(TensorDataset(torch.arange(10.0)[:, None], labels), batch_size=4)  # batches 4, 4, 2
    result = evaluate(FixedPredictions(), loader, device="cpu")
    assert result["count"] == 10
    assert result["accuracy"] == pytest.approx(0.2)  # a mean of batch accuracies would give (0 + 0 + 1) / 3


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    matrix = confusion_matrix(torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0, 1, 2, 2, 0]), 3)
    assert matrix.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 1]]


def assert_same_tensors(first, second):
    """torch.equal on every tensor of two nested state dicts."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    elif isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_same_tensors(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for a, b in zip(first, second):
            assert_same_tensors(a, b)
    else:
        assert first == second


TIMINGS = ("images_per_second", "seconds", "evaluation_seconds")


def without_timings(history: list[dict]) -> list[dict]:
    """A history less its wall-clock figures, which differ from run to run."""
    return [{key: value for key, value in record.items() if key not in TIMINGS} for record in history]


@pytest.mark.parametrize("mixing", [{}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0},
                                    {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "mix_probability": 0.5}],
                         ids=["plain", "mixup+cutmix", "half-mixed"])
def test_resume_after_one_epoch_equals_two_straight_epochs(tmp_path, mixing):
    config = TrainConfig(lr=3e-3, warmup_epochs=0.5, device="cpu", log_every=4, **mixing)
    straight = fit(tiny_vit(dropout=0.1), *loaders(augment=True), 2, config=config, progress=False,
                   checkpoint_path=tmp_path / "straight.pt")
    first = fit(tiny_vit(dropout=0.1), *loaders(augment=True), 2, config=config, progress=False,
                checkpoint_path=tmp_path / "split.pt", stop_after_epoch=1)
    assert len(first) == 1 and load_checkpoint(tmp_path / "split.pt")["epoch"] == 1
    # A fresh process would build a fresh model; a different init must not matter after loading.
    resumed = fit(tiny_vit(dropout=0.1, seed=123), *loaders(augment=True), 2, config=config, progress=False,
                  checkpoint_path=tmp_path / "split.pt", resume=True)
    assert without_timings(resumed) == without_timings(straight)
    a, b = load_checkpoint(tmp_path / "straight.pt"), load_checkpoint(tmp_path / "split.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "optimizer", "scheduler"):
        assert_same_tensors(a[key], b[key])


def test_a_schedule_shortened_during_its_warm_up_equals_the_shorter_schedule_from_the_start(tmp_path):
    # What scripts/gpu_checks.py does when a 200-epoch recipe cannot fit its time budget: it probes two epochs,
    # then resumes with fewer. The warm-up's rates do not depend on the length, so this is the shorter run exactly.
    config = TrainConfig(lr=3e-3, warmup_epochs=2, device="cpu", log_every=4)
    straight = fit(tiny_vit(), *loaders(), 4, config=config, progress=False, checkpoint_path=tmp_path / "a.pt")
    probe = fit(tiny_vit(), *loaders(), 50, config=config, progress=False, checkpoint_path=tmp_path / "b.pt",
                stop_after_epoch=2)
    assert len(probe) == 2
    shortened = fit(tiny_vit(), *loaders(), 4, config=config, progress=False, checkpoint_path=tmp_path / "b.pt",
                    resume=True)
    assert without_timings(shortened) == without_timings(straight)
    assert shortened[-1]["lr"] == 0.0  # the 4-epoch cosine ran to its end
    assert_same_tensors(load_checkpoint(tmp_path / "a.pt")["model"], load_checkpoint(tmp_path / "b.pt")["model"])


def test_mixup_and_cutmix_train_on_soft_targets_and_count_accuracy_on_own_labels():
    targets_seen = []

    class RecordingLoss(nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            targets_seen.append(targets)
            return super().forward(logits, targets)

    model = tiny_vit()
    optimizer = training.build_optimizer(model, CONFIG, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, 0, 100)
    mix = training.batch_mixer(TrainConfig(mixup_alpha=0.4, cutmix_alpha=1.0), NUM_CLASSES)
    own_labels, predictions = [], []

    def mixer(images, labels):
        own_labels.append(labels)
        return mix(images, labels)

    def predict_own_labels(module, args, logits):
        # Every prediction made the image's own label: counted against own labels, every image is right; against the
        # mixed targets' largest share, only those whose own label kept it. (Left to chance, the two counts can come
        # out equal over different images, and then the test could not tell which the tally used.) A batch whose
        # mixing left every image's own label the largest share (MixUp's or CutMix's lambda at least 0.5, about even
        # odds) cannot tell the two apart either: 32 batches make it all but certain that one can.
        logits = logits + 100 * nn.functional.one_hot(own_labels[-1], NUM_CLASSES)
        predictions.append(logits.detach().argmax(dim=-1))
        return logits

    model.register_forward_hook(predict_own_labels)
    train_loader, _ = loaders(train_size=512, batch_size=16)
    torch.manual_seed(0)
    tally = training.train_one_epoch(model, train_loader, optimizer, scheduler, RecordingLoss(),
                                     torch.device("cpu"), CONFIG, progress=False, mixer=mixer)
    assert len(targets_seen) == 32 and tally.count == 512
    for targets in targets_seen:  # probabilities over the classes, not class indices
        assert targets.shape == (16, NUM_CLASSES) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(16))
    assert any(((targets > 0) & (targets < 1)).any() for targets in targets_seen)  # images were blended
    _, correct, count = tally.totals(distributed=False)
    predictions, own_labels = torch.cat(predictions), torch.cat(own_labels)
    assert torch.equal(predictions, own_labels)
    assert correct == count == 512  # against each image's own label ...
    assert (predictions == torch.cat(targets_seen).argmax(dim=1)).sum() < 512  # ... not the mixed target's

    train_loader, test_loader = loaders(train_size=256)
    config = TrainConfig(lr=3e-3, warmup_epochs=0.5, device="cpu", log_every=4, mixup_alpha=0.4, cutmix_alpha=1.0)
    history = fit(tiny_vit(), train_loader, test_loader, 4, config=config, class_names=list("rgbk"), progress=False)
    assert history[-1]["test_accuracy"] >= 0.9  # it still learns the task


def test_mix_probability_mixes_that_share_of_the_batches_and_leaves_the_rest_as_they_were():
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % NUM_CLASSES
    mix = training.batch_mixer(TrainConfig(mixup_alpha=0.4, cutmix_alpha=1.0, mix_probability=0.25), NUM_CLASSES)

    def mixed_batches(seed: int) -> list[bool]:
        torch.manual_seed(seed)  # the global RNG, as fit seeds it every epoch
        pattern = []
        for _ in range(400):
            out_images, targets = mix(images, labels)
            if targets.ndim == 1:  # left alone: the very batch it was given
                assert out_images is images and targets is labels
            else:
                assert targets.shape == (8, NUM_CLASSES)
            pattern.append(targets.ndim == 2)
        return pattern

    pattern = mixed_batches(0)
    assert 60 <= sum(pattern) <= 140  # a quarter of 400 is 100 (sd 8.7): outside this band p < 1e-5
    assert mixed_batches(0) == pattern  # the same seed, the same batches mixed: resuming stays exact
    every = training.batch_mixer(TrainConfig(cutmix_alpha=1.0), NUM_CLASSES)  # the default: every batch, as DeiT
    assert all(every(images, labels)[1].ndim == 2 for _ in range(20))


def test_mixing_needs_a_positive_alpha_and_the_number_of_classes():
    assert training.batch_mixer(TrainConfig(), NUM_CLASSES) is None
    with pytest.raises(ValueError, match="must be 0 \\(off\\) or positive"):
        TrainConfig(mixup_alpha=-1.0)
    for share in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="mix_probability is the share of batches mixed, above 0 and at most 1"):
            TrainConfig(cutmix_alpha=1.0, mix_probability=share)
    with pytest.raises(ValueError, match="need the number of classes"):
        training.batch_mixer(TrainConfig(cutmix_alpha=1.0), None)
    # A share of batches for a run that mixes none would be silently inert: refused, wherever it comes from
    with pytest.raises(ValueError, match="mix_probability 0.5 is the share of batches .* and mixing is off"):
        TrainConfig(mix_probability=0.5)
    with pytest.raises(ValueError, match="and mixing is off"):
        get_recipe("demo").train_config(mix_probability=0.5)


def interrupt_at(model: nn.Module, call: int) -> nn.Module:
    """Send this process a SIGINT (Ctrl-C) during the model's `call`-th training forward pass."""
    calls = []

    def hook(module, args):
        if module.training:
            calls.append(1)
            if len(calls) == call:
                signal.raise_signal(signal.SIGINT)

    model.register_forward_pre_hook(hook)
    return model


def test_ctrl_c_saves_mid_epoch_and_resume_finishes_like_an_uninterrupted_run(tmp_path):
    straight = fit(tiny_vit(), *loaders(augment=True), 2, config=CONFIG, progress=False,
                   checkpoint_path=tmp_path / "straight.pt")
    path = tmp_path / "interrupted.pt"
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):  # 8 steps per epoch: Ctrl-C during the 3rd step of epoch 2
        fit(interrupt_at(tiny_vit(), call=11), *loaders(augment=True), 2, config=CONFIG, progress=False,
            checkpoint_path=path)
    assert signal.getsignal(signal.SIGINT) is handler_before  # fit put the handler back
    checkpoint = load_checkpoint(path)
    assert checkpoint["interrupted"] and checkpoint["epoch"] == 1
    assert checkpoint["epoch_progress"]["step"] == 3 and checkpoint["epoch_progress"]["count"] == 48
    resumed = fit(tiny_vit(), *loaders(augment=True), 2, config=CONFIG, progress=False, checkpoint_path=path,
                  resume=True)
    # No dropout here, so skipping the batches already trained on reproduces the uninterrupted run exactly.
    assert without_timings(resumed) == without_timings(straight)
    assert_same_tensors(load_checkpoint(path)["model"], load_checkpoint(tmp_path / "straight.pt")["model"])


@pytest.mark.parametrize("workers_stopped", [False, True])
def test_ctrl_c_during_an_evaluation_saves_the_epoch_though_no_checkpoint_was_due(tmp_path, workers_stopped):
    """checkpoint_every=3 (as recipes evaluate and save less often): Ctrl-C while epoch 1 is evaluated. With
    forked DataLoader workers the evaluation finishes; with spawned ones (macOS, Python 3.14) the workers get the
    Ctrl-C too and the loader fails, which `workers_stopped` imitates. Either way the epoch is saved and resumes
    exactly."""
    config = dataclasses.replace(CONFIG, checkpoint_every=3)
    straight = fit(tiny_vit(), *loaders(), 2, config=config, progress=False, checkpoint_path=tmp_path / "s.pt")
    model, calls = tiny_vit(), []

    def ctrl_c_in_the_first_evaluation(module, args):
        if not module.training and not calls:
            calls.append(1)
            signal.raise_signal(signal.SIGINT)
            if workers_stopped:
                raise RuntimeError("DataLoader worker (pid 123) exited unexpectedly")

    model.register_forward_pre_hook(ctrl_c_in_the_first_evaluation)
    path = tmp_path / "interrupted.pt"
    with pytest.raises(KeyboardInterrupt, match="stopped after epoch 1; checkpoint saved to"):
        fit(model, *loaders(), 2, config=config, progress=False, checkpoint_path=path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 1 and not checkpoint["interrupted"]
    first = checkpoint["history"][0]
    assert (first["test_accuracy"] is None) == workers_stopped
    if not workers_stopped:
        assert without_timings([first]) == without_timings(straight[:1])
    resumed = fit(tiny_vit(), *loaders(), 2, config=config, progress=False, checkpoint_path=path, resume=True)
    assert without_timings(resumed[1:]) == without_timings(straight[1:])
    assert_same_tensors(load_checkpoint(path)["model"], load_checkpoint(tmp_path / "s.pt")["model"])


def test_resuming_with_another_number_of_steps_per_epoch_is_refused(tmp_path):
    """The scheduler counts steps: resumed at 4 steps an epoch after 8, the rate would reach zero half way through
    the schedule (and a mid-epoch resume would skip the wrong batches). Another batch size, other data or another
    number of processes under torchrun all change it."""
    path = tmp_path / "checkpoint.pt"
    fit(tiny_vit(), *loaders(), 4, config=CONFIG, progress=False, checkpoint_path=path, stop_after_epoch=1)
    written = path.read_bytes()
    with pytest.raises(ValueError, match="took 8 steps per epoch on 1 process, and resumed it would take 4"):
        fit(tiny_vit(), *loaders(batch_size=32), 4, config=CONFIG, progress=False, checkpoint_path=path, resume=True)
    assert path.read_bytes() == written


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    train_loader, test_loader = loaders()
    path = tmp_path / "checkpoint.pt"
    fit(tiny_vit(), train_loader, test_loader, 3, config=CONFIG, progress=False, checkpoint_path=path,
        stop_after_epoch=1)
    good = path.read_bytes()
    train_loader.dataset.tensors[0][5] = float("nan")  # one corrupt image in the training data
    with pytest.raises(NonFiniteLossError, match=r"(?s)loss became nan in epoch 2.*unchanged"):
        fit(tiny_vit(), train_loader, test_loader, 3, config=CONFIG, progress=False, checkpoint_path=path,
            resume=True)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("clip_norm, caught_by", [(1.0, "the gradients became"), (0.0, "the weights became")])
def test_an_infinite_gradient_under_a_finite_loss_never_reaches_a_checkpoint(tmp_path, clip_norm, caught_by):
    """An overflow in the backward pass: the loss is finite but the update writes NaN weights. On the epoch's last
    step, a check of the loss alone would let the end-of-epoch checkpoint save them."""
    config = TrainConfig(lr=3e-3, warmup_epochs=0.5, device="cpu", log_every=4, clip_norm=clip_norm)
    train_loader, test_loader = loaders()  # 8 steps per epoch
    path = tmp_path / "checkpoint.pt"
    fit(tiny_vit(), train_loader, test_loader, 3, config=config, progress=False, checkpoint_path=path,
        stop_after_epoch=1)
    good = path.read_bytes()
    model, calls = tiny_vit(), []

    def overflow_on_the_last_step_of_epoch_2(gradient):
        calls.append(1)
        return gradient * float("inf") if len(calls) == 8 else gradient

    model.head.weight.register_hook(overflow_on_the_last_step_of_epoch_2)
    with pytest.raises(NonFiniteLossError, match=rf"(?s){caught_by} NaN or infinite in epoch 2.*unchanged"):
        fit(model, train_loader, test_loader, 3, config=config, progress=False, checkpoint_path=path, resume=True)
    assert len(calls) == 8 and not torch.isfinite(model.head.weight).all()  # the weights did become NaN
    assert path.read_bytes() == good


def test_a_time_limit_stops_before_an_epoch_that_would_end_past_it():
    now = training.time.perf_counter()
    # 50 s spent, epochs of 20 s: a limit of 60 s stops now (the next would end at 70 s); one of 80 s goes on.
    assert training._should_stop(2, None, 60.0, now - 50, 20.0, world_size=1)
    assert not training._should_stop(2, None, 80.0, now - 50, 20.0, world_size=1)
    assert not training._should_stop(2, None, None, now - 50, 20.0, world_size=1)
    assert training._should_stop(2, 3, None, now, 20.0, world_size=1)  # stop_after_epoch=3: epoch index 2 is the 3rd


def test_evaluating_every_n_epochs_trains_the_same_and_evaluates_the_last_epoch_of_each_session(tmp_path):
    def run(**changes):
        model = tiny_vit()
        config = dataclasses.replace(CONFIG, **changes)
        return model, fit(model, *loaders(train_size=64), 5, config=config, progress=False)

    every_epoch, history = run()
    model, sparse = run(eval_every=2)
    assert [record["test_accuracy"] is not None for record in sparse] == [False, True, False, True, True]
    assert all(record["test_loss"] is None and record["evaluation_seconds"] == 0 for record in sparse[::2][:2])
    for record, reference in zip(sparse, history):  # evaluating changes nothing in training
        assert record["train_loss"] == reference["train_loss"] and record["lr"] == reference["lr"]
        if record["test_accuracy"] is not None:
            assert (record["test_loss"], record["test_accuracy"]) == (reference["test_loss"],
                                                                      reference["test_accuracy"])
            assert record["evaluation_seconds"] > 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), every_epoch.state_dict().values()))
    assert training.evaluated(sparse) == [sparse[1], sparse[3], sparse[4]]
    assert "test: not evaluated" in training._summary_line(sparse[0], 5)

    # A session that stops early is evaluated where it stops, and the resumed one goes on with the same rhythm.
    path, config = tmp_path / "checkpoint.pt", dataclasses.replace(CONFIG, eval_every=2)
    first = fit(tiny_vit(), *loaders(train_size=64), 5, config=config, progress=False, checkpoint_path=path,
                stop_after_epoch=3)
    assert [record["test_accuracy"] is not None for record in first] == [False, True, True]
    resumed = fit(tiny_vit(), *loaders(train_size=64), 5, config=config, progress=False, checkpoint_path=path,
                  resume=True)
    assert [record["test_accuracy"] is not None for record in resumed] == [False, True, True, True, True]
    assert [record["train_loss"] for record in resumed] == [record["train_loss"] for record in history]

    with pytest.raises(ValueError, match="eval_every is the number of epochs between evaluations"):
        TrainConfig(eval_every=0)
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=True)  # a flag where a number of epochs belongs


def test_settings_that_would_fail_later_in_the_run_are_refused_at_once():
    """Each of these once passed TrainConfig and failed only after data had been read or an epoch trained."""
    for name, what in (("checkpoint_every", "epochs between checkpoints"),
                       ("log_every", "steps between progress-bar updates")):
        with pytest.raises(ValueError, match=f"{name} is the number of {what}, a whole number of at least 1"):
            TrainConfig(**{name: 0})
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be 0 \\(off\\) or positive"):
            TrainConfig(cutmix_alpha=alpha)
    with pytest.raises(ValueError, match="compile_mode 'reduce_overhead' is not one of torch.compile's modes: "
                                         ".*reduce-overhead"):
        TrainConfig(compile_mode="reduce_overhead")
    import torch._inductor

    for mode in torch._inductor.list_mode_options():  # every mode the installed torch.compile takes
        assert TrainConfig(compile_mode=mode).compile_mode == mode


def test_the_time_limit_forecast_counts_the_evaluations_to_come(monkeypatch):
    """After an epoch, the next one is forecast to take as long to train, plus an evaluation (a session is
    evaluated where it stops), plus this epoch's own evaluation when one is due: with evaluations of at least
    0.2 s, a forecast short of them would let a time limit overshoot."""
    forecasts, slow = [], training.evaluate

    def slow_evaluate(*args, **kwargs):
        training.time.sleep(0.2)
        return slow(*args, **kwargs)

    def recording(epoch, stop_after_epoch, time_limit_s, started, next_epoch_seconds, world_size):
        forecasts.append(next_epoch_seconds)
        return False

    monkeypatch.setattr(training, "evaluate", slow_evaluate)
    monkeypatch.setattr(training, "_should_stop", recording)
    history = fit(tiny_vit(), *loaders(train_size=32), 4, config=dataclasses.replace(CONFIG, eval_every=2),
                  progress=False)
    trained = [record["seconds"] - record["evaluation_seconds"] for record in history]
    assert forecasts[:2] == pytest.approx(trained[:2], abs=0.05)  # no evaluation timed yet
    assert forecasts[2] == pytest.approx(trained[2] + history[1]["evaluation_seconds"], abs=0.05)
    assert forecasts[3] == pytest.approx(trained[3] + 2 * history[1]["evaluation_seconds"], abs=0.05)
    assert history[1]["evaluation_seconds"] >= 0.2


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    good = path.read_bytes()

    def crash_half_way(state, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_checkpoint_every_n_epochs_and_always_at_the_end(tmp_path, monkeypatch):
    saved_epochs = []
    original = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint",
                        lambda state, path: saved_epochs.append(state["epoch"]) or original(state, path))
    config = TrainConfig(lr=3e-3, device="cpu", checkpoint_every=2)
    fit(tiny_vit(), *loaders(train_size=32), 5, config=config, progress=False, checkpoint_path=tmp_path / "c.pt")
    assert saved_epochs == [2, 4, 5]
    saved_epochs.clear()
    fit(tiny_vit(), *loaders(train_size=32), 5, config=config, progress=False, checkpoint_path=tmp_path / "d.pt",
        stop_after_epoch=3)
    assert saved_epochs == [2, 3]  # a session that stops early saves where it stopped


def test_checkpoint_has_the_documented_keys(tmp_path):
    path = tmp_path / "checkpoint.pt"
    fit(tiny_vit(), *loaders(train_size=32), 1, config=CONFIG, progress=False, checkpoint_path=path,
        class_names=["a", "b", "c", "d"])
    checkpoint = load_checkpoint(path)
    assert {"model", "optimizer", "scheduler", "epoch", "config", "train_config", "class_names", "history",
            "rng_state", "steps_per_epoch", "world_size"} <= set(checkpoint)
    assert checkpoint["class_names"] == ["a", "b", "c", "d"] and checkpoint["epoch"] == 1
    assert checkpoint["steps_per_epoch"] == 2 and checkpoint["world_size"] == 1  # 32 images in batches of 16
    assert ViTConfig(**checkpoint["config"]) == tiny_vit().config
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in checkpoint["model"])


# --------------------------------------------------------------------------------------------------------------
# Two processes on the CPU, as torchrun would start them
# --------------------------------------------------------------------------------------------------------------

def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed("cpu")
    train = coloured_images(96)
    train_loader = DataLoader(train, batch_size=16, sampler=DistributedSampler(train, seed=0))
    test_loader = DataLoader(coloured_images(61, seed=1), batch_size=16)  # odd size: shards of 31 and 30
    model = tiny_vit(seed=rank)  # different initial weights: DDP must start every rank from rank 0's
    history = fit(model, train_loader, test_loader, 2, config=CONFIG, progress=False,
                  checkpoint_path=Path(out_dir) / "checkpoint.pt")
    torch.save(model.state_dict(), Path(out_dir) / f"weights_rank{rank}.pt")
    (Path(out_dir) / f"history_rank{rank}.json").write_text(json.dumps(history))
    # One test image for two processes: rank 1's share is empty, and it must still join the gather.
    probabilities, labels = training.predict(model, DataLoader(coloured_images(1, seed=1), batch_size=16))
    (Path(out_dir) / f"predicted_rank{rank}.json").write_text(json.dumps([list(probabilities.shape), labels.tolist()]))
    cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_with_gloo_train_in_step_and_write_one_checkpoint(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint.pt", "weights_rank0.pt",
                                                            "weights_rank1.pt"]
    rank0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    assert_same_tensors(rank0, rank1)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert_same_tensors(checkpoint["model"], rank0)
    assert not torch.equal(rank0["pos_embed"], tiny_vit(seed=0).pos_embed.detach())  # it trained
    history = json.loads((tmp_path / "history_rank0.json").read_text())
    assert without_timings(history) == without_timings(json.loads((tmp_path / "history_rank1.json").read_text()))
    # The sharded evaluation adds up to exactly the single-process evaluation over all 61 test images.
    model = tiny_vit()
    model.load_state_dict(rank0)
    single = evaluate(model, DataLoader(coloured_images(61, seed=1), batch_size=16), device="cpu")
    assert history[-1]["test_accuracy"] == pytest.approx(single["accuracy"], abs=1e-12)
    assert history[-1]["test_loss"] == pytest.approx(single["loss"], rel=1e-5)
    label = coloured_images(1, seed=1).tensors[1].tolist()
    for rank in (0, 1):  # both processes get the one prediction
        assert json.loads((tmp_path / f"predicted_rank{rank}.json").read_text()) == [[1, NUM_CLASSES], label]


def test_resume_is_exact_with_augmenting_dataloader_workers(tmp_path):
    """The real loaders, random crops and flips drawn inside a worker process: resume still replays them exactly."""
    from PIL import Image

    from vit_helpers.data import make_dataloaders

    generator = torch.Generator().manual_seed(0)
    for label in range(NUM_CLASSES):
        for i in range(12):
            pixels = (torch.rand(10, 10, 3, generator=generator) * 255).to(torch.uint8).numpy()
            path = tmp_path / "images" / f"class{label}" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)

    def run(checkpoint, **kwargs):
        train, test, _ = make_dataloaders(tmp_path / "images", image_size=8, batch_size=8, test_fraction=0.25,
                                          num_workers=1, augment=True)
        return fit(tiny_vit(), train, test, 2, config=CONFIG, progress=False, checkpoint_path=checkpoint, **kwargs)

    straight = run(tmp_path / "straight.pt")
    run(tmp_path / "split.pt", stop_after_epoch=1)
    resumed = run(tmp_path / "split.pt", resume=True)
    assert without_timings(resumed) == without_timings(straight)
    assert_same_tensors(load_checkpoint(tmp_path / "straight.pt")["model"],
                        load_checkpoint(tmp_path / "split.pt")["model"])


def test_every_epoch_tells_the_distributed_sampler_its_number_also_after_resuming(tmp_path):
    """Without set_epoch a DistributedSampler gives every epoch the same order (and a resumed run the first one)."""
    epochs_set = []

    class RecordingSampler(DistributedSampler):
        def set_epoch(self, epoch):
            epochs_set.append(epoch)
            super().set_epoch(epoch)

    def run(**kwargs):
        train = coloured_images(32)
        train_loader = DataLoader(train, batch_size=16, sampler=RecordingSampler(train, num_replicas=1, rank=0))
        return fit(tiny_vit(), train_loader, DataLoader(coloured_images(20, seed=1), batch_size=16), 3,
                   config=CONFIG, progress=False, checkpoint_path=tmp_path / "c.pt", **kwargs)

    run(stop_after_epoch=2)
    run(resume=True)
    assert epochs_set == [0, 1, 2]


def test_a_recipe_builds_the_model_and_training_configs_it_names():
    from vit_helpers.recipes import RECIPES

    for name, recipe in RECIPES.items():
        model_config = recipe.model_config(num_classes=10)
        assert model_config == ViTConfig.named(recipe.model, **recipe.model_overrides, image_size=recipe.image_size,
                                               num_classes=10), name
        train_config = recipe.train_config(seed=7)
        assert (train_config.epochs, train_config.batch_size, train_config.lr, train_config.weight_decay,
                train_config.warmup_epochs, train_config.label_smoothing, train_config.checkpoint_every,
                train_config.seed) == (recipe.epochs, recipe.batch_size, recipe.lr, recipe.weight_decay,
                                       recipe.warmup_epochs, recipe.label_smoothing, recipe.checkpoint_every, 7)
        assert recipe.check() is recipe and recipe.for_device("cuda").check(), name  # nothing a loader refuses
    assert get_recipe("demo", "cuda").model_config(10).embed_dim == 384  # the GPU variant is ViT-S/4
    # cifar10's measured speed settings apply on a GPU only: on the CPU nothing is compiled by default
    on_gpu, on_cpu = get_recipe("cifar10", "cuda"), get_recipe("cifar10", "cpu")
    assert (on_gpu.compile_mode, on_gpu.compile_augment) == ("reduce-overhead", True)
    assert (on_cpu.compile_mode, on_cpu.compile_augment) == (None, False)
    assert on_gpu.train_config().compile_mode == "reduce-overhead"


def paper_vit_parameters(width: int, layers: int, mlp_dim: int, patch: int = 4, image: int = 32,
                         classes: int = 10) -> int:
    """A ViT's parameters counted from Eq. 1-4 rather than from our model: per layer the four attention projections
    (each D x D plus a bias), the MLP's two layers and two LayerNorms; then the patch embedding (P x P x 3 -> D),
    the class token, the position embeddings (the patches and the class token), the final LayerNorm and the head."""
    tokens = (image // patch) ** 2 + 1
    per_layer = 4 * (width * width + width) + (width * mlp_dim + mlp_dim) + (mlp_dim * width + width) + 2 * 2 * width
    return (layers * per_layer + (patch * patch * 3 * width + width) + width + tokens * width + 2 * width
            + (width * classes + classes))


def test_the_cifar10_recipe_is_lee_et_als_model_and_regularisers_at_batch_512():
    """Lee et al. 2021's plain ViT (4x4 patches, D=192, 9 layers of 12 heads, MLP 384), 2,697,610 parameters counted
    from the equations, with DeiT's regularisers as they set them; their 1e-3 at batch 128 scaled by the square root
    of the batch."""
    recipe = get_recipe("cifar10", "cuda")
    expected = paper_vit_parameters(width=192, layers=9, mlp_dim=384)
    assert expected == 2_697_610
    config = recipe.model_config(num_classes=10)
    assert (config.embed_dim, config.num_layers, config.num_heads, config.mlp_dim, config.patch_size) == \
        (192, 9, 12, 384, 4)
    assert (config.drop_path, config.init, config.attention_kernel) == (0.1, "timm", None)
    assert sum(parameter.numel() for parameter in ViT(config).parameters()) == expected
    assert (recipe.batch_size, recipe.lr) == (512, pytest.approx(1e-3 * (512 / 128) ** 0.5))
    assert (recipe.warmup_epochs, recipe.random_erasing, recipe.label_smoothing) == (30, 0.25, 0.1)
    assert (recipe.mixup_alpha, recipe.cutmix_alpha, recipe.mix_probability) == (1.0, 1.0, 0.5)
    assert (recipe.augment, recipe.augment_fill, recipe.crop_padding, recipe.crop_scale) == ("autoaugment", 128, 4,
                                                                                            None)


def test_a_compiled_model_evaluates_the_last_smaller_batch_with_the_graph_it_has():
    model = tiny_vit()
    nn.init.normal_(model.head.weight)  # a zero head would give every image the same loss
    loader = DataLoader(coloured_images(60, seed=1), batch_size=32)  # batches of 32 and 28
    eager = evaluate(model, loader, "cpu")
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # a running count: reset() keeps it
    compiled = evaluate(torch.compile(model, backend="aot_eager", dynamic=False), loader, "cpu")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    assert graphs == 1  # the batch of 28 was padded to 32, not compiled anew
    assert compiled["count"] == eager["count"] == 60  # the padding is not counted
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert compiled["accuracy"] == eager["accuracy"]


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, monkeypatch):
    """On CUDA `fit` compiles by default. The same path on the CPU, with torch.compile's aot_eager backend (it
    traces forward and backward as inductor would, without generating code), trains like eager and checkpoints the
    plain model: no `_orig_mod.` in the weights' names, and they load into a fresh ViT."""
    import functools

    monkeypatch.setattr(training.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    eager = fit(tiny_vit(), *loaders(), 2, config=CONFIG, progress=False)
    config = TrainConfig(lr=3e-3, warmup_epochs=0.5, device="cpu", log_every=4, compile=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # a running count: reset() keeps it
    compiled = fit(tiny_vit(), *loaders(), 2, config=config, progress=False, checkpoint_path=tmp_path / "c.pt")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    assert graphs == 2  # training and evaluation really ran compiled, one graph each (none for 2nd epoch)
    for ours, reference in zip(compiled, eager):
        assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-4)
        assert ours["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=0.02)
    weights = load_checkpoint(tmp_path / "c.pt")["model"]
    assert not [name for name in weights if "_orig_mod" in name]
    tiny_vit().load_state_dict(weights)


def _resume_right_after_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed("cpu")
    if rank == 0:  # a slow disk: rank 0 is still writing when the others have left fit
        original = training.save_checkpoint
        training.save_checkpoint = lambda state, path: training.time.sleep(2) or original(state, path)
    train = coloured_images(64)
    train_loader = DataLoader(train, batch_size=16, sampler=DistributedSampler(train, seed=0))
    test_loader = DataLoader(coloured_images(20, seed=1), batch_size=16)
    path = Path(out_dir) / "checkpoint.pt"
    fit(tiny_vit(), train_loader, test_loader, 2, config=CONFIG, progress=False, checkpoint_path=path,
        stop_after_epoch=1)
    assert load_checkpoint(path)["epoch"] == 1  # every process can read what fit saved as soon as it returns
    # As scripts/gpu_checks.py does after its probe: resume at once, in the same processes.
    history = fit(tiny_vit(seed=7), train_loader, test_loader, 2, config=CONFIG, progress=False,
                  checkpoint_path=path, resume=True)
    (Path(out_dir) / f"history_rank{rank}.json").write_text(json.dumps(without_timings(history)))
    cleanup_distributed()


def test_under_ddp_no_process_reads_or_resumes_the_checkpoint_before_rank_0_has_written_it(tmp_path):
    mp.spawn(_resume_right_after_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    histories = [json.loads((tmp_path / f"history_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["epoch"] for record in histories[0]] == [1, 2]
    assert histories[0] == histories[1]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


def _uneven_steps_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import datetime

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout: a collective that one process never joins fails in seconds instead of 30 minutes.
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    train = coloured_images(80)
    mine = torch.utils.data.Subset(train, range(0, 48) if rank == 0 else range(48, 80))  # 3 and 2 batches of 16
    try:
        fit(tiny_vit(), DataLoader(mine, batch_size=16), DataLoader(coloured_images(20, seed=1), batch_size=16), 1,
            config=CONFIG, progress=False)
    except ValueError as error:
        (Path(out_dir) / f"error_rank{rank}.txt").write_text(str(error))
    cleanup_distributed()  # every process raised at the same point: the barrier returns


def test_under_ddp_a_different_number_of_steps_per_process_is_an_error_not_a_hang(tmp_path):
    mp.spawn(_uneven_steps_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert "DistributedSampler" in (tmp_path / f"error_rank{rank}.txt").read_text()


def collate_labels(samples):
    """A collate_fn of the user's own: only the labels."""
    return torch.stack([label for _, label in samples])


#: Batches of the user's own, of uneven sizes, over the 15 samples of `numbered_samples`.
OWN_BATCHES = [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]


def numbered_samples() -> TensorDataset:
    return TensorDataset(torch.zeros(15, 1), torch.arange(15))  # each sample's label is its index


@pytest.mark.parametrize("loader, shards", [
    (DataLoader(numbered_samples(), batch_size=4), [[[0, 2, 4, 6], [8, 10, 12, 14]], [[1, 3, 5, 7], [9, 11, 13]]]),
    (DataLoader(numbered_samples(), batch_sampler=OWN_BATCHES), [OWN_BATCHES[0::2], OWN_BATCHES[1::2]]),
    (DataLoader(numbered_samples(), batch_size=4, drop_last=True), [[[0, 1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7]]]),
], ids=["batch_size", "batch_sampler", "drop_last"])
def test_under_ddp_each_test_sample_is_evaluated_once_in_the_batches_the_user_chose(monkeypatch, loader, shards):
    """A plain sequential test loader is split sample by sample; one with batches of the user's own (a
    batch_sampler, drop_last) is split by whole batches, so that the processes see together exactly the batches
    one process would."""
    monkeypatch.setattr(training, "_all_reduce", lambda *values, op=None: list(values))  # all ranks agree
    for rank, expected in enumerate(shards):
        shard, sums_need_all_reduce = training.evaluation_loader(loader, rank, world_size=2)
        assert sums_need_all_reduce and [labels.tolist() for _, labels in shard] == expected


@pytest.mark.parametrize("batching", [{"batch_size": 4}, {"batch_sampler": OWN_BATCHES}])
def test_under_ddp_the_split_test_loader_keeps_the_loaders_settings(monkeypatch, batching):
    monkeypatch.setattr(training, "_all_reduce", lambda *values, op=None: list(values))
    settings = dict(num_workers=2, pin_memory=True, collate_fn=collate_labels, timeout=30.0, worker_init_fn=print,
                    prefetch_factor=3, persistent_workers=True)
    shard, _ = training.evaluation_loader(DataLoader(numbered_samples(), **batching, **settings), 1, world_size=2)
    assert {name: getattr(shard, name) for name in settings} == settings


def test_under_ddp_batches_that_differ_between_processes_are_refused(monkeypatch):
    """A batch_sampler that shuffles, or that is already split per process, gives each process other batches:
    splitting them again would miss some samples and count others twice."""
    monkeypatch.setattr(training, "_all_reduce", lambda fingerprint, negated, op=None: [fingerprint + 1, negated])
    loader = DataLoader(numbered_samples(), batch_sampler=OWN_BATCHES)
    with pytest.raises(ValueError, match="different batches in different processes.*batch_size"):
        training.evaluation_loader(loader, 0, world_size=2)


def test_one_named_gpu_for_every_process_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="every process on one GPU.*LOCAL_RANK"):
        init_distributed("cuda:0")


def test_cuda_graphs_under_ddp_are_said_to_be_untested(monkeypatch):
    monkeypatch.setattr(training, "DistributedDataParallel", lambda model, device_ids=None: model)  # no group here
    config = TrainConfig(compile=True, compile_mode="reduce-overhead", device="cpu")
    with pytest.warns(UserWarning, match="not tested under DistributedDataParallel"):
        training.wrap_for_training(nn.Linear(2, 2), torch.device("cpu"), config, world_size=2)


def test_an_epoch_frees_its_last_gradients_before_the_evaluation():
    """Nothing may read the last step's gradients after the epoch: under CUDA graphs (compile mode
    reduce-overhead) the evaluation's graphs may reuse their memory. Freed, they cannot be read."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 2, 2), torch.randint(0, 2, (8,))), batch_size=4)
    config = TrainConfig(device="cpu", compile=False)
    optimizer = training.build_optimizer(model, config, torch.device("cpu"))
    scheduler = training.build_scheduler(optimizer, 0, 10)
    tally = training.train_one_epoch(model, loader, optimizer, scheduler, nn.CrossEntropyLoss(), torch.device("cpu"),
                                     config, progress=False)
    assert tally.step == 2 and scheduler.last_epoch == 2  # it trained
    assert all(parameter.grad is None for parameter in model.parameters())


class LooksCompiled(nn.Module):
    """A model wrapped as torch.compile wraps one (`_orig_mod`), counting the batch size of each call: the
    evaluation's handling of compiled models, tested without the minutes a compilation takes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._orig_mod, self.batch_sizes = model, []

    def forward(self, images):
        self.batch_sizes.append(len(images))
        return self._orig_mod(images)


def test_predict_treats_a_compiled_model_as_evaluate_does(monkeypatch):
    """`predict` (the confusion matrix, the notebooks' examples) runs a compiled model as `evaluate` does: every call
    marked as a new iteration for CUDA graphs, and the short last batch padded to the full size (no compilation
    for a new shape), giving the same probabilities as the plain model, padding cut off."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = tiny_vit()
    test_loader = DataLoader(coloured_images(50, seed=1), batch_size=16)  # 16, 16, 16 and a last batch of 2
    plain, plain_labels = training.predict(model, test_loader, "cpu")
    assert marks == [] and len(plain) == 50
    wrapped = LooksCompiled(model).train()
    probabilities, labels = training.predict(wrapped, test_loader, "cpu")
    assert wrapped.batch_sizes == [16, 16, 16, 16] and len(marks) == 4
    assert torch.equal(labels, plain_labels) and torch.allclose(probabilities, plain, atol=1e-6)
    assert wrapped.training  # put back in training mode, as it came
    result = training.evaluate(wrapped, test_loader, "cpu")
    assert wrapped.batch_sizes[4:] == [16, 16, 16, 16] and len(marks) == 8 and result["count"] == 50
    assert result["accuracy"] == pytest.approx((plain.argmax(1) == plain_labels).float().mean().item())


@pytest.mark.parametrize("compile_model", [True, False])
def test_each_compiled_call_is_marked_as_a_new_iteration_for_cuda_graphs(monkeypatch, compile_model):
    """With CUDA graphs (compile mode reduce-overhead) a replay overwrites the last one's outputs; the engine marks
    every compiled training step and evaluation batch as a new iteration, so that PyTorch replays its graphs
    instead of refusing or falling back. An uncompiled model needs no marks."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    train_loader, test_loader = loaders(train_size=64, batch_size=16)  # 4 training steps, 2 test batches
    config = TrainConfig(epochs=1, device="cpu", compile=compile_model)
    fit(tiny_vit(), train_loader, test_loader, config=config, progress=False)
    assert len(marks) == (len(train_loader) + len(test_loader) if compile_model else 0)
