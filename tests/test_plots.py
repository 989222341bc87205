"""The figures of a run: what each curve is drawn from."""

from vit_helpers import plots


def test_the_test_curves_are_drawn_at_the_evaluated_epochs_only():
    history = [{"epoch": epoch, "train_loss": 2.0 / epoch, "train_accuracy": 0.2 * epoch,
                "test_loss": 1.5 / epoch if epoch % 2 == 0 else None,
                "test_accuracy": 0.15 * epoch if epoch % 2 == 0 else None} for epoch in range(1, 5)]
    loss_axes, accuracy_axes = plots.plot_history(history).axes
    for axes, key in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        train, test = axes.get_lines()
        assert (train.get_label(), test.get_label()) == ("train", "test")
        assert list(train.get_xdata()) == [1, 2, 3, 4]
        assert list(train.get_ydata()) == [record[f"train_{key}"] for record in history]
        assert list(test.get_xdata()) == [2, 4]
        assert list(test.get_ydata()) == [history[1][f"test_{key}"], history[3][f"test_{key}"]]
