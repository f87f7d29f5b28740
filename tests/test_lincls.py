import builtins
import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import free_port, make_image_folder

import main_lincls
import main_moco
from moco import checkpoint as ckpt
from moco.utils import UsageError
from moco.weights import encoder_state_dict, load_encoder

SMALL = ["-a", "resnet18", "--small-stem", "-j", "0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny ImageFolder (15 + 15 images) and a main_moco.py checkpoint trained on it."""
    root = tmp_path_factory.mktemp("lincls")
    data = make_image_folder(root / "data", classes=3, per_class=5, size=32)
    out = root / "pretrain"
    main_moco.main(
        main_moco.get_args_parser().parse_args(
            [
                *SMALL,
                "--input-size",
                "32",
                "-b",
                "8",
                "--moco-k",
                "64",
                "--epochs",
                "1",
                "--seed",
                "0",
                "--output-dir",
                str(out),
                data,
            ]
        )
    )
    return data, str(out / "checkpoint_0000.pth.tar")


def lincls_args(data, out, *extra):
    return main_lincls.get_args_parser().parse_args(
        [
            *SMALL,
            "--input-size",
            "16",
            "-b",
            "4",
            "--epochs",
            "1",
            "--seed",
            "0",
            "--output-dir",
            str(out),
            *extra,
            data,
        ]
    )


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_defaults_are_the_originals():
    args = main_lincls.get_args_parser().parse_args(["DIR"])
    lr = main_lincls.learning_rate(args)
    assert (args.arch, args.workers, args.epochs, args.batch_size, lr) == (
        "resnet50",
        32,
        100,
        256,
        30.0,
    )
    assert (args.schedule, args.momentum, args.weight_decay, args.print_freq) == (
        [60, 80],
        0.9,
        0.0,
        10,
    )
    assert (args.output_dir, args.input_size, args.dist_url) == (
        ".",
        224,
        "tcp://224.66.41.62:23456",
    )


def test_the_default_learning_rate_is_the_protocols_and_a_given_one_is_kept():
    parse = main_lincls.get_args_parser().parse_args
    assert main_lincls.learning_rate(parse(["--cached-features", "DIR"])) == 0.01
    assert main_lincls.learning_rate(parse(["--lr", "3", "DIR"])) == 3.0
    assert (
        main_lincls.learning_rate(parse(["--cached-features", "--lr", "3", "DIR"]))
        == 3.0
    )
    help_text = " ".join(main_lincls.get_args_parser().format_help().split())
    assert "(default: 30.0, the original's; 0.01 with --cached-features)" in help_text


def test_linear_probe_trains_only_fc_and_writes_the_originals_checkpoints(
    pretrained, tmp_path
):
    data, path = pretrained
    best = main_lincls.main(lincls_args(data, tmp_path, "--pretrained", path))

    state = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert set(state) == {"epoch", "arch", "state_dict", "best_acc1", "optimizer"}
    assert (state["epoch"], state["arch"]) == (1, "resnet18")
    assert type(state["best_acc1"]) is float and state["best_acc1"] == best
    assert all(k.startswith("module.") for k in state["state_dict"])
    # fc.weight, fc.bias
    assert len(state["optimizer"]["param_groups"][0]["params"]) == 2
    best_file = torch.load(tmp_path / "model_best.pth.tar", weights_only=True)
    assert best_file["best_acc1"] == best  # first epoch is the best so far

    # every backbone tensor, BatchNorm statistics included, is the pretrained one
    encoder, _ = encoder_state_dict(ckpt.load_checkpoint(path))
    trained = main_lincls.backbone_state(state["state_dict"])
    assert trained.keys() == encoder.keys()
    assert all(torch.equal(trained[k], encoder[k]) for k in encoder)
    assert state["state_dict"]["module.fc.weight"].shape == (3, 512)  # 3 classes
    assert records(tmp_path)[-1]["val_images"] == 15


def flavours(path, tmp_path):
    """The same query encoder saved as each kind of file --pretrained accepts."""
    state = ckpt.load_checkpoint(path)
    sd = state["state_dict"]
    q = {
        k[len("module.encoder_q.") :]: v
        for k, v in sd.items()
        if k.startswith("module.encoder_q.")
    }
    v3_head = {"fc.0.weight": torch.zeros(8, 512), "fc.1.running_mean": torch.zeros(8)}
    files = {
        "project": state,
        "original": {
            "state_dict": {
                k: v for k, v in sd.items() if "encoder_q" in k or "queue" in k
            }
        },
        "no-ddp": {"state_dict": {k.removeprefix("module."): v for k, v in sd.items()}},
        "mocov3": {
            "state_dict": {
                **{
                    "module.base_encoder." + k: v
                    for k, v in q.items()
                    if not k.startswith("fc.")
                },
                **{"module.base_encoder." + k: v for k, v in v3_head.items()},
                **{"module.momentum_encoder." + k: v + 1 for k, v in q.items()},
            }
        },
        "torchvision": q,
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
    return {name: str(tmp_path / f"{name}.pth") for name in files}


def test_every_checkpoint_flavour_loads_the_same_backbone(pretrained, tmp_path):
    data, path = pretrained
    args = lincls_args(data, tmp_path)
    loaded = {}
    for name, file in flavours(path, tmp_path).items():
        model = main_lincls.create_model(args, 3)
        load_encoder(model, file, "resnet18")
        loaded[name] = main_lincls.backbone_state(model.state_dict())
    reference = loaded.pop("project")
    for name, backbone in loaded.items():
        assert backbone.keys() == reference.keys(), name
        assert all(torch.equal(backbone[k], reference[k]) for k in reference), name


class WritesAFile:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def bad_files(path, tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"state_dict": {"x": WritesAFile(marker)}}, tmp_path / "evil.pth")
    torch.save({"epoch": 3}, tmp_path / "no-state.pth")
    torch.save(
        {"state_dict": {"module.queue": torch.zeros(2, 2)}}, tmp_path / "queue-only.pth"
    )
    r34 = main_lincls.build_encoder("resnet34").state_dict()
    torch.save(r34, tmp_path / "resnet34.pth")
    return marker, {
        "missing": ("--pretrained", str(tmp_path / "nothere.pth"), "does not exist"),
        "evil": (
            "--pretrained",
            str(tmp_path / "evil.pth"),
            "was refused: it holds objects",
        ),
        "no state_dict": (
            "--pretrained",
            str(tmp_path / "no-state.pth"),
            "holds no state_dict",
        ),
        "no encoder": (
            "--pretrained",
            str(tmp_path / "queue-only.pth"),
            "unknown prefix",
        ),
        "wrong arch": (
            "--pretrained",
            str(tmp_path / "resnet34.pth"),
            "does not hold a resnet18 backbone",
        ),
        "missing resume": ("--resume", str(tmp_path / "nothere.pth"), "does not exist"),
        "pretraining file as resume": ("--resume", path, "goes to --pretrained"),
    }


def test_bad_checkpoints_are_refused_in_one_line(pretrained, tmp_path):
    data, path = pretrained
    marker, cases = bad_files(path, tmp_path)
    out = tmp_path / "out"
    for name, (flag, file, message) in cases.items():
        with pytest.raises(UsageError, match=message) as e:
            main_lincls.main(lincls_args(data, out, flag, file))
        assert "\n" not in str(e.value), name
    assert not os.path.exists(marker)  # the malicious pickle did not run
    assert os.listdir(out) == []  # nothing written

    # the same file of another arch, or without --small-stem, names what is wrong
    args = lincls_args(data, out, "--pretrained", path)
    args.arch = "resnet34"
    with pytest.raises(UsageError, match="is a resnet18 checkpoint; got -a resnet34"):
        main_lincls.main(args)
    args = lincls_args(data, out, "--pretrained", path)
    args.small_stem = False
    with pytest.raises(
        UsageError, match=r"conv1.weight has shape \[64, 3, 3, 3\].*--small-stem"
    ):
        main_lincls.main(args)
    # --pretrained is checked before the data: a good file passes, then the data fails
    with pytest.raises(UsageError, match="evil.pth' was refused"):
        main_lincls.main(
            lincls_args(
                str(tmp_path / "no-data"), out, "--pretrained", cases["evil"][1]
            )
        )
    with pytest.raises(UsageError, match="training data folder"):
        main_lincls.main(
            lincls_args(str(tmp_path / "no-data"), out, "--pretrained", path)
        )

    # the test's own proof of the danger
    torch.load(cases["evil"][1], weights_only=False)
    assert os.path.exists(marker)


def test_sanity_check_catches_a_changed_batchnorm_buffer(pretrained, tmp_path):
    data, path = pretrained
    args = lincls_args(data, tmp_path, "--pretrained", path)
    model = main_lincls.create_model(args, 3)
    load_encoder(model, path, "resnet18")
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # fc is what training changes: allowed
    main_lincls.sanity_check(model.state_dict(), None, args)

    model.layer2[1].bn1.running_mean.add_(1e-3)
    with pytest.raises(
        main_lincls.SanityCheckError, match=r"^layer2\.1\.bn1\.running_mean is changed"
    ):
        main_lincls.sanity_check(model.state_dict(), None, args)
    # without a file, the reference is the initial random backbone
    fresh = main_lincls.create_model(args, 3)
    reference = main_lincls.backbone_state(fresh.state_dict())
    fresh.bn1.running_var.mul_(2)
    with pytest.raises(main_lincls.SanityCheckError, match="bn1.running_var"):
        main_lincls.sanity_check(
            fresh.state_dict(), reference, SimpleNamespace(pretrained="", resume="")
        )


def test_two_processes_validate_exactly_as_one(pretrained, tmp_path, monkeypatch):
    """15 validation images over 2 processes: 7 + 8, none padded, none dropped."""
    data, path = pretrained
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 processes on 2 cores
    two = tmp_path / "two"
    main_lincls.main(
        lincls_args(
            data,
            two,
            "--pretrained",
            path,
            "--multiprocessing-distributed",
            "--procs-per-node",
            "2",
            "--world-size",
            "1",
            "--rank",
            "0",
            "--dist-url",
            f"tcp://127.0.0.1:{free_port()}",
        )
    )
    trained = records(two)[-1]
    assert trained["val_images"] == 15
    state = torch.load(two / "checkpoint.pth.tar", weights_only=True)
    assert all(k.startswith("module.") for k in state["state_dict"])

    # the same classifier validated by one process, --resume without --pretrained
    one = tmp_path / "one"
    acc1 = main_lincls.main(
        lincls_args(data, one, "-e", "--resume", str(two / "checkpoint.pth.tar"))
    )
    evaluated = records(one)[-1]
    assert evaluated["val_images"] == 15
    assert (acc1, evaluated["val_acc5"]) == (trained["val_acc1"], trained["val_acc5"])
    assert evaluated["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-5)

    # resuming for one more epoch: the sanity check compares with the resumed backbone
    main_lincls.main(
        lincls_args(
            data, two, "--epochs", "2", "--resume", str(two / "checkpoint.pth.tar")
        )
    )
    assert torch.load(two / "checkpoint.pth.tar", weights_only=True)["epoch"] == 2
