"""Every setting the programs refuse, flag by flag: check_args raises a UsageError whose
one line names the flag and what is wrong, before any data is read or anything is
written; run_cli turns it into that line on stderr and exit status 2."""

import pytest
import torch
from conftest import make_image_folder

import main_knn
import main_lincls
import main_moco
from moco.cli import run_cli
from moco.utils import UsageError

PROGRAMS = {"moco": main_moco, "lincls": main_lincls, "knn": main_knn}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    data = make_image_folder(root / "data", classes=2, per_class=4, size=16)
    # images without class folders, and a labelled train folder without val
    flat = root / "flat"
    flat.mkdir()
    for path in sorted((root / "data" / "train" / "class0").iterdir()):
        (flat / path.name).write_bytes(path.read_bytes())
    no_val = make_image_folder(root / "noval", 2, 4, 16, splits=("train",))
    return {"data": data, "flat": str(flat), "noval": no_val, "out": str(root / "out")}


def base(program, folders, data="data"):
    argv = [folders[data], "-a", "resnet18", "-b", "8", "-j", "0"]
    if program == "moco":
        argv += ["--moco-k", "64"]
    if program == "lincls":
        argv += ["--lr", "0.1"]  # main() gives the default; check_args takes a value
    if program != "knn":
        argv += ["--output-dir", folders["out"]]
    return argv


def refused(program, folders, *extra, data="data"):
    """check_args' one-line message for the base arguments and `extra`."""
    module = PROGRAMS[program]
    args = module.get_args_parser().parse_args([*base(program, folders, data), *extra])
    with pytest.raises(UsageError) as e:
        module.check_args(args)
    message = str(e.value)
    assert "\n" not in message
    return message


def positive(flag, value="0"):
    got = value if "." in value or flag not in FLOAT_FLAGS else str(float(value))
    return (flag.split("/")[-1], value), f"{flag} must be positive, got {got}"


def non_negative(flag):
    return (flag.split("/")[-1], "-1"), f"{flag} must be zero or positive, got -1"


FLOAT_FLAGS = {"--lr", "--moco-t", "--knn-t", "--wd"}

MOCO = [
    *(
        positive(f)
        for f in (
            "--epochs",
            "-b/--batch-size",
            "--moco-dim",
            "--moco-k",
            "--input-size",
            "--bn-splits",
            "-p/--print-freq",
            "--lr",
            "--moco-t",
        )
    ),
    *(
        non_negative(f)
        for f in ("-j/--workers", "--start-epoch", "--save-freq", "--keep-last")
    ),
    non_negative("--knn-freq"),
    (("--moco-m", "1"), "--moco-m must be in [0, 1), got 1.0"),
    (("--moco-m", "-0.1"), "--moco-m must be in [0, 1), got -0.1"),
    (("--knn-k", "0"), "--knn-k must be positive, got 0"),
    (("--knn-t", "0"), "--knn-t must be positive, got 0.0"),
    (
        ("--aug-plus", "--aug", "cifar10"),
        "--aug-plus is --aug v2; drop one of it and --aug cifar10",
    ),
    (("--bn-splits", "3"), "the batch of each process (8) does not split into "),
    (("--moco-k", "4"), "--moco-k 4 is smaller than the 8 keys enqueued per step"),
    (("--symmetric", "--moco-k", "12"), "--moco-k 12 is smaller than the 16 keys"),
    (
        ("--aug-impl", "batched", "--skip-bad-images"),
        "--skip-bad-images needs images decoded in the loader workers",
    ),
    (("--resume", "/nonexistent.pth.tar"), "'/nonexistent.pth.tar' does not exist"),
]

LINCLS = [
    *(
        positive(f)
        for f in ("--epochs", "-b/--batch-size", "--input-size", "-p/--print-freq")
    ),
    positive("--lr"),
    *(non_negative(f) for f in ("-j/--workers", "--start-epoch")),
    (("--wd", "-1"), "--wd must be zero or positive, got -1.0"),
    *(
        (
            ("--cached-features", *given),
            f"--cached-features trains in one run and takes no {given[0]}",
        )
        for given in (["--resume", "x"], ["--evaluate"], ["--start-epoch", "1"])
    ),
    (("--knn",), "--knn measures cached features: add --cached-features"),
]

KNN = [
    positive("-b/--batch-size"),
    positive("--input-size"),
    non_negative("-j/--workers"),
    (("--knn-k", "0"), "--knn-k must be positive, got 0"),
    (("--knn-t", "-1"), "--knn-t must be positive, got -1.0"),
    (("--knn-features", "head"), "--knn-features head needs --pretrained"),
]

# every program: the architecture and the launch flags
SHARED = [
    (("-a", "resnet_large"), "unknown --arch 'resnet_large'"),
    (("-a", "get_model"), "unknown --arch 'get_model'"),
    (
        ("-a", "mobilenet_v3_small", "--small-stem"),
        "--small-stem needs a ResNet (conv1 and maxpool); mobilenet_v3_small is not",
    ),
    (
        ("--multiprocessing-distributed", "--procs-per-node", "-1"),
        "--procs-per-node must be positive, got -1",
    ),
    (
        ("--multiprocessing-distributed", "--procs-per-node", "2"),
        "--multiprocessing-distributed needs --world-size (number of nodes)",
    ),
    (("--world-size", "2"), "distributed training needs --rank (this node's rank"),
    (
        ("--multiprocessing-distributed", "--procs-per-node", "3")
        + ("--world-size", "1", "--rank", "0"),
        "-b 8 (the batch of one node) does not split evenly over its 3 processes; "
        "use a multiple of 3",
    ),
]


def cases(table):
    return [
        pytest.param(extra, message, id=" ".join(extra)) for extra, message in table
    ]


@pytest.mark.parametrize("extra, message", cases(MOCO))
def test_main_moco_refuses(folders, extra, message):
    assert message in refused("moco", folders, *extra)


@pytest.mark.parametrize("extra, message", cases(LINCLS))
def test_main_lincls_refuses(folders, extra, message):
    assert message in refused("lincls", folders, *extra)


@pytest.mark.parametrize("extra, message", cases(KNN))
def test_main_knn_refuses(folders, extra, message):
    assert message in refused("knn", folders, *extra)


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("extra, message", cases(SHARED))
def test_every_program_refuses(folders, program, extra, message):
    assert message in refused(program, folders, *extra)


def test_main_moco_refuses_an_output_dir_that_cannot_be_written(folders, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "file" / "out")
    for program in ("moco", "lincls"):
        text = refused(program, folders, "--output-dir", out)
        assert f"--output-dir {out!r} cannot be written" in text
    assert (tmp_path / "file").read_text() == "not a folder"


def test_the_knn_monitor_needs_labels_and_a_validation_folder(folders):
    text = refused("moco", folders, "--knn-freq", "1", data="flat")
    assert "the kNN monitor (--knn-freq) needs labelled images" in text
    text = refused("moco", folders, "--knn-freq", "1", data="noval")
    assert "(--knn-freq) needs labelled images, but the validation data folder" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("program", PROGRAMS)
def test_gpu_settings_without_a_gpu_are_refused(folders, program):
    text = refused(program, folders, "--gpu", "0")
    assert text == "--gpu 0 given, but no CUDA GPU is visible; drop --gpu"
    if program == "moco":
        text = refused(program, folders, "--amp", "--amp-dtype", "float16")
        assert text == "--amp-dtype float16 needs a GPU; on the CPU use bfloat16"


@pytest.mark.parametrize("program", PROGRAMS)
def test_more_gpus_than_the_machine_has_are_refused(folders, program, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    text = refused(program, folders, "--gpu", "1")
    assert text == "--gpu 1 given, but only 1 GPU(s) are visible"
    text = refused(
        program,
        folders,
        *("--multiprocessing-distributed", "--procs-per-node", "2"),
        *("--world-size", "1", "--rank", "0"),
    )
    assert text == "2 processes per node but only 1 GPUs"


@pytest.mark.parametrize("program", PROGRAMS)
def test_multiprocessing_under_torchrun_is_refused(folders, program, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    text = refused(program, folders, "--multiprocessing-distributed")
    assert text.startswith("torchrun already starts one process per GPU")


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_refusal_ends_in_one_line_on_stderr_and_exit_status_2(
    folders, program, monkeypatch, capsys
):
    module = PROGRAMS[program]
    argv = [*base(program, folders), "--input-size", "0"]
    monkeypatch.setattr("sys.argv", [f"main_{program}.py", *argv])
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, module.get_args_parser())
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --input-size must be positive, got 0\n"
