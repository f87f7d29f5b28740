"""The encoder's weights out of every checkpoint flavour, with torchvision's names.

What main_lincls.py --pretrained, main_knn.py and detection/ read: pretraining files
of this project and of the original (module.encoder_q.*) and the original's released
models, a MoCo model saved without DistributedDataParallel (encoder_q.*), MoCo v3 ResNet
files (module.base_encoder.*), linear-classification files (module.*) and plain
torchvision state_dicts. Files are read by moco.checkpoint.load_checkpoint.
"""

import re
from typing import Any

import torch
import torch.nn as nn

from moco.checkpoint import CheckpointError, load_checkpoint
from moco.models import build_encoder

# prefixes under which a MoCo file holds its query encoder
ENCODER_PREFIXES = (
    "module.encoder_q.",  # the original's and this project's pretraining files
    "encoder_q.",  # a MoCo model saved without DistributedDataParallel
    "module.base_encoder.",  # MoCo v3 ResNet files
    "base_encoder.",
)
HEAD_PREFIX = "fc."


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
