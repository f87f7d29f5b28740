"""Convert a MoCo checkpoint into a detectron2 weight file or a torchvision state_dict.

detectron2, as the original converter: a pickle of
    {"model": {detectron2 name: numpy array}, "__author__": "MOCO",
     "matching_heuristics": True}
with torchvision's ResNet names renamed to detectron2's: layerN -> res{N+1},
bnK -> convK.norm, downsample.0 -> shortcut, downsample.1 -> shortcut.norm, and the
stem's conv1/bn1 under "stem.". "__author__" makes detectron2 take the names as its
own (without it they are read as Caffe2 names); "matching_heuristics" lets them match
by suffix, so res5 reaches the C4 models' ROI head as well as an FPN backbone.

torchvision: the backbone's state_dict saved with torch.save, for fine-tuning with
torchvision or timm. It holds fc.* only when the input's fc is a classifier (a
linear-classification file or a torchvision state_dict), never MoCo's projection head.

Both read every checkpoint flavour through moco.weights.encoder_state_dict.
"""

import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass

import numpy as np

from moco.checkpoint import CheckpointError, load_checkpoint, save_atomically
from moco.utils import UsageError
from moco.weights import ENCODER_PREFIXES, HEAD_PREFIX, encoder_state_dict

_NORM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# every name of a torchvision ResNet's state_dict but fc.* (ResNeXt, wide ResNet too)
RESNET_KEY = re.compile(
    rf"conv1\.weight|bn1\.{_NORM}|layer[1-4]\.\d+\."
    rf"(conv[1-3]\.weight|bn[1-3]\.{_NORM}|downsample\.0\.weight|downsample\.1\.{_NORM})"
)
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
# (blocks of layer1..layer4, bottleneck blocks) -> depth
DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}


@dataclass
class Backbone:
    """A ResNet read from a checkpoint, with torchvision names; its fc.* kept apart."""

    state_dict: dict
    head: dict
    prefix: str  # where the encoder was found in the input
    blocks: tuple  # blocks of layer1..layer4
    bottleneck: bool

    @property
    def depth(self):
        return DEPTHS.get((self.blocks, self.bottleneck))

    @property
    def head_is_classifier(self):
        # under a MoCo prefix fc is the projection head; a linear-classification
        # file (module.*) or a torchvision state_dict has a classifier there
        classifier = set(self.head) == {"fc.weight", "fc.bias"}
        return classifier and self.prefix not in ENCODER_PREFIXES

    def describe(self):
        kind = "bottleneck" if self.bottleneck else "basic"
        layout = "-".join(map(str, self.blocks))
        name = f"ResNet-{self.depth}" if self.depth else "ResNet"
        where = f"under {self.prefix!r}" if self.prefix else "without prefix"
        return f"a {name} ({kind} blocks {layout}) {where}"


def read_backbone(obj, path="checkpoint"):
    """The ResNet of a loaded checkpoint of any flavour; refuses anything else."""
    encoder, prefix = encoder_state_dict(obj, path, keep_head=True)
    head = {k: v for k, v in encoder.items() if k.startswith(HEAD_PREFIX)}
    state_dict = {k: v for k, v in encoder.items() if k not in head}
    other = next((k for k in state_dict if not RESNET_KEY.fullmatch(k)), None)
    if other is not None:
        raise CheckpointError(
            f"{path!r} does not hold a torchvision ResNet (it has {prefix + other!r}); "
            "only ResNets (resnet18 to resnet152, ResNeXt, wide ResNet) convert"
        )
    blocks = tuple(
        len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{i}.")})
        for i in range(1, 5)
    )
    if "conv1.weight" not in state_dict or 0 in blocks:
        raise CheckpointError(
            f"{path!r} holds an incomplete ResNet (no stem or an empty stage)"
        )
    bottleneck = any(".conv3." in k for k in state_dict)
    return Backbone(state_dict, head, prefix, blocks, bottleneck)


def detectron2_name(name):
    """detectron2's ResNet name for a torchvision ResNet state_dict name."""
    name = re.sub(r"(^|\.)bn([1-3])\.", r"\1conv\2.norm.", name)
    name = name.replace("downsample.0.", "shortcut.").replace(
        "downsample.1.", "shortcut.norm."
    )
    stage = re.match(r"layer([1-4])\.", name)
    if stage is None:
        return "stem." + name
    return f"res{int(stage.group(1)) + 1}.{name[stage.end():]}"


def to_detectron2(backbone):
    """
    The original converter's file content, less BatchNorm's num_batches_tracked: a
    step counter, not a weight; BN and SyncBN layers fill it in when it is missing,
    and FrozenBN layers have none, so that detectron2 would report each as unused.
    """
    kernel = tuple(backbone.state_dict["conv1.weight"].shape[-2:])
    if kernel != (7, 7):
        raise UsageError(
            f"the stem convolution is {kernel[0]}x{kernel[1]} (a --small-stem model); "
            "detectron2's ResNet stem is 7x7 and would be left random. Export it for "
            "torchvision instead (detection/export_torchvision.py)"
        )
    model = {
        detectron2_name(k): v.detach().cpu().numpy()
        for k, v in backbone.state_dict.items()
        if not k.endswith(".num_batches_tracked")
    }
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def to_torchvision(backbone):
    """The backbone's state_dict, with the input's classifier fc.* if it has one."""
    state_dict = dict(backbone.state_dict)
    if backbone.head_is_classifier:
        state_dict.update(backbone.head)
    return state_dict


class _PortablePickler(pickle.Pickler):
    """
    Writes numpy arrays as numpy.ndarray(shape, dtype, bytearray): NumPy 2 pickles
    them under numpy._core, which NumPy 1.x cannot import, and detectron2 setups
    often run NumPy 1.x. The arrays read back writable, as ordinary arrays.
    """

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            # tobytes() is in C order whatever the array's layout
            return np.ndarray, (obj.shape, obj.dtype.str, bytearray(obj.tobytes()))
        return NotImplemented


def _write_pickle(obj, f):
    _PortablePickler(f, protocol=4).dump(obj)


def _check_output(args):
    output = args.output
    if os.path.isdir(output):
        raise UsageError(f"output {output!r} is a directory; give a file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise UsageError(f"the directory of output {output!r} does not exist")
    if os.path.exists(output):
        if os.path.exists(args.input) and os.path.samefile(output, args.input):
            raise UsageError("the output is the input file; choose another output name")
        if not args.force:
            raise UsageError(f"output {output!r} exists; pass --force to overwrite it")


def _count(state_dict):
    """(tensors, parameters) of tensors or arrays; BN statistics are not parameters."""
    params = sum(
        math.prod(v.shape)
        for k, v in state_dict.items()
        if not k.endswith(BUFFER_SUFFIXES)
    )
    return len(state_dict), params


def main(args):
    _check_output(args)
    obj = load_checkpoint(args.input, what="input checkpoint")
    backbone = read_backbone(obj, args.input)
    print(f"read {args.input!r}: {backbone.describe()}")

    if args.format == "detectron2":
        state = to_detectron2(backbone)
        tensors, params = _count(state["model"])
        save_atomically(state, args.output, writer=_write_pickle)
    else:
        state = to_torchvision(backbone)
        tensors, params = _count(state)
        save_atomically(state, args.output)

    head_kept = args.format == "torchvision" and backbone.head_is_classifier
    if backbone.head and not head_kept:
        kind = "classifier" if backbone.head_is_classifier else "MoCo projection head"
        print(f"left out fc.* ({len(backbone.head)} tensors, the {kind})")
    written = f"{tensors} tensors, {params:,} parameters"
    print(f"wrote {args.output!r} ({args.format}): {written}")
    if args.format == "detectron2":
        _print_usage(backbone, args.output)
    return state


def _print_usage(backbone, output):
    options = f"MODEL.WEIGHTS {output}"
    if backbone.depth and backbone.depth != 50:
        options += f" MODEL.RESNETS.DEPTH {backbone.depth}"
    if backbone.bottleneck:
        print(
            f"use it with {options} and a *_moco.yaml config (see detection/README.md)"
        )
    else:  # detectron2 builds the C4 head's res5 of bottleneck blocks
        options += " MODEL.RESNETS.RES2_OUT_CHANNELS 64"
        print(f"use it with {options} in an FPN model (see detection/README.md)")


def get_args_parser(fmt="detectron2"):
    description = {
        "detectron2": "Convert a MoCo checkpoint into detectron2's weight format.",
        "torchvision": "Export the ResNet of a MoCo checkpoint as a torchvision "
        "state_dict (torch.save), without MoCo's projection head.",
    }[fmt]
    parser = argparse.ArgumentParser(
        description=description
        + " Reads pretraining files (module.encoder_q.*, encoder_q.*, MoCo v3 "
        "module.base_encoder.*), linear-classification files and torchvision "
        "state_dicts."
    )
    parser.add_argument(
        "input", help="checkpoint to convert, e.g. checkpoint_0199.pth.tar"
    )
    example = "output.pkl" if fmt == "detectron2" else "resnet50_moco.pth"
    parser.add_argument("output", help=f"file to write, e.g. {example}")
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing output file"
    )
    parser.set_defaults(format=fmt)
    return parser
