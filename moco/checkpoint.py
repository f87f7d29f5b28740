"""Checkpoint files: crash-safe writing, safe reading, and the key names of every flavour.

Pretraining files (the original's format): {'epoch', 'arch', 'state_dict', 'optimizer'},
state_dict keys 'module.encoder_q.*', 'module.encoder_k.*', 'module.queue',
'module.queue_ptr'. Files are read with torch.load(weights_only=True): tensors, numbers,
strings, lists, tuples and dicts only, so a crafted file cannot run code.
"""

import errno
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn as nn

from moco.distributed import (
    PREEMPTED_EXIT_CODE,
    StopSignal,
    barrier,
    broadcast_object,
)
from moco.meters import TrainMeters
from moco.models import build_encoder
from moco.utils import UsageError, logger

# prefixes under which a MoCo file holds its query encoder
ENCODER_PREFIXES = (
    "module.encoder_q.",  # the original's and this project's pretraining files
    "encoder_q.",  # a MoCo model saved without DistributedDataParallel
    "module.base_encoder.",  # MoCo v3 ResNet files
    "base_encoder.",
)
HEAD_PREFIX = "fc."


class CheckpointError(UsageError):
    """A file that is missing, unreadable, unsafe or of the wrong kind."""


def _atomic_write(path: str, write: Callable[[BinaryIO], object], size: int) -> None:
    """
    write(file) into a temporary file beside `path`, flushed to disk, then renamed to
    `path`: a kill or a full disk at any moment leaves either the previous file or the
    new one under that name, never a partial file. A full disk is a one-line
    CheckpointError; size: about how many bytes the file takes, for its message.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a full disk as a RuntimeError of its zip writer
        if isinstance(e, (OSError, RuntimeError)) and _disk_full(e, directory, size):
            raise CheckpointError(_disk_full_message(path, size)) from None
        raise
    # make the rename itself durable
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _disk_full(error: BaseException, directory: str, size: int) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(directory).free < size
    except OSError:
        return False


def _disk_full_message(path: str, size: int) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(directory).free
    latest = find_latest_checkpoint(directory)
    resume = f"; --resume auto would use {latest!r}" if latest else ""
    return (
        f"no space left to write {path!r} (about {size / 2**20:.1f} MiB needed, "
        f"{free / 2**20:.1f} MiB free); no partial file is left{resume}. Free some "
        "space (--keep-last N keeps fewer checkpoints) or write to another disk"
    )


def state_bytes(obj: object) -> int:
    """The bytes of the tensors in `obj` (nested dicts, lists, tuples): a file's size."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def save_checkpoint(
    state: dict,
    path: str,
    writer: Callable[[dict, BinaryIO], object] = torch.save,
) -> None:
    """
    Write `state` to `path` atomically (all of it or nothing). writer(state, file)
    serialises; torch.save unless another format is wanted.
    """
    _atomic_write(path, lambda f: writer(state, f), state_bytes(state))


def copy_checkpoint(src: str, dst: str) -> None:
    """Copy a checkpoint file as save_checkpoint writes one: all of it or nothing."""

    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)

    _atomic_write(dst, copy, os.path.getsize(src))


def with_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The names a DistributedDataParallel model has: every key under 'module.'."""
    return {"module." + k: v for k, v in state_dict.items()}


def without_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The names of the model itself, whichever way the file was saved."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    """Create `path` if needed and refuse one that cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path!r} cannot be written ({e.strerror})") from None


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", what: str = "checkpoint"
) -> Any:
    """torch.load(weights_only=True) with one-line errors for every way it can fail."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} does not exist (check the path)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{what} {path!r} was refused: it holds objects other than tensors, numbers, "
            f"strings and containers, which could run code when loaded ({first}). "
            "Load only files you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{what} {path!r} cannot be read ({first}); it is truncated or not a PyTorch "
            "checkpoint"
        ) from None


def _state_dict_of(obj: Any, path: str) -> dict[str, Any]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path!r} holds no state_dict: it is not a model checkpoint")


def encoder_state_dict(
    obj: Any, path: str = "checkpoint", keep_head: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """
    The backbone of any checkpoint flavour with torchvision names, without the head
    `fc.*` unless keep_head; returns (state_dict, the prefix it was found under).
    Accepts: pretraining files of this project and of the original (module.encoder_q.*),
    MoCo models saved without DDP (encoder_q.*), MoCo v3 ResNet files
    (module.base_encoder.*), linear-classification files (module.*) and plain
    torchvision state_dicts.
    """
    state_dict = _state_dict_of(obj, path)
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            break
    else:
        if any(
            re.search(r"(^|\.)(encoder_q|encoder_k|base_encoder|queue)(\.|$)", k)
            for k in state_dict
        ):
            raise CheckpointError(
                f"{path!r} holds a MoCo model under an unknown prefix; expected one of "
                + ", ".join(ENCODER_PREFIXES)
            )
        # a linear-classification file (module.*) or a plain torchvision state_dict
        prefix = "module." if all(k.startswith("module.") for k in state_dict) else ""
    encoder = {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix)
        and (keep_head or not k[len(prefix) :].startswith(HEAD_PREFIX))
    }
    if not encoder:
        raise CheckpointError(f"{path!r} holds no encoder tensors under {prefix!r}")
    return encoder, prefix


def load_encoder(
    model: nn.Module,
    path: str,
    arch: str | None = None,
    what: str = "--pretrained",
    obj: Any = None,
) -> dict[str, torch.Tensor]:
    """
    Load the backbone of the checkpoint at `path` (any flavour encoder_state_dict reads)
    into `model`, a torchvision model whose head `fc` is left as it is. Refuses a file of
    another architecture, or with missing, extra or differently shaped tensors, with a
    one-line CheckpointError. Returns the backbone state_dict that was loaded.
    obj: the file's contents, when the caller has read it already.
    """
    if obj is None:
        obj = load_checkpoint(path, what=what)
    file_arch = obj.get("arch") if isinstance(obj, dict) else None
    if arch and isinstance(file_arch, str) and file_arch != arch:
        raise CheckpointError(
            f"{what} {path!r} is a {file_arch} checkpoint; got -a {arch}"
        )
    state_dict, _ = encoder_state_dict(obj, path)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    # files saved by old torch versions have no BatchNorm step counters; eval ignores them
    missing = [
        k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{what} {path!r} does not hold a {arch or 'matching'} backbone: "
            f"{len(missing)} tensor(s) missing (e.g. {missing[:2]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:2]}); check -a"
        )
    for k, v in state_dict.items():
        if v.shape != own[k].shape:
            hint = (
                " (pretrained with --small-stem? add or drop it)"
                if k == "conv1.weight"
                else ""
            )
            raise CheckpointError(
                f"{what} {path!r}: {k} has shape {list(v.shape)}, the model's is "
                f"{list(own[k].shape)}{hint}; check -a"
            )
    result = model.load_state_dict(state_dict, strict=False)
    head = {k for k in model.state_dict() if k.startswith(HEAD_PREFIX)}
    assert {
        k for k in result.missing_keys if not k.endswith("num_batches_tracked")
    } == head
    return state_dict


# the heads of MoCo v1 (one linear layer) and v2 (--mlp: linear, ReLU, linear)
MOCO_HEADS = (
    {"fc.weight", "fc.bias"},
    {f"fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")},
)


def load_encoder_with_head(path: str, arch: str, small_stem: bool = False) -> nn.Module:
    """The query encoder of a MoCo checkpoint with its head, linear or MLP (--mlp)."""
    obj = load_checkpoint(path, what="--pretrained")
    state_dict, _ = encoder_state_dict(obj, path, keep_head=True)
    head = {k: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)}
    if set(head) not in MOCO_HEADS or any(
        v.dim() != 2 for k, v in head.items() if k.endswith("weight")
    ):
        raise CheckpointError(
            f"{path!r} holds no MoCo v1/v2 head (fc.* is {sorted(head)[:4] or 'absent'}); "
            "use --knn-features backbone"
        )
    model = build_encoder(arch, small_stem=small_stem)
    load_encoder(model, path, arch, obj=obj)
    if "fc.weight" in head:
        out_dim, in_dim = head["fc.weight"].shape
        model.fc = nn.Linear(in_dim, out_dim)
    else:
        hidden, in_dim = head["fc.0.weight"].shape
        out_dim = head["fc.2.weight"].shape[0]
        # names as MoCo's: fc.0.* and fc.2.*
        model.fc = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )
    try:
        model.fc.load_state_dict(
            {k.removeprefix(HEAD_PREFIX): v for k, v in head.items()}
        )
    except RuntimeError:
        raise CheckpointError(
            f"{path!r}: its head (fc.*) does not fit -a {arch}"
        ) from None
    return model


CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{4,})\.pth\.tar$")
LAST_NAME = "checkpoint_last.pth.tar"


def list_checkpoints(directory: str) -> list[str]:
    """Pretraining checkpoints in `directory`, newest first by their file name."""
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        m = CHECKPOINT_RE.match(name)
        if m:
            found.append(os.path.join(directory, name))
    found.sort(
        # found holds only names the pattern matched
        key=lambda p: int(CHECKPOINT_RE.match(os.path.basename(p)).group(1)),  # type: ignore[union-attr]
        reverse=True,
    )
    return found


def find_latest_checkpoint(directory: str) -> str | None:
    """
    The checkpoint with the most training done (epoch, then step within the epoch)
    among those in `directory` that load; None when there is none.
    """
    candidates = list_checkpoints(directory)
    last = os.path.join(directory, LAST_NAME)
    if os.path.isfile(last):
        candidates.insert(0, last)
    best, best_key = None, None
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            continue
        key = (ckpt.get("epoch", 0), ckpt.get("iter", 0))
        if best_key is None or key > best_key:
            best, best_key = path, key
        if path != last:  # epoch files are sorted: the first readable one is the newest
            break
    return best


def remove_old_checkpoints(directory: str, keep_last: int) -> None:
    """Keep the newest `keep_last` epoch checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for path in list_checkpoints(directory)[keep_last:]:
        os.remove(path)


def resume_path(resume: str, output_dir: str) -> str | None:
    """The checkpoint --resume names ('auto': the newest valid one), or None."""
    if resume == "auto":
        return find_latest_checkpoint(output_dir)
    return resume or None


def check_pretrain_resume(
    path: str, arch: str, moco_dim: int, moco_k: int, mlp: bool
) -> None:
    """Refuse a --resume file that is not a MoCo checkpoint of the model asked for."""
    state = load_checkpoint(path, what="--resume checkpoint")
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict) or "module.queue" not in sd:
        raise CheckpointError(f"--resume {path!r} is not a MoCo pretraining checkpoint")
    if state.get("arch", arch) != arch:
        raise CheckpointError(
            f"--resume {path!r} is a {state['arch']} checkpoint; got -a {arch}"
        )
    dim, K = sd["module.queue"].shape
    if (dim, K) != (moco_dim, moco_k):
        raise CheckpointError(
            f"--resume {path!r} has --moco-dim {dim} --moco-k {K}; got --moco-dim "
            f"{moco_dim} --moco-k {moco_k}"
        )
    file_mlp = "module.encoder_q.fc.0.weight" in sd
    if file_mlp != mlp:
        raise CheckpointError(
            f"--resume {path!r} was trained {'with' if file_mlp else 'without'} --mlp; "
            "add or drop --mlp to match"
        )


def model_state(
    epoch: int, arch: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """The original's checkpoint: completed epochs, arch, state_dict as DDP names it
    ('module.*'), optimizer."""
    return {
        "epoch": epoch,
        "arch": arch,
        "state_dict": with_module_prefix(model.state_dict()),
        "optimizer": optimizer.state_dict(),
    }


def restore(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    what: str = "--resume checkpoint",
) -> dict:
    """
    Load the model and optimizer of the checkpoint at `path` wherever they are, and
    return the file's contents. The file is read onto the CPU: load_state_dict copies
    each tensor to its parameter's device, and the random states stay CPU tensors
    (NumPy's is read back with .numpy(), which refuses a CUDA tensor).
    """
    state = load_checkpoint(path, map_location="cpu", what=what)
    model.load_state_dict(without_module_prefix(state["state_dict"]))
    optimizer.load_state_dict(state["optimizer"])
    return state


class ClassifierCheckpointer:
    """
    The checkpoints of linear classification in `output_dir`, in the original's
    format: checkpoint.pth.tar after every epoch (epoch, arch, state_dict,
    best_acc1, optimizer) and model_best.pth.tar, a copy of the best epoch's.
    """

    LAST, BEST = "checkpoint.pth.tar", "model_best.pth.tar"

    def __init__(
        self,
        output_dir: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        arch: str,
        enabled: bool = True,
    ) -> None:
        self.output_dir = output_dir
        self.model = model
        self.optimizer = optimizer
        self.arch = arch
        self.enabled = enabled

    def save(self, epoch: int, best_acc1: float, is_best: bool) -> None:
        """After epoch `epoch` (from 0)."""
        if not self.enabled:
            return
        state = model_state(epoch + 1, self.arch, self.model, self.optimizer)
        state["best_acc1"] = best_acc1
        path = os.path.join(self.output_dir, self.LAST)
        save_checkpoint(state, path)
        if is_best:
            copy_checkpoint(path, os.path.join(self.output_dir, self.BEST))

    def resume(self, path: str) -> tuple[int, float]:
        """Load model and optimizer; returns (completed epochs, best Acc@1)."""
        state = restore(path, self.model, self.optimizer)
        return state["epoch"], float(state["best_acc1"])


def check_classifier_resume(
    path: str, arch: str, model: nn.Module, hint: str = ""
) -> None:
    """
    Refuse a --resume file that is not a linear classifier of `model` (a fresh one
    of -a `arch`); hint: what else must match, for the message.
    """
    state = load_checkpoint(path, what="--resume checkpoint")
    sd = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        problem = "no state_dict"
    else:
        missing = [k for k in ("epoch", "optimizer", "best_acc1") if k not in state]
        problem = f"no {missing[0]!r}" if missing else None
        if problem and any("encoder_q." in k for k in sd):
            problem += "; a pretraining checkpoint goes to --pretrained"
    if problem:
        raise CheckpointError(
            f"--resume {path!r} is not a checkpoint of main_lincls.py ({problem})"
        )
    if state.get("arch", arch) != arch:
        raise CheckpointError(
            f"--resume {path!r} is a {state['arch']} model; got -a {arch}"
        )
    try:
        model.load_state_dict(without_module_prefix(sd))  # type: ignore[arg-type]
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise CheckpointError(
            f"--resume {path!r} does not fit -a {arch}{hint}: {detail[:200]}"
        ) from None


class Checkpointer:
    """
    The checkpoints of a pretraining run in `output_dir`, in the original's format
    (epoch, arch, state_dict with 'module.' names, optimizer) plus what an exact resume
    needs: the step within the epoch (iter), the random states, the data seed, the
    gradient scaler, the arguments and, mid-epoch, the state of the epoch's `meters`.
    Only the process with `enabled` writes.
    """

    def __init__(
        self,
        output_dir: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        *,
        arch: str,
        args: Mapping[str, Any] | None = None,
        data_seed: int | None = None,
        meters: TrainMeters | None = None,
        keep_last: int = 0,
        enabled: bool = True,
    ) -> None:
        self.output_dir = output_dir
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.arch = arch
        self.args = dict(args or {})
        self.meters = meters
        self.keep_last = keep_last
        self.enabled = enabled
        # the seed of the augmentations; a resumed run takes its file's
        self.data_seed = data_seed

    def save_epoch(self, epoch: int) -> None:
        """After epoch `epoch` (from 0): checkpoint_{epoch:04d}.pth.tar holds epoch + 1."""
        if not self.enabled:
            return
        self._save(epoch + 1, 0, f"checkpoint_{epoch:04d}.pth.tar")
        # superseded by the epoch's file
        last = os.path.join(self.output_dir, LAST_NAME)
        if os.path.exists(last):
            os.remove(last)
        remove_old_checkpoints(self.output_dir, self.keep_last)

    def save_mid_epoch(self, epoch: int, steps_done: int) -> None:
        """
        Within epoch `epoch`, after `steps_done` of its steps: checkpoint_last, with the
        state of the epoch's meters so far, for whole-epoch averages on resume.
        """
        if self.enabled:
            meters = self.meters.state_dict() if self.meters is not None else None
            self._save(epoch, steps_done, LAST_NAME, meters)

    def _save(
        self, epoch: int, steps_done: int, name: str, meters: dict | None = None
    ) -> None:
        state = {
            **model_state(epoch, self.arch, self.model, self.optimizer),
            # steps done in the epoch in progress
            "iter": steps_done,
            "args": self.args,
            "data_seed": self.data_seed,
            "rng": get_rng_state(),
        }
        if meters:
            state["meters"] = meters
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        save_checkpoint(state, os.path.join(self.output_dir, name))

    def resume_if_asked(self, resume: str, start_epoch: int = 0) -> tuple[int, int]:
        """
        --resume: a path, 'auto' (the newest valid file in output_dir) or ''. Loads it
        (process 0's choice on every process: one that cannot read it says so in one
        line); returns (completed epochs, steps done in the next epoch) to start from.
        """
        path = resume_path(resume, self.output_dir) if self.enabled else None
        path = broadcast_object(path)
        if path:
            logger.info(f"=> loading checkpoint '{path}'")
            epoch, step = self.resume(path)
            logger.info(f"=> loaded checkpoint '{path}' (epoch {epoch}, step {step})")
            return epoch, step
        if resume == "auto":
            logger.info(
                f"=> no checkpoint in '{self.output_dir}' yet: starting from scratch"
            )
        return start_epoch, 0

    def resume(self, path: str) -> tuple[int, int]:
        """
        Load model, optimizer, scaler, random states, data seed and the meters of an
        epoch stopped within from `path` into the model and optimizer wherever they
        are; returns (completed epochs, steps done in the next epoch).
        """
        state = restore(path, self.model, self.optimizer)
        # files of the original have neither data seed nor random states
        self.data_seed = state.get("data_seed", self.data_seed)
        if "meters" in state and self.meters is not None:
            self.meters.load_state_dict(state["meters"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"])
        return state["epoch"], state.get("iter", 0)


class Preemption:
    """
    Stopping a pretraining run so that it resumes exactly. SIGTERM or SIGUSR1 (what
    schedulers send before they preempt a job) sets `requested`; the training step
    makes every process agree on it, and after that step every process stops: within
    an epoch process 0 saves checkpoint_last first, at an epoch's last step the epoch
    is saved as every epoch is (after_epoch); then each exits with status
    PREEMPTED_EXIT_CODE. Every `save_freq` steps within an epoch it saves too.
    """

    def __init__(self, checkpointer: Checkpointer, save_freq: int = 0) -> None:
        self.checkpointer = checkpointer
        self.save_freq = save_freq
        self.signal = StopSignal()
        # every process agreed to stop at an epoch's last step
        self.stopping = False

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signal.received is not None

    def after_step(self, epoch: int, steps_done: int, total: int, stop: bool) -> None:
        """
        After `steps_done` of the `total` steps of epoch `epoch`; stop: every process
        agreed to stop at this step.
        """
        within = steps_done < total
        if stop:
            logger.info(
                f"=> stopped by a signal at epoch {epoch} step {steps_done}; resume "
                f"with --resume auto --output-dir {self.checkpointer.output_dir}"
            )
        if within and (stop or (self.save_freq and steps_done % self.save_freq == 0)):
            self.checkpointer.save_mid_epoch(epoch, steps_done)
        if stop and within:
            self.exit()
        self.stopping = stop

    def after_epoch(self) -> None:
        """The epoch is saved: exit if every process agreed to stop at its last step."""
        if self.stopping:
            self.exit()

    def exit(self) -> None:
        # no process leaves before process 0 has written its checkpoint
        barrier()
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def close(self) -> None:
        """Put back the signal handlers that were there before."""
        self.signal.restore()


def get_rng_state() -> dict:
    """torch's, Python's and NumPy's random states (and CUDA's), as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # weights_only loading reads tensors and Python numbers, not NumPy arrays
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),  # type: ignore[attr-defined]
            int(pos),
            int(has_gauss),
            float(cached),
        ),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state returned, from CPU tensors or tensors on a device."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(
        tuple(tuple(x) if isinstance(x, list) else x for x in state["python"])
    )
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.cpu().numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
