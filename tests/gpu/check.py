#!/usr/bin/env python3
"""The project checked on one CUDA GPU, from a fresh copy, in one call of 9 minutes.

    bash tests/gpu/gpu_check.sh --cifar data/cifar10-jpeg.tar.gz   # on the GPU machine
    bash tests/gpu/gpu_check.sh --dry-run     # the same at toy size on the CPU

Sections, in this order, each within its time (--total seconds in all, split by
CAPS; the CIFAR-10 run also takes what the others leave). A section that fails, stops
at its limit or raises is reported with the tail of its output, and the next one runs:

  setup   the interpreter (tests/gpu/setup_env.py): .venv reused, or made from a
          python3 that has torch (no download), or made as `make venv` does
  info    GPU, driver, torch, CUDA and cuDNN versions
  pytest  every test marked cuda in tests/, torch.compile's last, each within
          --pytest-timeout seconds (where pytest-timeout is installed)
  step    bench/step.py, ResNet-50 224 px MoCo v2 (--mlp, K 65536): fp32 with
          --original (the project, the original's formulas, the backbone floor), then
          --amp --channels-last (and --compile with --step-compile): images/s, ratios
  loader  bench/loader.py, v1 and v2 at 224 px with 16 workers on generated
          500 x 375 JPEGs, its batched path decoding with nvjpeg
  cifar   main_moco.py with the official CIFAR-10 demo's recipe on --cifar's tarball
          until the time is spent, then SIGTERM (the run checkpoints and exits 75):
          kNN and loss after each epoch next to the published run's

The table is printed at the end and written as JSON to --out after every section; with
$OUT set, also $OUT/gpu_check.json, $OUT/gpu_check.txt (the table) and
$OUT/gpu_check.log (every command and its output). The exit status is 0 when every
section asked for passed, 1 otherwise, 2 for bad arguments.

--dry-run: the CPU, resnet18 at 16 px, a few images, a CIFAR-10 subset of 50 + 20
images (or generated ones), one epoch; the cuda tests on their CPU fall-back
(MOCO_TEST_DEVICE=cpu). tests/test_gpu_check.py runs it (with --pytest-k: the normal
suite runs every cuda test on the CPU where there is no GPU). Only the standard library is
imported here: this runs before .venv exists.
"""

import argparse
import datetime
import os
import resource
import shutil
import signal
import sys
import time
import traceback

import report
import sections
import setup_env
from harness import Check, SectionTimeout, SkipSection

SECTIONS = ("setup", "info", "pytest", "step", "loader", "cifar")
# seconds each section may take; on the GPU 500 in all, 9 minutes with a margin
CAPS = {"setup": 25, "info": 10, "pytest": 130, "step": 50, "loader": 35, "cifar": 250}
DRY_CAPS = {
    "setup": 60,
    "info": 30,
    "pytest": 200,
    "step": 90,
    "loader": 60,
    "cifar": 120,
}
GREEDY = "cifar"  # runs until the deadline: it takes what the sections before it left
RUNNERS = {
    "setup": setup_env.section_setup,
    "info": sections.section_info,
    "pytest": sections.section_pytest,
    "step": sections.section_step,
    "loader": sections.section_loader,
    "cifar": sections.section_cifar,
}


class Stopped(BaseException):
    """The check itself was sent SIGTERM or SIGINT."""


class BadArguments(Exception):
    """A command line that cannot run: said in one line, exit status 2."""


def section_caps(args: argparse.Namespace) -> dict:
    """Seconds for each section: CAPS (DRY_CAPS) times --time-scale, then
    --section-timeout, all scaled down to fit --total when they do not."""
    caps = {
        k: v * args.time_scale for k, v in (DRY_CAPS if args.dry_run else CAPS).items()
    }
    caps.update(args.section_timeout)
    asked = sum(caps[s] for s in SECTIONS if s in args.only)
    if args.total is None:
        args.total = asked
    if asked > args.total:
        caps = {k: v * args.total / asked for k, v in caps.items()}
    return caps


def children_cpu_seconds() -> float:
    """CPU seconds of the finished programs this check ran."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_section(
    check: Check, args: argparse.Namespace, name: str, cap: float, done: list
) -> None:
    sec = report.Section(name)
    done.append(sec)
    check.section = sec
    began, cpu_began = time.monotonic(), children_cpu_seconds()
    end = check.deadline if name == GREEDY else began + cap
    check.section_deadline = min(end, check.deadline)
    if name not in args.only:
        sec.note = "not asked for (--only/--skip)"
    elif check.python is None and name != "setup":
        sec.status, sec.note = "failed", "no interpreter: set-up failed"
    elif check.left() < 1:
        sec.note = "no time left in --total"
    else:
        check.say(f"{name}: {check.left():.0f} s")
        try:
            sec.note = RUNNERS[name](check, sec, args)
            sec.status = "ok"
        except SkipSection as e:
            sec.status, sec.note = "skipped", str(e)
        except SectionTimeout as e:
            sec.status, sec.note = "timeout", str(e)
        except Exception as e:  # a broken section is reported, the next one runs
            where = traceback.extract_tb(e.__traceback__)[-1]
            place = f" ({os.path.basename(where.filename)}:{where.lineno})"
            sec.status = "failed"
            sec.note = f"{type(e).__name__}: {e}"[:200] + place
            lines = traceback.format_exc().strip().splitlines()
            check.logged(f"{name}: {type(e).__name__}", "\n".join(lines[-12:]))
        finally:  # also when the check itself is stopped
            sec.seconds = round(time.monotonic() - began, 1)
            sec.cpu_seconds = round(children_cpu_seconds() - cpu_began, 1)
    check.section = None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument(
        "--out",
        default=os.path.join("output", "gpu_check.json"),
        help="the JSON report, its log beside it (default: output/, which git ignores)",
    )
    parser.add_argument(
        "--cifar",
        default="",
        help="cifar10-jpeg.tar.gz, e.g. data/cifar10-jpeg.tar.gz (gpu_check.sh takes "
        "a relative path from the repository's root)",
    )
    parser.add_argument(
        "--total",
        type=float,
        default=None,
        help="seconds for everything (default: the sections' caps, 500 on the GPU)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every section's seconds (a slow machine)",
    )
    parser.add_argument(
        "--section-timeout",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="this section's seconds instead of its cap (repeatable)",
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument("--skip", default="", help="sections not to run")
    parser.add_argument("--python", default="", help="use this interpreter, no set-up")
    parser.add_argument("--venv", default=os.path.join(setup_env.REPO, ".venv"))
    parser.add_argument(
        "--base-python",
        default="python3",
        help="the interpreter a new venv is made from",
    )
    parser.add_argument("--pytest-k", default="", help="pytest -k selection")
    parser.add_argument(
        "--pytest-timeout",
        type=float,
        default=None,
        help="seconds a cuda test may take (default 90; dry run 60)",
    )
    parser.add_argument("--step-batch", type=int, default=64, help="step.py -b")
    parser.add_argument(
        "--step-compile",
        action="store_true",
        help="also time --compile (compiling ResNet-50 takes minutes: give the step "
        "section more with --section-timeout step=S)",
    )
    parser.add_argument("--loader-images", type=int, default=512)
    parser.add_argument(
        "--cifar-epochs",
        type=int,
        default=0,
        help="stop the CIFAR-10 run after N epochs (default: when the time is spent)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Bad arguments end the check before anything runs."""
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    unknown = sorted(set(only + skip) - set(SECTIONS))
    if unknown:
        raise BadArguments(
            f"no section {', '.join(unknown)}: use {', '.join(SECTIONS)}"
        )
    args.only = [s for s in only if s not in skip]
    timeouts = {}
    for item in args.section_timeout:
        name, _, seconds = item.partition("=")
        try:
            timeouts[name] = float(seconds)
        except ValueError:
            raise BadArguments(
                f"--section-timeout {item!r}: give NAME=SECONDS"
            ) from None
        if name not in SECTIONS:
            raise BadArguments(f"--section-timeout {item!r}: no section {name!r}")
    args.section_timeout = timeouts
    if args.time_scale <= 0 or (args.total is not None and args.total <= 0):
        raise BadArguments("--time-scale and --total must be positive")
    if args.cifar:
        if not os.path.isfile(args.cifar):
            raise BadArguments(
                f"--cifar {args.cifar}: no such file (copy cifar10-jpeg.tar.gz into the "
                "working tree, e.g. data/, and name that path)"
            )
        args.cifar = os.path.abspath(args.cifar)
    if args.pytest_timeout is None:
        args.pytest_timeout = (60 if args.dry_run else 90) * args.time_scale


def main(argv: list | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args)
    except BadArguments as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    caps = section_caps(args)
    out = os.path.abspath(args.out)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        check = Check(args.dry_run, args.total, os.path.splitext(out)[0] + ".log")
    except OSError as e:
        print(
            f"error: --out {args.out}: {e.strerror} (choose a writable path)",
            file=sys.stderr,
        )
        return 2
    check.python = args.python or None  # else the set-up section finds one
    done = []

    def save() -> str:
        text = report.table(done, check.info, check.dry, check.elapsed())
        record = {
            "dry_run": check.dry,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": round(check.elapsed(), 1),
            "total_budget_s": args.total,
            "caps_s": {k: round(v, 1) for k, v in caps.items()},
            "python": check.python,
            "info": check.info,
            "sections": done,
        }
        try:
            report.write(out, record, text, check.log_path)
        except OSError as e:  # the table is still printed at the end
            check.say(f"could not write the report: {e}")
        return text

    def stopped(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    check.progress = save
    previous = {s: signal.signal(s, stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for name in SECTIONS:
            run_section(check, args, name, caps[name], done)
            save()
    except Stopped as e:
        if check.section is not None:  # the section in progress
            check.section.status = "failed"
            check.section.note = f"the check was stopped ({e})"
        for name in SECTIONS[len(done) :]:
            done.append(
                report.Section(name, note=f"not run: the check was stopped ({e})")
            )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        text = save()
        shutil.rmtree(check.tmp, ignore_errors=True)
    print(text)
    print(f"report: {out}; commands and output: {check.log_path}")
    asked = [s for s in done if s.name in args.only]
    return 0 if all(s.status == "ok" for s in asked) else 1


if __name__ == "__main__":
    sys.exit(main())
