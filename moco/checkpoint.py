"""Checkpoint files: crash-safe writing, safe reading, and the key names of every flavour.

Pretraining files (the original's format): {'epoch', 'arch', 'state_dict', 'optimizer'},
state_dict keys 'module.encoder_q.*', 'module.encoder_k.*', 'module.queue',
'module.queue_ptr'. Files are read with torch.load(weights_only=True): tensors, numbers,
strings, lists, tuples and dicts only, so a crafted file cannot run code.
"""

import os
import pickle
import random
import re
import shutil

import numpy as np
import torch

from moco.distributed import broadcast_object
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


def _atomic_write(path, write):
    """
    write(file) into a temporary file beside `path`, flushed to disk, then renamed to
    `path`: a kill or a full disk at any moment leaves either the previous file or the
    new one under that name, never a partial file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
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


def save_checkpoint(state, path, writer=torch.save):
    """
    Write `state` to `path` atomically (all of it or nothing). writer(state, file)
    serialises; torch.save unless another format is wanted.
    """
    _atomic_write(path, lambda f: writer(state, f))


def copy_checkpoint(src, dst):
    """Copy a checkpoint file as save_checkpoint writes one: all of it or nothing."""

    def copy(f):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)

    _atomic_write(dst, copy)


def with_module_prefix(state_dict):
    """The names a DistributedDataParallel model has: every key under 'module.'."""
    return {"module." + k: v for k, v in state_dict.items()}


def without_module_prefix(state_dict):
    """The names of the model itself, whichever way the file was saved."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def check_output_dir(path, flag="--output-dir"):
    """Create `path` if needed and refuse one that cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path!r} cannot be written ({e.strerror})") from None


def load_checkpoint(path, map_location="cpu", what="checkpoint"):
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


def _state_dict_of(obj, path):
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path!r} holds no state_dict: it is not a model checkpoint")


def encoder_state_dict(obj, path="checkpoint", keep_head=False):
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


def load_encoder(model, path, arch=None, what="--pretrained", obj=None):
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


CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{4,})\.pth\.tar$")
LAST_NAME = "checkpoint_last.pth.tar"


def list_checkpoints(directory):
    """Pretraining checkpoints in `directory`, newest first by their file name."""
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        m = CHECKPOINT_RE.match(name)
        if m:
            found.append(os.path.join(directory, name))
    found.sort(
        key=lambda p: int(CHECKPOINT_RE.match(os.path.basename(p)).group(1)),
        reverse=True,
    )
    return found


def find_latest_checkpoint(directory):
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


def remove_old_checkpoints(directory, keep_last):
    """Keep the newest `keep_last` epoch checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for path in list_checkpoints(directory)[keep_last:]:
        os.remove(path)


def resume_path(resume, output_dir):
    """The checkpoint --resume names ('auto': the newest valid one), or None."""
    if resume == "auto":
        return find_latest_checkpoint(output_dir)
    return resume or None


def check_pretrain_resume(path, arch, moco_dim, moco_k, mlp):
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


class Checkpointer:
    """
    The checkpoints of a pretraining run in `output_dir`, in the original's format
    (epoch, arch, state_dict with 'module.' names, optimizer) plus what an exact resume
    needs: the step within the epoch (iter), the random states, the data seed, the
    gradient scaler, the arguments and, mid-epoch, the epoch's meter sums. Only the
    process with `enabled` writes.
    """

    def __init__(
        self,
        output_dir,
        model,
        optimizer,
        scaler,
        *,
        arch,
        args=None,
        data_seed=None,
        keep_last=0,
        enabled=True,
    ):
        self.output_dir = output_dir
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.arch = arch
        self.args = dict(args or {})
        self.keep_last = keep_last
        self.enabled = enabled
        # the seed of the augmentations; a resumed run takes its file's
        self.data_seed = data_seed
        # the epoch's meters so far, from a mid-epoch file resumed
        self.meters = {}

    def save_epoch(self, epoch):
        """After epoch `epoch` (from 0): checkpoint_{epoch:04d}.pth.tar holds epoch + 1."""
        if not self.enabled:
            return
        self._save(epoch + 1, 0, f"checkpoint_{epoch:04d}.pth.tar")
        # superseded by the epoch's file
        last = os.path.join(self.output_dir, LAST_NAME)
        if os.path.exists(last):
            os.remove(last)
        remove_old_checkpoints(self.output_dir, self.keep_last)

    def save_mid_epoch(self, epoch, steps_done, meters=()):
        """
        Within epoch `epoch`, after `steps_done` of its steps: checkpoint_last, with the
        sums of the epoch's AverageMeters so far, for whole-epoch averages on resume.
        """
        if self.enabled:
            sums = {meter.name: meter.state() for meter in meters}
            self._save(epoch, steps_done, LAST_NAME, sums)

    def _save(self, epoch, steps_done, name, meters=None):
        state = {
            # completed epochs, and steps done in the epoch in progress
            "epoch": epoch,
            "iter": steps_done,
            "arch": self.arch,
            "state_dict": with_module_prefix(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "args": self.args,
            "data_seed": self.data_seed,
            "rng": get_rng_state(),
        }
        if meters:
            state["meters"] = meters
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        save_checkpoint(state, os.path.join(self.output_dir, name))

    def resume_if_asked(self, resume, start_epoch=0):
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

    def resume(self, path):
        """
        Load model, optimizer, scaler, random states and data seed from `path` into
        the model and optimizer wherever they are; returns (completed epochs, steps
        done in the next epoch).
        """
        # read onto the CPU: load_state_dict copies each tensor to its parameter's
        # device, and the random states must stay CPU tensors (NumPy's is read back
        # with .numpy(), which refuses a CUDA tensor)
        state = load_checkpoint(path, map_location="cpu", what="--resume checkpoint")
        self.model.load_state_dict(without_module_prefix(state["state_dict"]))
        self.optimizer.load_state_dict(state["optimizer"])
        # files of the original have neither data seed nor random states
        self.data_seed = state.get("data_seed", self.data_seed)
        self.meters = state.get("meters", {})
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"])
        return state["epoch"], state.get("iter", 0)


def get_rng_state():
    """torch's, Python's and NumPy's random states (and CUDA's), as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # weights_only loading reads tensors and Python numbers, not NumPy arrays
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
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
