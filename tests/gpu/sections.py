"""The sections after set-up: each runs its programs under check.python within the
section's time and adds its rows; it returns the section's note, or raises
(SkipSection, SectionTimeout, or any other error: failed)."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time

import parse
from harness import HERE, REPO, Check, SectionTimeout, SkipSection
from report import Section

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

# nn.Module.compile with the aot_eager backend, then the script: the dry run's compile
# (inductor's C++ build takes minutes on a small CPU)
COMPILE_AOT_EAGER = (
    "import runpy, sys, torch\n"
    "compile_module = torch.nn.Module.compile\n"
    "torch.nn.Module.compile = lambda self, *a, **k: compile_module(\n"
    "    self, *a, **{'backend': 'aot_eager', **k})\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)

CIFAR_RECIPE = (
    "-a resnet18 --small-stem --input-size 32 --bn-splits 8 --aug cifar10 "
    "--normalize cifar10 -b 512 --lr 0.06 --wd 5e-4 --cos --epochs 200 --moco-k 4096 "
    "--moco-m 0.99 --moco-t 0.1 --knn-freq 1 --knn-features head --knn-crop none "
    "--gpu 0"
).split()
PREEMPTED_EXIT_CODE = 75  # main_moco.py: stopped on a signal after a checkpoint
# the dry run's CIFAR-10 subset, images per class: 3 steps of 16 an epoch, so that
# the SIGTERM sent after the first kNN pass stops the run within the next epoch
DRY_CIFAR = {"train": 5, "val": 2}


# ---------------------------------------------------------------- info
def section_info(check: Check, sec: Section, args: argparse.Namespace) -> str:
    r = check.run([check.python, "-c", INFO], check.left())
    if r.rc != 0:
        raise RuntimeError(r.last_line())
    check.info = json.loads(r.output.strip().splitlines()[-1])
    if shutil.which("nvidia-smi"):
        query = ["--query-gpu=driver_version", "--format=csv,noheader"]
        smi = check.run(["nvidia-smi", *query], 30)
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
def pytest_command(python: str, timeout: float | None, k: str) -> list:
    """Every test marked cuda in tests/, the slowest last (gpu_check_plugin), each
    within `timeout` seconds when pytest-timeout is there (timeout not None)."""
    cmd = [python, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rfEs"]
    cmd += ["-p", "gpu_check_plugin", "--continue-on-collection-errors"]
    if timeout is not None:
        cmd += ["--timeout", f"{timeout:.0f}"]
    if k:
        cmd += ["-k", k]
    return cmd


HAS_TIMEOUT = (
    "import importlib.util as u; raise SystemExit(not u.find_spec('pytest_timeout'))"
)


def section_pytest(check: Check, sec: Section, args: argparse.Namespace) -> str:
    results = os.path.join(check.tmp, "pytest.jsonl")
    has_timeout = check.run([check.python, "-c", HAS_TIMEOUT], 30).rc == 0
    timeout = args.pytest_timeout if has_timeout else None
    cmd = pytest_command(check.python, timeout, args.pytest_k)
    path = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "GPU_CHECK_RESULTS": results}
    # on the GPU machine a test that finds no GPU fails instead of skipping
    env["MOCO_TEST_DEVICE"] = "cuda"
    if check.dry:
        env.update(MOCO_TEST_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")
    # SIGINT at the limit: pytest stops after the test in progress and says so
    r = check.run(cmd, check.left(), env=env, first_signal=signal.SIGINT)
    order, outcomes = parse.pytest_outcomes(parse.read_new_records(results, 0)[0])
    counts = {}
    for nodeid in order:
        o = outcomes.get(nodeid, {"outcome": "not run", "message": "", "seconds": None})
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
        file, _, name = nodeid.rpartition("::")
        figures = {"nodeid": nodeid, "file": file}
        sec.add(name, o["outcome"], o["message"], seconds=o["seconds"], figures=figures)
    summary = parse.pytest_summary(r.output) or r.last_line()
    tally = ", ".join(f"{n} {what}" for what, n in counts.items())
    per_test = "no per-test limit (no pytest-timeout)"
    if timeout is not None:
        per_test = f"{timeout:.0f} s a test"
    note = f"{tally or 'no test ran'}; {per_test}"
    if r.timed_out:
        raise SectionTimeout(f"stopped at the section's limit: {note}")
    if not order:
        raise RuntimeError(f"no cuda test collected: {summary}")
    if counts.get("failed") or counts.get("error") or r.rc not in (0, None):
        raise RuntimeError(f"{note}; {summary}"[:200])
    if not counts.get("passed"):
        raise RuntimeError(f"no test passed: {note}")
    return note


# ---------------------------------------------------------------- step
def step_runs(check: Check, args: argparse.Namespace) -> list:
    """(label, bench/step.py arguments, share of the section's time) of each run."""
    if check.dry:
        base = (
            "-a resnet18 --small-stem --input-size 16 -b 4 --moco-k 16 --moco-dim 8 "
            "--mlp --device cpu --steps 1 --warmup 0 --part-reps 1 --threads 1"
        ).split()
    else:
        base = (
            f"-a resnet50 --input-size 224 -b {args.step_batch} --moco-k 65536 "
            "--mlp --moco-t 0.2 --device cuda --steps 10 --warmup 3 --part-reps 5"
        ).split()
    # shares of the time: the first builds three models and times MoCo's parts
    runs = [("fp32 --original", base + ["--original"], 3)]
    amp = "--amp --channels-last"
    runs.append((amp, base + f"{amp} --no-parts".split(), 2))
    if args.step_compile:
        runs.append(
            (f"{amp} --compile", base + f"{amp} --compile --no-parts".split(), 4)
        )
    return runs


def section_step(check: Check, sec: Section, args: argparse.Namespace) -> str:
    runs = step_runs(check, args)
    failed, rates, timed_out = [], {}, False
    for i, (label, argv, share) in enumerate(runs):
        # this run's share of what is left to it and the runs after it
        limit = check.left() * share / sum(run[2] for run in runs[i:])
        cmd = [check.python, "bench/step.py", *argv]
        compiled = "--compile" in argv and check.dry
        if compiled:
            cmd = [check.python, "-c", COMPILE_AOT_EAGER, "bench/step.py", *argv]
        r = check.run(cmd, limit)
        found = parse.parse_step(r.output)
        if r.rc != 0 or "a" not in found or "b" not in found:
            failed.append(label)
            timed_out |= r.timed_out
            status = "timeout" if r.timed_out else "failed"
            sec.add(label, status, r.last_line(), seconds=r.seconds)
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
        error = SectionTimeout if timed_out else RuntimeError
        raise error(f"{', '.join(failed)} did not finish ({what})")
    return what


# ---------------------------------------------------------------- loader
def generate(
    check: Check, root: str, n: int, width: int, height: int, classes: int
) -> None:
    script = os.path.join(HERE, "images.py")
    r = check.run([check.python, script, root, n, width, height, classes], 120)
    if r.rc != 0:
        raise RuntimeError(f"could not generate images: {r.last_line()}")


def section_loader(check: Check, sec: Section, args: argparse.Namespace) -> str:
    began = time.monotonic()
    folder = os.path.join(check.tmp, "loader")
    if check.dry:
        n, size = 16, (100, 75)
        argv = "--size 32 --workers 0 --repeats 1 --batch-size 4".split()
    else:
        n, size = args.loader_images, (500, 375)  # ImageNet's typical size
        argv = "--size 224 --workers 16 --repeats 2 --batch-size 64".split()
        argv += ["--device", "cuda"]  # the batched path decodes with nvjpeg
    generate(check, folder, n, *size, 10)
    what = f"{n} generated {size[0]} x {size[1]} JPEGs"
    sec.add("data", "ok", what, seconds=time.monotonic() - began)
    r = check.run([check.python, "bench/loader.py", "--data", folder, *argv], 600)
    rows = parse.parse_loader(r.output)
    for recipe, workers, rates, ratios in rows:
        value = ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items())
        value += "; " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
        figures = dict(recipe=recipe, workers=workers, images_per_s=rates, **ratios)
        sec.add(f"{recipe} {workers} workers", "ok", value, figures=figures)
    if r.timed_out:
        raise SectionTimeout(f"{len(rows)} of 2 recipes measured: {r.last_line()}")
    if r.rc != 0 or not rows:
        raise RuntimeError(r.last_line())
    where = "cuda" if "cuda" in argv else "the CPU"
    return f"{argv[1]} px crops, {argv[3]} workers; batched path on {where}"


# ---------------------------------------------------------------- cifar
def extract_subset(tarball: str, dest: str, per_class: dict) -> str:
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


def cifar_data(check: Check, sec: Section, args: argparse.Namespace) -> str:
    """The ImageFolder the run trains on, and its row."""
    began = time.monotonic()
    data = os.path.join(check.tmp, "cifar")
    if not args.cifar:
        if not check.dry:
            sec.add("data", "skipped", "no --cifar PATH/cifar10-jpeg.tar.gz given")
            raise SkipSection("no CIFAR-10: give --cifar PATH/cifar10-jpeg.tar.gz")
        for split, per_class in DRY_CIFAR.items():
            generate(check, os.path.join(data, split), per_class * 10, 32, 32, 10)
        what = "generated 32 px images (no --cifar)"
    elif check.dry:
        data = extract_subset(args.cifar, data, DRY_CIFAR)
        what = f"{args.cifar}: {DRY_CIFAR['train']} + {DRY_CIFAR['val']} images a class"
    else:
        os.makedirs(data)
        r = check.run(["tar", "-xzf", args.cifar, "-C", data], 120)
        if r.rc != 0:
            raise RuntimeError(f"tar failed: {r.last_line()}")
        data = os.path.join(data, "cifar10")
        what = f"{args.cifar}: 50,000 + 10,000 images"
    sec.add("data", "ok", what, seconds=time.monotonic() - began)
    return data


def cifar_command(check: Check, data: str, out: str) -> list:
    argv = list(CIFAR_RECIPE)
    if check.dry:
        # 16 px crops (a step in a second): the kNN monitor then crops the images
        swap = {"-b": "16", "--moco-k": "256", "--input-size": "16"}
        swap["--knn-crop"] = "center"
        for flag, value in swap.items():
            argv[argv.index(flag) + 1] = value
        argv.remove("--gpu")
        argv.remove("0")
        argv += ["-j", "0"]
    else:
        argv += ["-j", str(min(16, os.cpu_count() or 1))]
    return [check.python, "main_moco.py", *argv, "--output-dir", out, data]


def epoch_row(
    sec: Section,
    index: int,
    epoch: dict,
    published: dict,
    knn_s: float | None,
    stopped: bool = False,
) -> None:
    """Epoch `index`'s row: kNN and loss next to the published run's; one without a
    kNN figure was stopped (or failed) before or during its kNN pass."""
    acc, loss = epoch.get("knn_acc1"), epoch.get("loss")
    pub_loss, pub_acc = published.get(index + 1, (None, None))
    value = f"kNN {acc:.2f}" if acc is not None else "no kNN"
    value += f" (published {pub_acc:.2f})" if pub_acc is not None else ""
    value += f", loss {loss:.2f}" if loss is not None else ""
    value += f" (published {pub_loss:.2f})" if pub_loss is not None else ""
    if epoch.get("images_per_s"):
        value += f"; {epoch['images_per_s']:.0f} img/s"
        value += f", data {100 * epoch.get('data_share', 0):.0f}% of the step time"
    if knn_s is not None:
        value += f"; kNN pass {knn_s:.0f} s"
    figures = dict(epoch=index + 1, **epoch, knn_s=knn_s)
    figures.update(published_knn_acc1=pub_acc, published_loss=pub_loss)
    status = "ok" if acc is not None else "stopped" if stopped else "failed"
    seconds = epoch.get("epoch_time_s")
    sec.add(f"epoch {index + 1}", status, value, seconds=seconds, figures=figures)


class EpochRows:
    """The run's log.jsonl read as it grows: a row for each epoch once its kNN figure
    is in, with the seconds of its kNN pass when training and kNN arrived apart."""

    def __init__(self, sec: Section, path: str):
        self.sec, self.path, self.seen = sec, path, 0
        self.records, self.shown, self.trained_at = [], set(), {}
        self.published = parse.published_curve()

    def poll(self) -> int:
        """Rows for the epochs whose kNN figure came in; the epochs shown so far."""
        new, self.seen = parse.read_new_records(self.path, self.seen)
        self.records += new
        epochs = parse.cifar_epochs(self.records)
        for e in sorted(set(epochs) - self.shown):
            if "knn_acc1" in epochs[e]:
                trained = self.trained_at.get(e)
                knn_s = None if trained is None else time.monotonic() - trained
                epoch_row(self.sec, e, epochs[e], self.published, knn_s)
                self.shown.add(e)
        for e in epochs:
            self.trained_at.setdefault(e, time.monotonic())
        return len(self.shown)

    def finish(self, stopped: bool) -> int:
        """The rest of the file: rows for the epochs left, kNN figure or not."""
        self.poll()
        epochs = parse.cifar_epochs(self.records)
        for e in sorted(set(epochs) - self.shown):
            epoch_row(self.sec, e, epochs[e], self.published, None, stopped)
        return len(self.shown)


def terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM (main_moco.py checkpoints and exits 75), then SIGKILL after `grace`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def section_cifar(check: Check, sec: Section, args: argparse.Namespace) -> str:
    data = cifar_data(check, sec, args)
    out = os.path.join(check.tmp, "cifar_run")
    cmd = [str(c) for c in cifar_command(check, data, out)]
    shown = " ".join(cmd)
    check.say(f"$ {shown}  (until {check.left():.0f} s from now)")
    # SIGTERM stops the run after the step in progress (or the kNN pass), then saves
    grace = min(45.0 if check.dry else 20.0, check.left() / 3)
    run_until = time.monotonic() + check.left() - grace
    stop_after = 1 if check.dry else args.cifar_epochs
    rows = EpochRows(sec, os.path.join(out, "log.jsonl"))
    log_path = os.path.join(check.tmp, "cifar_run.out")
    with open(log_path, "w") as log_file:
        began = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        try:
            while proc.poll() is None and time.monotonic() < run_until:
                done = len(rows.shown)
                if rows.poll() > done:
                    check.progress()  # a kill of the whole check keeps these epochs
                if stop_after and len(rows.shown) >= stop_after:
                    break
                time.sleep(0.5)
        finally:
            stopped, signalled = proc.poll() is None, time.monotonic()
            if stopped:
                terminate(proc, grace)
    with open(log_path, errors="replace") as f:
        output = f.read()
    check.logged(f"{shown}\n(exit {proc.returncode})", output[-200_000:])
    check.keep_tail(output)
    epochs = rows.finish(stopped)
    how = f"exit {proc.returncode} after {time.monotonic() - began:.0f} s"
    if stopped:
        how = f"SIGTERM after {signalled - began:.0f} s, exit {proc.returncode}"
        how += f" {time.monotonic() - signalled:.0f} s later"
    ok_exit = proc.returncode == (PREEMPTED_EXIT_CODE if stopped else 0)
    if not ok_exit:
        how += ": " + " | ".join(output.strip().splitlines()[-2:])[:200]
    sec.add("stop", "ok" if ok_exit else "failed", how)
    if not epochs or not ok_exit:
        raise RuntimeError(f"{epochs} epoch(s) with kNN; {how}")
    return f"{epochs} epoch(s) with kNN; {how}"
