import json
import math
import sys

import pytest
import torch

from moco import checkpoint as ckpt
from moco.utils import UsageError
from tools import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(
    directory, epochs=3, steps=4, print_freq=2, moco_k=None, partial_line=False
):
    """A log.jsonl as main_moco.py writes it: step, epoch and knn records."""
    lines = []
    if moco_k is not None:
        lines.append({"kind": "args", "moco_k": moco_k})
    for epoch in range(epochs):
        for step in range(0, steps, print_freq):
            lines.append(
                {
                    "kind": "step",
                    "epoch": epoch,
                    "step": step,
                    "global_step": epoch * steps + step,
                    "loss": 8.0 - epoch,
                    "acc1": 10.0 * epoch,
                    "acc5": 20.0 * epoch,
                    "lr": 0.03 * (1 - epoch / epochs),
                    "images_per_s": 100.0,
                    "data_share": 0.1,
                    "epoch_eta_s": 1.0,
                }
            )
        lines.append(
            {
                "kind": "epoch",
                "epoch": epoch,
                "loss": 8.0 - epoch,
                "acc1": 10.0 * epoch,
                "acc5": 20.0 * epoch,
                "lr": 0.03,
                "epoch_time_s": 1.0,
                "images_per_s": 100.0,
                "data_share": 0.1,
                "eta_s": 1.0,
            }
        )
        lines.append({"kind": "knn", "epoch": epoch, "knn_acc1": 30.0 + epoch})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if partial_line:
        text += '{"kind": "step", "epo'  # a run killed mid-write
    (directory / "log.jsonl").write_text(text)


def test_steps_per_epoch_is_read_from_the_global_step(tmp_path):
    write_log(tmp_path, epochs=3, steps=6, print_freq=4)
    records = plot.read_log(tmp_path / "log.jsonl")
    assert plot.steps_per_epoch(records) == 6


def test_read_log_skips_a_partial_last_line(tmp_path):
    write_log(tmp_path, epochs=2, partial_line=True)
    records = plot.read_log(tmp_path / "log.jsonl")
    assert [r["kind"] for r in records].count("epoch") == 2
    assert all("epoch" in r for r in records)


def test_missing_or_empty_log_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no training log"):
        plot.read_log(str(tmp_path / "log.jsonl"))
    (tmp_path / "log.jsonl").write_text('{"kind": "knn", "epoch": 0, "knn_acc1": 1}\n')
    with pytest.raises(UsageError, match="no training records"):
        plot.read_log(str(tmp_path / "log.jsonl"))


def test_queue_size_comes_from_the_args_record_else_the_newest_checkpoint(tmp_path):
    write_log(tmp_path, moco_k=4096)
    assert (
        plot.run_args(str(tmp_path), plot.read_log(tmp_path / "log.jsonl"))["moco_k"]
        == 4096
    )

    write_log(tmp_path)  # no args record: main_moco.py's checkpoints hold the args
    records = plot.read_log(tmp_path / "log.jsonl")
    assert plot.run_args(str(tmp_path), records) == {}
    for epoch, k in ((0, 16), (1, 32)):
        state = {
            "epoch": epoch + 1,
            "args": {"moco_k": k},
            "state_dict": {"x": torch.zeros(1)},
        }
        ckpt.save_atomically(state, str(tmp_path / f"checkpoint_{epoch:04d}.pth.tar"))
    assert plot.run_args(str(tmp_path), records)["moco_k"] == 32


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    write_log(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(UsageError, match="pip install matplotlib"):
        plot.plot_log(str(tmp_path))


def test_plot_command_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_log(tmp_path, moco_k=65536)
    out = plot.main(plot.get_args_parser().parse_args([str(tmp_path)]))
    assert out == str(tmp_path / "curves.png")
    data = (tmp_path / "curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert "curves.png" in capsys.readouterr().out


def test_plot_draws_the_chance_line_and_references(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_log(tmp_path, moco_k=4096)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    out = plot.plot_log(
        str(tmp_path), str(tmp_path / "x.png"), references={"random init": 12.5}
    )
    assert (tmp_path / "x.png").read_bytes().startswith(PNG_MAGIC) and out.endswith(
        "x.png"
    )
    ax_loss, _, _, ax_knn = figures[0].axes
    labels = [line.get_label() for line in ax_loss.get_lines()]
    assert f"chance ln(K+1) = {math.log(4097):.2f}" in labels
    knn_lines = {
        line.get_label(): list(line.get_ydata()) for line in ax_knn.get_lines()
    }
    assert knn_lines["kNN acc@1 (val)"] == [30.0, 31.0, 32.0]
    assert knn_lines["random init: 12.5"] == [12.5, 12.5]


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def keep_figures(monkeypatch):
    """The figures plot closes, kept to inspect them."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def test_the_shipped_reference_is_the_published_cifar10_curve():
    epochs, losses, knns = plot.read_reference("cifar10-demo")
    assert epochs == list(range(1, 201))
    # the published figures: epochs 1, 10, 200 and the best kNN (82.73 at epoch 190)
    assert (losses[0], knns[0]) == (6.9569, 31.98)
    assert (losses[9], knns[9]) == (5.991, 48.03)
    assert (losses[199], knns[199]) == (2.2716, 82.58)
    assert max(knns) == 82.73 and knns.index(82.73) + 1 == 190
    with pytest.raises(UsageError, match="unknown reference 'imagenet'"):
        plot.read_reference("imagenet")


def test_plot_with_the_reference_names_the_run_and_the_published_run(
    tmp_path, monkeypatch
):
    figures = keep_figures(monkeypatch)
    run = tmp_path / "cifar-run"
    run.mkdir()
    write_log(run, epochs=3, moco_k=4096)
    args = plot.get_args_parser().parse_args([str(run), "--reference", "cifar10-demo"])
    out = plot.main(args)
    assert out == str(run / "curves.png")
    assert (run / "curves.png").read_bytes().startswith(PNG_MAGIC)
    ax_loss, _, _, ax_knn = figures[0].axes
    published = "official CIFAR-10 demo (published, K 4096)"
    assert legend_texts(ax_loss) == [
        "cifar-run",
        published,
        f"chance ln(K+1) = {math.log(4097):.2f}",
    ]
    assert legend_texts(ax_knn) == ["cifar-run", published]
    # drawn up to the run's last epoch
    reference = [line for line in ax_knn.get_lines() if line.get_label() == published]
    assert list(reference[0].get_ydata()) == [31.98, 33.52, 34.71]


def test_plot_of_several_runs_names_each_in_the_legend(tmp_path, monkeypatch):
    figures = keep_figures(monkeypatch)
    runs = []
    for name, k in (("seed0", 4096), ("seed1", 4096), ("bf16", 2048)):
        runs.append(tmp_path / name)
        runs[-1].mkdir()
        write_log(runs[-1], epochs=2, moco_k=k)
    monkeypatch.chdir(tmp_path)
    out = plot.main(plot.get_args_parser().parse_args([str(r) for r in runs]))
    assert out == "compare.png"
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG_MAGIC)
    ax_loss, ax_acc, ax_lr, ax_knn = figures[0].axes
    chances = [f"chance ln(K+1) = {math.log(k + 1):.2f}" for k in (2048, 4096)]
    assert legend_texts(ax_loss) == ["seed0", "seed1", "bf16", *chances]
    assert legend_texts(ax_knn) == legend_texts(ax_lr) == ["seed0", "seed1", "bf16"]
    assert "seed1 acc@5" in legend_texts(ax_acc)
    # each run in its own colour on every axis
    colours = {line.get_label(): line.get_color() for line in ax_knn.get_lines()}
    assert len(set(colours.values())) == 3

    args = plot.get_args_parser().parse_args(
        [str(runs[0]), str(runs[2]), "--label", "fp32", "--label", "bf16 autocast"]
        + ["--out", str(tmp_path / "x.png")]
    )
    plot.main(args)
    assert legend_texts(figures[1].axes[3]) == ["fp32", "bf16 autocast"]


def test_labels_must_match_the_runs_and_same_named_runs_get_their_paths(tmp_path):
    with pytest.raises(UsageError, match=r"one --label per run \(2 runs, 1 labels\)"):
        plot.run_labels(["a", "b"], ["x"])
    assert plot.run_labels(["a/out", "b/out"]) == ["a/out", "b/out"]
    assert plot.run_labels(["runs/a/", "runs/b"]) == ["a", "b"]
