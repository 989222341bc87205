"""Figures of a training run: loss and accuracy curves, the confusion matrix, predictions on test images.

Every function returns a matplotlib `Figure` built without pyplot, so it works in a notebook (the figure
displays when it is a cell's value) and headless on a server (`figure.savefig("curves.png")`), whatever the
backend.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from matplotlib.figure import Figure


def plot_history(history: Sequence[dict[str, float]]) -> Figure:
    """Train and test loss (left) and accuracy (right) per epoch, from `fit`'s history; the test curves at the
    epochs that were evaluated (all of them, unless `TrainConfig.eval_every` > 1)."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for split, style in (("train", "o-"), ("test", "s--")):
        records = [r for r in history if r[f"{split}_accuracy"] is not None]
        epochs = [r["epoch"] for r in records]
        loss_axes.plot(epochs, [r[f"{split}_loss"] for r in records], style, label=split)
        accuracy_axes.plot(epochs, [r[f"{split}_accuracy"] for r in records], style, label=split)
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss (train with label smoothing)")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def plot_confusion_matrix(matrix, class_names: Sequence[str], normalize: bool = True) -> Figure:
    """Rows are true classes, columns predicted ones; cells show counts, shaded by the fraction of their row."""
    counts = torch.as_tensor(matrix).double()
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.55 * len(class_names) + 2)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow((fractions if normalize else counts).numpy(), cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, fraction=0.046, label="fraction of the true class" if normalize else "count")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set(xlabel="predicted class", ylabel="true class",
             title=f"confusion matrix (accuracy {counts.trace() / counts.sum().clamp(min=1):.3f})")
    for row in ticks:
        for column in ticks:
            dark = fractions[row, column] > 0.5
            axes.text(column, row, f"{int(counts[row, column])}", ha="center", va="center", fontsize=8,
                      color="white" if dark else "black")
    return figure


def plot_predictions(images: torch.Tensor, probabilities: torch.Tensor, class_names: Sequence[str],
                     labels: torch.Tensor | None = None, denormalize: Callable | None = None,
                     top_k: int = 3, columns: int = 4) -> Figure:
    """A grid of test images, each titled with its top-k predicted classes and probabilities.

    `images` (N, 3, H, W) as the model saw them; pass `denormalize` (e.g. `vit_helpers.data.denormalize`) to
    undo the normalisation. With `labels` the title says the truth and is green when the top prediction is right.
    """
    images = images.detach().float().cpu()
    images = denormalize(images) if denormalize is not None else images
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(3 * columns, 3.4 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for index, axes in enumerate(grid.flat):
        axes.axis("off")
        if index >= len(images):
            continue
        axes.imshow(images[index].permute(1, 2, 0).clamp(0, 1).numpy())  # (H, W, 3) for matplotlib
        values, classes = probabilities[index].topk(min(top_k, probabilities.shape[-1]))
        lines = [f"{class_names[c]} {p:.2f}" for p, c in zip(values.tolist(), classes.tolist())]
        colour = "black"
        if labels is not None:
            colour = "green" if classes[0] == labels[index] else "red"
            lines.append(f"(true: {class_names[int(labels[index])]})")
        axes.set_title("\n".join(lines), fontsize=9, color=colour)
    return figure
