"""The check's results: rows and sections, the table, the JSON report and its copies."""

import json
import os
import shutil
from dataclasses import asdict, dataclass, field

RULE = "-" * 120
TAIL_LINES_SHOWN = 3  # of a section that did not pass, under its row in the table


@dataclass
class Row:
    item: str
    status: str  # ok, failed, timeout, skipped, not run; a test's: passed, failed, ...
    value: str = ""
    seconds: float | None = None
    figures: dict = field(default_factory=dict)


@dataclass
class Section:
    name: str
    status: str = "skipped"  # ok, failed, timeout, skipped
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # its programs' CPU time: a measure on a busy machine
    note: str = ""
    tail: str = ""  # the last lines of its last command's output
    rows: list = field(default_factory=list)

    def add(
        self,
        item: str,
        status: str,
        value: str = "",
        seconds: float | None = None,
        figures: dict | None = None,
    ) -> Row:
        seconds = None if seconds is None else round(seconds, 2)
        row = Row(str(item), str(status), str(value), seconds, figures or {})
        self.rows.append(row)
        return row


def table_line(section, item, status, seconds, text) -> str:
    """One line of the table; any field may be None."""
    if isinstance(seconds, float | int):
        seconds = f"{seconds:.1f}"
    fields = [("" if f is None else str(f)) for f in (section, item, status, seconds)]
    section, item, status, seconds = fields
    text = "" if text is None else str(text)
    return f"{section:<8} {item[:62]:<62} {status:<9} {seconds:>6}  {text}"


def header(info: dict, dry: bool) -> str:
    where = info.get("gpu", "no GPU")
    if "gpu" in info:
        where += f" ({info.get('capability')}, {info.get('memory_gib')} GiB)"
    if info.get("driver"):
        where += f", driver {info['driver']}"
    return (
        f"gpu_check{' --dry-run (CPU, toy sizes)' if dry else ''}: {where}; "
        f"torch {info.get('torch', '?')}, CUDA {info.get('cuda', '-')}, cuDNN "
        f"{info.get('cudnn', '-')}, python {info.get('python', '?')}, "
        f"{info.get('cpus', '?')} CPUs"
    )


def table(sections: list, info: dict, dry: bool, seconds: float) -> str:
    lines = [header(info, dry), table_line("section", "item", "status", "s", "result")]
    lines.append(RULE)
    for s in sections:
        lines.append(table_line(s.name, "(section)", s.status, s.seconds, s.note))
        for r in s.rows:
            lines.append(table_line("", r.item, r.status, r.seconds, r.value))
        if s.status in ("failed", "timeout") and s.tail:
            tail = s.tail.strip().splitlines()[-TAIL_LINES_SHOWN:]
            lines += [table_line("", "", "", None, "| " + t[:150]) for t in tail]
    ok = sum(s.status == "ok" for s in sections)
    lines.append(RULE)
    done = f"{ok} of {len(sections)} sections ok"
    lines.append(table_line("total", "", "", seconds, done))
    return "\n".join(lines)


def write(path: str, report: dict, text: str, log_path: str) -> None:
    """The JSON report to `path`; with $OUT set, it, the table and the log there too."""
    sections = report["sections"]
    report = {**report, "sections": [asdict(s) for s in sections]}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    out = os.environ.get("OUT")
    if out and os.path.isdir(out):
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "gpu_check.txt"), "w") as f:
            f.write(text + "\n")
        copy = os.path.join(out, "gpu_check.log")
        if os.path.abspath(log_path) != os.path.abspath(copy):
            shutil.copyfile(log_path, copy)
