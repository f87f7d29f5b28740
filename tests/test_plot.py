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
        ckpt.save_checkpoint(state, str(tmp_path / f"checkpoint_{epoch:04d}.pth.tar"))
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
