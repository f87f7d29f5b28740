"""What a process started by SLURM's `srun` takes from its environment.

srun starts the tasks of a job step and tells each one, in SLURM_* variables, its rank
(SLURM_PROCID), its rank on its node (SLURM_LOCALID), the number of tasks and how they
sit on the step's nodes. The batch script and an salloc shell see SLURM_* variables
too, but only a step's tasks have SLURM_STEP_NUM_TASKS: a program started there without
srun runs as it would anywhere else.
"""

import itertools
import os
import re
from dataclasses import dataclass

from moco.utils import UsageError

# the rendezvous port, unless MASTER_PORT gives one: derived from the job id, so that
# every task of a job finds the same one and jobs sharing a node differ; below the
# ports Linux hands out to outgoing connections (32768 and up)
PORT_BASE, PORT_SPAN = 15000, 10000


@dataclass(frozen=True)
class SlurmTask:
    """One task of an srun step, as SLURM describes it."""

    job_id: int
    # how often the job was requeued (SLURM_RESTART_COUNT)
    restarts: int
    rank: int
    local_rank: int
    tasks: int
    tasks_per_node: int
    # the step's nodes in SLURM's compact form, e.g. gpu[01-02]
    nodelist: str

    def rendezvous(self) -> tuple[str, str]:
        """
        tcp://HOST:PORT where the tasks meet: MASTER_ADDR, else the step's first
        node (where task 0 runs); MASTER_PORT, else a port derived from the job id.
        Returns the address and where its parts came from.
        """
        host, host_from = os.environ.get("MASTER_ADDR"), "MASTER_ADDR"
        if not host:
            host, host_from = expand_nodelist(self.nodelist)[0], "the first node"
        port, port_from = os.environ.get("MASTER_PORT"), "MASTER_PORT"
        if port is None:
            port, port_from = str(port_from_job_id(self.job_id)), "the job id's port"
        elif not port.isdigit():
            raise UsageError(f"MASTER_PORT is {port!r}, not a port number")
        return f"tcp://{host}:{port}", f"{host_from}, {port_from}"


def slurm_task() -> SlurmTask | None:
    """This process's srun task, or None where srun did not start it."""
    env = os.environ
    if "SLURM_STEP_NUM_TASKS" not in env:
        return None
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or _required("SLURM_TASKS_PER_NODE")
    counts = tasks_per_node(spec)
    if len(set(counts)) > 1:
        raise UsageError(
            f"srun put {spec} tasks on the nodes (SLURM_STEP_TASKS_PER_NODE), but "
            "every node must run as many processes: ask for --ntasks-per-node"
        )
    return SlurmTask(
        job_id=_number("SLURM_JOB_ID"),
        restarts=int(env.get("SLURM_RESTART_COUNT") or 0),
        rank=_number("SLURM_PROCID"),
        local_rank=_number("SLURM_LOCALID"),
        tasks=_number("SLURM_STEP_NUM_TASKS"),
        tasks_per_node=counts[0],
        nodelist=env.get("SLURM_STEP_NODELIST") or _required("SLURM_JOB_NODELIST"),
    )


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise UsageError(f"an srun task without {name}: is this SLURM's environment?")
    return value


def _number(name: str) -> int:
    value = _required(name)
    if not value.isdigit():
        raise UsageError(f"{name} is {value!r}, not a number")
    return int(value)


def port_from_job_id(job_id: int) -> int:
    """The rendezvous port of a job without MASTER_PORT."""
    return PORT_BASE + job_id % PORT_SPAN


def tasks_per_node(spec: str) -> list[int]:
    """The tasks on each node from SLURM's form: '2(x3),1' is [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not found:
            raise UsageError(f"cannot read SLURM's tasks per node {spec!r}")
        counts += [int(found[1])] * int(found[2] or 1)
    return counts


def expand_nodelist(nodelist: str) -> list[str]:
    """
    The host names of a SLURM node list, in order: 'gpu[01-02,7],login' is gpu01,
    gpu02, gpu7, login; 'r[1-2]n[1-2]' is r1n1, r1n2, r2n1, r2n2. A range's numbers
    have the width of its first number (zero-padded).
    """
    # the names, split at the commas outside brackets
    names = re.findall(r"(?:[^,\[\]]|\[[^\[\]]*\])+", nodelist)
    if not names or ",".join(names) != nodelist:
        raise UsageError(
            f"cannot read the node list {nodelist!r}; set MASTER_ADDR to the address "
            "of the first node"
        )
    hosts = []
    for name in names:
        # literal parts and bracketed ranges alternate: a, 01-02, b, 3, ''
        parts = re.split(r"\[([^\[\]]*)\]", name)
        choices = [
            _expand_ranges(part, nodelist) if i % 2 else [part]
            for i, part in enumerate(parts)
        ]
        hosts += ["".join(p) for p in itertools.product(*choices)]
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """'01-03,7' is 01, 02, 03, 7."""
    numbers = []
    for part in ranges.split(","):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not found or int(found[2] or found[1]) < int(found[1]):
            raise UsageError(
                f"cannot read the range [{ranges}] of the node list {nodelist!r}; set "
                "MASTER_ADDR to the address of the first node"
            )
        first, last = found[1], found[2] or found[1]
        numbers += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return numbers
