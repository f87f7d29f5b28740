"""
Counting, on the CPU, what would make the host wait for a GPU.

On CUDA the host queues kernels and runs ahead of the GPU; it waits (a
synchronisation) when it needs a value the GPU computes, or when it copies host
memory to the GPU without `non_blocking` from pinned memory. On the CPU nothing waits,
so the counter follows where each tensor would live: the tensors it is given (a
model's parameters and buffers, a batch) and whatever is computed from them are on
the device; tensors made from host data are on the host. It counts

- reads of a device tensor by the host: `item`, `tolist`, `bool`/`int`/`float`,
  `cpu`, `numpy`, `.to("cpu")`;
- operations on a device tensor whose output size depends on its values: `nonzero`,
  boolean-mask indexing, `masked_select`, `bincount`, `unique`, `repeat_interleave`
  without `output_size`;
- copies of host data to the device that are not `non_blocking`: `torch.tensor` and
  `torch.as_tensor` with a `device`, `.to(device)`, `copy_` into a device tensor, and
  a host tensor (not a 0-dim scalar) mixed with device tensors in one operation.

The code under test names a device (`device=`, `.to(device)`) only for the training
device: a factory given a `device` makes a device tensor. Whether a non-blocking copy
really starts from pinned memory cannot be seen on the CPU (pinning needs a GPU);
the GPU check runs the same code on CUDA.
"""

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# host reads of a device tensor's values
_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
}
# outputs whose size depends on the values
_DATA_DEPENDENT = {
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.argwhere,
    torch.Tensor.argwhere,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.bincount,
    torch.Tensor.bincount,
    torch.unique,
    torch.Tensor.unique,
    torch.unique_consecutive,
    torch.Tensor.unique_consecutive,
}
_INDEXING = {
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.Tensor.index_put_,
    torch.Tensor.index_put,
}
_FACTORIES_FROM_DATA = {torch.tensor, torch.as_tensor}


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class SyncCounter(TorchFunctionMode):
    """
    with SyncCounter(model, batch) as syncs: ...; then syncs.events lists what would
    synchronise on CUDA, one string each.
    """

    def __init__(self, *on_device: Any) -> None:
        super().__init__()
        # id -> weak reference: a WeakSet would compare tensors with ==
        self._device: dict[int, weakref.ref] = {}
        self.events: list[str] = []
        self.on_device(*on_device)

    def on_device(self, *objs: Any) -> None:
        """
        Tensors, modules (parameters, buffers), optimizers (their state) and nests of
        them live on the device.
        """
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                tensors = [*obj.parameters(), *obj.buffers()]
            elif isinstance(obj, torch.optim.Optimizer):
                tensors = list(_tensors(list(obj.state.values())))
            else:
                tensors = list(_tensors(obj))
            for t in tensors:
                self._device[id(t)] = weakref.ref(t)

    def is_on_device(self, t: torch.Tensor) -> bool:
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def __len__(self) -> int:
        return len(self.events)

    def _count(self, kind: str, func: Any) -> None:
        self.events.append(f"{kind}: {getattr(func, '__name__', func)}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        on_dev = [t for t in inputs if self.is_on_device(t)]
        host = [t for t in inputs if not self.is_on_device(t) and t.dim() > 0]
        result = func(*args, **kwargs)

        to_host = func is torch.Tensor.to and _names_host(args[1:], kwargs)
        to_device = (
            func is torch.Tensor.to and not on_dev and _names_device(args[1:], kwargs)
        )
        if (to_host or to_device or func in _READS) and result is args[0]:
            # on the CPU a copy between host and device returns its input: make it
            # another object, so that where each lives can be told apart
            result = result.clone()

        if func in _READS or to_host:
            if on_dev:
                self._count("read", func)
            return result  # on the host
        if func in _FACTORIES_FROM_DATA and "device" in kwargs:
            self._count("copy to device", func)
            self.on_device(result)
            return result
        if to_device:
            if not kwargs.get("non_blocking", False):
                self._count("copy to device", func)
            self.on_device(result)
            return result
        if func is torch.Tensor.copy_ and on_dev and self.is_on_device(args[0]):
            if host and not kwargs.get("non_blocking", False):
                self._count("copy to device", func)
            return result
        if on_dev:
            if func in _DATA_DEPENDENT:
                self._count("data-dependent size", func)
            elif func in _INDEXING and any(t.dtype == torch.bool for t in inputs[1:]):
                self._count("boolean mask", func)
            elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
                if "output_size" not in kwargs and any(
                    isinstance(a, torch.Tensor) for a in args[1:]
                ):
                    self._count("data-dependent size", func)
            elif host:
                self._count("host tensor used on the device", func)
            self.on_device(result)
        elif "device" in kwargs and kwargs["device"] is not None:
            self.on_device(result)  # a factory on the device
        return result


def _names_host(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str) and target.split(":")[0] == "cpu"


def _names_device(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, (torch.device, str)) and not _names_host(args, kwargs)
