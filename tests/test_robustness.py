"""Never lose a run: kills, signals, bad data, bad arguments, bad files, NaN, dead ranks."""

import gc
import json
import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch
from conftest import (
    PYTHON,
    REPO,
    RESUME_EPOCHS,
    TINY,
    assert_same_state,
    load,
    make_image_folder,
    moco_args,
    run_moco,
    spawn_flags,
)

import main_moco
from moco import checkpoint as ckpt
from moco.cli import run_cli
from moco.utils import NonFiniteLossError, UsageError

EPOCHS = RESUME_EPOCHS  # 3 steps an epoch on the 24-image folder


def start(data, out, *extra, procs=1):
    """main_moco.py in its own process group, output unbuffered, one checkpoint a step."""
    argv = [
        PYTHON,
        os.path.join(REPO, "main_moco.py"),
        str(data),
        *TINY,
        "--epochs",
        str(EPOCHS),
        "--output-dir",
        str(out),
        "--save-freq",
        "1",
        *map(str, extra),
    ]
    if procs > 1:
        argv += spawn_flags(procs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )


def wait_for_line(proc, needle, timeout=240):
    """Read the process's output until a line contains `needle`; returns all lines read."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return lines
        assert time.time() < deadline, "".join(lines)
    raise AssertionError(f"{needle!r} never printed:\n{''.join(lines)}")


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def epoch_averages(out):
    """Each epoch's logged loss and accuracies, the last record of an epoch run twice."""
    with open(out / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {
        r["epoch"]: (r["loss"], r["acc1"], r["acc5"])
        for r in records
        if r["kind"] == "epoch"
    }


def kill_one_rank(proc):
    """SIGKILL one of the two processes the launcher spawned; it must say so and stop."""
    children = subprocess.run(
        ["pgrep", "-f", "-s", str(proc.pid), "spawn_main"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(children) == 2, children
    os.kill(int(max(children, key=int)), signal.SIGKILL)
    began = time.time()
    code, text = finish(proc, timeout=120)
    assert code != 0 and time.time() - began < 120
    assert "error: process" in text and "died" in text


@pytest.fixture(scope="module")
def reference(tmp_path_factory, two_process_run):
    """Uninterrupted seeded runs with 1 process (in this one, with the options of
    `start`) and 2: final state, epoch averages; the 2-process run's output."""
    data, out2, output = two_process_run
    out1 = tmp_path_factory.mktemp("ref") / "out1"
    run_moco(data, out1, "--save-freq", "1", epochs=EPOCHS)
    runs = {
        procs: (
            load(out / f"checkpoint_{EPOCHS - 1:04d}.pth.tar"),
            epoch_averages(out),
        )
        for procs, out in ((1, out1), (2, out2))
    }
    return data, runs, output


def test_two_processes_spawned_like_the_original(reference):
    # the 2-process reference run: --multiprocessing-distributed --world-size 1
    # --rank 0 --dist-url tcp://...; its resume is pinned by the kill tests below
    _, runs, text = reference
    assert "batch: 4 per process, 8 global" in text
    assert "processes: 2 (2 per node), device cpu" in text
    assert text.count("Epoch: [0][0/") == 1  # only rank 0 prints
    state = runs[2][0]
    assert all(k.startswith("module.") for k in state["state_dict"])
    # 24 images over 2 processes of 4: 3 steps of 8 keys an epoch
    assert int(state["state_dict"]["module.queue_ptr"]) == 3 * 8 * EPOCHS % 64


def test_sigkill_twice_then_resume_auto_is_bit_identical(reference, tmp_path):
    data, runs, _ = reference
    out = tmp_path / "out"
    # unlabeled images: the same files as a list in the folder's order, which trains
    # as the folder does
    listed = tmp_path / "train.txt"
    paths = sorted(
        os.path.relpath(os.path.join(d, f), data)
        for d, _, files in os.walk(os.path.join(data, "train"))
        for f in files
    )
    listed.write_text("".join(p + "\n" for p in paths))
    extra = ["--resume", "auto", "--train-list", listed]
    kills = sorted(random.Random(1).sample(range(3 * EPOCHS - 1), 2))
    for step in kills:  # two kills at random steps, the second of a resumed run
        proc = start(data, out, *extra)
        wait_for_line(proc, f"Epoch: [{step // 3}][{step % 3}/3]")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    code, text = finish(start(data, out, *extra))
    assert code == 0, text
    state, averages = runs[1]
    assert_same_state(state, load(out / f"checkpoint_{EPOCHS - 1:04d}.pth.tar"))
    # an epoch resumed mid-way logs the whole epoch's averages, as if never stopped
    assert epoch_averages(out) == averages


def test_sigterm_then_a_dead_rank_then_resume_auto_on_two_processes_is_exact(
    reference, tmp_path
):
    data, runs, _ = reference
    out = tmp_path / "out"
    proc = start(data, out, procs=2)
    wait_for_line(proc, "Epoch: [0][1/3]")
    os.kill(proc.pid, signal.SIGTERM)  # the launcher passes it on to its processes
    code, text = finish(proc)
    assert code == 75, text  # stopped after a checkpoint: resume me
    found = re.search(r"stopped by a signal at epoch (\d+) step (\d+)", text)
    assert found, text
    epoch, step = map(int, found.groups())
    if step < 3:  # within the epoch: the mid-epoch file says where it stopped
        state = load(out / ckpt.LAST_NAME)
        assert (state["epoch"], state["iter"]) == (epoch, step)
    else:  # the signal came at the epoch's last step: the epoch is saved whole
        assert not (out / ckpt.LAST_NAME).exists()
        assert load(out / f"checkpoint_{epoch:04d}.pth.tar")["epoch"] == epoch + 1
    # the resumed run loses one of its processes: the launcher stops the other with a
    # one-line error, and what was saved before stays
    proc = start(data, out, "--resume", "auto", procs=2)
    wait_for_line(proc, "Epoch: [1][0/3]")
    kill_one_rank(proc)
    code, text = finish(start(data, out, "--resume", "auto", procs=2))
    assert code == 0, text
    state, averages = runs[2]
    assert_same_state(state, load(out / f"checkpoint_{EPOCHS - 1:04d}.pth.tar"))
    assert epoch_averages(out) == averages


def test_sigterm_to_every_process_with_loader_workers_saves_and_exits_75(tmp_path):
    # as SLURM at a time limit or a preemption: the signal reaches every process of
    # the task, the loader workers too, which must not end the run before it saves
    data = make_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "out"
    proc = start(data, out, "-j", "2")
    wait_for_line(proc, "Epoch: [0][0/3]")
    os.killpg(proc.pid, signal.SIGTERM)
    code, text = finish(proc)
    assert code == 75, text
    assert "Traceback" not in text and "killed by signal" not in text
    found = re.search(r"stopped by a signal at epoch (\d+) step (\d+)", text)
    assert found, text
    epoch, step = map(int, found.groups())
    saved = load(out / ckpt.LAST_NAME) if step < 3 else None
    assert saved is None or (saved["epoch"], saved["iter"]) == (epoch, step)


def test_an_interrupted_save_leaves_the_previous_checkpoint_valid(
    tmp_path, monkeypatch
):
    path = tmp_path / "checkpoint_0000.pth.tar"
    ckpt.save_atomically({"epoch": 1, "w": torch.ones(3)}, str(path))

    def dies_half_way(state, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError(28, "No space left on device")

    # one line: the file, the space it needs, the checkpoint --resume auto takes
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_atomically(
            {"epoch": 2, "w": torch.zeros(3)}, str(path), writer=dies_half_way
        )
    message = str(e.value)
    assert "\n" not in message and f"no space left to write {str(path)!r}" in message
    assert (
        "MiB needed" in message and f"--resume auto would use {str(path)!r}" in message
    )
    assert load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint_0000.pth.tar"]  # no temporary file left


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_checkpoint(
    image_folder, tmp_path, monkeypatch, capsys
):
    run_moco(image_folder, tmp_path / "probe")
    size = os.path.getsize(tmp_path / "probe" / "checkpoint_0000.pth.tar")
    disk = tmp_path / "disk"
    disk.mkdir()
    # a filesystem with room for one checkpoint, not two
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(disk)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            "cannot mount a small tmpfs here (needs root); the writer test above "
            "covers the message"
        )
    try:
        argv = [image_folder, *TINY, "--epochs", "2", "--output-dir", disk]
        monkeypatch.setattr("sys.argv", ["main_moco.py", *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_cli(main_moco.main, main_moco.get_args_parser())
        stderr = capsys.readouterr().err
        first = str(disk / "checkpoint_0000.pth.tar")
        assert e.value.code == 2
        assert stderr.strip().count("\n") == 0, stderr
        assert "no space left to write" in stderr and "checkpoint_0001" in stderr
        assert f"--resume auto would use {first!r}" in stderr
        assert load(first)["epoch"] == 1
        assert sorted(os.listdir(disk)) == ["checkpoint_0000.pth.tar", "log.jsonl"]
    finally:
        subprocess.run(["umount", str(disk)])


def test_keep_last_bounds_the_number_of_epoch_checkpoints(image_folder, tmp_path):
    run_moco(image_folder, tmp_path, "--keep-last", "2", epochs=3)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".tar")) == [
        "checkpoint_0001.pth.tar",
        "checkpoint_0002.pth.tar",
    ]


def test_resume_auto_skips_a_truncated_newest_checkpoint(image_folder, tmp_path):
    run_moco(image_folder, tmp_path, epochs=2)
    newest = tmp_path / "checkpoint_0001.pth.tar"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert ckpt.find_latest_checkpoint(str(tmp_path)) == str(
        tmp_path / "checkpoint_0000.pth.tar"
    )


def test_a_non_finite_loss_stops_before_any_bad_state_is_written(
    image_folder, tmp_path, monkeypatch
):
    calls = {"n": 0}
    real = torch.nn.CrossEntropyLoss.forward

    def poisoned(self, input, target):
        calls["n"] += 1
        loss = real(self, input, target)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 0 step 2"):
        run_moco(image_folder, tmp_path, "--save-freq", "1")
    state = load(tmp_path / ckpt.LAST_NAME)
    assert (state["epoch"], state["iter"]) == (0, 2)  # the last good step
    assert all(
        torch.isfinite(v).all()
        for v in state["state_dict"].values()
        if v.is_floating_point()
    )
    assert not os.path.exists(tmp_path / "checkpoint_0000.pth.tar")


def test_a_non_finite_loss_in_a_spawned_process_ends_in_one_line(capfd):
    from moco.distributed import _spawned_worker

    def worker(local_rank, nprocs, message):
        raise NonFiniteLossError(message)

    with pytest.raises(SystemExit) as e:
        _spawned_worker(0, worker, 2, ("the loss became nan at epoch 0 step 2",))
    assert e.value.code == 2
    assert capfd.readouterr().err == "error: the loss became nan at epoch 0 step 2\n"


def test_preemption_saves_every_save_freq_steps_and_after_a_stop_exits_75():
    saved = []

    class Saver:
        output_dir = "out"

        def save_mid_epoch(self, epoch, steps_done):
            saved.append((epoch, steps_done))

    before = signal.getsignal(signal.SIGTERM)
    preemption = ckpt.Preemption(Saver(), save_freq=2)
    try:
        assert not preemption.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested  # caught: the run goes on to the agreed step
        # epoch 0 of 5 steps: saved after steps 2 and 4, the epoch's own file after 5
        for steps_done in range(1, 6):
            preemption.after_step(0, steps_done, 5, stop=False)
        preemption.after_epoch()
        assert saved == [(0, 2), (0, 4)]
        # a stop agreed at the last step: the epoch is saved as every epoch, then exit
        preemption.after_step(1, 5, 5, stop=True)
        assert saved == [(0, 2), (0, 4)]
        with pytest.raises(SystemExit) as e:
            preemption.after_epoch()
        assert e.value.code == 75
        # within an epoch: saved where it stopped, then exit
        with pytest.raises(SystemExit) as e:
            preemption.after_step(2, 3, 5, stop=True)
        assert e.value.code == 75 and saved[-1] == (2, 3)
    finally:
        preemption.close()
    assert signal.getsignal(signal.SIGTERM) == before


class StopAtStep:
    """A StopSignal whose signal arrives during the given step (counted from 1)."""

    def __init__(self, step):
        self.step, self.steps = step, 0

    @property
    def received(self):
        self.steps += 1
        return signal.SIGTERM if self.steps == self.step else None

    def restore(self):
        pass


def test_a_signal_at_an_epochs_last_step_saves_the_epoch_and_resumes_after_it(
    image_folder, tmp_path, monkeypatch
):
    run_moco(image_folder, tmp_path / "whole", epochs=EPOCHS)
    out = tmp_path / "stopped"
    # 3 steps an epoch: the signal comes during the first epoch's last step
    monkeypatch.setattr(ckpt, "StopSignal", lambda: StopAtStep(3))
    with pytest.raises(SystemExit) as e:
        run_moco(image_folder, out, epochs=EPOCHS)
    assert e.value.code == 75
    assert load(out / "checkpoint_0000.pth.tar")["epoch"] == 1
    assert not os.path.exists(out / ckpt.LAST_NAME)
    monkeypatch.undo()
    run_moco(image_folder, out, "--resume", "auto", epochs=EPOCHS)
    final = f"checkpoint_{EPOCHS - 1:04d}.pth.tar"
    assert_same_state(load(tmp_path / "whole" / final), load(out / final))
    # every epoch record is of an epoch that ran: none of zero steps
    with open(out / "log.jsonl") as f:
        epochs = [r for r in map(json.loads, f) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    assert all(r["loss"] > 0 for r in epochs)


def test_a_malicious_checkpoint_is_refused_and_runs_nothing(image_folder, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "state_dict": Evil()}, path)
    with pytest.raises(UsageError, match="refused"):
        run_moco(image_folder, tmp_path / "out", "--resume", str(path))
    assert not marker.exists()


def _args_error(image_folder, tmp_path, *extra):
    with pytest.raises(UsageError) as e:
        main_moco.main(moco_args(image_folder, tmp_path, *extra))
    return str(e.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--moco-k", "4"], "--moco-k 4 is smaller than the 8 keys"),
        (["--symmetric", "--moco-k", "12"], "smaller than the 16 keys"),
        (["-a", "resnet_large"], "unknown --arch 'resnet_large'"),
        (["-a", "get_model"], "unknown --arch 'get_model'"),
        (
            ["-a", "mobilenet_v3_small", "--mlp"],
            "--mlp needs an architecture with an 'fc'",
        ),
        (["-b", "0"], "-b/--batch-size must be positive"),
        (["--moco-dim", "-1"], "--moco-dim must be positive"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--moco-m", "1.0"], "--moco-m must be in [0, 1)"),
        (["--moco-m", "-0.1"], "--moco-m must be in [0, 1)"),
        (["--moco-t", "0"], "--moco-t must be positive"),
        (["--bn-splits", "3"], "does not split into --bn-splits 3"),
        (["-b", "30"], "no full batch of 30"),
        (["--gpu", "0"], "no CUDA GPU is visible"),
    ],
)
def test_impossible_arguments_are_refused_with_one_line(
    image_folder, tmp_path, extra, message
):
    if "--gpu" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    text = _args_error(image_folder, tmp_path / "out", *extra)
    assert message in text and "\n" not in text
    assert not os.path.exists(tmp_path / "out" / "checkpoint_0000.pth.tar")


def test_an_output_dir_that_cannot_be_written_is_refused(image_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    text = _args_error(image_folder, blocker / "out")
    assert "--output-dir" in text and "cannot be written" in text


def test_a_resume_file_of_another_model_is_refused(image_folder, tmp_path):
    run_moco(image_folder, tmp_path / "a")
    path = str(tmp_path / "a" / "checkpoint_0000.pth.tar")
    cases = {
        ("-a", "resnet34"): "is a resnet18 checkpoint; got -a resnet34",
        ("--moco-k", "32"): "has --moco-dim 16 --moco-k 64",
        ("--moco-dim", "8"): "has --moco-dim 16 --moco-k 64",
        ("--mlp",): "trained without --mlp",
    }
    for extra, message in cases.items():
        assert message in _args_error(
            image_folder, tmp_path / "b", "--resume", path, *extra
        )
    assert "does not exist" in _args_error(
        image_folder, tmp_path / "b", "--resume", "nope.tar"
    )


def test_bad_data_folders_are_refused_before_training(tmp_path):
    from conftest import make_image_folder

    assert "does not exist" in _args_error(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    assert "holds no images" in _args_error(tmp_path / "flat", tmp_path / "o")
    (tmp_path / "flat" / "train" / "a.jpg").write_bytes(b"")
    # pretraining needs no class folders; the kNN monitor does
    assert "no full batch" in _args_error(tmp_path / "flat", tmp_path / "o")
    knn = ("--knn-freq", "1")
    assert "has no class folders" in _args_error(
        tmp_path / "flat", tmp_path / "o", *knn
    )
    data = make_image_folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "empty").mkdir()
    text = _args_error(data, tmp_path / "o", *knn)
    assert "empty" in text and "holds no images" in text


def _corrupt_one_image(image_folder, kind):
    path = os.path.join(image_folder, "train", "class1", "3.jpg")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(
            data[: len(data) // 3] if kind == "truncated" else b"this is not an image"
        )
    return path


# read in this process (-j 0) and in a loader worker (-j 1)
@pytest.mark.parametrize("kind, workers", [("truncated", 0), ("not an image", 1)])
def test_an_unreadable_image_is_named_in_a_one_line_error(
    image_folder, tmp_path, kind, workers, monkeypatch, capsys
):
    path = _corrupt_one_image(image_folder, kind)
    # the command line as main_moco.py runs it
    argv = [
        image_folder,
        *TINY,
        "-j",
        workers,
        "--epochs",
        "1",
        "--output-dir",
        tmp_path,
    ]
    monkeypatch.setattr("sys.argv", ["main_moco.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_cli(main_moco.main, main_moco.get_args_parser())
    code = e.value.code
    # the traceback holds the loader and its worker: let them go now, not in a later
    # test (the worker's shutdown after an error waits for the loader's 5 s timeout)
    del e
    gc.collect()
    assert code == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert (
        len(lines) == 1 and path in lines[0] and "--skip-bad-images" in lines[0]
    ), stderr


def test_skip_bad_images_logs_skips_and_counts(image_folder, tmp_path, capsys):
    path = _corrupt_one_image(image_folder, "truncated")
    run_moco(image_folder, tmp_path, "--skip-bad-images")
    out = capsys.readouterr().out
    assert f"skipping: cannot read image {path!r}" in out
    assert "1 unreadable image(s) skipped" in out
    assert os.path.exists(tmp_path / "checkpoint_0000.pth.tar")
