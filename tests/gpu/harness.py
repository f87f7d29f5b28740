"""What every section shares: the clock, the commands it runs and the log."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
TAIL_LINES = 20  # of a command's output, kept in its section's report


class SkipSection(Exception):
    """The section cannot run here (no data): reported as skipped, not failed."""


class SectionTimeout(Exception):
    """The section's command reached its time limit: reported as timeout."""


@dataclass
class Result:
    """A finished command: its exit status, output, seconds, and whether it was
    stopped at its limit."""

    rc: int | None
    output: str
    seconds: float
    timed_out: bool = False

    def last_line(self) -> str:
        lines = [line for line in self.output.strip().splitlines() if line.strip()]
        tail = lines[-1] if lines else f"no output, exit {self.rc}"
        return ("stopped at its time limit; " if self.timed_out else "") + tail[:200]


class Check:
    """The run's clock (the whole deadline and the section's), interpreter and log."""

    def __init__(self, dry: bool, total: float, log_path: str):
        self.dry = dry
        self.start = time.monotonic()
        self.deadline = self.start + total
        self.section_deadline = self.deadline
        self.section = None  # the report.Section being run
        self.python = None
        self.info = {}
        self.progress = lambda: None  # saves the report so far
        self.log_path = log_path
        open(log_path, "w").close()
        self.tmp = tempfile.mkdtemp(prefix="gpu_check_")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left to the section in progress."""
        return min(self.section_deadline, self.deadline) - time.monotonic()

    def say(self, text: str) -> None:
        print(f"[gpu_check {self.elapsed():6.1f} s] {text}", file=sys.stderr)

    def logged(self, title: str, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {title}\n{text}\n")

    def keep_tail(self, output: str) -> None:
        if self.section is not None:
            tail = output.strip().splitlines()[-TAIL_LINES:] or ["(no output)"]
            self.section.tail = "\n".join(tail)

    def run(
        self,
        cmd: list,
        limit: float,
        env: dict | None = None,
        first_signal: int = signal.SIGTERM,
        grace: float = 15.0,
    ) -> Result:
        """
        cmd in the repository, output captured, for at most `limit` seconds and never
        past the section's deadline: `first_signal` to its process group `grace`
        seconds before the end (a third of the time at most), then SIGKILL.
        """
        cmd = [str(c) for c in cmd]
        limit = max(1.0, min(limit, self.left()))
        grace = min(grace, limit / 3)
        shown = " ".join(cmd).replace("\n", "\\n ")
        self.say(f"$ {shown[:300]}  (limit {limit:.0f} s)")
        began = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group: stopped as a whole
        )
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=limit - grace)
        except subprocess.TimeoutExpired:
            timed_out = True
            out = stop(proc, first_signal, grace)
        except BaseException:  # the check itself is stopped: so is the command
            stop(proc, signal.SIGKILL, 0)
            raise
        seconds = time.monotonic() - began
        rc = proc.returncode
        self.logged(f"{shown}\n(exit {rc}, {seconds:.1f} s)", out[-200_000:])
        self.keep_tail(out)
        return Result(rc, out, seconds, timed_out)


def stop(proc: subprocess.Popen, first_signal: int, grace: float) -> str:
    """Signal the process group, wait `grace` seconds, then kill it; its output."""
    for sig, wait in ((first_signal, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.communicate(timeout=wait)[0] or ""
        except subprocess.TimeoutExpired:
            continue
    # a process that left the group still holds the pipe: give up on its output
    proc.stdout.close()
    proc.wait()
    return "(output lost: a process outside its process group kept it open)"
