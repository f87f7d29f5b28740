"""bench/gpu_check.py --dry-run: the one-shot GPU check runs end to end at toy size on
the CPU, so that the short GPU session it is written for finds nothing broken.

The dry run runs some of the cuda tests (DRY_RUN_TESTS); the others run on the CPU
fall-back in the second test, so that each of them runs somewhere.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import PYTHON, REPO

SECTIONS = ["setup", "info", "pytest", "step", "loader", "cifar"]
DRY_RUN_TESTS = "float32_under_autocast or channels_last"
CPU_FALLBACK = {"MOCO_TEST_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run, with a new venv made from this interpreter (as on a GPU machine
    whose python3 is a venv holding torch) and $OUT set."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "OUT").mkdir()
    argv = [PYTHON, os.path.join(REPO, "bench", "gpu_check.py"), "--dry-run"]
    argv += ["--out", tmp / "check.json", "--venv", tmp / "venv"]
    argv += ["--base-python", PYTHON, "--pytest-k", DRY_RUN_TESTS]
    r = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,  # the script finds the repository by itself
        env={**os.environ, "OUT": str(tmp / "OUT"), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 0, r.stdout + r.stderr[-5000:]
    return r.stdout, json.loads((tmp / "check.json").read_text()), tmp


def rows(report, section):
    (sec,) = [s for s in report["sections"] if s["name"] == section]
    assert sec["status"] == "ok", sec
    return {r["item"]: r for r in sec["rows"]}


def test_dry_run_prints_one_table_of_every_section_and_writes_it_as_json(dry_run):
    stdout, report, tmp = dry_run
    assert [s["name"] for s in report["sections"]] == SECTIONS
    assert all(s["status"] == "ok" for s in report["sections"])
    table = (tmp / "OUT" / "gpu_check.txt").read_text()
    assert table in stdout  # the table printed is the one written to $OUT
    assert stdout.count("\nsection ") == 1  # one table
    for name in SECTIONS:
        assert re.search(rf"^{name} +\(section\) +ok ", table, re.M), name
    assert re.search(r"^total .* 6 of 6 sections ok$", table, re.M)
    assert json.loads((tmp / "OUT" / "gpu_check.json").read_text()) == report
    assert "main_moco.py" in (tmp / "OUT" / "gpu_check.log").read_text()
    assert report["dry_run"] and report["info"]["torch"]


def test_set_up_makes_a_venv_that_sees_the_torch_of_the_python_it_came_from(dry_run):
    _, report, tmp = dry_run
    setup = rows(report, "setup")
    assert "--system-site-packages" in setup["venv"]["value"]
    if PYTHON == sys.executable and sys.prefix != sys.base_prefix:
        assert "linked in with a .pth" in setup["venv"]["value"]  # made from a venv
    assert setup["pip install"]["status"] == "skipped"  # nothing to download
    assert report["python"] == str(tmp / "venv" / "bin" / "python")


def test_dry_run_reports_each_cuda_test_it_ran(dry_run):
    _, report, _ = dry_run
    tests = rows(report, "pytest")
    assert sorted(tests) == [
        "test_channels_last_trains_as_the_contiguous_run",
        "test_logits_and_queue_stay_float32_under_autocast[bfloat16]",
        "test_logits_and_queue_stay_float32_under_autocast[float16]",
    ]
    assert all(t["status"] == "passed" and t["seconds"] > 0 for t in tests.values())


def test_dry_run_reports_images_per_second_of_the_three_step_variants(dry_run):
    _, report, _ = dry_run
    runs = rows(report, "step")
    assert list(runs) == [
        "fp32 --original",
        "--amp --channels-last",
        "--amp --channels-last --compile",
    ]
    for run in runs.values():
        assert run["figures"]["a"]["images_per_s"] > 0
        assert run["figures"]["b"]["images_per_s"] > 0
    assert runs["fp32 --original"]["figures"]["o"]["vs_floor"] > 0
    assert "x" in runs["--amp --channels-last"]["value"]  # the speed-up over fp32


def test_dry_run_reports_the_input_pipeline_of_both_recipes(dry_run):
    _, report, _ = dry_run
    loader = rows(report, "loader")
    measured = [r for r in loader.values() if "images_per_s" in r["figures"]]
    assert {r["figures"]["recipe"] for r in measured} == {"v1", "v2"}
    for r in measured:
        rates = r["figures"]["images_per_s"]
        assert rates["fast"] > 0 and rates["original"] > 0
    batched = [r for r in measured if "batched" in r["figures"]["images_per_s"]]
    # the batched path is measured when bench/loader.py offers it, else said absent
    assert batched or loader["batched GPU path"]["status"] == "not available"


def test_dry_run_trains_the_cifar_recipe_an_epoch_then_stops_it_with_sigterm(dry_run):
    _, report, _ = dry_run
    cifar = rows(report, "cifar")
    first = cifar["epoch 1"]["figures"]
    assert 0 <= first["knn_acc1"] <= 100 and first["loss"] > 0
    assert first["published_knn_acc1"] == 31.98 and first["published_loss"] == 6.96
    assert (
        cifar["stop"]["value"].startswith("SIGTERM")
        and "exit 75" in cifar["stop"]["value"]
    )


def test_the_cuda_tests_left_out_of_the_dry_run_pass_on_the_cpu():
    r = subprocess.run(
        [PYTHON, "-m", "pytest", "-m", "cuda", "-q", "tests/test_cuda.py"]
        + ["-k", f"not ({DRY_RUN_TESTS})"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, **CPU_FALLBACK},
    )
    summary = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary
