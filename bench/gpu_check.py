#!/usr/bin/env python3
"""The project checked on one CUDA GPU, from a fresh copy, in 8 minutes.

    bash bench/gpu_check.sh                  # on the GPU machine: about 8 minutes
    bash bench/gpu_check.sh --dry-run        # the same at toy size on the CPU, 1-2 min

Sections, run in this order, each within its time budget and all within --total seconds
(a failing or timed-out section is reported and the next one runs):

  setup   the interpreter: .venv reused; or created with --system-site-packages when
          python3 already imports torch (a GPU machine's own build, no download; a
          python3 that is itself a venv is linked in with a .pth file), the packages it
          lacks installed from the requirements; or created and `pip install -r
          requirements.txt -r requirements-dev.txt` as `make venv` does
  info    GPU, driver, torch, CUDA and cuDNN versions
  pytest  pytest -m cuda -q (tests/test_cuda.py): each test's outcome and time
  step    bench/step.py, ResNet-50 224 px MoCo v2 (--mlp, K 65536): fp32 with --original
          (project vs the original's formulas vs the backbone floor), then --amp
          --channels-last, then --amp --channels-last --compile: images/s and ratios
  loader  bench/loader.py, v1 and v2 at 224 px with 8 and 16 workers on generated
          500 x 375 JPEGs (and its batched path where its --help offers one)
  cifar   main_moco.py with the official CIFAR-10 demo's recipe on
          ../shared/data/cifar10-jpeg.tar.gz until the budget is spent, then SIGTERM
          (the run checkpoints and exits 75): kNN and loss per epoch against the
          published run's

The table is printed at the end and written as JSON to --out after every section; with
$OUT set, also $OUT/gpu_check.json, $OUT/gpu_check.txt (the table) and
$OUT/gpu_check.log (every command and its output). The exit status is 0 when every
section passed.

--dry-run: the CPU, resnet18 at 16-32 px, a few images, a 70-image CIFAR-10 subset (or
a generated folder), one epoch; the cuda tests run with MOCO_TEST_DEVICE=cpu and the
compile variants with the aot_eager backend (inductor's C++ build takes minutes on 2
cores). tests/test_gpu_check.py runs it.

Only the standard library is imported here: the script has to run before .venv exists.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("setup", "info", "pytest", "step", "loader", "cifar")

# the official demo's run, epochs 1-10 (facebookresearch/moco, branch colab-notebook)
PUBLISHED_KNN = [31.98, 33.52, 34.71, 36.98, 37.95, 39.87, 41.86, 44.18, 46.34, 48.03]
PUBLISHED_LOSS = [6.96, 7.25, 7.29, 7.10, 6.86, 6.72, 6.59, 6.37, 6.22, 5.99]

CIFAR_RECIPE = (
    "-a resnet18 --small-stem --input-size 32 --bn-splits 8 --aug cifar10 "
    "--normalize cifar10 -b 512 --lr 0.06 --wd 5e-4 --cos --epochs 200 --moco-k 4096 "
    "--moco-m 0.99 --moco-t 0.1 --knn-freq 1 --knn-features head --knn-crop none "
    "--gpu 0 -j 16"
).split()
PREEMPTED_EXIT_CODE = 75  # main_moco.py: stopped on a signal after a checkpoint

# nn.Module.compile with the aot_eager backend, then the script: the dry run's compile
COMPILE_AOT_EAGER = (
    "import runpy, sys, torch\n"
    "compile_module = torch.nn.Module.compile\n"
    "torch.nn.Module.compile = lambda self, *a, **k: compile_module(\n"
    "    self, *a, **{'backend': 'aot_eager', **k})\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)

# what the interpreter has: versions of the requirements, torch importable or not
PROBE = """
import importlib.metadata as md, json, site, sys
names = sys.argv[1:]
have = {}
for n in names:
    try:
        have[n] = md.version(n)
    except md.PackageNotFoundError:
        have[n] = None
try:
    import torch
    torch_ok = torch.__version__
except Exception:
    torch_ok = None
print(json.dumps({"versions": have, "torch": torch_ok,
                  "is_venv": sys.prefix != sys.base_prefix,
                  "site": site.getsitepackages(), "executable": sys.executable}))
"""

INFO = """
import json, os, platform, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "gpus": torch.cuda.device_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(info))
"""


@dataclass
class Row:
    item: str
    status: str  # ok, failed, timeout, skipped, not available; pytest: passed, ...
    value: str = ""
    seconds: float | None = None
    figures: dict = field(default_factory=dict)


@dataclass
class Section:
    name: str
    status: str = "skipped"
    seconds: float = 0.0
    note: str = ""
    rows: list = field(default_factory=list)

    def add(self, *args, **kwargs):
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row


@dataclass
class Result:
    """A finished command: exit status (None when killed at its limit) and output."""

    rc: int | None
    output: str
    seconds: float

    @property
    def timed_out(self):
        return self.rc is None


class Check:
    """The sections' shared state: interpreter, deadline, log, report."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.start = time.monotonic()
        self.deadline = self.start + args.total
        self.python = None
        self.info = {}
        self.sections = []
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        self.log_path = os.path.splitext(args.out)[0] + ".log"
        open(self.log_path, "w").close()
        self.tmp = tempfile.mkdtemp(prefix="gpu_check_")

    # ------------------------------------------------------------ time
    def left(self):
        return self.deadline - time.monotonic()

    def budget(self, name):
        """Seconds for section `name`: its own budget, less what the sections after it
        are promised, never past the deadline."""
        budgets = self.args.budgets
        after = SECTIONS[SECTIONS.index(name) + 1 :]
        reserve = sum(
            min(budgets[s], self.args.reserve) for s in after if self.wanted(s)
        )
        return max(0.0, min(budgets[name], self.left() - reserve))

    def wanted(self, name):
        return name in self.args.only and name not in self.args.skip

    # ------------------------------------------------------------ commands
    def say(self, text):
        print(
            f"[gpu_check {time.monotonic() - self.start:6.1f} s] {text}",
            file=sys.stderr,
        )

    def logged(self, title, text):
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {title}\n{text}\n")

    def run(self, cmd, timeout, env=None, first_signal=signal.SIGTERM, cwd=REPO):
        """Run cmd (output captured) for at most `timeout` seconds; at the limit send
        `first_signal` to its process group, then SIGKILL after a grace period."""
        shown = " ".join(str(c) for c in cmd)
        self.say(f"$ {shown[:300]}  (limit {timeout:.0f} s)")
        began = time.monotonic()
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group: killed as a whole
        )
        try:
            out, _ = proc.communicate(timeout=max(timeout, 1))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            out, rc = self._stop(proc, first_signal), None
        seconds = time.monotonic() - began
        self.logged(f"{shown}\n(exit {rc}, {seconds:.1f} s)", out[-200_000:])
        return Result(rc, out, seconds)

    @staticmethod
    def _stop(proc, first_signal, grace=20):
        try:
            os.killpg(proc.pid, first_signal)
            out, _ = proc.communicate(timeout=grace)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
        return out

    # ------------------------------------------------------------ report
    def save(self):
        report = {
            "dry_run": self.dry,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": round(time.monotonic() - self.start, 1),
            "total_budget_s": self.args.total,
            "python": self.python,
            "info": self.info,
            "sections": [asdict(s) for s in self.sections],
        }
        table = self.table()
        with open(self.args.out, "w") as f:
            json.dump(report, f, indent=1)
        out = os.environ.get("OUT")
        if out and os.path.isdir(out):
            with open(os.path.join(out, "gpu_check.json"), "w") as f:
                json.dump(report, f, indent=1)
            with open(os.path.join(out, "gpu_check.txt"), "w") as f:
                f.write(table + "\n")
            if os.path.abspath(self.log_path) != os.path.join(out, "gpu_check.log"):
                shutil.copyfile(self.log_path, os.path.join(out, "gpu_check.log"))
        return table

    def table(self):
        i = self.info
        where = i.get("gpu", "no GPU")
        if "gpu" in i:
            where += f" ({i['capability']}, {i['memory_gib']} GiB)"
        if i.get("driver"):
            where += f", driver {i['driver']}"
        lines = [
            f"gpu_check{' --dry-run (CPU, toy sizes)' if self.dry else ''}: {where}; "
            f"torch {i.get('torch', '?')}, CUDA {i.get('cuda', '-')}, cuDNN "
            f"{i.get('cudnn', '-')}, python {i.get('python', '?')}, "
            f"{i.get('cpus', '?')} CPUs",
            table_line("section", "item", "status", "s", "result"),
            "-" * 120,
        ]
        for s in self.sections:
            lines.append(table_line(s.name, "(section)", s.status, s.seconds, s.note))
            for r in s.rows:
                lines.append(table_line("", r.item, r.status, r.seconds, r.value))
        ok = sum(s.status == "ok" for s in self.sections)
        lines.append("-" * 120)
        seconds = time.monotonic() - self.start
        done = f"{ok} of {len(self.sections)} sections ok"
        lines.append(table_line("total", "", "", seconds, done))
        return "\n".join(lines)


def table_line(section, item, status, seconds, text):
    if isinstance(seconds, float | int):
        seconds = f"{seconds:.1f}"
    return f"{section:<8} {item[:62]:<62} {status:<9} {seconds or '':>6}  {text}"


# ---------------------------------------------------------------- setup
def requirements():
    """(name, pinned version or None, line) of requirements.txt and -dev.txt."""
    reqs = []
    for name in ("requirements.txt", "requirements-dev.txt"):
        with open(os.path.join(REPO, name)) as f:
            for line in f:
                line = line.split("#")[0].strip()
                if line:
                    pkg = re.split(r"[<>=!~;\[ ]", line)[0]
                    pin = line.split("==")[1].strip() if "==" in line else None
                    reqs.append((pkg, pin, line))
    return reqs


def probe(check, python):
    names = [name for name, _, _ in requirements()]
    r = check.run([python, "-c", PROBE, *names], timeout=120)
    if r.rc != 0:
        return None
    return json.loads(r.output.strip().splitlines()[-1])


def section_setup(check, sec):
    args = check.args
    if args.python:
        found = probe(check, args.python)
        if not found or not found["torch"]:
            raise RuntimeError(f"--python {args.python} cannot import torch")
        check.python = args.python
        sec.add("interpreter", "ok", f"--python {args.python}: torch {found['torch']}")
        return f"given: {args.python}"
    venv = os.path.abspath(args.venv)
    python = os.path.join(venv, "bin", "python")
    t0, base = time.monotonic(), None
    if os.path.exists(python):
        decision = f"reused {venv}"
    else:
        base = probe(check, args.base_python)
        if base is None:
            raise RuntimeError(f"{args.base_python} does not run")
        if base["torch"]:
            decision = (
                f"created {venv} with --system-site-packages: {base['executable']} "
                f"already imports torch {base['torch']} (no download)"
            )
            # no pip of its own: nothing to install, and no ensurepip needed
            flags = ["--system-site-packages", "--without-pip"]
            r = check.run([args.base_python, "-m", "venv", *flags, venv], 120)
            if r.rc == 0 and base["is_venv"]:
                # a venv's --system-site-packages are the base interpreter's, not the
                # venv's that holds torch: add those with a .pth file
                link_site_packages(check, python, base["site"])
                decision += " and, a venv itself, is linked in with a .pth"
            if r.rc != 0:
                check.python = args.base_python
                sec.add("venv", "failed", f"python -m venv failed: {last_line(r)}")
                sec.add("interpreter", "ok", f"{args.base_python} itself instead")
                return f"{args.base_python} itself (venv creation failed)"
        else:
            decision = (
                f"created {venv}: {args.base_python} has no torch, so the "
                "requirements (torch included) are installed"
            )
            r = check.run([args.base_python, "-m", "venv", venv], timeout=180)
            if r.rc != 0:
                raise RuntimeError(f"python -m venv failed: {last_line(r)}")
    check.say(f"set-up: {decision}")
    sec.add("venv", "ok", decision, seconds=time.monotonic() - t0)

    have = probe(check, python)
    if have is None:
        raise RuntimeError(f"{python} does not run")
    if not have["torch"] and base is not None and base["torch"]:
        # the new venv does not see the base's torch after all: use the base itself
        check.python = args.base_python
        sec.add("interpreter", "ok", f"{args.base_python} itself: .venv lacks torch")
        return f"{args.base_python}, torch {base['torch']}"
    missing = [line for name, _, line in requirements() if not have["versions"][name]]
    if base is not None and not base["torch"]:
        missing = ["-r", "requirements.txt", "-r", "requirements-dev.txt"]  # make venv
    if missing:
        timeout = max(10.0, check.budget("setup") - (time.monotonic() - t0))
        pip = [python, "-m", "pip", "install", "--retries", "1", "--timeout", "20"]
        r = check.run([*pip, *missing], timeout=timeout)
        sec.add(
            "pip install " + " ".join(missing),
            "ok" if r.rc == 0 else "timeout" if r.timed_out else "failed",
            "" if r.rc == 0 else last_line(r),
            seconds=r.seconds,
        )
        have = probe(check, python) or have
    else:
        sec.add("pip install", "skipped", "every requirement is already there")
    versions = []
    for name, pin, _ in requirements():
        v = have["versions"][name]
        kept = pin and v and v.split("+")[0] != pin
        note = f" (requirements pin {pin}: the machine's build kept)" if kept else ""
        versions.append(f"{name} {v or 'MISSING'}{note}")
    sec.add("versions", "ok" if have["torch"] else "failed", "; ".join(versions))
    if not have["torch"]:
        raise RuntimeError(f"{python} cannot import torch")
    check.python = python
    return f"{python}, torch {have['torch']}"


def link_site_packages(check, python, site_dirs):
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    own = check.run([python, "-c", where], 60).output.strip().splitlines()[-1]
    with open(os.path.join(own, "_gpu_check_base.pth"), "w") as f:
        f.write("\n".join(site_dirs) + "\n")


def last_line(r):
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    tail = lines[-1] if lines else ""
    return ("killed at its time limit; " if r.timed_out else "") + tail[:200]


# ---------------------------------------------------------------- info
def section_info(check, sec):
    r = check.run([check.python, "-c", INFO], timeout=check.budget("info"))
    if r.rc != 0:
        raise RuntimeError(last_line(r))
    check.info = json.loads(r.output.strip().splitlines()[-1])
    if shutil.which("nvidia-smi"):
        smi = check.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 30
        )
        if smi.rc == 0 and smi.output.strip():
            check.info["driver"] = smi.output.strip().splitlines()[0]
    i = check.info
    versions = f"torch {i['torch']}, CUDA {i['cuda']}, cuDNN {i['cudnn']}"
    sec.add("torch", "ok", versions, figures=i)
    if "gpu" in i:
        gpu = f"{i['gpu']} {i['capability']} {i['memory_gib']} GiB, driver "
        sec.add("gpu", "ok", gpu + f"{i.get('driver', '?')}, {i['gpus']} visible")
    elif check.dry:
        sec.add("gpu", "ok", f"none (dry run on the CPU, {i['cpus']} CPUs)")
    else:
        sec.add("gpu", "failed", "torch sees no CUDA GPU")
        raise RuntimeError("no CUDA GPU visible to torch")
    return f"{i.get('gpu', 'CPU')}, torch {i['torch']}"


# ---------------------------------------------------------------- pytest
def section_pytest(check, sec):
    report = os.path.join(check.tmp, "pytest.xml")
    cmd = [check.python, "-m", "pytest", "-m", "cuda", "-q", f"--junitxml={report}"]
    cmd.append("--continue-on-collection-errors")  # another module's error stops none
    if check.args.pytest_k:
        cmd += ["-k", check.args.pytest_k]
    # on the GPU machine a test that finds no GPU fails instead of skipping
    env = {"MOCO_TEST_DEVICE": "cuda"}
    if check.dry:
        env = {"MOCO_TEST_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    # SIGINT at the limit: pytest stops, still writes its report of the tests done
    r = check.run(cmd, check.budget("pytest"), env=env, first_signal=signal.SIGINT)
    summary = [
        line
        for line in r.output.splitlines()
        if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)
    ]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if os.path.exists(report):
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name")
            seconds = float(case.get("time", 0))
            outcome, message = "passed", ""
            for kind in ("failure", "error", "skipped"):
                child = case.find(kind)
                if child is not None:
                    outcome = "skipped" if kind == "skipped" else "failed"
                    message = (child.get("message") or child.text or "").strip()
                    message = message.splitlines()[0][:110] if message else kind
                    break
            counts[outcome] += 1
            where = {"classname": case.get("classname")}
            sec.add(name, outcome, message, seconds=seconds, figures=where)
    else:
        sec.add("report", "failed", "pytest wrote no report: " + last_line(r))
    note = (summary[-1].strip("= ") if summary else last_line(r))[:120]
    if r.timed_out:
        raise RuntimeError(f"stopped at its time limit: {note}")
    if counts["failed"] or r.rc != 0 or not counts["passed"]:
        raise RuntimeError(note or f"pytest exit {r.rc}")
    return note


# ---------------------------------------------------------------- step
STEP_ROW = re.compile(
    r"^\((a|b|o)\) (?:step|floor|original)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
)


def step_runs(check):
    if check.dry:
        base = (
            "-a resnet18 --small-stem --input-size 16 -b 4 --moco-k 16 --moco-dim 8 "
            "--mlp --device cpu --steps 2 --warmup 1 --part-reps 1 --threads 1"
        ).split()
    else:
        base = (
            f"-a resnet50 --input-size 224 -b {check.args.step_batch} --moco-k 65536 "
            "--mlp --moco-t 0.2 --device cuda --steps 10 --warmup 3 --part-reps 5"
        ).split()
    # (label, arguments, most seconds): compiling ResNet-50 twice takes the longest
    caps = (40, 40, 60) if check.dry else (60, 50, 150)
    flags = ["--original", "--amp --channels-last", "--amp --channels-last --compile"]
    labels = ["fp32 --original", flags[1], flags[2]]
    return [
        (label, base + f.split(), cap) for label, f, cap in zip(labels, flags, caps)
    ]


def parse_step(output):
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


def section_step(check, sec):
    runs = step_runs(check)
    budget = check.budget("step")
    began = time.monotonic()
    failed, rates = [], {}
    for i, (label, argv, cap) in enumerate(runs):
        # the runs after this one keep a minimum each
        later = check.args.reserve * (len(runs) - i - 1)
        timeout = max(5.0, min(cap, budget - (time.monotonic() - began) - later))
        cmd = [check.python, "bench/step.py", *argv]
        compiled = "--compile" in argv and check.dry
        if compiled:
            cmd = [check.python, "-c", COMPILE_AOT_EAGER, "bench/step.py", *argv]
        r = check.run(cmd, timeout)
        found = parse_step(r.output)
        if r.rc != 0 or "a" not in found or "b" not in found:
            failed.append(label)
            status = "timeout" if r.timed_out else "failed"
            sec.add(label, status, last_line(r), seconds=r.seconds)
            continue
        a, b = found["a"], found["b"]
        rates[label] = a["images_per_s"]
        value = (
            f"step {a['images_per_s']:.1f} img/s, floor {b['images_per_s']:.1f}"
            + (f", original {found['o']['images_per_s']:.1f}" if "o" in found else "")
            + f"; (a)/(b) {a['vs_floor']:.3f}"
            + (f", (o)/(b) {found['o']['vs_floor']:.3f}" if "o" in found else "")
        )
        if label != runs[0][0] and runs[0][0] in rates:
            value += f"; step x{a['images_per_s'] / rates[runs[0][0]]:.2f} vs fp32"
        if compiled:
            value += " (aot_eager backend)"
        sec.add(label, "ok", value, seconds=r.seconds, figures=found)
    base = runs[0][1]
    arch, px, batch = (base[base.index(f) + 1] for f in ("-a", "--input-size", "-b"))
    what = f"{arch} {px} px, batch {batch}"
    if failed:
        raise RuntimeError(f"{', '.join(failed)} failed ({what})")
    return what


# ---------------------------------------------------------------- loader
def make_images(root, n, width, height, classes):
    """n JPEGs (quality 90) in root/class<i>/, made in parallel (--make-images)."""
    import multiprocessing

    jobs = [(root, i, width, height, classes) for i in range(n)]
    with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.starmap(make_image, jobs, chunksize=16)


def make_image(root, i, width, height, classes):
    """Image i: a smooth random colour field with a little noise and a colour bias per
    class, landscape or (a quarter) portrait. numpy and PIL are imported here: this
    runs under the project's interpreter, not the one that makes .venv."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    c = i % classes
    w, h = (height, width) if rng.random() < 0.25 else (width, height)
    coarse = rng.integers(0, 256, size=(max(h // 32, 2), max(w // 32, 2), 3))
    img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(h, w, 3))
    pixels += 40 * np.array([c % 3 == 0, c % 3 == 1, c % 3 == 2]) - 20
    folder = os.path.join(root, f"class{c}")
    os.makedirs(folder, exist_ok=True)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    img.save(os.path.join(folder, f"{i}.jpg"), quality=90)


def generate(check, root, n, width, height, classes, timeout=120):
    me = os.path.abspath(__file__)
    shape = [n, width, height, classes]
    r = check.run([check.python, me, "--make-images", root, *shape], timeout)
    if r.rc != 0:
        raise RuntimeError(f"could not generate images: {last_line(r)}")


def parse_loader(output):
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


def section_loader(check, sec):
    budget = check.budget("loader")
    began = time.monotonic()
    folder = os.path.join(check.tmp, "loader")
    if check.dry:
        n, size = 16, (100, 75)
        argv = "--size 32 --workers 0 2 --repeats 1 --batch-size 4".split()
    else:
        n, size = check.args.loader_images, (500, 375)  # ImageNet's typical size
        argv = "--size 224 --workers 8 16 --repeats 3 --batch-size 64".split()
    generate(check, folder, n, *size, 10)
    what = f"{n} generated {size[0]} x {size[1]} JPEGs"
    sec.add("data", "ok", what, seconds=time.monotonic() - began)
    helptext = check.run([check.python, "bench/loader.py", "--help"], 60).output
    batched = "batched" in helptext
    if batched and "--device" in helptext and not check.dry:
        argv += ["--device", "cuda"]
    r = check.run(
        [check.python, "bench/loader.py", "--data", folder, *argv],
        max(5.0, budget - (time.monotonic() - began)),
    )
    rows = parse_loader(r.output)
    for recipe, workers, rates, ratios in rows:
        value = ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items())
        value += "; " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
        figures = dict(recipe=recipe, workers=workers, images_per_s=rates, **ratios)
        sec.add(f"{recipe} {workers} workers", "ok", value, figures=figures)
    if not batched:
        no = "bench/loader.py --help offers no 'batched'"
        sec.add("batched GPU path", "not available", no)
    elif not any("batched" in rates for _, _, rates, _ in rows):
        no = "offered by --help, absent from the table"
        sec.add("batched GPU path", "failed", no)
    if r.rc != 0 or not rows:
        raise RuntimeError(last_line(r) or f"exit {r.rc}")
    where = "on cuda" if "cuda" in argv else "on the CPU"
    return f"{argv[1]} px crops; batched path {where if batched else 'not offered'}"


# ---------------------------------------------------------------- cifar
def find_cifar(args):
    """--cifar, else ../shared/data/, else shared/data/ (a copy carried in the tree)."""
    name = os.path.join("shared", "data", "cifar10-jpeg.tar.gz")
    places = [args.cifar] if args.cifar else [os.path.join(REPO, "..", name), name]
    for path in places:
        if os.path.exists(os.path.join(REPO, path)):
            return os.path.abspath(os.path.join(REPO, path))
    return None


def extract_subset(tarball, dest, per_class):
    """The first per_class[split] images of each class of each split, streamed."""
    counts = {}
    with tarfile.open(tarball, "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")  # cifar10/<split>/<class>/<file>
            if not member.isfile() or len(parts) != 4 or parts[1] not in per_class:
                continue
            key = (parts[1], parts[2])
            if counts.get(key, 0) < per_class[parts[1]]:
                counts[key] = counts.get(key, 0) + 1
                target = os.path.join(dest, *parts[1:])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as f:
                    shutil.copyfileobj(src, f)
    return dest


# the dry run's CIFAR-10 subset, images per class: 3 steps of 16, 2 CPU cores
DRY_CIFAR = {"train": 5, "val": 2}


def cifar_command(check, data, out):
    argv = list(CIFAR_RECIPE)
    if check.dry:
        swap = {"-b": "16", "--moco-k": "256", "-j": "0"}
        for flag, value in swap.items():
            argv[argv.index(flag) + 1] = value
        i = argv.index("--gpu")
        del argv[i : i + 2]
    return [check.python, "main_moco.py", *argv, "--output-dir", out, data]


def read_records(path, seen):
    """New complete lines of log.jsonl since `seen` bytes."""
    if not os.path.exists(path):
        return [], seen
    with open(path) as f:
        f.seek(seen)
        text = f.read()
    done = text[: text.rfind("\n") + 1]  # a line being written waits for next time
    records = [json.loads(line) for line in done.splitlines() if line.strip()]
    return records, seen + len(done.encode())


def section_cifar(check, sec):
    tarball = find_cifar(check.args)
    began = time.monotonic()
    budget = check.budget("cifar")
    data = os.path.join(check.tmp, "cifar")
    if tarball is None:
        if not check.dry:
            sec.add("data", "skipped", "no cifar10-jpeg.tar.gz (--cifar PATH)")
            raise SkipSection("no cifar10-jpeg.tar.gz: give --cifar PATH")
        for split, per_class in DRY_CIFAR.items():
            generate(check, os.path.join(data, split), per_class * 10, 32, 32, 10)
        what = "generated 32 px images (no cifar10-jpeg.tar.gz)"
    elif check.dry:
        data = extract_subset(tarball, data, DRY_CIFAR)
        what = f"{tarball}: {DRY_CIFAR['train']} + {DRY_CIFAR['val']} images a class"
    else:
        os.makedirs(data)
        r = check.run(["tar", "-xzf", tarball, "-C", data], min(120, budget / 3))
        if r.rc != 0:
            raise RuntimeError(f"tar failed: {last_line(r)}")
        data = os.path.join(data, "cifar10")
        what = f"{tarball}: 50,000 + 10,000 images"
    sec.add("data", "ok", what, seconds=time.monotonic() - began)

    out = os.path.join(check.tmp, "cifar_run")
    cmd = cifar_command(check, data, out)
    shown = " ".join(cmd)
    check.say(f"$ {shown}")
    # SIGTERM stops the run after the step in progress (or the kNN pass), then saves
    grace = 45 if check.dry else 60
    run_until = max(time.monotonic() + 10, began + budget - grace)
    log_file = open(os.path.join(check.tmp, "cifar_run.out"), "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    records, seen, run_began = [], 0, time.monotonic()
    stop_after = 1 if check.dry else check.args.cifar_epochs
    while proc.poll() is None and time.monotonic() < run_until:
        new, seen = read_records(os.path.join(out, "log.jsonl"), seen)
        records += new
        if stop_after and sum(r.get("kind") == "knn" for r in records) >= stop_after:
            break
        time.sleep(0.5)
    stopped = proc.poll() is None
    if stopped:
        proc.send_signal(signal.SIGTERM)  # checkpoints at the next step, exits 75
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log_file.close()
    new, seen = read_records(os.path.join(out, "log.jsonl"), seen)
    records += new
    with open(log_file.name) as f:
        output = f.read()
    check.logged(f"{shown}\n(exit {proc.returncode})", output[-200_000:])

    epochs = {r["epoch"]: r for r in records if r.get("kind") == "epoch"}
    knn = {r["epoch"]: r for r in records if r.get("kind") == "knn"}
    for e in sorted(set(epochs) | set(knn)):
        acc = knn.get(e, {}).get("knn_acc1")
        loss = epochs.get(e, {}).get("loss")
        secs = epochs.get(e, {}).get("epoch_time_s")
        pub_acc, pub_loss = published(PUBLISHED_KNN, e), published(PUBLISHED_LOSS, e)
        value = f"kNN {acc:.2f}" if acc is not None else "no kNN"
        value += f" (published {pub_acc:.2f})" if pub_acc is not None else ""
        value += f", loss {loss:.2f}" if loss is not None else ""
        value += f" (published {pub_loss:.2f})" if pub_loss is not None else ""
        figures = dict(epoch=e + 1, knn_acc1=acc, loss=loss, epoch_time_s=secs)
        figures.update(published_knn_acc1=pub_acc, published_loss=pub_loss)
        status = "ok" if acc is not None else "failed"
        sec.add(f"epoch {e + 1}", status, value, seconds=secs, figures=figures)
    how = (
        f"SIGTERM after {time.monotonic() - run_began:.0f} s: exit {proc.returncode}"
        if stopped
        else f"exit {proc.returncode}"
    )
    ok_exit = proc.returncode == (PREEMPTED_EXIT_CODE if stopped else 0)
    if not ok_exit:
        how += ": " + " | ".join(output.strip().splitlines()[-2:])[:200]
    sec.add("stop", "ok" if ok_exit else "failed", how)
    if not knn or not ok_exit:
        raise RuntimeError(f"{len(knn)} kNN figure(s); {how}")
    return f"{len(knn)} epoch(s) with kNN; {how}"


def published(figures, epoch):
    """The published figure after epoch index `epoch` (0-based), if there is one."""
    return figures[epoch] if epoch < len(figures) else None


class SkipSection(Exception):
    """The section cannot run here (no data): reported as skipped, not failed."""


# ---------------------------------------------------------------- main
RUNNERS = {
    "setup": section_setup,
    "info": section_info,
    "pytest": section_pytest,
    "step": section_step,
    "loader": section_loader,
    "cifar": section_cifar,
}


def run_section(check, name):
    sec = Section(name)
    check.sections.append(sec)
    began = time.monotonic()
    if not check.wanted(name):
        sec.note = "not asked for (--only/--skip)"
    elif check.python is None and name != "setup":
        sec.status, sec.note = "failed", "no interpreter: set-up failed"
    elif check.budget(name) < 3:
        sec.status, sec.note = "skipped", "no time left in --total"
    else:
        check.say(f"{name}: budget {check.budget(name):.0f} s")
        try:
            sec.note = RUNNERS[name](check, sec)
            sec.status = "ok"
        except SkipSection as e:
            sec.status, sec.note = "skipped", str(e)
        except Exception as e:  # a broken section is reported, the next one runs
            sec.status, sec.note = "failed", f"{type(e).__name__}: {e}"[:200]
    sec.seconds = time.monotonic() - began
    check.save()


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report")
    parser.add_argument(
        "--total",
        type=float,
        default=None,
        help="seconds for everything (default 460; dry run 360)",
    )
    parser.add_argument("--python", default="", help="use this interpreter, no set-up")
    parser.add_argument("--venv", default=os.path.join(REPO, ".venv"))
    parser.add_argument(
        "--base-python",
        default="python3",
        help="the interpreter a new venv is made from",
    )
    parser.add_argument("--pytest-k", default="", help="pytest -k selection")
    parser.add_argument("--step-batch", type=int, default=64, help="step.py -b")
    parser.add_argument("--loader-images", type=int, default=512)
    parser.add_argument("--cifar", default="", help="cifar10-jpeg.tar.gz")
    parser.add_argument(
        "--cifar-epochs",
        type=int,
        default=0,
        help="stop the CIFAR-10 run after N epochs (default: budget)",
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument("--skip", default="", help="sections not to run")
    parser.add_argument(
        "--reserve",
        type=float,
        default=None,
        help="seconds kept for each later section (default 30; dry 10)",
    )
    parser.add_argument("--make-images", nargs=5, help=argparse.SUPPRESS)
    return parser


def budgets(dry):
    """Each section's most seconds; the CIFAR-10 run takes what the others leave."""
    seconds = [60, 30, 150, 150, 60, 120] if dry else [150, 30, 170, 170, 80, 460]
    return dict(zip(SECTIONS, seconds))


def main(args):
    if args.make_images:
        root, n, width, height, classes = args.make_images
        make_images(root, int(n), int(width), int(height), int(classes))
        return 0
    args.total = args.total or (360 if args.dry_run else 460)
    if args.reserve is None:
        args.reserve = 10 if args.dry_run else 30
    args.budgets = budgets(args.dry_run)
    args.only = [s for s in args.only.split(",") if s]
    args.skip = [s for s in args.skip.split(",") if s]
    check = Check(args)
    try:
        for name in SECTIONS:
            run_section(check, name)
    finally:
        table = check.save()
        shutil.rmtree(check.tmp, ignore_errors=True)
    print(table)
    print(
        f"report: {os.path.abspath(args.out)}; commands and output: "
        f"{os.path.abspath(check.log_path)}"
    )
    asked = [s for s in check.sections if check.wanted(s.name)]
    return 0 if all(s.status == "ok" for s in asked) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
