"""main_moco.py end to end on a tiny generated ImageFolder."""

import json
import math
import os
import shutil

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_same_state,
    free_port,
    load,
    make_image_folder,
    moco_args,
    run_moco,
    script,
)

from moco.utils import UsageError


def test_cpu_run_writes_the_original_checkpoint_format(image_folder, tmp_path):
    out = tmp_path / "out"
    run_moco(image_folder, out, "--mlp", "--aug-plus", "--cos", epochs=2)
    assert sorted(p for p in os.listdir(out) if p.endswith(".pth.tar")) == [
        "checkpoint_0000.pth.tar",
        "checkpoint_0001.pth.tar",
    ]
    ckpt = load(out / "checkpoint_0001.pth.tar")  # weights_only=True
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet18"
    sd = ckpt["state_dict"]
    assert all(k.startswith("module.") for k in sd)
    assert (
        sd["module.queue"].shape == (16, 64)
        and sd["module.queue_ptr"].dtype == torch.long
    )
    assert "module.encoder_q.fc.0.weight" in sd and "module.encoder_k.fc.2.bias" in sd
    torch.testing.assert_close(sd["module.queue"].norm(dim=0), torch.ones(64))
    # one SGD group over every parameter, the key encoder's included
    n_params = sum(
        1
        for k in sd
        if "running" not in k
        and "num_batches" not in k
        and k.startswith(("module.encoder_q.", "module.encoder_k."))
    )
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 1 and len(groups[0]["params"]) == n_params
    # 24 images, batch 8: 3 steps an epoch, 8 keys each: the pointer went round 6 x 8 = 48
    assert int(sd["module.queue_ptr"]) == 48


def test_resume_continues_exactly_where_the_run_stopped(image_folder, tmp_path):
    # split BatchNorm shuffles keys with torch's generator: the kNN monitor between the
    # epochs of the uninterrupted run must leave it as the checkpoint saved it
    split = ("--bn-splits", "2")
    run_moco(image_folder, tmp_path / "full", *split, "--knn-freq", "1", epochs=2)
    run_moco(image_folder, tmp_path / "part", *split, epochs=1)
    first = tmp_path / "part/checkpoint_0000.pth.tar"
    run_moco(image_folder, tmp_path / "part", *split, "--resume", str(first), epochs=2)
    assert_same_state(
        load(tmp_path / "full/checkpoint_0001.pth.tar"),
        load(tmp_path / "part/checkpoint_0001.pth.tar"),
    )


def test_queue_wraps_around_when_k_is_not_a_multiple_of_the_batch(
    image_folder, tmp_path
):
    run_moco(image_folder, tmp_path, "--moco-k", "20")
    ckpt = load(tmp_path / "checkpoint_0000.pth.tar")
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == (3 * 8) % 20


def test_symmetric_and_bn_splits_train(image_folder, tmp_path, capsys):
    run_moco(image_folder, tmp_path, "--symmetric", "--bn-splits", "2")
    ckpt = load(tmp_path / "checkpoint_0000.pth.tar")
    # both keys enqueued
    assert int(ckpt["state_dict"]["module.queue_ptr"]) == (3 * 16) % 64
    assert "module.encoder_q.bn1.running_mean" in ckpt["state_dict"]


def test_check_args_returns_the_values_the_arguments_imply(image_folder, tmp_path):
    import main_moco

    two = ["--multiprocessing-distributed", "--world-size", "1", "--rank", "0"]
    args = moco_args(
        image_folder, tmp_path, *two, "--procs-per-node", "2", "-j", "3", "--aug-plus"
    )
    plan = main_moco.check_args(args)
    # -b 8 and -j 3 of the node over its 2 processes; workers rounded up
    assert (plan.procs_per_node, plan.world_size) == (2, 2)
    assert (plan.batch_size, plan.workers, plan.global_batch) == (4, 2, 8)
    assert plan.recipe == "v2" and plan.keys_per_step == 8
    assert plan.launch.procs_per_node == 2 and plan.knn.k == 200
    args = moco_args(image_folder, tmp_path, "--symmetric", "--aug", "cifar10")
    plan = main_moco.check_args(args)
    assert (plan.world_size, plan.batch_size, plan.keys_per_step) == (1, 8, 16)
    assert plan.recipe == "cifar10"


def test_startup_summary_prints_derived_values(
    image_folder, tmp_path, capsys, monkeypatch
):
    import main_moco

    # the launch settings, the shares of batch and workers and the kNN options are
    # derived once for the run
    calls = []
    for name in ("launch_settings", "per_process", "knn_options"):
        real = getattr(main_moco, name)

        def counted(*a, real=real, name=name):
            calls.append(name)
            return real(*a)

        monkeypatch.setattr(main_moco, name, counted)
    run_moco(image_folder, tmp_path, "--lr", "0.06", "--knn-freq", "1")
    assert sorted(calls) == ["knn_options", "launch_settings", "per_process"]
    out = capsys.readouterr().out
    assert "processes: 1 (1 per node), device cpu" in out
    assert "batch: 8 per process, 8 global" in out
    assert "learning rate: 0.06 (linear scaling for this batch: 0.0009375" in out
    assert "queue: 64 keys = 8 steps of 8 keys" in out
    assert "Epoch: [0][0/3]" in out  # the original's progress lines
    # K 64 on 24 images: the queue holds the query's own earlier keys
    assert "--moco-k 64 with 24 training images: the queue holds" in out


def test_pretrains_on_unlabeled_images_at_any_depth(tmp_path, capsys, monkeypatch):
    import main_moco

    # no DIR/train, no class folders: images two levels down, and at the top
    flat = tmp_path / "photos"
    make_image_folder(tmp_path / "src", splits=("train",))
    for i, path in enumerate(sorted((tmp_path / "src" / "train").rglob("*.jpg"))):
        target = flat / ("" if i % 2 else f"day{i % 3}/roll") / f"{i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    listed = []
    real = main_moco.pretrain_images
    monkeypatch.setattr(
        main_moco, "pretrain_images", lambda *a: listed.append(a) or real(*a)
    )
    run_moco(flat, tmp_path / "out")
    assert len(listed) == 1  # the folder is walked once, not again by the process
    out = capsys.readouterr().out
    assert f"no {flat}/train: training on the 24 images under {flat}" in out
    assert load(tmp_path / "out" / "checkpoint_0000.pth.tar")["epoch"] == 1
    with pytest.raises(UsageError, match="kNN monitor"):
        run_moco(flat, tmp_path / "out2", "--knn-freq", "1")


def test_amp_on_a_cpu_that_emulates_bfloat16_is_named_a_slow_choice(monkeypatch):
    import main_moco

    args = main_moco.get_args_parser().parse_args(["x", "--amp"])
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    warning = main_moco.emulated_amp_warning(args, cpu)
    assert "without native bfloat16 (AVX2)" in warning
    # the figure is the docs' measurement, not a constant here
    assert "many times as long" in warning and "docs/precision.md" in warning
    assert main_moco.emulated_amp_warning(args, torch.device("cuda")) is None
    args.amp = False
    assert main_moco.emulated_amp_warning(args, cpu) is None


def test_log_has_one_json_object_per_line_with_the_promised_fields(
    image_folder, tmp_path
):
    run_moco(image_folder, tmp_path, "--knn-freq", "1", "--knn-k", "5", epochs=2)
    with open(tmp_path / "log.jsonl") as f:
        records = [json.loads(line) for line in f]  # each line parses on its own
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "args" and records[0]["moco_k"] == 64
    # -p 1, 3 steps an epoch: 3 step records, then the epoch's, then the monitor's
    assert kinds[1:] == (["step"] * 3 + ["epoch", "knn"]) * 2
    step_fields = {
        "epoch",
        "step",
        "global_step",
        "loss",
        "acc1",
        "acc5",
        "lr",
        "images_per_s",
        "data_share",
        "epoch_eta_s",
    }
    epoch_fields = {
        "epoch",
        "loss",
        "acc1",
        "acc5",
        "lr",
        "epoch_time_s",
        "images_per_s",
        "data_share",
        "eta_s",
    }
    fields = {"step": step_fields, "epoch": epoch_fields, "knn": {"epoch", "knn_acc1"}}
    for r in records[1:]:
        assert fields[r["kind"]] <= set(r), r
        assert all(math.isfinite(v) for k, v in r.items() if isinstance(v, float)), r
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["global_step"] for r in steps] == list(range(6))
    assert all(0 <= r["data_share"] <= 1 and r["images_per_s"] > 0 for r in steps)
    assert steps[-1]["epoch_eta_s"] == 0  # the epoch's last step
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert epochs[0]["eta_s"] > 0 and epochs[1]["eta_s"] == 0
    assert [r["epoch"] for r in records if r["kind"] == "knn"] == [0, 1]
    assert all(0 <= r["knn_acc1"] <= 100 for r in records if r["kind"] == "knn")


def test_torchrun_splits_the_node_batch_over_its_processes(image_folder, tmp_path):
    r = script(
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        free_port(),
        os.path.join(REPO, "main_moco.py"),
        image_folder,
        *TINY,
        "--epochs",
        "1",
        "--output-dir",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "batch: 4 per process, 8 global" in r.stdout
    assert os.path.exists(tmp_path / "checkpoint_0000.pth.tar")


def test_resumes_a_file_in_the_original_format(image_folder, tmp_path):
    """Only the original's four keys, in the pre-1.6 (non-zip) serialisation."""
    run_moco(image_folder, tmp_path / "a")
    full = load(tmp_path / "a/checkpoint_0000.pth.tar")
    original = {k: full[k] for k in ("epoch", "arch", "state_dict", "optimizer")}
    path = tmp_path / "original.pth.tar"
    torch.save(original, path, _use_new_zipfile_serialization=False)
    run_moco(image_folder, tmp_path / "b", "--resume", str(path), epochs=2)
    resumed = load(tmp_path / "b/checkpoint_0001.pth.tar")
    assert resumed["epoch"] == 2
    assert int(resumed["state_dict"]["module.queue_ptr"]) == 48
    # started at epoch 1
    assert not os.path.exists(tmp_path / "b/checkpoint_0000.pth.tar")
