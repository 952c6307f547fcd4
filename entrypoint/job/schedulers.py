"""What each scheduler's environment says about the job, one reader per convention
(PyTorchJob, SLURM, OpenMPI, Volcengine MLP, ModelArts, SageMaker): docs/TOPOLOGY.md.
A reader returns what its variables say, or None where they are absent; detect()
(entrypoint/job/topology.py) reconciles them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


class TopologyError(ValueError):
    """The environment does not describe one consistent job."""


@dataclass(frozen=True)
class Reading:
    """What one convention says; None where it says nothing."""

    source: str
    nnodes: int | None = None
    node_rank: int | None = None
    nproc_per_node: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    world_size_reading: str | None = None
    origins: dict[str, str] = field(default_factory=dict)
    # The convention reads WORLD_SIZE itself (or its values override it): detect()
    # then does not hold a WORLD_SIZE beside it against what it says.
    accounts_for_world_size: bool = False


def read_int(env: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise TopologyError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise TopologyError(f"{name}={raw!r} must be at least {minimum}")
    return value


def first_set(env: Mapping[str, str], *names: str) -> tuple[str, str] | tuple[None, None]:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None, None


# The nodes' agreement store (entrypoint/job/agreement.py) listens on the master port plus this.
STORE_PORT_OFFSET = 1
HIGHEST_MASTER_PORT = 65535 - STORE_PORT_OFFSET


def read_port(env: Mapping[str, str], *names: str) -> tuple[int | None, str | None]:
    for name in names:
        value = read_int(env, name, minimum=1)
        if value is not None:
            if value > HIGHEST_MASTER_PORT:
                raise TopologyError(
                    f"{name}={value} is not a usable master port (1-{HIGHEST_MASTER_PORT}: the nodes' agreement store "
                    "listens on the port after it)"
                )
            return value, f"{name}={value}"
    return None, None


def origins_of(**entries: tuple[object, str | None]) -> dict[str, str]:
    """value name -> where it came from, for the values a reading found."""
    return {name: origin for name, (value, origin) in entries.items() if value is not None and origin}


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, e.g. ``gpu[001-003,7],login-a`` -> hosts in order.

    Written here rather than calling ``scontrol`` (absent in containers); zero padding
    of ranges is kept (``[08-10]`` -> 08, 09, 10).
    """
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                low, high = part.split("-", 1)
                if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
                    raise TopologyError(f"SLURM_JOB_NODELIST={nodelist!r}: bad range {part!r}")
                width = len(low)
                hosts += [f"{prefix}{number:0{width}d}{suffix}" for number in range(int(low), int(high) + 1)]
            elif part.isdigit():
                hosts.append(prefix + part + suffix)
            else:
                raise TopologyError(f"SLURM_JOB_NODELIST={nodelist!r}: bad entry {part!r}")
    if not hosts:
        raise TopologyError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def _pytorchjob(env) -> Reading | None:
    """Kubeflow PyTorchJob >= 1.9: PET_* describe the job; WORLD_SIZE counts processes."""
    if not any(name.startswith("PET_") for name in env):
        return None
    raw_nnodes = env.get("PET_NNODES", "")
    if ":" in raw_nnodes:  # elastic min:max
        low, _, high = raw_nnodes.partition(":")
        if low != high:
            raise TopologyError(
                f"PET_NNODES={raw_nnodes!r} is an elastic range; the benchmark needs a fixed node count"
            )
        env = {**env, "PET_NNODES": low}
    nnodes = read_int(env, "PET_NNODES", 1)
    nproc = (
        None
        if env.get("PET_NPROC_PER_NODE", "").strip() in ("", "auto", "gpu")
        else read_int(env, "PET_NPROC_PER_NODE", 1)
    )
    node_rank = read_int(env, "PET_NODE_RANK")
    if node_rank is None and nproc is not None and read_int(env, "RANK") is not None:
        node_rank = read_int(env, "RANK") // nproc
    addr_name, addr = first_set(env, "PET_MASTER_ADDR", "MASTER_ADDR")
    port, port_origin = read_port(env, "PET_MASTER_PORT", "MASTER_PORT")
    world_size = read_int(env, "WORLD_SIZE", 1)
    if world_size is not None and nnodes is not None and nproc is not None and world_size != nnodes * nproc:
        raise TopologyError(
            f"WORLD_SIZE={world_size} contradicts PET_NNODES={nnodes} x PET_NPROC_PER_NODE={nproc}; "
            "fix the job spec or set NNODES/NODE_RANK/NPROC_PER_NODE explicitly"
        )
    origins = origins_of(
        nnodes=(nnodes, f"PET_NNODES={nnodes}"),
        node_rank=(
            node_rank,
            ("PET_NODE_RANK" if "PET_NODE_RANK" in env else "RANK // PET_NPROC_PER_NODE") + f"={node_rank}",
        ),
        nproc_per_node=(nproc, f"PET_NPROC_PER_NODE={nproc}"),
        master_addr=(addr, f"{addr_name}={addr}"),
        master_port=(port, port_origin),
    )
    return Reading(
        "Kubeflow PyTorchJob (PET_*)",
        nnodes,
        node_rank,
        nproc,
        addr,
        port,
        "processes" if world_size else None,
        origins,
        accounts_for_world_size=True,
    )


def _slurm(env) -> Reading | None:
    nnodes = read_int(env, "SLURM_NNODES", 1) or read_int(env, "SLURM_JOB_NUM_NODES", 1)
    if nnodes is None:
        return None
    node_rank = read_int(env, "SLURM_NODEID")
    addr_name, addr = first_set(env, "MASTER_ADDR")
    addr_origin = f"MASTER_ADDR={addr}"
    if not addr:
        list_name, nodelist = first_set(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nodelist:
            hosts = expand_nodelist(nodelist)
            if len(hosts) != nnodes:
                raise TopologyError(f"{list_name}={nodelist!r} names {len(hosts)} hosts but SLURM_NNODES={nnodes}")
            addr, addr_origin = hosts[0], f"first host of {list_name}={nodelist}"
    port, port_origin = read_port(env, "MASTER_PORT")
    origins = origins_of(
        nnodes=(nnodes, f"SLURM_NNODES={nnodes}"),
        node_rank=(node_rank, f"SLURM_NODEID={node_rank}"),
        master_addr=(addr, addr_origin),
        master_port=(port, port_origin),
    )
    return Reading("SLURM", nnodes, node_rank, None, addr, port, origins=origins)


def _openmpi(env) -> Reading | None:
    size = read_int(env, "OMPI_COMM_WORLD_SIZE", 1)
    if size is None:
        return None
    local_size = read_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
    if local_size not in (None, 1):
        raise TopologyError(
            f"OMPI_COMM_WORLD_LOCAL_SIZE={local_size}: start the appliance once per node "
            "(mpirun --map-by ppr:1:node); it starts one process per GPU itself"
        )
    node_rank = read_int(env, "OMPI_COMM_WORLD_RANK")
    addr_name, addr = first_set(env, "MASTER_ADDR")
    port, port_origin = read_port(env, "MASTER_PORT")
    origins = origins_of(
        nnodes=(size, f"OMPI_COMM_WORLD_SIZE={size}"),
        node_rank=(node_rank, f"OMPI_COMM_WORLD_RANK={node_rank}"),
        master_addr=(addr, f"MASTER_ADDR={addr}"),
        master_port=(port, port_origin),
    )
    return Reading("OpenMPI", size, node_rank, None, addr, port, origins=origins)


def _volcengine(env) -> Reading | None:
    nnodes = read_int(env, "MLP_WORKER_NUM", 1)
    if nnodes is None:
        return None
    node_rank = read_int(env, "MLP_ROLE_INDEX")
    nproc = read_int(env, "MLP_WORKER_GPU", 1)
    addr_name, addr = first_set(env, "MLP_WORKER_0_HOST")
    port, port_origin = read_port(env, "MLP_WORKER_0_PORT")
    origins = origins_of(
        nnodes=(nnodes, f"MLP_WORKER_NUM={nnodes}"),
        node_rank=(node_rank, f"MLP_ROLE_INDEX={node_rank}"),
        nproc_per_node=(nproc, f"MLP_WORKER_GPU={nproc}"),
        master_addr=(addr, f"MLP_WORKER_0_HOST={addr}"),
        master_port=(port, port_origin),
    )
    return Reading("Volcengine MLP", nnodes, node_rank, nproc, addr, port, origins=origins)


def _modelarts(env) -> Reading | None:
    count_name, count = first_set(env, "VC_WORKER_NUM", "MA_NUM_HOSTS")
    if count is None:
        return None
    nnodes = read_int(env, count_name, 1)
    node_rank = read_int(env, "VC_TASK_INDEX")
    addr_name, addr = first_set(env, "MASTER_ADDR")
    addr_origin = f"MASTER_ADDR={addr}"
    if not addr and env.get("VC_WORKER_HOSTS", "").strip():
        hosts = [h.strip() for h in env["VC_WORKER_HOSTS"].split(",") if h.strip()]
        addr, addr_origin = hosts[0], f"first host of VC_WORKER_HOSTS={env['VC_WORKER_HOSTS']}"
    port, port_origin = read_port(env, "MASTER_PORT")
    nproc = read_int(env, "MA_NUM_GPUS", 1)
    origins = origins_of(
        nnodes=(nnodes, f"{count_name}={nnodes}"),
        node_rank=(node_rank, f"VC_TASK_INDEX={node_rank}"),
        nproc_per_node=(nproc, f"MA_NUM_GPUS={nproc}"),
        master_addr=(addr, addr_origin),
        master_port=(port, port_origin),
    )
    return Reading("Huawei ModelArts", nnodes, node_rank, nproc, addr, port, origins=origins)


def _sagemaker(env) -> Reading | None:
    if not env.get("SM_HOSTS", "").strip():
        return None
    try:
        hosts = json.loads(env["SM_HOSTS"])
    except ValueError:
        raise TopologyError(f"SM_HOSTS={env['SM_HOSTS']!r} is not a JSON list of host names") from None
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise TopologyError(f"SM_HOSTS={env['SM_HOSTS']!r} is not a JSON list of host names")
    current = env.get("SM_CURRENT_HOST", "")
    if current not in hosts:
        raise TopologyError(f"SM_CURRENT_HOST={current!r} is not in SM_HOSTS={env['SM_HOSTS']}")
    hosts = sorted(hosts)  # every node sorts the same way, so ranks agree
    nproc = read_int(env, "SM_NUM_GPUS", 1)
    port, port_origin = read_port(env, "MASTER_PORT")
    origins = origins_of(
        nnodes=(hosts, f"len(SM_HOSTS)={len(hosts)}"),
        node_rank=(current, f"position of SM_CURRENT_HOST={current} in sorted SM_HOSTS"),
        nproc_per_node=(nproc, f"SM_NUM_GPUS={nproc}"),
        master_addr=(hosts, f"first of sorted SM_HOSTS={hosts[0]}"),
        master_port=(port, port_origin),
    )
    return Reading("Amazon SageMaker", len(hosts), hosts.index(current), nproc, hosts[0], port, origins=origins)


@dataclass(frozen=True)
class Scheduler:
    """One scheduler's convention: every variable its reader reads (a container
    launcher passes them all in: RANK_VARIABLES) and the reader."""

    name: str
    variables: tuple[str, ...]
    read: Callable[[Mapping[str, str]], Reading | None]


MASTER = ("MASTER_ADDR", "MASTER_PORT")
SCHEDULERS = (
    Scheduler(
        "Kubeflow PyTorchJob",
        (
            "PET_NNODES",
            "PET_NODE_RANK",
            "PET_NPROC_PER_NODE",
            "PET_MASTER_ADDR",
            "PET_MASTER_PORT",
            "RANK",
            "WORLD_SIZE",
        )
        + MASTER,
        _pytorchjob,
    ),
    Scheduler(
        "SLURM",
        ("SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_NODELIST") + MASTER,
        _slurm,
    ),
    Scheduler(
        "OpenMPI", ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE") + MASTER, _openmpi
    ),
    Scheduler(
        "Volcengine MLP",
        ("MLP_WORKER_NUM", "MLP_ROLE_INDEX", "MLP_WORKER_0_HOST", "MLP_WORKER_0_PORT", "MLP_WORKER_GPU"),
        _volcengine,
    ),
    Scheduler(
        "Huawei ModelArts",
        ("VC_WORKER_NUM", "MA_NUM_HOSTS", "VC_TASK_INDEX", "VC_WORKER_HOSTS", "MA_NUM_GPUS") + MASTER,
        _modelarts,
    ),
    Scheduler("Amazon SageMaker", ("SM_HOSTS", "SM_CURRENT_HOST", "SM_NUM_GPUS", "MASTER_PORT"), _sagemaker),
)
