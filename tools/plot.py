"""Training curves of a pretraining run as a PNG.

    python -m tools.plot OUTPUT_DIR [--out FILE.png] [--moco-k K]

reads OUTPUT_DIR/log.jsonl (written by main_moco.py) and draws the contrastive loss
with its chance level ln(K + 1), the contrastive accuracy, the learning rate and the
kNN accuracy (runs with --knn-freq). K comes from --moco-k, else from the run's
"args" record or its newest checkpoint. Needs matplotlib (pip install matplotlib).
"""

import argparse
import json
import math
import os

from moco import checkpoint as ckpt
from moco.cli import run_cli
from moco.utils import UsageError, logger, setup_logging


def read_log(path):
    """The records of a log.jsonl; a partial last line (a killed run) is skipped."""
    if not os.path.isfile(path):
        raise UsageError(
            f"no training log {path!r}; give the --output-dir of a main_moco.py run"
        )
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    if not any(r.get("kind") in ("step", "epoch") for r in records):
        raise UsageError(f"{path!r} holds no training records yet")
    return records


def run_args(output_dir, records):
    """The run's arguments: its "args" record, else those of its newest checkpoint."""
    for r in records:
        if r.get("kind") == "args":
            return r
    candidates = [os.path.join(output_dir, ckpt.LAST_NAME)] + ckpt.list_checkpoints(
        output_dir
    )
    for path in candidates:
        if os.path.isfile(path):
            try:
                state = ckpt.load_checkpoint(path)
            except ckpt.CheckpointError:
                continue
            if isinstance(state.get("args"), dict):
                return state["args"]
    return {}


def steps_per_epoch(records):
    """From any step record past epoch 0: global_step = epoch * steps + step."""
    for r in records:
        if r.get("kind") == "step" and r.get("epoch", 0) > 0:
            return (r["global_step"] - r["step"]) / r["epoch"]
    steps = [r["step"] for r in records if r.get("kind") == "step"]
    return max(steps) + 1 if steps else 1


def plot_log(output_dir, out=None, moco_k=None, references=None):
    """
    Draw OUTPUT_DIR/log.jsonl into a PNG (default OUTPUT_DIR/curves.png); returns its
    path. references: {label: kNN accuracy} drawn as horizontal lines (e.g. a
    random-init encoder's).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install matplotlib") from None

    records = read_log(os.path.join(output_dir, "log.jsonl"))
    if moco_k is None:
        moco_k = run_args(output_dir, records).get("moco_k")
    per_epoch = steps_per_epoch(records)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    knn = [r for r in records if r.get("kind") == "knn"]
    x_step = [(r["global_step"] + 1) / per_epoch for r in steps]
    x_epoch = [r["epoch"] + 1 for r in epochs]

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    (ax_loss, ax_acc), (ax_lr, ax_knn) = axes

    ax_loss.plot(x_step, [r["loss"] for r in steps], lw=1, alpha=0.6, label="step")
    ax_loss.plot(x_epoch, [r["loss"] for r in epochs], "o-", label="epoch mean")
    if moco_k:
        chance = math.log(moco_k + 1)
        ax_loss.axhline(
            chance, ls="--", c="gray", label=f"chance ln(K+1) = {chance:.2f}"
        )
    ax_loss.set_title("contrastive loss")

    ax_acc.plot(
        x_step, [r["acc1"] for r in steps], lw=1, alpha=0.6, label="acc@1 (step)"
    )
    ax_acc.plot(x_epoch, [r["acc1"] for r in epochs], "o-", label="acc@1 (epoch)")
    ax_acc.plot(x_epoch, [r["acc5"] for r in epochs], "s-", label="acc@5 (epoch)")
    ax_acc.set_title(
        "contrastive accuracy, %" + (f" ({moco_k + 1}-way)" if moco_k else "")
    )

    ax_lr.plot(x_step, [r["lr"] for r in steps], ".-", lw=1)
    ax_lr.set_title("learning rate")

    if knn:
        features = knn[-1].get("features")
        ax_knn.plot(
            [r["epoch"] + 1 for r in knn],
            [r["knn_acc1"] for r in knn],
            "o-",
            label="kNN acc@1 (val" + (f", {features} features)" if features else ")"),
        )
    for i, (label, value) in enumerate((references or {}).items()):
        ax_knn.axhline(value, ls="--", c=f"C{i + 1}", label=f"{label}: {value:.1f}")
    if not knn and not references:
        ax_knn.text(
            0.5,
            0.5,
            "no kNN records\n(main_moco.py --knn-freq N)",
            ha="center",
            va="center",
            transform=ax_knn.transAxes,
        )
    ax_knn.set_title("kNN accuracy, %")

    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(os.path.normpath(output_dir), fontsize=9)

    out = out or os.path.join(output_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="plot the curves of a main_moco.py run"
    )
    parser.add_argument(
        "output_dir", metavar="OUTPUT_DIR", help="the run's --output-dir"
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="PNG to write (default: OUTPUT_DIR/curves.png)",
    )
    parser.add_argument(
        "--moco-k",
        default=None,
        type=int,
        metavar="K",
        help="queue size for the chance line (default: the run's)",
    )
    return parser


def main(args):
    setup_logging()
    out = plot_log(args.output_dir, args.out, args.moco_k)
    logger.info(f"=> wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
