"""SLURM: srun launches every process, and a job signalled before its time limit is
requeued and ends as if never stopped, on a real controller and compute daemon."""

import os
import random
import re
import shutil
import socket
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
from conftest import (
    PYTHON,
    REPO,
    RESUME_EPOCHS,
    TINY,
    assert_same_state,
    free_port,
    load,
    moco_args,
)
from test_robustness import epoch_averages

import main_moco
from moco.cli import run_cli
from moco.distributed import Launch, init_distributed
from moco.slurm import expand_nodelist
from moco.utils import UsageError

TEMPLATE = os.path.join(REPO, "tools", "slurm", "pretrain.sbatch")


@pytest.fixture
def srun_env(monkeypatch):
    """Sets the environment of an srun task (keyword: variable's value, None: unset)."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "MASTER_")) or name in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
        ):
            monkeypatch.delenv(name)

    def set_env(**values):
        task = {
            "SLURM_JOB_ID": "4242",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2",
            "SLURM_STEP_NODELIST": "gpu[07-08]",
            **values,
        }
        for name, value in task.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return set_env


@pytest.fixture
def process_group(monkeypatch):
    """Records the process group init_distributed would join, instead of joining it."""
    joined = {}

    def record(backend, init_method, world_size, rank, timeout):
        joined.update(url=init_method, world_size=world_size, rank=rank)

    monkeypatch.setattr(dist, "init_process_group", record)
    return joined


NODE_LISTS = {
    "vm": ["vm"],
    "gpu[01-03,07],login1": ["gpu01", "gpu02", "gpu03", "gpu07", "login1"],
    "node[8-10]": ["node8", "node9", "node10"],
    "n[001-3]": ["n001", "n002", "n003"],
    "r[1-2]n[01-02]": ["r1n01", "r1n02", "r2n01", "r2n02"],
}


def test_node_lists_expand_as_slurm_writes_them(tmp_path):
    for nodelist, hosts in NODE_LISTS.items():
        assert expand_nodelist(nodelist) == hosts, nodelist
    if shutil.which("scontrol"):
        # and as SLURM's own parser expands them (it needs a configuration, no daemon)
        conf = tmp_path / "slurm.conf"
        conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")
        for nodelist, hosts in NODE_LISTS.items():
            shown = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                env={**os.environ, "SLURM_CONF": str(conf)},
            ).stdout.split()
            assert shown == hosts, nodelist


@pytest.mark.parametrize(
    "nodelist", ["", "node[1-", "node[3-1]", "node[a]", "a]", "gpu[1-2],,cpu1"]
)
def test_an_unreadable_node_list_is_refused_in_one_line(nodelist):
    with pytest.raises(UsageError) as e:
        expand_nodelist(nodelist)
    message = str(e.value)
    assert f"{nodelist!r}" in message and "MASTER_ADDR" in message
    assert "\n" not in message


def test_srun_tasks_are_the_processes_with_slurms_ranks_and_rendezvous(
    srun_env, process_group
):
    # 2 nodes x 2 tasks, distributed cyclically: task 1 is node 1's first task; port
    # 15000 + job id % 10000 (docs/slurm.md)
    srun_env(
        SLURM_JOB_ID="1234567",
        SLURM_PROCID="1",
        SLURM_LOCALID="0",
        SLURM_STEP_NUM_TASKS="4",
        SLURM_STEP_TASKS_PER_NODE="2(x2)",
    )
    settings = Launch()
    assert settings.processes_per_node() == 2 and settings.total_processes() == 4
    env = init_distributed(0, 2, settings)
    assert process_group == {"url": "tcp://gpu07:19567", "world_size": 4, "rank": 1}
    assert (env.rank, env.world_size, env.local_rank) == (1, 4, 0)
    assert env.slurm == (
        "slurm: job 1234567, task 1 of 4, 2 per node; rendezvous tcp://gpu07:19567 "
        "(the first node, the job id's port)"
    )
    # MASTER_ADDR and MASTER_PORT where set, --dist-url where given; the times the
    # job was requeued
    srun_env(MASTER_ADDR="10.0.0.7", MASTER_PORT="29400", SLURM_RESTART_COUNT="2")
    env = init_distributed(0, 2, settings)
    assert process_group["url"] == "tcp://10.0.0.7:29400"
    assert env.slurm.startswith("slurm: job 4242 (requeued 2x), task 0 of 2,")
    assert env.slurm.endswith("(MASTER_ADDR, MASTER_PORT)")
    init_distributed(0, 2, Launch(dist_url="tcp://head:1234"))
    assert process_group["url"] == "tcp://head:1234"


def test_srun_tasks_shown_one_gpu_each_take_that_gpu(
    srun_env, process_group, monkeypatch
):
    # srun --ntasks-per-node=4 --gpus-per-task=1: SLURM sets CUDA_VISIBLE_DEVICES per
    # task, so each of the node's 4 processes sees exactly one GPU
    srun_env(
        SLURM_PROCID="2",
        SLURM_LOCALID="2",
        SLURM_STEP_NUM_TASKS="4",
        SLURM_STEP_TASKS_PER_NODE="4",
        CUDA_VISIBLE_DEVICES="2",
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    settings = Launch()
    settings.check(batch_size=256)  # accepted: 4 processes, one GPU each
    env = init_distributed(2, 4, settings)
    assert env.device == torch.device("cuda", 0) and process_group["rank"] == 2
    # without CUDA_VISIBLE_DEVICES, 4 tasks would share the one GPU they see
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(UsageError, match="4 processes per node but only 1 GPUs"):
        settings.check(batch_size=256)


def test_srun_with_a_task_per_node_spawns_the_processes_of_each_node(
    srun_env, process_group
):
    # the original's launch under srun: 2 nodes, a task on each, 2 processes spawned
    srun_env(SLURM_PROCID="1", SLURM_STEP_TASKS_PER_NODE="1(x2)")
    settings = Launch(multiprocessing_distributed=True, procs_per_node=2)
    assert settings.processes_per_node() == 2 and settings.total_processes() == 4
    settings.check(batch_size=8)
    for local_rank in (0, 1):
        env = init_distributed(local_rank, 2, settings)
        assert process_group["world_size"] == 4
        assert process_group["rank"] == env.rank == 2 + local_rank
    assert ", 1 per node, each spawning 2 processes;" in env.slurm


def test_torchrun_inside_an_allocation_and_the_batch_script_itself(
    srun_env, process_group
):
    # torchrun started by srun on each node: its variables decide
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    srun_env(SLURM_STEP_TASKS_PER_NODE="1(x2)", LOCAL_WORLD_SIZE="4", **torchrun)
    settings = Launch()
    assert settings.processes_per_node() == 4 and settings.total_processes() == 8
    env = init_distributed(1, 4, settings)
    assert process_group == {"url": "env://", "world_size": 8, "rank": 5}
    assert env.slurm is None
    # the batch script has SLURM_PROCID and SLURM_NTASKS but is no srun task: a
    # program started there without srun runs alone
    srun_env(
        SLURM_STEP_NUM_TASKS=None,
        SLURM_NTASKS="2",
        SLURM_TASKS_PER_NODE="2",
        **dict.fromkeys(torchrun),
    )
    assert Launch().total_processes() == 1
    assert init_distributed(None, 1, Launch()).slurm is None


@pytest.mark.parametrize(
    "task, extra, message",
    [
        (
            {"SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "3"},
            [],
            "-b 8 (the batch of one node) does not split evenly over its 3 processes",
        ),
        (
            {"SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"},
            [],
            "srun put 2(x3),1 tasks on the nodes",
        ),
        (
            {"SLURM_STEP_NODELIST": "gpu[07-"},
            [],
            "cannot read the node list 'gpu[07-'",
        ),
        ({}, ["--rank", "1"], "--rank 1 disagrees with srun's SLURM_PROCID 0"),
        (
            {},
            ["--world-size", "1"],
            "--world-size 1 disagrees with srun's SLURM_STEP_NUM_TASKS 2",
        ),
        (
            {},
            ["--multiprocessing-distributed"],
            "srun started 2 tasks on this node and --multiprocessing-distributed",
        ),
    ],
)
def test_launch_flags_and_slurm_jobs_that_cannot_work_are_refused_in_one_line(
    srun_env, image_folder, tmp_path, task, extra, message
):
    srun_env(**task)
    # were it not refused, the rendezvous would fail after 5 s instead of hanging
    extra = [*extra, "--dist-timeout", "5"]
    with pytest.raises(UsageError) as e:
        main_moco.main(moco_args(image_folder, tmp_path / "out", *extra))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_a_refused_slurm_job_exits_with_status_2_and_one_line(
    srun_env, image_folder, tmp_path, monkeypatch, capsys
):
    srun_env(SLURM_STEP_NODELIST="gpu[07-")
    argv = [image_folder, *TINY, "--output-dir", tmp_path]
    monkeypatch.setattr("sys.argv", ["main_moco.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_cli(main_moco.main, main_moco.get_args_parser())
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: cannot read the node list")


# the real thing: munged, slurmctld and slurmd on this machine
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
PORT_BASE, PORT_SPAN = 15000, 10000  # the rendezvous port: 15000 + job id % 10000


class Cluster:
    """A one-node SLURM cluster of this machine, its files in `root`."""

    def __init__(self, root, node, first_job_id):
        self.root, self.node, self.first_job_id = root, node, first_job_id
        # nothing of an enclosing SLURM job (where the suite runs in one) leaks in
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MASTER_"))
        }
        self.env["SLURM_CONF"] = str(root / "slurm.conf")

    def run(self, *argv, **env):
        """A SLURM command's output; `env`: variables added to the environment."""
        done = subprocess.run(
            argv,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        return done.stdout

    def job(self, job_id):
        """The job's fields as `scontrol show job` gives them."""
        line = self.run("scontrol", "--oneliner", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def quietly(self, *argv):
        """A SLURM command's output, empty where it fails."""
        done = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=60
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    def idle(self):
        return self.quietly("sinfo", "--noheader", "--format=%T") == "idle"


def _write_configuration(root, node, first_job_id):
    munge = root / "munge"
    munge.mkdir()
    munge.chmod(0o755)  # munged: the socket's folder must be searchable by all
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for d in ("state", "spool"):
        (root / d).mkdir()
    (root / "slurm.conf").write_text(f"""ClusterName=moco-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds (at least 5; default 120) before it starts
AuthInfo=socket={munge}/munge.socket,cred_expire=5
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
FirstJobId={first_job_id}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return [
        [
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={munge}/munge.socket",
            f"--pid-file={munge}/munged.pid",
            f"--seed-file={munge}/munged.seed",
        ],
        ["slurmctld", "-D", "-c", "-i"],
        ["slurmd", "-D", "-N", node],
    ]


def _free_job_id():
    """A first job id whose rendezvous port is free, outside the tests' port blocks."""
    for job_id in random.Random().sample(range(1, 5000), 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", PORT_BASE + job_id % PORT_SPAN))
            except OSError:
                continue
            return job_id
    raise RuntimeError("no free port in 15001-19999")


def _why_no_slurm():
    """Why SLURM's daemons cannot be started here, or ''."""
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing; Debian: apt-get "
            "install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "starting SLURM's daemons needs root"
    return ""


# decided before any fixture: the reference run is not made for a skipped test
needs_slurm = pytest.mark.skipif(bool(_why_no_slurm()), reason=_why_no_slurm())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]
    cluster = Cluster(root, node, _free_job_id())
    daemons = []
    try:
        for argv in _write_configuration(root, node, cluster.first_job_id):
            log = open(root / f"{argv[0]}.log", "w")
            daemons.append(
                subprocess.Popen(
                    argv, env=cluster.env, stdout=log, stderr=subprocess.STDOUT
                )
            )
            log.close()
            if argv[0] == "munged":
                _wait(lambda: (root / "munge" / "munge.socket").exists(), 10)
        if not _wait(cluster.idle, 30):
            logs = {p.args[0]: (root / f"{p.args[0]}.log").read_text() for p in daemons}
            pytest.skip(f"SLURM did not start here: {_last_error(logs)}")
        yield cluster
    finally:
        # the jobs first, then the daemons that run them
        if daemons:
            cluster.quietly("scancel", "--user=root")
            _wait(lambda: not cluster.quietly("squeue", "--noheader"), 30)
        for p in reversed(daemons):
            p.terminate()
        for p in reversed(daemons):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(condition, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def _last_error(logs):
    lines = [
        f"{name}: {line}"
        for name, text in logs.items()
        for line in text.splitlines()
        if "error" in line.lower() or "fatal" in line.lower()
    ]
    return lines[-1] if lines else "no node became idle within 30 s"


# the states of a job that will not run again
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _wait_for_text(path, needle, cluster, job_id, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return
        if cluster.job(job_id)["JobState"] in ENDED:
            break
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} never printed:\n{text}")


@needs_slurm
def test_a_job_signalled_before_its_time_limit_is_requeued_and_ends_as_if_never_stopped(
    cluster, two_process_run, tmp_path
):
    data, reference, _ = two_process_run
    out, log = tmp_path / "out", tmp_path / "job.out"
    # the template on one node of 2 CPUs: 2 tasks, no GPU; the reference run's
    # arguments, with loader workers (SLURM signals every process of a task)
    job_id = cluster.run(
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--time=10",
        f"--output={log}",
        f"--chdir={REPO}",
        TEMPLATE,
        data,
        *TINY,
        "-j",
        "2",
        "--epochs",
        str(RESUME_EPOCHS),
        "--output-dir",
        str(out),
        "--save-freq",
        "1",
        "--dist-timeout",
        "60",
        PYTHON=PYTHON,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    ).strip()
    assert int(job_id) == cluster.first_job_id
    _wait_for_text(log, "Epoch: [0][0/3]", cluster, job_id)
    # what --signal=USR1@300 does 5 minutes before the time limit: every task's
    # processes get SIGUSR1 (the batch script does not)
    cluster.run("scancel", "--signal=USR1", job_id)
    deadline = time.time() + 240
    while cluster.job(job_id)["JobState"] not in ENDED:
        assert time.time() < deadline, log.read_text()
        time.sleep(0.5)
    job, text = cluster.job(job_id), log.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == (
        "COMPLETED",
        "0:0",
        "1",
    ), text

    # the tasks' ranks and the rendezvous came from SLURM; the first run started from
    # scratch and stopped, the requeued one said where it continued from
    port = PORT_BASE + int(job_id) % PORT_SPAN
    where = (
        f"rendezvous tcp://{cluster.node}:{port} (the first node, the job id's port)"
    )
    stopped = re.search(r"stopped by a signal at epoch (\d) step (\d)", text)
    assert stopped, text
    epoch, step = map(int, stopped.groups())
    resumed = (
        f"{out}/checkpoint_last.pth.tar' (epoch {epoch}, step {step})"
        if step < 3
        else f"{out}/checkpoint_{epoch:04d}.pth.tar' (epoch {epoch + 1}, step 0)"
    )
    lines = [
        f"=> no checkpoint in '{out}' yet: starting from scratch",
        f"=> slurm: job {job_id}, task 0 of 2, 2 per node; {where}",
        stopped[0],
        f"=> loaded checkpoint '{resumed}",
        f"=> slurm: job {job_id} (requeued 1x), task 0 of 2, 2 per node; {where}",
    ]
    assert all(text.count(line) == 1 for line in lines), text
    assert sorted(lines, key=text.index) == lines, text

    final = f"checkpoint_{RESUME_EPOCHS - 1:04d}.pth.tar"
    assert_same_state(load(reference / final), load(out / final))
    assert epoch_averages(out) == epoch_averages(reference)
