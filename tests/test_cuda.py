"""main_moco.py on a CUDA GPU: exact resume, mixed precision, channels-last, compile,
torchrun with NCCL, and a GPU checkpoint read on the CPU.

Every test is marked `cuda` and runs on the device of the `device` fixture: the GPU
when there is one, else the CPU at toy size (the CPU fall-back, so that these tests run
in every `make test` and cannot rot), where the options that need CUDA become their CPU
equivalents (see `on`) and bfloat16 runs only where the CPU has it natively
(`native_bfloat16`): elsewhere it is emulated, and one step takes seconds instead of
milliseconds. MOCO_TEST_DEVICE=cuda makes a missing GPU an error (the GPU check sets
it); MOCO_TEST_DEVICE=cpu asks for the fall-back where no GPU is visible.

    pytest -m cuda -q                         # on the GPU, or the CPU fall-back
    MOCO_TEST_DEVICE=cuda pytest -m cuda -q   # on the GPU, or fail
"""

import copy
import functools
import json
import os
import signal
import subprocess
import zipfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import (
    PYTHON,
    REPO,
    TINY,
    assert_same_state,
    free_port,
    load,
    make_image_folder,
    run_moco,
    script,
)

import main_lincls
from moco.builder import MoCo
from moco.distributed import wrap_ddp
from moco.models import build_encoder

pytestmark = pytest.mark.cuda

EPOCHS = 2
# crops on the CPU fall-back: a step of ResNet-18 in a fraction of a second
CPU_INPUT_SIZE = 16


def device_under_test():
    """
    CUDA when there is a GPU, else the CPU; with MOCO_TEST_DEVICE=cuda a missing GPU
    is an error; with MOCO_TEST_DEVICE=cpu and a GPU visible, a skip.
    """
    wanted = os.environ.get("MOCO_TEST_DEVICE", "")
    if wanted not in ("", "cpu", "cuda"):
        raise ValueError(f"MOCO_TEST_DEVICE must be cpu or cuda, got {wanted!r}")
    if torch.cuda.is_available():
        if wanted == "cpu":
            pytest.skip(
                "MOCO_TEST_DEVICE=cpu but a GPU is visible (main_moco.py would use "
                "it): hide it with CUDA_VISIBLE_DEVICES="
            )
        return torch.device("cuda", 0)
    if wanted == "cuda":
        pytest.fail("MOCO_TEST_DEVICE=cuda, but torch sees no CUDA GPU")
    return torch.device("cpu")


@pytest.fixture(scope="module")
def device():
    return device_under_test()


def on(device, *argv):
    """
    main_moco.py arguments for `device`. On the CPU, the options that need CUDA
    become their CPU equivalents: --gpu N is dropped (the CPU is used where there is
    no GPU), float16 becomes bfloat16 (no gradient scaler) and nccl becomes gloo; the
    crops are CPU_INPUT_SIZE px (the last --input-size given wins over TINY's).
    """
    argv = [str(a) for a in argv]
    if device.type == "cuda":
        return argv
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--gpu":
            skip = True  # and its value
        elif a == "float16" and i > 0 and argv[i - 1] == "--amp-dtype":
            out.append("bfloat16")
        elif a == "nccl" and i > 0 and argv[i - 1] == "--dist-backend":
            out.append("gloo")
        else:
            out.append(a)
    return out + ["--input-size", str(CPU_INPUT_SIZE)]


def amp_dtype_on(device, dtype):
    """The autocast type on `device`: float16 needs a GPU, bfloat16 stands in for it."""
    return "bfloat16" if device.type == "cpu" else dtype


def native_bfloat16():
    """Whether oneDNN has bfloat16 kernels for this CPU (not for AVX2-only ones)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def skip_cpu_duplicate(device, dtype):
    """On the CPU float16 becomes bfloat16: that case is the bfloat16 one again."""
    if device.type == "cpu" and dtype == "float16":
        pytest.skip("float16 needs a GPU; on the CPU it would repeat the bfloat16 case")


@pytest.fixture(scope="module")
def data(device, tmp_path_factory):
    """24 images (3 steps an epoch) on the CPU; 96 (12 steps) on a GPU, where a step
    is quick, so that a signal sent at the first step arrives well before the end."""
    root = tmp_path_factory.mktemp("cuda_data")
    return make_image_folder(root / "data", per_class=8 if device.type == "cpu" else 32)


@pytest.fixture(scope="module")
def reference(device, data, tmp_path_factory):
    """A seeded, uninterrupted run of EPOCHS epochs on the device: the run the
    interrupted ones must equal bit for bit."""
    out = tmp_path_factory.mktemp("cuda_reference")
    run_moco(data, out, *on(device, "--gpu", "0"), epochs=EPOCHS)
    return out


def steps(data, batch_size=8):
    """Steps an epoch (TINY's batch of 8)."""
    return (
        sum(len(files) for _, _, files in os.walk(os.path.join(data, "train")))
        // batch_size
    )


def epoch_file(out, epoch):
    return os.path.join(out, f"checkpoint_{epoch:04d}.pth.tar")


def first_losses(out, n=2):
    """The loss of the first n steps, from log.jsonl (-p 1 logs every step)."""
    records = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [r["loss"] for r in records if r.get("kind") == "step"][:n]


def assert_same_computation(out, reference):
    """
    Another memory format or compiled kernels, the same computation: the first steps'
    losses (the same seeded weights and images) agree closely, the checkpoint keeps
    its names and all of it is finite. Later steps are not compared: T 0.07 and a tiny
    dataset amplify rounding differences within a few SGD steps.
    """
    # TF32 convolutions (PyTorch's default on GPUs) of other algorithms differ by
    # about 1e-3: a loss near 0 moves by 1e-3 or so, one near ln(K + 1) by 1e-2
    losses = first_losses(out)
    torch.testing.assert_close(losses, first_losses(reference), rtol=1e-2, atol=5e-3)
    a = load(epoch_file(out, 0))["state_dict"]
    assert list(a) == list(load(epoch_file(reference, 0))["state_dict"])
    for k, v in a.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    assert a["module.queue"].dtype == torch.float32
    norms = a["module.queue"].norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms))


# ---------------------------------------------------------------- exact resume
def test_gpu_run_resumed_after_one_epoch_is_bit_identical(
    device, data, reference, tmp_path
):
    out = tmp_path / "out"
    run_moco(data, out, *on(device, "--gpu", "0"), epochs=1)
    # the first epoch alone is the reference's first epoch (step schedule, no --cos)
    assert_same_state(load(epoch_file(reference, 0)), load(epoch_file(out, 0)))
    run_moco(data, out, *on(device, "--gpu", "0", "--resume", "auto"), epochs=EPOCHS)
    assert_same_state(load(epoch_file(reference, 1)), load(epoch_file(out, 1)))
    # written from the device: the tensors come back there without map_location
    saved = torch.load(epoch_file(out, 1), weights_only=True)
    assert saved["state_dict"]["module.queue"].device.type == device.type


def test_sigterm_mid_epoch_checkpoints_exits_75_and_resumes_bit_identical(
    device, data, reference, tmp_path
):
    out = tmp_path / "out"
    argv = [PYTHON, os.path.join(REPO, "main_moco.py"), data, *TINY]
    argv += ["--epochs", EPOCHS, "--output-dir", out, "--save-freq", "1"]
    argv += on(device, "--gpu", "0")
    proc = subprocess.Popen(
        [str(a) for a in argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stdout:  # the first step is printed once the handler is in
            lines.append(line)
            if "Epoch: [0][0/" in line:
                os.kill(proc.pid, signal.SIGTERM)
                break
        lines += proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
    assert proc.returncode == 75, text  # checkpointed: resume me
    assert "stopped by a signal" in text
    state = load(out / "checkpoint_last.pth.tar")
    assert state["epoch"] == 0 and state["iter"] >= 1, (state["epoch"], state["iter"])
    run_moco(data, out, *on(device, "--gpu", "0", "--resume", "auto"), epochs=EPOCHS)
    assert_same_state(load(epoch_file(reference, 1)), load(epoch_file(out, 1)))


def test_seeded_runs_give_identical_checkpoints(device, data, tmp_path):
    extra = on(device, "--gpu", "0", "--mlp", "--aug-plus", "--cos", "--bn-splits", "2")
    run_moco(data, tmp_path / "a", *extra)
    run_moco(data, tmp_path / "b", *extra)
    assert_same_state(
        load(epoch_file(tmp_path / "a", 0)), load(epoch_file(tmp_path / "b", 0))
    )


# ---------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_resume_is_bit_identical_and_restores_the_gradient_scaler(
    device, data, tmp_path, dtype
):
    skip_cpu_duplicate(device, dtype)
    if device.type == "cpu" and not native_bfloat16():
        pytest.skip(
            "oneDNN has no bfloat16 kernels for this CPU: emulated, these runs take "
            "minutes; the GPU and CPUs with them (AVX-512) run this test"
        )
    amp = on(device, "--gpu", "0", "--amp", "--amp-dtype", dtype)
    run_moco(data, tmp_path / "full", *amp, epochs=EPOCHS)
    run_moco(data, tmp_path / "part", *amp, epochs=1)
    run_moco(data, tmp_path / "part", *amp, "--resume", "auto", epochs=EPOCHS)
    full = load(epoch_file(tmp_path / "full", 1))
    part = load(epoch_file(tmp_path / "part", 1))
    assert_same_state(full, part)
    assert full["state_dict"]["module.queue"].dtype == torch.float32
    uses_scaler = amp_dtype_on(device, dtype) == "float16"
    assert ("scaler" in full) == uses_scaler  # saved only when there is one
    if not uses_scaler:
        return
    assert full["scaler"] == part["scaler"]
    # restored, not rebuilt: a resume from a scale of 1024 carries on from it
    first = load(epoch_file(tmp_path / "part", 0))
    first["scaler"].update(scale=1024.0, _growth_tracker=5)
    torch.save(first, tmp_path / "edited.pth.tar")
    edited = ["--resume", tmp_path / "edited.pth.tar"]
    run_moco(data, tmp_path / "edited", *amp, *edited, epochs=EPOCHS)
    after = load(epoch_file(tmp_path / "edited", 1))["scaler"]
    # one epoch after the resume, no overflow at that scale: the tracker counts on
    assert (after["scale"], after["_growth_tracker"]) == (1024.0, 5 + steps(data))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_logits_and_queue_stay_float32_under_autocast(device, dtype):
    skip_cpu_duplicate(device, dtype)
    dtype = getattr(torch, amp_dtype_on(device, dtype))
    # the types do not depend on the size; emulated bfloat16 costs seconds a step
    px = 32 if device.type == "cuda" else 8
    torch.manual_seed(0)
    encoder = functools.partial(build_encoder, "resnet18", small_stem=True)
    model = MoCo(encoder, dim=16, K=64, m=0.99, T=0.07, mlp=True).to(device)
    g = torch.Generator().manual_seed(1)
    im_q, im_k = (torch.randn(8, 3, px, px, generator=g).to(device) for _ in range(2))
    with torch.autocast(device.type, dtype=dtype):
        assert model.encoder_q(im_q).dtype == dtype  # autocast is on
        logits, labels = model(im_q, im_k)
    assert logits.dtype == torch.float32 and logits.shape == (8, 65)
    assert model.queue.dtype == torch.float32
    loss = F.cross_entropy(logits, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.encoder_q.parameters())
    # the enqueued keys are the float32 normalised keys
    norms = model.queue[:, :8].norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(8, device=device))
    assert int(model.queue_ptr) == 8


# -------------------------------------------------------- memory format, compile
def test_channels_last_trains_as_the_contiguous_run(device, data, reference, tmp_path):
    run_moco(data, tmp_path, *on(device, "--gpu", "0", "--channels-last"))
    assert_same_computation(tmp_path, reference)


def test_compiled_run_keeps_checkpoint_names_and_results(
    device, data, reference, tmp_path, monkeypatch
):
    if device.type == "cpu":
        # inductor builds C++ for minutes on 2 cores: on the CPU fall-back trace and
        # differentiate the graphs (dynamo + AOTAutograd) and run them eagerly
        compile_module = torch.nn.Module.compile
        monkeypatch.setattr(
            torch.nn.Module,
            "compile",
            lambda self, *a, **k: compile_module(
                self, *a, **{"backend": "aot_eager", **k}
            ),
        )
    run_moco(data, tmp_path, *on(device, "--gpu", "0", "--compile"))
    assert_same_computation(tmp_path, reference)


# ---------------------------------------------------------------- torchrun, NCCL
def test_torchrun_one_process_with_nccl_gives_the_plain_run(
    device, data, reference, tmp_path
):
    launcher = ["--nproc_per_node", "1", "--master_port", free_port()]
    moco = [os.path.join(REPO, "main_moco.py"), data, *TINY, "--epochs", "1"]
    backend = on(device, "--dist-backend", "nccl")
    r = script("torchrun", *launcher, *moco, "--output-dir", tmp_path, *backend)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"device {device.type}" in r.stdout + r.stderr
    assert_same_state(load(epoch_file(reference, 0)), load(epoch_file(tmp_path, 0)))


def test_nccl_process_group_runs_ddp_steps_exactly_as_without_it(device, monkeypatch):
    """main_moco.py makes no process group for one process, so NCCL itself is tried
    here: DDP over a group of one, gradients all-reduced by NCCL, as main_moco wraps
    the model, gives the plain model's steps."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    encoder = functools.partial(build_encoder, "resnet18", small_stem=True)
    model = MoCo(encoder, dim=16, K=64, m=0.99, T=0.07).to(device)
    plain = copy.deepcopy(model)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        world_size=1,
        rank=0,
    )
    try:
        ddp = wrap_ddp(model, device)
        for net, m in ((ddp, model), (plain, plain)):
            opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
            for step in range(2):
                g = torch.Generator().manual_seed(step)
                im_q, im_k = (
                    torch.randn(8, 3, 32, 32, generator=g).to(device) for _ in range(2)
                )
                torch.manual_seed(10 + step)  # the shuffle's draw
                loss = F.cross_entropy(*net(im_q, im_k))
                opt.zero_grad()
                loss.backward()
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    sa, sb = model.state_dict(), plain.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- GPU file, CPU reader
def as_written_on_cuda(path, dst):
    """
    `path` with every storage tagged cuda:0, as torch.save writes a GPU run's tensors:
    on the CPU fall-back, a file that really needs map_location on a machine without
    a GPU. (The tag is the pickled location string, memoised once.)
    """
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(dst, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
                assert cpu in data, "torch.save wrote the location another way"
                data = data.replace(cpu, cuda)
            out.writestr(info, data)
    return dst


def test_gpu_checkpoint_loads_on_the_cpu_and_into_the_linear_probe(
    device, data, reference, tmp_path
):
    path = epoch_file(reference, EPOCHS - 1)
    if device.type == "cpu":
        path = as_written_on_cuda(path, tmp_path / "from_gpu.pth.tar")
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # no GPU here to put it on
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in state["state_dict"].values())
    # the linear probe on a machine without a GPU: a process that sees none
    probe_args = (
        "-a resnet18 --small-stem --input-size 32 -b 4 --epochs 1 -j 0 --seed 0"
    )
    probe_args = [*probe_args.split(), "--pretrained", path]
    probe_args += ["--output-dir", tmp_path / "probe", data]
    if device.type == "cpu":  # this process sees none already
        main_lincls.main(main_lincls.get_args_parser().parse_args(map(str, probe_args)))
    else:
        r = script("main_lincls.py", *probe_args, env={"CUDA_VISIBLE_DEVICES": ""})
        assert r.returncode == 0, r.stdout + r.stderr
    probe = load(tmp_path / "probe" / "checkpoint.pth.tar")["state_dict"]
    probe = {k.removeprefix("module."): v for k, v in probe.items()}
    # the probe's backbone is the pretrained query encoder, unchanged
    prefix = "module.encoder_q."
    backbone = {
        k[len(prefix) :]: v
        for k, v in state["state_dict"].items()
        if k.startswith(prefix) and not k.startswith(prefix + "fc.")
    }
    assert backbone and backbone.keys() <= probe.keys()
    for k, v in backbone.items():
        assert torch.equal(probe[k], v), k
