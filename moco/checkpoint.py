"""Checkpoint files: written crash-safe, read safely; the pretraining checkpoints.

Pretraining files (the original's format): {'epoch', 'arch', 'state_dict', 'optimizer'},
state_dict keys 'module.encoder_q.*', 'module.encoder_k.*', 'module.queue',
'module.queue_ptr'. Every program reads checkpoint files through load_checkpoint:
torch.load(weights_only=True) (tensors, numbers, strings, lists, tuples and dicts only,
so a crafted file cannot run code) of files that torch.save wrote; any other file is
refused in one line that says what it is. Reading the encoder out of every checkpoint
flavour is moco/weights.py.
"""

import errno
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
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
from moco.utils import UsageError, logger


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


def save_atomically(
    state: Any,
    path: str,
    writer: Callable[[Any, BinaryIO], object] = torch.save,
) -> None:
    """
    Write `state` to `path` atomically (all of it or nothing). writer(state, file)
    serialises; torch.save unless another format is wanted.
    """
    _atomic_write(path, lambda f: writer(state, f), state_bytes(state))


def copy_atomically(src: str, dst: str) -> None:
    """Copy the file `src` to `dst` as save_atomically writes one: all of it or nothing."""

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


# torch.save's legacy format (torch < 1.6, the original's released models) opens with
# this number, pickled as a long
LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# files that are often given by mistake, by their first bytes
SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\x1f\x8b", "a gzip file (unpack it first)"),
)


def _not_a_checkpoint(path: str) -> str | None:
    """
    What is wrong with the file at `path`, judged from its first bytes (and a zip
    archive's list of names), without unpickling anything; None for a file that
    torch.save may have written: a zip archive holding data.pkl, or the legacy format.
    """
    if os.path.isdir(path):
        return "is a directory, not a checkpoint file"
    if not os.path.isfile(path):
        return "does not exist (check the path)"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not head:
        return "is empty (0 bytes): it is not a PyTorch checkpoint"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "is truncated or damaged: its zip archive cannot be read"
        if not any(name.endswith("/data.pkl") for name in names):
            return (
                "is a zip archive but not a PyTorch checkpoint (it holds no data.pkl, "
                f"but e.g. {names[:2]})"
            )
        if any(name.endswith("/constants.pkl") for name in names):
            return (
                "is a TorchScript model (torch.jit.save), not a checkpoint of weights"
            )
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # a pickle (its PROTO opcode)
        if LEGACY_MAGIC in head[:32]:
            return None
        return (
            "is a pickle but not a PyTorch checkpoint: torch.save did not write it "
            "(it is left unread)"
        )
    if head[257:262] == b"ustar":  # torch.save's oldest format is a tar archive
        return None
    kind = next((kind for sig, kind in SIGNATURES if head.startswith(sig)), None)
    if kind is None:
        kind = "a text file" if _is_text(head) else "neither a zip archive nor a pickle"
    return f"is not a PyTorch checkpoint: it is {kind}"


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        # a character cut at the end of the sample
        if e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f" for c in text)


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", what: str = "checkpoint"
) -> Any:
    """
    torch.load(weights_only=True) of a file torch.save wrote; any other file, and one
    that fails to load, is a one-line CheckpointError that says what it is.
    """
    problem = _not_a_checkpoint(path)
    if problem:
        raise CheckpointError(f"{what} {path!r} {problem}")
    try:
        with warnings.catch_warnings():
            # e.g. of the pickle protocol: the file is read or refused in one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # whatever a damaged file makes torch raise
        message = str(e)
        # the weights-only unpickler's refusal of a name it does not allow
        if isinstance(e, pickle.UnpicklingError) and "operand" not in message:
            found = re.search(r"GLOBAL (\S+)", message)
            holds = f" (here {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{what} {path!r} was refused: it holds objects other than tensors, "
                f"numbers, strings and containers{holds}, which could run code when "
                "loaded. Load only files you trust"
            ) from None
        # the unpickler's own words, else torch's first line
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
        lines = message.strip().splitlines()
        detail = found.group(1) if found else lines[0] if lines else type(e).__name__
        raise CheckpointError(
            f"{what} {path!r} is truncated or damaged: torch.load fails "
            f"({detail[:200]})"
        ) from None


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
        save_atomically(state, os.path.join(self.output_dir, name))

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
