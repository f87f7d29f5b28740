#!/usr/bin/env python
"""Time MoCo's training step against the backbone's own cost.

    python bench/step.py -a resnet18 --input-size 64 -b 64 --moco-k 4096 --mlp --original
    python bench/step.py -a resnet50 --input-size 224 -b 16 --moco-k 65536 --mlp --original
    python bench/step.py ... --procs 2                    # 2 gloo processes on the CPU
    torchrun --nproc-per-node 2 bench/step.py ...         # the same under torchrun
    python bench/step.py ... --device cuda --amp --channels-last --compile

Variants, timed interleaved (a, b, o, o, b, a, ...), medians after warm-up:
  (a) step:     main_moco.train_step, as main_moco.train calls it: MoCo forward,
                cross-entropy, one host read of the loss and the accuracy counts, the
                stop/NaN flags, backward, SGD over model.parameters() (DDP without
                buffer broadcasts)
  (b) floor:    the same backbone alone: query forward + backward, key forward without
                grad, SGD over the query encoder (DDP over the query encoder)
  (o) original: as (a) with the original's formulas (tests/original.py) for the parts
                this project changed (allocating momentum update, all-gather shuffle,
                host-read enqueue pointer, DDP broadcasting every buffer)
Then each MoCo-specific part alone, and (with several processes) the bytes each process
sends and receives per step, counted analytically and measured on the collectives.
Batch (-b) is per process. Input is random; no data loading is timed.
"""

import argparse
import copy
import functools
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moco.builder  # noqa: E402
from main_moco import create_model, train_step  # noqa: E402
from moco.builder import world_size_and_rank  # noqa: E402
from moco.distributed import any_process, wrap_ddp  # noqa: E402
from moco.meters import read_step  # noqa: E402
from tests.original import OriginalMoCo, original_logits  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="MoCo training step vs. backbone floor"
    )
    parser.add_argument("-a", "--arch", default="resnet50")
    parser.add_argument("--input-size", default=224, type=int, metavar="PX")
    parser.add_argument("-b", "--batch-size", default=16, type=int, help="per process")
    parser.add_argument("--moco-k", default=65536, type=int)
    parser.add_argument("--moco-dim", default=128, type=int)
    parser.add_argument("--moco-m", default=0.999, type=float)
    parser.add_argument("--moco-t", default=0.07, type=float)
    parser.add_argument("--mlp", action="store_true")
    parser.add_argument("--small-stem", action="store_true")
    parser.add_argument("--bn-splits", default=1, type=int)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--amp", action="store_true", help="autocast (bfloat16 default)"
    )
    parser.add_argument(
        "--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"]
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="nn.Module.compile() encoders"
    )
    parser.add_argument("--procs", default=1, type=int, help="gloo processes to spawn")
    parser.add_argument(
        "--threads",
        default=0,
        type=int,
        help="torch threads per process (default: cores / processes)",
    )
    parser.add_argument("--steps", default=10, type=int, help="timed steps per variant")
    parser.add_argument(
        "--warmup", default=2, type=int, help="untimed steps per variant"
    )
    parser.add_argument(
        "--part-reps", default=10, type=int, help="repetitions per part"
    )
    parser.add_argument("--original", action="store_true", help="also time variant (o)")
    parser.add_argument(
        "--no-parts", action="store_true", help="skip the per-part times"
    )
    parser.add_argument(
        "--traffic-only",
        action="store_true",
        help="only count the bytes each process moves (with --procs > 1)",
    )
    parser.add_argument("--port", default=29517, type=int, help="port for --procs > 1")
    return parser


# ---------------------------------------------------------------- collectives counter
class Traffic:
    """Bytes this process sends to and receives from other processes, per collective."""

    def __init__(self):
        self.on = False
        self.sent, self.received = {}, {}

    def add(self, name, sent, received):
        if self.on:
            self.sent[name] = self.sent.get(name, 0) + sent
            self.received[name] = self.received.get(name, 0) + received

    def reset(self):
        self.sent, self.received = {}, {}


TRAFFIC = Traffic()


def _nbytes(t):
    return t.numel() * t.element_size()


def install_counters():
    """Wrap the torch.distributed calls MoCo makes (builder and bench look them up late)."""
    w, rank = dist.get_world_size(), dist.get_rank()
    orig = {
        n: getattr(dist, n) for n in ("all_gather", "all_to_all_single", "broadcast")
    }

    def all_gather(tensor_list, tensor, *a, **k):
        TRAFFIC.add(
            "all_gather " + _kind(tensor),
            (w - 1) * _nbytes(tensor),
            (w - 1) * _nbytes(tensor),
        )
        return orig["all_gather"](tensor_list, tensor, *a, **k)

    def all_to_all_single(
        output, input, output_split_sizes=None, input_split_sizes=None, *a, **k
    ):
        row_in = _nbytes(input) // max(input.shape[0], 1)
        row_out = _nbytes(output) // max(output.shape[0], 1)
        own_in = input_split_sizes[rank] if input_split_sizes else input.shape[0] // w
        own_out = (
            output_split_sizes[rank] if output_split_sizes else output.shape[0] // w
        )
        TRAFFIC.add(
            "all_to_all " + _kind(input),
            (input.shape[0] - own_in) * row_in,
            (output.shape[0] - own_out) * row_out,
        )
        return orig["all_to_all_single"](
            output, input, output_split_sizes, input_split_sizes, *a, **k
        )

    def broadcast(tensor, src=0, *a, **k):
        TRAFFIC.add(
            "broadcast " + _kind(tensor),
            (w - 1) * _nbytes(tensor) if rank == src else 0,
            0 if rank == src else _nbytes(tensor),
        )
        return orig["broadcast"](tensor, src, *a, **k)

    dist.all_gather, dist.all_to_all_single = all_gather, all_to_all_single
    dist.broadcast = broadcast


def _kind(t):
    return (
        "images" if t.dim() == 4 else ("indices" if t.dtype == torch.long else "keys")
    )


def count_ddp(ddp, w, rank):
    """Count DDP's gradient all-reduce (a comm hook) and its buffer broadcast."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        b = _nbytes(bucket.buffer())
        # ring all-reduce: 2 (w-1)/w of the gradients out and in
        TRAFFIC.add(
            "DDP gradient all_reduce", 2 * (w - 1) * b // w, 2 * (w - 1) * b // w
        )
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    plain = ddp._distributed_broadcast_coalesced

    def broadcast_buffers(tensors, buffer_size, authoritative_rank=0):
        b = sum(_nbytes(t) for t in tensors)
        TRAFFIC.add(
            "DDP buffer broadcast",
            (w - 1) * b if rank == authoritative_rank else 0,
            0 if rank == authoritative_rank else b,
        )
        return plain(tensors, buffer_size, authoritative_rank)

    ddp._distributed_broadcast_coalesced = broadcast_buffers


# ---------------------------------------------------------------- the steps
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.world_size, self.rank = world_size_and_rank()
        self.distributed = self.world_size > 1
        self.amp_dtype = getattr(torch, args.amp_dtype)
        self.memory_format = (
            torch.channels_last if args.channels_last else torch.contiguous_format
        )
        self.autocast = functools.partial(
            torch.autocast, device.type, dtype=self.amp_dtype, enabled=args.amp
        )
        self.criterion = nn.CrossEntropyLoss()
        n, px = args.batch_size, args.input_size
        gen = torch.Generator().manual_seed(1000 + self.rank)
        # the loader's batches: on the host (pinned for a GPU), copied in every step
        pin = device.type == "cuda"
        self.images = [
            (
                torch.randn(n, 3, px, px, generator=gen).pin_memory()
                if pin
                else torch.randn(n, 3, px, px, generator=gen)
            )
            for _ in range(2)
        ]

        self.moco = self._moco(moco.builder.MoCo)
        self.floor_q = copy.deepcopy(self.moco[0].encoder_q)
        self.floor_k = copy.deepcopy(self.moco[0].encoder_k)
        if args.compile:
            self.floor_q.compile()
            self.floor_k.compile()
        self.floor_q_ddp = self.floor_q
        if self.distributed:
            self.floor_q_ddp = wrap_ddp(self.floor_q, device)
            count_ddp(self.floor_q_ddp, self.world_size, self.rank)
        self.floor_opt = self._sgd(self.floor_q.parameters())
        self.floor_scaler = self._scaler()
        self.original = self._moco(OriginalMoCo) if args.original else None

    def _sgd(self, params):
        return torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4)

    def _moco(self, cls):
        """Model, DDP wrapper, optimizer and scaler, built as main_moco.main_worker does."""
        # the same weights and queue for every variant
        torch.manual_seed(0)
        model = create_model(self.args, self.device)
        model.__class__ = cls
        ddp = model
        if self.distributed:
            if cls is OriginalMoCo:  # the original's default: buffers broadcast
                ddp = nn.parallel.DistributedDataParallel(
                    model,
                    device_ids=[self.device] if self.device.type == "cuda" else None,
                )
            else:
                ddp = wrap_ddp(model, self.device)
            count_ddp(ddp, self.world_size, self.rank)
        return model, ddp, self._sgd(model.parameters()), self._scaler()

    def _scaler(self):
        enabled = self.args.amp and self.amp_dtype == torch.float16
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def inputs(self):
        return [
            x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            for x in self.images
        ]

    def moco_step(self, which):
        _, model, optimizer, scaler = which
        im_q, im_k = self.inputs()
        # the accuracy counts are read with the loss, as in training
        train_step(
            model,
            self.criterion,
            optimizer,
            im_q,
            im_k,
            scaler=scaler,
            autocast=self.autocast(),
            symmetric=self.args.symmetric,
        )

    def floor_step(self):
        im_q, im_k = self.inputs()
        with self.autocast():
            q = self.floor_q_ddp(im_q)
            with torch.no_grad():
                self.floor_k(im_k)
        # any scalar will do: the backbone's backward is the cost
        loss = q.float().square().mean()
        self.floor_opt.zero_grad()
        self.floor_scaler.scale(loss).backward()
        self.floor_scaler.step(self.floor_opt)
        self.floor_scaler.update()

    def variants(self):
        v = {"a": lambda: self.moco_step(self.moco), "b": self.floor_step}
        if self.original:
            v["o"] = lambda: self.moco_step(self.original)
        return v

    def time(self, fn, cpu=False):
        """Seconds of one call, the slowest process's; processes start together.
        cpu: also the process's CPU time (all its threads), less sensitive to other
        programs taking the cores than the wall clock."""
        if self.distributed:
            dist.barrier()
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(self.device)
        # on the training device: NCCL reduces CUDA tensors only
        t = torch.tensor(
            [time.perf_counter() - t0, time.process_time() - c0],
            dtype=torch.float64,
            device=self.device,
        )
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist() if cpu else t[0].item()

    def run_interleaved(self):
        """Per variant: wall and CPU seconds of every timed step, in rounds a b o o b a."""
        v = self.variants()
        order = list(v) + list(v)[::-1]  # each variant as often first as last
        for _ in range(self.args.warmup):
            for name in order[: len(v)]:
                v[name]()
        times = {name: [] for name in v}
        while min(len(t) for t in times.values()) < self.args.steps:
            for name in order:
                times[name].append(self.time(v[name], cpu=True))
        return times

    # ------------------------------------------------------------ parts
    def median_time(self, fn, setup=None):
        """Median wall and CPU seconds of fn() (of fn(setup()) with a setup)."""
        ts = []
        for i in range(self.args.part_reps + 2):
            call = functools.partial(fn, setup()) if setup else fn
            t = self.time(call, cpu=True)
            if i >= 2:  # warm-up
                ts.append(t)
        return statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)

    def parts(self, model):
        """MoCo's own work, each part alone with the step's shapes."""
        args, dev = self.args, self.device
        n, dim = args.batch_size, args.moco_dim
        im_k = self.inputs()[1]
        gen = torch.Generator().manual_seed(7 + self.rank)
        k = nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).to(dev)
        _, idx_unshuffle = model._batch_shuffle_ddp(im_k)
        out = {}
        out["momentum update"] = self.median_time(model._momentum_update_key_encoder)
        out["shuffle (images)"] = self.median_time(
            lambda: model._batch_shuffle_ddp(im_k)
        )
        out["unshuffle (keys)"] = self.median_time(
            lambda: model._batch_unshuffle_ddp(k, idx_unshuffle)
        )

        def make_q():
            return torch.randn(n, dim, device=dev).requires_grad_()

        def logits(q):
            # normalise, l_pos, l_neg against the queue, /T, CE
            qn = nn.functional.normalize(q, dim=1)
            out = original_logits(qn, k, model.queue, args.moco_t)
            loss = self.criterion(out, torch.zeros(n, dtype=torch.long, device=dev))
            loss.backward()
            return out, loss

        out["logits + CE, fwd+bwd"] = self.median_time(logits, make_q)
        out["  of which queue.clone()"] = self.median_time(lambda: model.queue.clone())
        out["enqueue"] = self.median_time(lambda: model._dequeue_and_enqueue(k))
        output, loss = logits(make_q())

        target = torch.zeros(n, dtype=torch.long, device=dev)

        def read_and_flags():
            # as train_step: the flags agreed on the device, read with the loss
            flags = torch.stack([loss.new_zeros(()), (~loss.isfinite()).float()])
            read_step(loss, output, target, any_process(flags))

        out["accuracy counts, host read, stop flags"] = self.median_time(read_and_flags)
        return out

    # ------------------------------------------------------------ traffic
    def traffic(self, which, steps=2):
        TRAFFIC.reset()
        TRAFFIC.on = True
        for _ in range(steps):
            self.moco_step(which)
        TRAFFIC.on = False
        return {
            k: (TRAFFIC.sent[k] / steps, TRAFFIC.received[k] / steps)
            for k in TRAFFIC.sent
        }

    def analytic_traffic(self, model, original):
        """Expected bytes received per step by a process other than 0 (rank 0 sends)."""
        args, w, n = self.args, self.world_size, self.args.batch_size
        image = 3 * args.input_size**2 * 4
        key = args.moco_dim * 4
        # the keys are gathered twice: to unshuffle them and to enqueue them
        out = {"broadcast indices": w * n * 8, "all_gather keys": 2 * (w - 1) * n * key}
        if original:
            out["all_gather images"] = (w - 1) * n * image
            out["DDP buffer broadcast"] = sum(_nbytes(b) for b in model.buffers())
        else:
            out["all_to_all images"] = (w - 1) * n * image / w  # expected: (w-1)/w rows
        grads = sum(_nbytes(p) for p in model.encoder_q.parameters())
        out["DDP gradient all_reduce"] = 2 * (w - 1) * grads / w
        return out


# ---------------------------------------------------------------- report
def fmt_bytes(b):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(b) < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1000


def describe(args, device, w):
    prec = f"autocast {args.amp_dtype}" if args.amp else "fp32"
    flags = [
        name
        for name, on in (
            ("mlp", args.mlp),
            ("channels_last", args.channels_last),
            ("compiled", args.compile),
        )
        if on
    ]
    return (
        f"{args.arch} {args.input_size}px, batch {args.batch_size}/process x {w} "
        f"process(es), K {args.moco_k}, dim {args.moco_dim}, {', '.join(flags + [str(device)])}, "
        f"{prec}, {torch.get_num_threads()} thread(s)/process, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def report_times(say, args, world_size, times):
    wall = {v: [t[0] for t in ts] for v, ts in times.items()}
    cpu = {v: [t[1] for t in ts] for v, ts in times.items()}
    med = {v: statistics.median(t) for v, t in wall.items()}
    med_cpu = {v: statistics.median(t) for v, t in cpu.items()}
    images = args.batch_size * world_size
    names = {"a": "(a) step", "b": "(b) floor", "o": "(o) original"}
    say(
        f"\n{len(wall['a'])} steps per variant after {args.warmup} warm-up, interleaved; "
        "medians; paired: median over rounds of step/floor; cpu: process CPU time"
    )
    say(
        f"{'variant':<14}{'ms/step':>9}{'images/s':>10}{'/ floor':>9}{'paired':>8}"
        f"{'cpu ms':>9}{'/ floor':>9}   wall ms of every step"
    )
    for v, t in med.items():
        paired = statistics.median(x / y for x, y in zip(wall[v], wall["b"]))
        every = " ".join(f"{x * 1e3:.0f}" for x in wall[v])
        say(
            f"{names[v]:<14}{t * 1e3:>9.1f}{images / t:>10.1f}{t / med['b']:>9.3f}{paired:>8.3f}"
            f"{med_cpu[v] * 1e3:>9.1f}{med_cpu[v] / med_cpu['b']:>9.3f}   {every}"
        )
    say(
        f"ratio (a)/(b) = {med['a'] / med['b']:.3f}"
        + (f"   ratio (o)/(b) = {med['o'] / med['b']:.3f}" if "o" in med else "")
        + f"   (load average now {os.getloadavg()[0]:.1f})"
    )
    return med, med_cpu


def report_parts(say, bench, med, med_cpu):
    models = {"project": bench.moco[0]}
    if bench.original:
        models["original"] = bench.original[0]
    parts = {name: bench.parts(m) for name, m in models.items()}
    say(
        f"\n{'MoCo-specific part (median ms)':<32}"
        + "".join(f"{n + ' wall':>16}{'cpu':>8}" for n in parts)
    )
    for key in parts["project"]:
        say(
            f"{key:<32}"
            + "".join(
                f"{p[key][0] * 1e3:>16.2f}{p[key][1] * 1e3:>8.2f}"
                for p in parts.values()
            )
        )
    diff = [
        f"{(med[v] - med['b']) * 1e3:>16.2f}{(med_cpu[v] - med_cpu['b']) * 1e3:>8.2f}"
        for v in ("a", "o")
        if v in med
    ]
    say(f"{'whole step - floor':<32}" + "".join(diff))
    # the parts' sum over the floor: what the ratio is when nothing else differs, and
    # steadier than the ratio itself on a machine shared with other programs
    sums = {
        n: sum(t[0] for k, t in p.items() if "of which" not in k)
        for n, p in parts.items()
    }
    say(
        f"{'sum of the parts':<32}"
        + "".join(f"{t * 1e3:>16.2f}{'':>8}" for t in sums.values())
    )
    say(
        "ratio from the parts, 1 + sum / floor: "
        + ", ".join(f"{n} {1 + t / med['b']:.3f}" for n, t in sums.items())
    )


def report_traffic(say, bench, world_size):
    rows = []
    for name, which in (("project", bench.moco), ("original", bench.original)):
        if which is not None:
            per_rank = [None] * world_size
            dist.all_gather_object(per_rank, bench.traffic(which))
            rows.append(
                (name, per_rank, bench.analytic_traffic(which[0], name == "original"))
            )
    say(
        f"\nbytes per step and process, {world_size} processes (analytic: received by a "
        "process other than 0; measured: received, then sent, by each process)"
    )
    for name, per_rank, expected in rows:
        total = [0] * world_size
        for key in sorted(set().union(*per_rank, expected)):
            cells = []
            for r, m in enumerate(per_rank):
                sent, received = m.get(key, (0, 0))
                total[r] += received
                cells.append(f"r{r} {fmt_bytes(received)} / {fmt_bytes(sent)}")
            exp = fmt_bytes(expected[key]) if key in expected else "-"
            say(f"  {name:<9}{key:<25}{exp:>10}   " + ", ".join(cells))
        say(
            f"  {name:<9}{'total received':<25}{fmt_bytes(sum(expected.values())):>10}   "
            + ", ".join(f"r{r} {fmt_bytes(t)}" for r, t in enumerate(total))
        )


def worker(rank, args):
    device = torch.device(args.device)
    world_size = int(os.environ.get("WORLD_SIZE", args.procs))
    if device.type == "cuda":
        device = torch.device("cuda", rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as main_moco without --seed
    if device.type == "cpu":
        torch.set_num_threads(
            args.threads or max(1, (os.cpu_count() or 1) // world_size)
        )
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        else:
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{args.port}",
                world_size=world_size,
                rank=rank,
            )
        install_counters()
    rank = dist.get_rank() if world_size > 1 else 0
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        bench = Bench(args, device)
        say(describe(args, device, world_size))
        if not args.traffic_only:
            med, med_cpu = report_times(say, args, world_size, bench.run_interleaved())
            if not args.no_parts:
                report_parts(say, bench, med, med_cpu)
        if world_size > 1:
            report_traffic(say, bench, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def main(args):
    problem = None
    if args.amp and args.amp_dtype == "float16" and not args.device.startswith("cuda"):
        problem = "--amp-dtype float16 needs a GPU; on the CPU use bfloat16"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problem = "--device cuda given, but no CUDA GPU is visible"
    if args.original and args.symmetric:
        problem = "--original has no symmetric loss (the original has none): drop one"
    if args.traffic_only and args.procs < 2 and "WORLD_SIZE" not in os.environ:
        problem = "--traffic-only needs several processes (--procs 2 or torchrun)"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return worker(int(os.environ.get("LOCAL_RANK", 0)), args)
    if args.procs > 1:
        return mp.spawn(worker, args=(args,), nprocs=args.procs)
    return worker(0, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
