"""A pytest plugin for the check's pytest section (`-p gpu_check_plugin`, this folder on
PYTHONPATH): the slowest tests (torch.compile's) run last, so that a stop at the
section's limit loses the fewest, and each outcome is appended to the JSON lines file
$GPU_CHECK_RESULTS as soon as it is known, so that a stop loses none of them."""

import json
import os

import pytest

SLOW = ("compile",)  # in a test's name: it runs after the others


def slow(item: pytest.Item) -> bool:
    return any(word in item.name for word in SLOW)


def record(line: dict) -> None:
    path = os.environ.get("GPU_CHECK_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=slow)  # stable: the others keep their order


def pytest_collection_finish(session: pytest.Session) -> None:
    record({"kind": "order", "nodeids": [item.nodeid for item in session.items]})


_reports = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _reports.setdefault(report.nodeid, []).append(report)


def message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0] if crash.message else ""
    text = str(report.longrepr or "").strip().splitlines()
    return text[-1] if text else ""


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    reports = _reports.pop(nodeid, [])
    outcome, text = "passed", ""
    for r in reports:
        if r.failed:
            outcome = "failed" if r.when == "call" else "error"
            text = message(r)
            break
        if r.skipped:
            outcome, text = "skipped", message(r)
    seconds = sum(r.duration for r in reports)
    record(
        {
            "kind": "test",
            "nodeid": nodeid,
            "outcome": outcome,
            "seconds": round(seconds, 3),
            "message": text[:300],
        }
    )
