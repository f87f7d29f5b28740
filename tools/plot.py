"""Training curves of pretraining runs as a PNG.

    python -m tools.plot OUTPUT_DIR [--out FILE.png] [--moco-k K]
    python -m tools.plot OUTPUT_DIR --reference cifar10-demo
    python -m tools.plot RUN1 RUN2 ... [--label NAME --label NAME ...]

reads OUTPUT_DIR/log.jsonl (written by main_moco.py) and draws the contrastive loss
with its chance level ln(K + 1), the contrastive accuracy, the learning rate and the
kNN accuracy (runs with --knn-freq). K comes from --moco-k, else from the run's
"args" record or its newest checkpoint. Several runs are drawn together, each named
in the legend; --reference adds a published run's per-epoch mean loss and kNN
accuracy (tools/reference/). Needs matplotlib (pip install matplotlib).
"""

import argparse
import csv
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


# published curves to draw beside a run: name -> (file in tools/reference, legend)
REFERENCES = {
    "cifar10-demo": ("cifar10_demo.csv", "official CIFAR-10 demo (published, K 4096)"),
}


def read_reference(name):
    """A published run's (epochs, mean losses, kNN accuracies) from tools/reference."""
    if name not in REFERENCES:
        raise UsageError(
            f"unknown reference {name!r}; use one of {', '.join(sorted(REFERENCES))}"
        )
    path = os.path.join(os.path.dirname(__file__), "reference", REFERENCES[name][0])
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    return (
        [int(r["epoch"]) for r in rows],
        [float(r["loss"]) for r in rows],
        [float(r["knn_top1"]) for r in rows],
    )


def run_labels(output_dirs, labels=None):
    """The legend name of each run: its --label, else its folder's name (or path)."""
    if labels:
        if len(labels) != len(output_dirs):
            raise UsageError(
                f"give one --label per run ({len(output_dirs)} runs, "
                f"{len(labels)} labels)"
            )
        return list(labels)
    names = [os.path.basename(os.path.abspath(d)) for d in output_dirs]
    if len(set(names)) < len(names):  # a/out and b/out
        names = [os.path.normpath(d) for d in output_dirs]
    return names


def draw_run(axes, output_dir, moco_k=None, label=None, color=None):
    """
    One run's curves on the four axes; returns its queue size and last epoch drawn.
    label None: the run alone, its curves named by what they are; else named by label
    in the colour given.
    """
    (ax_loss, ax_acc), (ax_lr, ax_knn) = axes
    records = read_log(os.path.join(output_dir, "log.jsonl"))
    if moco_k is None:
        moco_k = run_args(output_dir, records).get("moco_k")
    per_epoch = steps_per_epoch(records)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    knn = [r for r in records if r.get("kind") == "knn"]
    x_step = [(r["global_step"] + 1) / per_epoch for r in steps]
    x_epoch = [r["epoch"] + 1 for r in epochs]
    alone = label is None
    style = {} if alone else {"color": color}
    # in a comparison the step curves go unnamed: the epoch curves name the run
    step_label = (lambda text: text) if alone else (lambda text: "_" + text)

    ax_loss.plot(
        x_step,
        [r["loss"] for r in steps],
        lw=1,
        alpha=0.6,
        label=step_label("step"),
        **style,
    )
    ax_loss.plot(
        x_epoch,
        [r["loss"] for r in epochs],
        "o-",
        label="epoch mean" if alone else label,
        **style,
    )

    ax_acc.plot(
        x_step,
        [r["acc1"] for r in steps],
        lw=1,
        alpha=0.6,
        label=step_label("acc@1 (step)"),
        **style,
    )
    ax_acc.plot(
        x_epoch,
        [r["acc1"] for r in epochs],
        "o-",
        label="acc@1 (epoch)" if alone else f"{label} acc@1",
        **style,
    )
    ax_acc.plot(
        x_epoch,
        [r["acc5"] for r in epochs],
        "s-" if alone else "s--",
        label="acc@5 (epoch)" if alone else f"{label} acc@5",
        **style,
    )

    ax_lr.plot(
        x_step,
        [r["lr"] for r in steps],
        ".-",
        lw=1,
        label="_lr" if alone else label,
        **style,
    )

    if knn:
        features = knn[-1].get("features")
        ax_knn.plot(
            [r["epoch"] + 1 for r in knn],
            [r["knn_acc1"] for r in knn],
            "o-",
            label=(
                "kNN acc@1 (val" + (f", {features} features)" if features else ")")
                if alone
                else label + (f" ({features} features)" if features else "")
            ),
            **style,
        )
    last = max(x_epoch + x_step + [r["epoch"] + 1 for r in knn], default=0)
    return moco_k, last


def plot_runs(
    output_dirs, out=None, moco_k=None, references=None, reference=None, labels=None
):
    """
    Draw the log.jsonl of one run or several into a PNG; returns its path (default:
    OUTPUT_DIR/curves.png for one run, compare.png for several). references: {label:
    kNN accuracy} drawn as horizontal lines (e.g. a random-init encoder's).
    reference: a name of REFERENCES, the published curves drawn beside the runs' up to
    their last epoch. labels: the legend name of each run (default: its folder's name).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install matplotlib") from None

    published = read_reference(reference) if reference else None
    alone = len(output_dirs) == 1 and not reference and not labels
    names = [None] if alone else run_labels(output_dirs, labels)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    (ax_loss, ax_acc), (ax_lr, ax_knn) = axes

    queues, last = [], 0
    for i, (output_dir, name) in enumerate(zip(output_dirs, names)):
        k, run_last = draw_run(axes, output_dir, moco_k, name, f"C{i}")
        queues.append(k)
        last = max(last, run_last)
    if published:
        epochs, losses, knns = (
            [v for e, v in zip(published[0], values) if e <= max(1, math.ceil(last))]
            for values in published
        )
        legend = REFERENCES[reference][1]
        ax_loss.plot(epochs, losses, "-", c="k", lw=1.5, label=legend)
        ax_knn.plot(epochs, knns, "-", c="k", lw=1.5, label=legend)

    for k in sorted({k for k in queues if k}):
        chance = math.log(k + 1)
        ax_loss.axhline(
            chance, ls="--", c="gray", label=f"chance ln(K+1) = {chance:.2f}"
        )
    ax_loss.set_title("contrastive loss")
    ways = {k + 1 for k in queues if k}
    ax_acc.set_title(
        "contrastive accuracy, %" + (f" ({ways.pop()}-way)" if len(ways) == 1 else "")
    )
    ax_lr.set_title("learning rate")

    for i, (label, value) in enumerate((references or {}).items()):
        ax_knn.axhline(value, ls="--", c=f"C{i + 1}", label=f"{label}: {value:.1f}")
    if not ax_knn.get_lines():
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
    fig.suptitle(", ".join(os.path.normpath(d) for d in output_dirs), fontsize=9)

    if out is None:
        out = (
            os.path.join(output_dirs[0], "curves.png")
            if len(output_dirs) == 1
            else "compare.png"
        )
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_log(output_dir, out=None, moco_k=None, references=None):
    """Draw OUTPUT_DIR/log.jsonl into a PNG (default OUTPUT_DIR/curves.png)."""
    return plot_runs([output_dir], out, moco_k, references)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="plot the curves of main_moco.py runs, beside each other or "
        "beside a published run"
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="OUTPUT_DIR",
        help="a run's --output-dir; several are drawn together",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="PNG to write (default: OUTPUT_DIR/curves.png for one run, compare.png "
        "for several)",
    )
    parser.add_argument(
        "--moco-k",
        default=None,
        type=int,
        metavar="K",
        help="queue size for the chance line (default: each run's)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        choices=sorted(REFERENCES),
        help="draw a published run's mean loss and kNN accuracy per epoch beside the "
        "runs': cifar10-demo, the official CIFAR-10 demo (K 4096, m 0.99, T 0.1)",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=None,
        metavar="NAME",
        help="the legend name of a run, once per OUTPUT_DIR in their order "
        "(default: each run's folder name)",
    )
    return parser


def main(args):
    setup_logging()
    out = plot_runs(
        args.runs,
        args.out,
        args.moco_k,
        reference=args.reference,
        labels=args.label,
    )
    logger.info(f"=> wrote {out}")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
