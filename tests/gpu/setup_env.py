"""The set-up section: the interpreter every later section runs.

.venv reused; or created with --system-site-packages when the base python3 already has
torch (a GPU machine's own build, no download; a python3 that is itself a venv is
linked in with a .pth file), the packages it lacks installed from the requirements; or
created and the requirements installed, as `make venv` does. The type checker is left
out: the check never runs it.
"""

import argparse
import json
import os
import re
import time

from harness import REPO, Check
from report import Section

# what an interpreter has, without importing torch (seconds on a busy machine)
PROBE = """
import importlib.metadata as md, importlib.util, json, site, sys
have = {}
for n in sys.argv[1:]:
    try:
        have[n] = md.version(n)
    except md.PackageNotFoundError:
        have[n] = None
torch = importlib.util.find_spec("torch") is not None
print(json.dumps({"versions": have, "torch": have.get("torch") if torch else None,
                  "is_venv": sys.prefix != sys.base_prefix,
                  "site": site.getsitepackages(), "executable": sys.executable}))
"""


# in requirements-dev.txt for `make test`, never used by the check: not installed on
# a GPU machine, which may have no network
NOT_USED = {"mypy"}


def requirements() -> list:
    """(name, pinned version or None, line) of requirements.txt and -dev.txt that the
    check uses."""
    reqs = []
    for name in ("requirements.txt", "requirements-dev.txt"):
        with open(os.path.join(REPO, name)) as f:
            for line in f:
                line = line.split("#")[0].strip()
                if line:
                    pkg = re.split(r"[<>=!~;\[ ]", line)[0]
                    pin = line.split("==")[1].strip() if "==" in line else None
                    if pkg not in NOT_USED:
                        reqs.append((pkg, pin, line))
    return reqs


def probe(check: Check, python: str) -> dict | None:
    names = [name for name, _, _ in requirements()]
    r = check.run([python, "-c", PROBE, *names], 60)
    if r.rc != 0:
        return None
    return json.loads(r.output.strip().splitlines()[-1])


def section_setup(check: Check, sec: Section, args: argparse.Namespace) -> str:
    if args.python:
        found = probe(check, args.python)
        if not found or not found["torch"]:
            raise RuntimeError(f"--python {args.python} has no torch")
        check.python = args.python
        sec.add("interpreter", "ok", f"--python {args.python}: torch {found['torch']}")
        return f"given: {args.python}"
    venv = os.path.abspath(args.venv)
    if os.path.islink(venv) and not os.path.exists(venv):
        # a link to another checkout's .venv that did not travel with this copy
        sec.add("venv", "skipped", f"{venv} links to {os.readlink(venv)}, not here")
        venv = os.path.join(check.tmp, "venv")
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
                f"already has torch {base['torch']} (no download)"
            )
            # no pip of its own: nothing to install, and no ensurepip needed
            flags = ["--system-site-packages", "--without-pip"]
            r = check.run([args.base_python, "-m", "venv", *flags, venv], 120)
            if r.rc != 0:
                check.python = args.base_python
                sec.add("venv", "failed", f"python -m venv failed: {r.last_line()}")
                sec.add("interpreter", "ok", f"{args.base_python} itself instead")
                return f"{args.base_python} itself (venv creation failed)"
            if base["is_venv"]:
                # a venv's --system-site-packages are the base interpreter's, not the
                # venv's that holds torch: add those with a .pth file
                link_site_packages(check, python, base["site"])
                decision += " and, a venv itself, is linked in with a .pth"
        else:
            decision = (
                f"created {venv}: {args.base_python} has no torch, so the "
                "requirements (torch included) are installed"
            )
            r = check.run([args.base_python, "-m", "venv", venv], 180)
            if r.rc != 0:
                raise RuntimeError(f"python -m venv failed: {r.last_line()}")
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
        missing = [line for _, _, line in requirements()]  # as make venv, less mypy
    if missing:
        pip = [python, "-m", "pip", "install", "--retries", "1", "--timeout", "20"]
        r = check.run([*pip, *missing], check.left())
        status = "ok" if r.rc == 0 else "timeout" if r.timed_out else "failed"
        note = "" if r.rc == 0 else r.last_line()
        sec.add("pip install " + " ".join(missing), status, note, seconds=r.seconds)
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
        raise RuntimeError(f"{python} has no torch")
    check.python = python
    return f"{python}, torch {have['torch']}"


def link_site_packages(check: Check, python: str, site_dirs: list) -> None:
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    own = check.run([python, "-c", where], 60).output.strip().splitlines()[-1]
    with open(os.path.join(own, "_gpu_check_base.pth"), "w") as f:
        f.write("\n".join(site_dirs) + "\n")
