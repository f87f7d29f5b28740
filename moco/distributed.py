"""Process start-up for every launch mode, and helpers that are no-ops with one process.

Launch modes (one code path all programs share):
- one process: `python main_moco.py DATA` (a GPU if there is one, `--gpu N`, or the CPU)
- the original's: `--multiprocessing-distributed --world-size NODES --rank NODE
  --dist-url tcp://HOST:PORT`, one process per GPU (or `--procs-per-node` CPU processes)
- torchrun / `--dist-url env://`: RANK, WORLD_SIZE and LOCAL_RANK from the environment
- `--world-size W --rank R --dist-url ...` without spawning: one process per node
- srun (SLURM): a task per process, or with --multiprocessing-distributed a task per
  node; ranks, sizes and the rendezvous from SLURM's environment (moco/slurm.py)
`-b` is the batch of one node, split evenly over that node's processes.
"""

import datetime
import inspect
import os
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco.slurm import SlurmTask, slurm_task
from moco.utils import ONE_LINE_ERRORS, UsageError, logger, one_line, setup_logging

# EX_TEMPFAIL: stopped on a signal after a checkpoint; resume it
PREEMPTED_EXIT_CODE = 75


@dataclass(frozen=True)
class Launch:
    """The values of the launch flags (moco.cli.add_launch_arguments)."""

    world_size: int = -1
    rank: int = -1
    dist_url: str = "tcp://224.66.41.62:23456"
    dist_backend: str = "nccl"
    gpu: int | None = None
    multiprocessing_distributed: bool = False
    procs_per_node: int = 0
    dist_timeout: int = 1800

    def processes_per_node(self) -> int:
        """
        Processes this node runs: LOCAL_WORLD_SIZE under torchrun, its srun tasks,
        else one per GPU.
        """
        if _under_torchrun():
            return int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        task = slurm_task()
        if task and not self.multiprocessing_distributed:
            return task.tasks_per_node
        if not self.multiprocessing_distributed:
            return 1
        if self.procs_per_node:
            return self.procs_per_node
        return max(torch.cuda.device_count(), 1)

    def total_processes(self) -> int:
        """The world size this launch will have."""
        if _under_torchrun():
            return int(os.environ["WORLD_SIZE"])
        launchers = self._launchers()[0]
        if not self.multiprocessing_distributed:
            return launchers
        return launchers * self.processes_per_node()

    def _launchers(self) -> tuple[int, int]:
        """
        The processes that start this launch (one per node: --world-size, or with
        env:// WORLD_SIZE; under srun its tasks) and this one's rank among them.
        """
        task = slurm_task()
        if task:
            return task.tasks, task.rank
        nodes, node_rank = self.world_size, self.rank
        if self.dist_url == "env://":
            nodes = nodes if nodes > 0 else int(os.environ.get("WORLD_SIZE", 1))
            node_rank = node_rank if node_rank >= 0 else int(os.environ.get("RANK", 0))
        return max(nodes, 1), max(node_rank, 0)

    def check(self, batch_size: int) -> None:
        """Refuse impossible launch settings before any process starts."""
        check_slurm(self)
        if _under_torchrun() and self.multiprocessing_distributed:
            raise UsageError(
                "torchrun already starts one process per GPU: "
                "drop --multiprocessing-distributed"
            )
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.gpu is not None and not gpus:
            raise UsageError(
                f"--gpu {self.gpu} given, but no CUDA GPU is visible; drop --gpu"
            )
        if self.gpu is not None and self.gpu >= gpus:
            raise UsageError(
                f"--gpu {self.gpu} given, but only {gpus} GPU(s) are visible"
            )
        n = self.processes_per_node()
        if n < 1:
            raise UsageError(f"--procs-per-node must be positive, got {n}")
        if gpus and n > gpus and not _own_gpu_each(gpus):
            raise UsageError(f"{n} processes per node but only {gpus} GPUs")
        if not _under_torchrun() and not slurm_task() and self.dist_url != "env://":
            if self.multiprocessing_distributed and self.world_size < 1:
                raise UsageError(
                    "--multiprocessing-distributed needs --world-size (number of nodes)"
                )
            spawning = self.multiprocessing_distributed or self.world_size > 1
            if spawning and self.rank < 0:
                raise UsageError(
                    "distributed training needs --rank (this node's rank, from 0)"
                )
        if batch_size % n:
            raise UsageError(
                f"-b {batch_size} (the batch of one node) does not split evenly over "
                f"its {n} processes; use a multiple of {n}"
            )


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _own_gpu_each(gpus: int) -> bool:
    """
    Whether a scheduler shows each process of the node its own GPU: under torchrun or
    srun, one GPU visible through CUDA_VISIBLE_DEVICES (local_gpu then takes GPU 0).
    """
    launched = _under_torchrun() or slurm_task() is not None
    return launched and gpus == 1 and "CUDA_VISIBLE_DEVICES" in os.environ


def check_slurm(settings: Launch) -> None:
    """Refuse launch flags that contradict what srun told this task."""
    task = slurm_task()
    if task is None or _under_torchrun():
        return
    if settings.multiprocessing_distributed and task.tasks_per_node > 1:
        raise UsageError(
            f"srun started {task.tasks_per_node} tasks on this node and "
            "--multiprocessing-distributed would spawn processes in each: use "
            "--ntasks-per-node=1 with it, or drop it for a task per process"
        )
    for flag, given, slurm, name in (
        ("--rank", settings.rank, task.rank, "SLURM_PROCID"),
        ("--world-size", settings.world_size, task.tasks, "SLURM_STEP_NUM_TASKS"),
    ):
        if given >= 0 and given != slurm:
            raise UsageError(
                f"{flag} {given} disagrees with srun's {name} {slurm}; drop {flag} "
                "under srun"
            )
    slurm_rendezvous(settings, task)


def slurm_rendezvous(settings: Launch, task: SlurmTask) -> tuple[str, str]:
    """
    The address where an srun launch meets (--dist-url where given) and the start-up
    summary's line saying what was taken from SLURM.
    """
    if settings.dist_url != Launch.dist_url:
        url, source = settings.dist_url, "--dist-url"
    else:
        url, source = task.rendezvous()
    spawned = (
        f", each spawning {settings.processes_per_node()} processes"
        if settings.multiprocessing_distributed
        else ""
    )
    requeued = f" (requeued {task.restarts}x)" if task.restarts else ""
    return url, (
        f"slurm: job {task.job_id}{requeued}, task {task.rank} of {task.tasks}, "
        f"{task.tasks_per_node} per node{spawned}; rendezvous {url} ({source})"
    )


@dataclass
class DistEnv:
    """Where this process runs and who else does."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    procs_per_node: int = 1
    device: torch.device = torch.device("cpu")
    # what the launch took from SLURM, for the start-up summary (None outside srun)
    slurm: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def per_process(self, batch_size: int, workers: int) -> tuple[int, int]:
        """This process's share of the node's batch (-b) and loader workers (-j)."""
        return per_process(batch_size, workers, self.procs_per_node)


def per_process(batch_size: int, workers: int, procs_per_node: int) -> tuple[int, int]:
    """Each process's share of a node's batch (-b) and loader workers (-j)."""
    n = procs_per_node
    return batch_size // n, (workers + n - 1) // n


def _spawned_worker(
    local_rank: int, main_worker: Callable[..., Any], nprocs: int, args: tuple
) -> None:
    try:
        main_worker(local_rank, nprocs, *args)
    except ONE_LINE_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def launch(main_worker: Callable[..., Any], settings: Launch, *args: Any) -> Any:
    """Run main_worker(local_rank, procs_per_node, *args) in each process of this node."""
    if _under_torchrun():
        local_rank = int(os.environ["LOCAL_RANK"])
        return main_worker(local_rank, settings.processes_per_node(), *args)
    if not settings.multiprocessing_distributed:
        task = slurm_task()
        return main_worker(
            task.local_rank if task else None, settings.processes_per_node(), *args
        )
    nprocs = settings.processes_per_node()
    context = mp.spawn(
        _spawned_worker, nprocs=nprocs, args=(main_worker, nprocs, args), join=False
    )

    # a scheduler may signal this process only
    def forward(signum: int, frame: object) -> None:
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        # the process said why already
        if e.exit_code in (PREEMPTED_EXIT_CODE, 2):
            raise SystemExit(e.exit_code) from None
        how = (
            f"signal {signal.Signals(-e.exit_code).name}"
            if e.exit_code < 0
            else f"status {e.exit_code}"
        )
        print(
            f"error: process {e.error_index} died ({how}); the other processes were "
            "stopped. Resume with --resume auto (or the last checkpoint)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def init_distributed(
    local_rank: int | None, procs_per_node: int, settings: Launch
) -> DistEnv:
    """
    Join the process group of this launch mode and log as this process's rank does;
    returns where this process runs.
    """
    url, slurm = settings.dist_url, None
    if _under_torchrun():
        url = "env://"
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    else:
        task = slurm_task()
        if task:
            url, slurm = slurm_rendezvous(settings, task)
        launchers, launcher_rank = settings._launchers()
        if settings.multiprocessing_distributed:
            world_size = launchers * procs_per_node
            rank = launcher_rank * procs_per_node + (local_rank or 0)
        else:
            world_size, rank = launchers, launcher_rank
    local_rank = local_rank or 0

    if torch.cuda.is_available():
        if procs_per_node > 1 or settings.gpu is None:
            device = torch.device("cuda", local_gpu(local_rank))
        else:
            device = torch.device("cuda", settings.gpu)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if procs_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
            # processes sharing a node's CPUs share its cores, not oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs_per_node))

    if world_size > 1:
        backend = settings.dist_backend
        if device.type == "cpu" and backend == "nccl":
            # nccl needs GPUs
            backend = "gloo"
        dist.init_process_group(
            backend=backend,
            init_method=url,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(seconds=settings.dist_timeout),
        )
    setup_logging(rank)
    return DistEnv(rank, world_size, local_rank, procs_per_node, device, slurm)


def local_gpu(local_rank: int, visible: int | None = None) -> int:
    """
    The GPU index of the process with `local_rank`: its own GPU when the node's GPUs
    are all visible to it, GPU 0 when a scheduler shows each process only its own one
    (CUDA_VISIBLE_DEVICES set per process).
    """
    visible = torch.cuda.device_count() if visible is None else visible
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise UsageError(
        f"process {local_rank} of this node sees {visible} GPUs: give each process "
        "all of the node's GPUs or exactly one (CUDA_VISIBLE_DEVICES)"
    )


def ddp_buffer_option(ddp_init: Callable[..., Any] | None = None) -> str:
    """
    The keyword that stops DistributedDataParallel from broadcasting buffers at each
    forward: `forward_sync_buffers` where the installed torch has it (2.13 and newer,
    which deprecate the other), else `broadcast_buffers`.
    """
    if ddp_init is None:
        ddp_init = torch.nn.parallel.DistributedDataParallel.__init__
    if "forward_sync_buffers" in inspect.signature(ddp_init).parameters:
        return "forward_sync_buffers"
    return "broadcast_buffers"


def wrap_ddp(
    model: torch.nn.Module,
    device: torch.device,
    ddp_init: Callable[..., Any] | None = None,
) -> torch.nn.parallel.DistributedDataParallel:
    """
    `model` in DistributedDataParallel whose buffers are process 0's at the start and
    then never broadcast again: MoCo's queue stays the same on every process by itself,
    and each key encoder keeps its own BatchNorm statistics. ddp_init: the constructor
    whose signature decides the keyword (the installed torch's by default).
    """
    option = ddp_buffer_option(ddp_init)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        **{option: False},  # type: ignore[arg-type]  # a keyword known at run time
    )
    if option == "broadcast_buffers":
        # forward_sync_buffers=False still syncs buffers once; broadcast_buffers=False
        # does not, and the queues of unseeded processes would differ
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return ddp


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every process; nothing to wait for with one."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; the tensor itself with one process."""
    if get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def any_process(flags: torch.Tensor) -> torch.Tensor:
    """
    For each of the `flags` (0 or 1): is it set on any process? In place, on their
    device: nothing waits for the host, which reads the result with its other values.
    """
    if get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def broadcast_object(obj: Any) -> Any:
    """Process 0's obj on every process."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_seed(seed: int | None = None) -> int:
    """`seed`, or a fresh random one, the same on every process (process 0's)."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    return broadcast_object(seed)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """
    The contiguous share of `n` samples that process `rank` evaluates: shares differ by
    at most one and, unlike DistributedSampler's, hold every sample exactly once.
    """
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def broadcast_shares_(tensor: torch.Tensor) -> torch.Tensor:
    """
    Every process's share (shard_range) of the rows of `tensor` written in place on
    every process, from the process that filled it: each process fills its own share
    of a tensor of all the rows, and no second copy of them is made.
    """
    world_size = get_world_size()
    for rank in range(world_size if world_size > 1 else 0):
        share = shard_range(tensor.shape[0], rank, world_size)
        if len(share):
            dist.broadcast(tensor[share.start : share.stop], src=rank)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """
    Every process's `tensor`, whose row counts may differ, concatenated in rank order
    (detections: a few rows each; features, all of one size, use broadcast_shares_).
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    # all_gather needs equal shapes: pad to the longest share, trim afterwards
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, sizes)])


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopSignal:
    """
    SIGTERM / SIGUSR1 (what cluster schedulers send before preemption) set `received`;
    the training step agrees on it across processes, so every rank stops at one step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {
            signum: signal.signal(signum, self._handler) for signum in self.SIGNALS
        }

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handler(self, signum: int, frame: object) -> None:
        if self.received is None:
            logger.warning(
                f"=> received {signal.Signals(signum).name}: stopping after this step"
            )
        self.received = signum


def ignore_stop_signals(worker_id: int = 0) -> None:
    """
    A DataLoader worker's init: the training process alone acts on SIGTERM and
    SIGUSR1. SLURM signals every process of a task, loader workers included, and a
    worker killed by one would end the run before it saves.
    """
    for signum in StopSignal.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
