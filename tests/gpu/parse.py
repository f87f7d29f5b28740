"""Figures out of the programs' outputs: bench/step.py's and bench/loader.py's tables,
pytest's results (as tests/gpu/gpu_check_plugin.py writes them), main_moco.py's
log.jsonl, and the published CIFAR-10 curve."""

import csv
import json
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the official CIFAR-10 demo's published run, every epoch, with its source
PUBLISHED_CURVE = os.path.join(REPO, "tools", "reference", "cifar10_demo.csv")

STEP_ROW = re.compile(
    r"^\((a|b|o)\) (?:step|floor|original)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
)
SUMMARY = re.compile(r"\d+ (passed|failed|error|errors|skipped|deselected)\b")


def parse_step(output: str) -> dict:
    """{'a': {...}, 'b': {...}, 'o': {...}} from bench/step.py's table."""
    found = {}
    for line in output.splitlines():
        m = STEP_ROW.match(line.strip())
        if m:
            v, ms, ips, floor, paired = m.groups()
            found[v] = {
                "ms_per_step": float(ms),
                "images_per_s": float(ips),
                "vs_floor": float(floor),
                "paired_vs_floor": float(paired),
            }
    return found


def parse_loader(output: str) -> list:
    """[(recipe, workers, {impl: img/s}, {ratio: value})] from bench/loader.py's
    table, read by its header: 'X img/s' columns are rates, 'X/Y' columns ratios."""
    columns, rows = None, []
    for line in output.splitlines():
        tokens = line.split()
        if tokens[:2] == ["recipe", "workers"]:
            columns, i = [], 0
            while i < len(tokens):
                if tokens[i + 1 : i + 2] == ["img/s"]:
                    columns.append(tokens[i] + " img/s")
                    i += 2
                else:
                    columns.append(tokens[i])
                    i += 1
        elif columns and len(tokens) == len(columns) and tokens[1].isdigit():
            try:
                values = [float(t) for t in tokens[2:]]
            except ValueError:
                continue
            cells = dict(zip(columns[2:], values))
            rates = {
                c.removesuffix(" img/s"): v for c, v in cells.items() if "img/s" in c
            }
            ratios = {c: v for c, v in cells.items() if "img/s" not in c}
            rows.append((tokens[0], int(tokens[1]), rates, ratios))
    return rows


def read_new_records(path: str, seen: int) -> tuple:
    """The complete JSON lines of `path` after its first `seen` bytes, and the bytes
    read so far; a line being written waits for the next call."""
    if not os.path.exists(path):
        return [], seen
    with open(path, "rb") as f:
        f.seek(seen)
        data = f.read()
    done = data[: data.rfind(b"\n") + 1]
    records = []
    for line in done.decode(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return records, seen + len(done)


def pytest_outcomes(records: list) -> tuple:
    """(node ids in the order pytest ran them, {node id: outcome record}) from the
    plugin's records; a test it never reached has no outcome."""
    order, outcomes = [], {}
    for r in records:
        if r.get("kind") == "order":
            order = list(r.get("nodeids") or [])
        elif r.get("kind") == "test" and r.get("nodeid"):
            outcomes[r["nodeid"]] = r
    order += [n for n in outcomes if n not in order]
    return order, outcomes


def pytest_summary(output: str) -> str:
    """pytest's last summary line ('3 passed, 1 skipped in 4.2s'), or ''."""
    lines = [line.strip("= ") for line in output.splitlines() if SUMMARY.search(line)]
    return lines[-1] if lines else ""


def published_curve(path: str = PUBLISHED_CURVE) -> dict:
    """{epoch (1-based): (loss, kNN top-1)} of the published run ('#' lines are its
    description)."""
    with open(path) as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return {int(r["epoch"]): (float(r["loss"]), float(r["knn_top1"])) for r in rows}


def cifar_epochs(records: list) -> dict:
    """{epoch index: {'loss', 'epoch_time_s', 'images_per_s', 'data_share',
    'knn_acc1'}} from main_moco.py's log.jsonl records."""
    epochs = {}
    for r in records:
        if r.get("kind") in ("epoch", "knn") and isinstance(r.get("epoch"), int):
            e = epochs.setdefault(r["epoch"], {})
            for key in ("loss", "epoch_time_s", "images_per_s", "data_share"):
                if r.get("kind") == "epoch" and key in r:
                    e[key] = r[key]
            if r.get("kind") == "knn":
                e["knn_acc1"] = r.get("knn_acc1")
    return epochs
