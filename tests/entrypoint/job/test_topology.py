"""Topology from each scheduler's environment: one row per case, refusals included."""

from __future__ import annotations

import json

import pytest

from entrypoint.job.schedulers import expand_nodelist
from entrypoint.job.topology import TopologyError, detect
from tests.conftest import llava_bench

# (case, environment, visible GPUs, extra arguments,
#  expected (nnodes, node_rank, nproc_per_node, master_addr, master_port), source contains)
CASES = [
    ("no scheduler, 8 GPUs", {}, 8, {}, (1, 0, 8, "127.0.0.1", 29500), "single node"),
    ("no scheduler, CPU", {}, 0, {}, (1, 0, 1, "127.0.0.1", 29500), "single node"),
    (
        "seed convention: WORLD_SIZE counts nodes",
        {"WORLD_SIZE": "4", "RANK": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"},
        8,
        {},
        (4, 2, 8, "10.0.0.1", 23456),
        "WORLD_SIZE/RANK (nodes)",
    ),
    (
        "WORLD_SIZE with LOCAL_WORLD_SIZE counts processes",
        {"WORLD_SIZE": "32", "RANK": "17", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "h0", "MASTER_PORT": "29400"},
        8,
        {},
        (4, 2, 8, "h0", 29400),
        "processes",
    ),
    (
        "--world-size-means processes with LOCAL_WORLD_SIZE",
        {"WORLD_SIZE": "16", "RANK": "8", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "h0"},
        8,
        {"world_size_means": "processes"},
        (2, 1, 8, "h0", 29500),
        "processes",
    ),
    (
        "--world-size-means processes with NPROC_PER_NODE",
        {"WORLD_SIZE": "16", "RANK": "8", "NPROC_PER_NODE": "8", "MASTER_ADDR": "h0"},
        8,
        {"world_size_means": "processes"},
        (2, 1, 8, "h0", 29500),
        "processes",
    ),
    (
        "--world-size-means processes with --nproc-per-node",
        {"WORLD_SIZE": "16", "RANK": "12", "MASTER_ADDR": "h0"},
        8,
        {"world_size_means": "processes", "nproc_per_node": 4},
        (4, 3, 4, "h0", 29500),
        "processes",
    ),
    (
        "SLURM with a WORLD_SIZE that counts its processes",
        {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "a,b", "WORLD_SIZE": "16"},
        8,
        {},
        (2, 1, 8, "a", 29500),
        "SLURM",
    ),
    (
        "explicit variables win over the scheduler",
        {
            "NNODES": "2",
            "NODE_RANK": "1",
            "ADDR": "master",
            "PORT": "30000",
            "NPROC_PER_NODE": "4",
            "SLURM_NNODES": "2",
            "SLURM_NODEID": "1",
            "SLURM_JOB_NODELIST": "gpu[01-02]",
        },
        8,
        {},
        (2, 1, 4, "master", 30000),
        "explicit",
    ),
    (
        "explicit NNODES, master address from SLURM",
        {"NNODES": "2", "NODE_RANK": "0", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]"},
        8,
        {},
        (2, 0, 8, "gpu07", 29500),
        "explicit",
    ),
    (
        "Kubeflow PyTorchJob: WORLD_SIZE = pods x processes",
        {
            "PET_NNODES": "4",
            "PET_NPROC_PER_NODE": "8",
            "PET_NODE_RANK": "3",
            "WORLD_SIZE": "32",
            "RANK": "3",
            "MASTER_ADDR": "job-master-0",
            "MASTER_PORT": "23456",
        },
        8,
        {},
        (4, 3, 8, "job-master-0", 23456),
        "PyTorchJob",
    ),
    (
        "PyTorchJob with a fixed elastic range 2:2",
        {
            "PET_NNODES": "2:2",
            "PET_NODE_RANK": "1",
            "PET_NPROC_PER_NODE": "auto",
            "MASTER_ADDR": "m",
            "MASTER_PORT": "1234",
        },
        8,
        {},
        (2, 1, 8, "m", 1234),
        "PyTorchJob",
    ),
    (
        "SLURM with a zero-padded bracketed node list",
        {"SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "node[008-010],login"},
        8,
        {},
        (4, 3, 8, "node008", 29500),
        "SLURM",
    ),
    (
        "SLURM with MASTER_ADDR set by the batch script",
        {
            "SLURM_NNODES": "2",
            "SLURM_NODEID": "1",
            "SLURM_JOB_NODELIST": "a,b",
            "MASTER_ADDR": "b",
            "MASTER_PORT": "4000",
        },
        4,
        {},
        (2, 1, 4, "b", 4000),
        "SLURM",
    ),
    (
        "OpenMPI, one appliance per node",
        {
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
            "MASTER_ADDR": "h1",
        },
        8,
        {},
        (2, 1, 8, "h1", 29500),
        "OpenMPI",
    ),
    (
        "Volcengine MLP",
        {
            "MLP_WORKER_NUM": "4",
            "MLP_ROLE_INDEX": "2",
            "MLP_WORKER_0_HOST": "10.1.1.1",
            "MLP_WORKER_0_PORT": "9000",
            "MLP_WORKER_GPU": "8",
        },
        8,
        {},
        (4, 2, 8, "10.1.1.1", 9000),
        "Volcengine",
    ),
    (
        "ModelArts",
        {"VC_WORKER_NUM": "2", "VC_TASK_INDEX": "1", "VC_WORKER_HOSTS": "w0.svc,w1.svc"},
        8,
        {},
        (2, 1, 8, "w0.svc", 29500),
        "ModelArts",
    ),
    (
        "ModelArts with MA_NUM_HOSTS",
        {"MA_NUM_HOSTS": "2", "VC_TASK_INDEX": "0", "VC_WORKER_HOSTS": "w0,w1", "MASTER_PORT": "6000"},
        8,
        {},
        (2, 0, 8, "w0", 6000),
        "ModelArts",
    ),
    (
        "ModelArts with MA_NUM_GPUS and no GPU visible",
        {"VC_WORKER_NUM": "2", "VC_TASK_INDEX": "0", "VC_WORKER_HOSTS": "w0,w1", "MA_NUM_GPUS": "8"},
        0,
        {},
        (2, 0, 8, "w0", 29500),
        "ModelArts",
    ),
    (
        "SageMaker",
        {"SM_HOSTS": '["algo-2", "algo-1"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "8"},
        8,
        {},
        (2, 1, 8, "algo-1", 29500),
        "SageMaker",
    ),
    (
        "--nproc-per-node overrides the GPU count",
        {},
        8,
        {"nproc_per_node": 2},
        (1, 0, 2, "127.0.0.1", 29500),
        "single node",
    ),
]


@pytest.mark.parametrize("case, env, gpus, extra, expected, source", CASES, ids=[c[0] for c in CASES])
def test_each_scheduler(case, env, gpus, extra, expected, source):
    topology = detect(env, gpus, **extra)
    got = (topology.nnodes, topology.node_rank, topology.nproc_per_node, topology.master_addr, topology.master_port)
    assert got == expected
    assert source in topology.source
    assert set(topology.origins) >= {"nnodes", "master_addr", "master_port", "nproc_per_node"}


REFUSALS = [
    ("multi-node without master address", {"WORLD_SIZE": "2", "RANK": "1"}, {}, "no master address"),
    ("SLURM multi-node without a node list", {"SLURM_NNODES": "2", "SLURM_NODEID": "0"}, {}, "MASTER_ADDR"),
    ("node rank out of range", {"NNODES": "2", "NODE_RANK": "2", "ADDR": "h"}, {}, "not below the node count 2"),
    ("multi-node without node rank", {"NNODES": "2", "ADDR": "h"}, {}, "no node rank"),
    ("non-numeric NNODES", {"NNODES": "two"}, {}, "NNODES='two'"),
    ("non-numeric port", {"MASTER_PORT": "http", "WORLD_SIZE": "1"}, {}, "MASTER_PORT='http'"),
    ("port out of range", {"NNODES": "1", "PORT": "70000"}, {}, "not a usable master port"),
    ("the store's port out of range", {"MASTER_PORT": "65535", "WORLD_SIZE": "1"}, {}, "1-65534"),
    ("negative rank", {"NNODES": "2", "NODE_RANK": "-1", "ADDR": "h"}, {}, "at least 0"),
    (
        "PET_* contradict WORLD_SIZE",
        {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "0", "WORLD_SIZE": "16", "MASTER_ADDR": "m"},
        {},
        "contradicts",
    ),
    ("elastic node range", {"PET_NNODES": "1:4", "MASTER_ADDR": "m"}, {}, "elastic"),
    (
        "SLURM and OpenMPI disagree",
        {
            "SLURM_NNODES": "2",
            "SLURM_NODEID": "0",
            "SLURM_JOB_NODELIST": "a,b",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
        },
        {},
        "SLURM says nnodes=2",
    ),
    (
        "OpenMPI with several processes per node",
        {"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"},
        {},
        "once per node",
    ),
    (
        "node list shorter than SLURM_NNODES",
        {"SLURM_NNODES": "3", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]"},
        {},
        "names 2 hosts",
    ),
    (
        "WORLD_SIZE as processes without per-node count",
        {"WORLD_SIZE": "16", "MASTER_ADDR": "m"},
        {"world_size_means": "processes"},
        "LOCAL_WORLD_SIZE",
    ),
    ("SageMaker host missing from the list", {"SM_HOSTS": '["a"]', "SM_CURRENT_HOST": "b"}, {}, "not in SM_HOSTS"),
    ("SageMaker hosts not JSON", {"SM_HOSTS": "a,b", "SM_CURRENT_HOST": "a"}, {}, "JSON list"),
    ("bad --world-size-means", {}, {"world_size_means": "gpus"}, "nodes' or 'processes"),
    (
        "SLURM and a WORLD_SIZE that counts neither its nodes nor its processes",
        {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "a,b", "WORLD_SIZE": "4"},
        {},
        "WORLD_SIZE=4 contradicts SLURM: 2 node(s) x 8 process(es)",
    ),
    (
        "SLURM and a WORLD_SIZE read as nodes that counts processes",
        {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "a,b", "WORLD_SIZE": "16"},
        {"world_size_means": "nodes"},
        "WORLD_SIZE=16 contradicts SLURM",
    ),
]


@pytest.mark.parametrize("case, env, extra, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_variables(case, env, extra, words):
    with pytest.raises(TopologyError, match=None) as refused:
        detect(env, 8, **extra)
    assert words in str(refused.value)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),
        ("a[1,3-4],b-7,c[09]", ["a1", "a3", "a4", "b-7", "c09"]),
        ("rack1-n[1-2]-ib", ["rack1-n1-ib", "rack1-n2-ib"]),
    ],
)
def test_slurm_node_lists(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[3-1]", "gpu[a-b]", "gpu[x]"])
def test_bad_slurm_node_lists_are_refused(bad):
    with pytest.raises(TopologyError):
        expand_nodelist(bad)


def test_topology_command_shows_what_run_launches_on_this_cpu_machine():
    """What `run` would do here: one CPU process on a free port, XTuner's train.py with
    --launcher none (no torchrun, no DeepSpeed)."""
    done = llava_bench("topology", "--json", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert (decision["nnodes"], decision["nproc_per_node"]) == (1, 1)
    assert decision["origins"]["master_port"] == f"free port {decision['master_port']}"
    command = decision["launch_command"]
    assert (
        command[-2:] == ["--launcher", "none"]
        and "--deepspeed" not in command
        and "torch.distributed.run" not in command
    )


def test_topology_previews_a_multi_node_reading_on_a_machine_without_gpus():
    """A login node has no GPU: the reading is shown, with what `run` would refuse here;
    --gpus previews the launch on the training nodes."""
    env = {
        "WORLD_SIZE": "4",
        "RANK": "2",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": "23456",
        "NPROC_PER_NODE": "8",
        "PATH": "/usr/bin:/bin",
    }
    done = llava_bench("topology", "--json", env=env)
    assert done.returncode == 0, done.stderr
    reading = json.loads(done.stdout)
    assert (reading["nnodes"], reading["node_rank"], reading["nproc_per_node"]) == (4, 2, 8)
    assert reading["launch_command"] is None and "4 node(s) x 8 process(es) on CPU" in reading["run_here"]["problem"]
    done = llava_bench("topology", "--json", "--gpus", "8", env=env)
    assert done.returncode == 0, done.stderr
    preview = json.loads(done.stdout)
    assert (preview["gpus"], preview["gpus_from"]) == (8, "--gpus")
    assert "torch.distributed.run" in preview["launch_command"] and "--deepspeed" in preview["launch_command"]
    assert "--nnodes" in preview["launch_command"] and "0 GPU(s) visible here" in preview["run_here"]["problem"]
    text = llava_bench("topology", env=env)
    assert text.returncode == 0 and "run here would refuse: 4 node(s) x 8 process(es) on CPU" in text.stdout


@pytest.mark.parametrize("case, env, gpus, extra, expected, source", CASES, ids=[c[0] for c in CASES])
def test_the_topology_command_reads_every_scheduler_on_a_cpu_machine(case, env, gpus, extra, expected, source):
    """The table above through the command, in process (typer's runner): `--gpus N` gives
    this GPU-less machine the case's GPUs."""
    from typer.testing import CliRunner

    from entrypoint.cli.app import app

    options = [f"--{name.replace('_', '-')}={value}" for name, value in extra.items()]
    done = CliRunner().invoke(
        app, ["topology", "--json", *options, *(["--gpus", str(gpus)] if gpus else [])], env=env, catch_exceptions=False
    )
    assert done.exit_code == 0, done.output
    reading = json.loads(done.stdout)
    got = (reading["nnodes"], reading["node_rank"], reading["nproc_per_node"], reading["master_addr"])
    assert got == expected[:4] and source in reading["source"]
    assert reading["master_port"] == expected[4] or reading["nnodes"] == 1  # one node: a free port


def test_topology_command_refuses_with_exit_2_and_the_reason_on_stderr():
    done = llava_bench("topology", "--json", env={"NNODES": "2", "NODE_RANK": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "master address" in done.stderr
    assert done.stdout == ""


class RecordingEnv(dict):
    """An environment that notes every variable a reader looks up."""

    def __init__(self, values: dict):
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)

    def __contains__(self, name):
        self.read.add(name)
        return super().__contains__(name)


EVERY_SCHEDULER = {
    **{name: "2" for name in ("PET_NNODES", "PET_NPROC_PER_NODE", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")},
    **{name: "2" for name in ("OMPI_COMM_WORLD_SIZE", "MLP_WORKER_NUM", "MLP_WORKER_GPU", "VC_WORKER_NUM")},
    **{name: "2" for name in ("MA_NUM_HOSTS", "MA_NUM_GPUS", "SM_NUM_GPUS")},
    "WORLD_SIZE": "4",
    **{name: "1" for name in ("SLURM_NODEID", "OMPI_COMM_WORLD_RANK", "MLP_ROLE_INDEX", "VC_TASK_INDEX", "RANK")},
    "PET_NODE_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_NODELIST": "gpu[01-02]",
    "VC_WORKER_HOSTS": "a,b",
    "SM_HOSTS": '["a", "b"]',
    "SM_CURRENT_HOST": "b",
    "MLP_WORKER_0_HOST": "a",
    "MLP_WORKER_0_PORT": "23456",
    "PET_MASTER_ADDR": "a",
    "PET_MASTER_PORT": "23456",
}


@pytest.mark.parametrize("master", [{"MASTER_ADDR": "a", "MASTER_PORT": "23456"}, {}])
def test_each_scheduler_declares_every_variable_its_reader_reads(master):
    """RANK_VARIABLES (what `make run` passes into the container) is built from these
    declarations, so a variable read but not declared would never reach the appliance."""
    from entrypoint.job.schedulers import SCHEDULERS
    from entrypoint.job.topology import RANK_VARIABLES

    for scheduler in SCHEDULERS:
        env = RecordingEnv({**EVERY_SCHEDULER, **master})
        assert scheduler.read(env) is not None, scheduler.name
        assert env.read <= set(scheduler.variables), (scheduler.name, env.read - set(scheduler.variables))
        assert set(scheduler.variables) <= set(RANK_VARIABLES)
