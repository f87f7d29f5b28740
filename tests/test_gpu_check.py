"""tests/gpu/gpu_check.sh --dry-run: the one-shot GPU check runs end to end at toy size
on the CPU, so that the short GPU session it is written for finds nothing broken. Its
pytest section runs a few of the tests marked cuda here (--pytest-k DRY_RUN_TESTS): the
others run on their CPU fall-back in the normal suite already (tests/test_cuda.py).

A section that stops at its limit on a slow machine is reported as `timeout`; the tests
of that section are then skipped, not failed (tests/gpu/check.py --time-scale gives a
slow machine more time).
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import PYTHON, REPO

sys.path.insert(0, os.path.join(REPO, "tests", "gpu"))
import check  # noqa: E402
import gpu_check_plugin  # noqa: E402
import parse  # noqa: E402
import sections  # noqa: E402

SECTIONS = ["setup", "info", "pytest", "step", "loader", "cifar"]
ENTRY = os.path.join(REPO, "tests", "gpu", "gpu_check.sh")
CIFAR = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg.tar.gz")
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
# the cuda tests the dry run's pytest section runs: two quick ones (the nvjpeg one
# reports its skip on the CPU)
DRY_RUN_TESTS = "nvjpeg or logits_and_queue"


def run_check(tmp, *argv, timeout=600):
    """The check in a subprocess through its entry script, $OUT set to tmp/OUT."""
    (tmp / "OUT").mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", ENTRY, "--out", str(tmp / "check.json"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,  # the script finds the repository by itself
        env={**os.environ, **CPU_ONLY, "OUT": str(tmp / "OUT"), "PYTHON": PYTHON},
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run, with a new venv made from this interpreter (as on a GPU machine
    whose python3 is a venv holding torch) and $OUT set; the CIFAR-10 tarball where
    this machine keeps one, else generated images."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    argv = ["--dry-run", "--venv", tmp / "venv", "--base-python", PYTHON]
    argv += ["--pytest-k", DRY_RUN_TESTS]
    if os.path.exists(CIFAR):
        argv += ["--cifar", CIFAR]
    r = run_check(tmp, *argv)
    report = json.loads((tmp / "check.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["sections"]}
    assert set(statuses.values()) <= {"ok", "timeout"}, r.stdout + r.stderr[-5000:]
    assert r.returncode == (0 if set(statuses.values()) == {"ok"} else 1)
    assert "Traceback" not in r.stdout + r.stderr
    return r.stdout, report, tmp


def section(report, name):
    (sec,) = [s for s in report["sections"] if s["name"] == name]
    if sec["status"] == "timeout":
        pytest.skip(f"the dry run's {name} section stopped at its limit: {sec['note']}")
    assert sec["status"] == "ok", sec
    return sec


def rows(report, name):
    return {r["item"]: r for r in section(report, name)["rows"]}


def test_dry_run_prints_one_table_of_every_section_and_writes_it_as_json(dry_run):
    stdout, report, tmp = dry_run
    assert [s["name"] for s in report["sections"]] == SECTIONS
    table = (tmp / "OUT" / "gpu_check.txt").read_text()
    assert table in stdout  # the table printed is the one written to $OUT
    assert stdout.count("\nsection ") == 1  # one table
    for s in report["sections"]:
        assert re.search(rf"^{s['name']} +\(section\) +{s['status']} ", table, re.M)
    ok = sum(s["status"] == "ok" for s in report["sections"])
    assert re.search(rf"^total .* {ok} of 6 sections ok$", table, re.M)
    assert json.loads((tmp / "OUT" / "gpu_check.json").read_text()) == report
    assert "main_moco.py" in (tmp / "OUT" / "gpu_check.log").read_text()
    assert report["dry_run"] and report["info"]["torch"]
    assert sum(report["caps_s"].values()) <= report["total_budget_s"]


def test_set_up_makes_a_venv_that_sees_the_torch_of_the_python_it_came_from(dry_run):
    _, report, tmp = dry_run
    setup = rows(report, "setup")
    assert "--system-site-packages" in setup["venv"]["value"]
    if PYTHON == sys.executable and sys.prefix != sys.base_prefix:
        assert "linked in with a .pth" in setup["venv"]["value"]  # made from a venv
    assert setup["pip install"]["status"] == "skipped"  # nothing to download
    assert report["python"] == str(tmp / "venv" / "bin" / "python")


def test_set_up_installs_only_what_the_check_uses():
    import setup_env

    with open(os.path.join(REPO, "requirements-dev.txt")) as f:
        assert "mypy" in f.read()  # for make test's type check
    names = [name for name, _, _ in setup_env.requirements()]
    assert "torch" in names and "pytest" in names
    assert "mypy" not in names  # nothing the offline GPU machine would try to fetch


def test_the_pytest_section_runs_every_cuda_test_unless_told_otherwise():
    cmd = sections.pytest_command("python", None, "")
    assert cmd[:6] == ["python", "-m", "pytest", "tests", "-m", "cuda"]
    assert "-k" not in cmd and "--timeout" not in cmd
    cmd = sections.pytest_command("python", 90, "nvjpeg")
    assert cmd[-4:] == ["--timeout", "90", "-k", "nvjpeg"]


def test_the_pytest_section_runs_the_compiled_tests_last_in_their_order():
    class Item:
        def __init__(self, name):
            self.name = name

    names = ["test_a", "test_compiled_x", "test_b[1]", "test_compile_y", "test_c"]
    items = [Item(n) for n in names]
    gpu_check_plugin.pytest_collection_modifyitems(items)
    assert [i.name for i in items] == [
        "test_a",
        "test_b[1]",
        "test_c",
        "test_compiled_x",
        "test_compile_y",
    ]


def test_the_pytest_section_reports_each_test_it_ran(dry_run):
    _, report, _ = dry_run
    tests = [s for s in report["sections"] if s["name"] == "pytest"][0]["rows"]
    # float16 is bfloat16 on the CPU, and nvjpeg is the GPU's: those are skipped
    for t in tests:
        if "float16]" in t["item"] and "bfloat16" not in t["item"]:
            assert t["status"] == "skipped", t
            assert t["value"].startswith("float16 needs a GPU; on the CPU it would")
        elif "nvjpeg" in t["item"]:
            assert t["status"] == "skipped", t
            assert t["value"].startswith("needs a GPU: on the CPU it would compare")
        else:
            assert t["status"] == "passed", t
            assert t["seconds"] is not None and t["seconds"] >= 0
    section(report, "pytest")  # skipped from here if it stopped at its limit
    ran = {t["item"].split("[")[0] for t in tests}
    assert ran == {
        "test_cuda_decodes_with_nvjpeg_and_stays_close_to_the_cpu",
        "test_logits_and_queue_stay_float32_under_autocast",
    }
    assert "2 skipped, 1 passed" in section(report, "pytest")["note"]


def test_dry_run_reports_images_per_second_of_both_step_variants(dry_run):
    _, report, _ = dry_run
    runs = rows(report, "step")
    assert list(runs) == ["fp32 --original", "--amp --channels-last"]
    for run in runs.values():
        assert run["figures"]["a"]["images_per_s"] > 0
        assert run["figures"]["b"]["images_per_s"] > 0
    assert runs["fp32 --original"]["figures"]["o"]["vs_floor"] > 0
    assert "vs fp32" in runs["--amp --channels-last"]["value"]  # the speed-up


def test_dry_run_reports_the_input_pipeline_of_both_recipes(dry_run):
    _, report, _ = dry_run
    loader = rows(report, "loader")
    measured = [r for r in loader.values() if "images_per_s" in r["figures"]]
    assert {r["figures"]["recipe"] for r in measured} == {"v1", "v2"}
    for r in measured:
        rates = r["figures"]["images_per_s"]
        assert rates["fast"] > 0 and rates["original"] > 0 and rates["batched"] > 0


def test_dry_run_trains_the_cifar_recipe_an_epoch_then_stops_it_with_sigterm(dry_run):
    _, report, _ = dry_run
    cifar = rows(report, "cifar")
    # stopped by the signal after at least one epoch's kNN figure (more on a fast CPU)
    epochs = re.match(r"(\d+) epoch\(s\) with kNN", section(report, "cifar")["note"])
    assert epochs and int(epochs.group(1)) >= 1
    assert all(f"epoch {e}" in cifar for e in range(1, int(epochs.group(1)) + 1))
    first = cifar["epoch 1"]["figures"]
    assert 0 <= first["knn_acc1"] <= 100 and first["loss"] > 0
    assert first["published_knn_acc1"] == 31.98 and first["published_loss"] == 6.9569
    assert "(published 31.98)" in cifar["epoch 1"]["value"]
    assert (
        cifar["stop"]["value"].startswith("SIGTERM")
        and "exit 75" in cifar["stop"]["value"]
    )


def test_a_section_past_its_limit_keeps_its_row_and_the_check_exits_1(tmp_path):
    # pytest stopped at 3 s, while it still imports the tests: no test, no rows
    argv = ["--dry-run", "--python", PYTHON, "--only", "pytest"]
    r = run_check(tmp_path, *argv, "--section-timeout", "pytest=3", timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    (pytest_section,) = [s for s in report["sections"] if s["name"] == "pytest"]
    assert pytest_section["status"] == "timeout"
    assert pytest_section["tail"]  # its output, or "(no output)"
    assert "stopped at the section's limit" in pytest_section["note"]
    table = (tmp_path / "OUT" / "gpu_check.txt").read_text()
    assert re.search(r"^pytest +\(section\) +timeout ", table, re.M)
    assert re.search(r"^total .* 0 of 6 sections ok$", table, re.M)


def test_an_error_inside_a_section_is_its_failed_row_and_the_next_one_runs(
    tmp_path, monkeypatch, capsys
):
    def broken(check_, sec, args):
        sec.add(None, None, None)  # a row of Nones prints too
        return {}.get("item")[:62]  # TypeError: 'NoneType' object is not subscriptable

    def fine(check_, sec, args):
        sec.add("a test", "passed", seconds=1.0)
        return "ran"

    monkeypatch.setitem(check.RUNNERS, "info", broken)
    monkeypatch.setitem(check.RUNNERS, "pytest", fine)
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "check.json"
    argv = ["--python", sys.executable, "--only", "info,pytest", "--out", str(out)]
    assert check.main(argv) == 1
    report = {s["name"]: s for s in json.loads(out.read_text())["sections"]}
    assert report["info"]["status"] == "failed"
    assert report["info"]["note"].startswith("TypeError: 'NoneType' object is not")
    assert "test_gpu_check.py:" in report["info"]["note"]  # where it was raised
    assert report["pytest"]["status"] == "ok" and report["pytest"]["note"] == "ran"
    log = (tmp_path / "check.log").read_text()
    assert "Traceback" in log and 'return {}.get("item")[:62]' in log
    table = capsys.readouterr().out
    assert re.search(r"^info +\(section\) +failed .*TypeError", table, re.M)
    assert re.search(r"^pytest +\(section\) +ok +[\d.]+  ran$", table, re.M)


def test_the_sections_fit_the_total_and_the_cifar_run_gets_four_minutes():
    args = check.get_args_parser().parse_args([])
    check.check_args(args)
    caps = check.section_caps(args)
    assert args.total == sum(caps.values()) <= 500  # 9 minutes with a margin
    assert caps["cifar"] >= 240
    args = check.get_args_parser().parse_args(["--total", "300"])
    check.check_args(args)
    assert sum(check.section_caps(args).values()) <= 300


def test_pytest_gets_a_per_test_limit_only_where_pytest_timeout_is_installed():
    with_plugin = sections.pytest_command("python", 90, "")
    assert with_plugin[with_plugin.index("--timeout") + 1] == "90"
    assert "--timeout" not in sections.pytest_command("python", None, "")
    assert with_plugin[with_plugin.index("pytest") + 1 :][:3] == ["tests", "-m", "cuda"]


def test_pytest_results_cut_short_by_a_kill_name_the_tests_not_run(tmp_path):
    path = tmp_path / "results.jsonl"
    order = {"kind": "order", "nodeids": ["a.py::x", "a.py::y", "b.py::z"]}
    done = {"kind": "test", "nodeid": "a.py::x", "outcome": "passed", "seconds": 1}
    path.write_text(json.dumps(order) + "\n" + json.dumps(done) + '\n{"kind": "te')
    records, seen = parse.read_new_records(str(path), 0)
    assert seen == len(path.read_bytes()) - len('{"kind": "te')  # the cut line waits
    ran, outcomes = parse.pytest_outcomes(records)
    assert ran == order["nodeids"] and list(outcomes) == ["a.py::x"]
