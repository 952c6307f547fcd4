"""The job's layout from the scheduler's environment (DESIGN §4).

One pure function, ``detect``, maps an environment to a ``Topology`` or raises
``TopologyError`` naming the variables at fault. It never guesses: a multi-node job
without a master address, a node rank out of range or two schedulers that disagree
are refused. Every value records where it came from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations

# Every variable `detect` reads (and the network variables NCCL and gloo read), so
# launchers such as `make run` can pass them into the container.
RANK_VARIABLES = (
    "NNODES",
    "NODE_RANK",
    "NPROC_PER_NODE",
    "ADDR",
    "PORT",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_NPROC_PER_NODE",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "SLURM_NNODES",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NODEID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MLP_WORKER_NUM",
    "MLP_ROLE_INDEX",
    "MLP_WORKER_0_HOST",
    "MLP_WORKER_0_PORT",
    "MLP_WORKER_GPU",
    "VC_WORKER_NUM",
    "MA_NUM_HOSTS",
    "VC_TASK_INDEX",
    "VC_WORKER_HOSTS",
    "MA_NUM_GPUS",
    "SM_HOSTS",
    "SM_CURRENT_HOST",
    "SM_NUM_GPUS",
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "GLOO_SOCKET_IFNAME",
)
DEFAULT_PORT = 29500  # passed explicitly: XTuner picks a random port per node otherwise
LOOPBACK = "127.0.0.1"


class TopologyError(ValueError):
    """The environment does not describe one consistent job."""


@dataclass(frozen=True)
class Topology:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    source: str  # which convention decided it
    world_size_reading: str | None = None  # "nodes" or "processes" when WORLD_SIZE was read
    origins: dict[str, str] = field(default_factory=dict)  # value name -> "VAR=value" or a rule

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def as_dict(self) -> dict:
        return {
            "nnodes": self.nnodes,
            "node_rank": self.node_rank,
            "nproc_per_node": self.nproc_per_node,
            "master_addr": self.master_addr,
            "master_port": self.master_port,
            "source": self.source,
            "world_size": self.world_size,
            "world_size_reading": self.world_size_reading,
            "origins": dict(self.origins),
        }

    def torchrun_args(self) -> list[str]:
        return [
            "--nnodes",
            str(self.nnodes),
            "--node_rank",
            str(self.node_rank),
            "--nproc_per_node",
            str(self.nproc_per_node),
            "--master_addr",
            self.master_addr,
            "--master_port",
            str(self.master_port),
        ]


@dataclass(frozen=True)
class _Reading:
    """What one convention says; None where it says nothing."""

    source: str
    nnodes: int | None = None
    node_rank: int | None = None
    nproc_per_node: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    world_size_reading: str | None = None
    origins: dict[str, str] = field(default_factory=dict)


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
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


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | tuple[None, None]:
    for name in names:
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None, None


def _port(env: Mapping[str, str], *names: str) -> tuple[int | None, str | None]:
    for name in names:
        value = _int(env, name, minimum=1)
        if value is not None:
            if value > 65535:
                raise TopologyError(f"{name}={value} is not a TCP port (1-65535)")
            return value, f"{name}={value}"
    return None, None


def _origins(**entries: tuple[object, str | None]) -> dict[str, str]:
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


def _explicit(env) -> _Reading | None:
    nnodes = _int(env, "NNODES", 1)
    if nnodes is None:
        return None
    addr_name, addr = _first(env, "ADDR", "MASTER_ADDR")
    port, port_origin = _port(env, "PORT", "MASTER_PORT")
    node_rank = _int(env, "NODE_RANK")
    origins = _origins(
        nnodes=(nnodes, f"NNODES={nnodes}"),
        node_rank=(node_rank, f"NODE_RANK={node_rank}"),
        master_addr=(addr, f"{addr_name}={addr}"),
        master_port=(port, port_origin),
    )
    return _Reading("explicit NNODES/NODE_RANK/ADDR/PORT", nnodes, node_rank, None, addr, port, origins=origins)


def _pytorchjob(env) -> _Reading | None:
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
    nnodes = _int(env, "PET_NNODES", 1)
    nproc = (
        None if env.get("PET_NPROC_PER_NODE", "").strip() in ("", "auto", "gpu") else _int(env, "PET_NPROC_PER_NODE", 1)
    )
    node_rank = _int(env, "PET_NODE_RANK")
    if node_rank is None and nproc is not None and _int(env, "RANK") is not None:
        node_rank = _int(env, "RANK") // nproc
    addr_name, addr = _first(env, "PET_MASTER_ADDR", "MASTER_ADDR")
    port, port_origin = _port(env, "PET_MASTER_PORT", "MASTER_PORT")
    world_size = _int(env, "WORLD_SIZE", 1)
    if world_size is not None and nnodes is not None and nproc is not None and world_size != nnodes * nproc:
        raise TopologyError(
            f"WORLD_SIZE={world_size} contradicts PET_NNODES={nnodes} x PET_NPROC_PER_NODE={nproc}; "
            "fix the job spec or set NNODES/NODE_RANK/NPROC_PER_NODE explicitly"
        )
    origins = _origins(
        nnodes=(nnodes, f"PET_NNODES={nnodes}"),
        node_rank=(
            node_rank,
            ("PET_NODE_RANK" if "PET_NODE_RANK" in env else "RANK // PET_NPROC_PER_NODE") + f"={node_rank}",
        ),
        nproc_per_node=(nproc, f"PET_NPROC_PER_NODE={nproc}"),
        master_addr=(addr, f"{addr_name}={addr}"),
        master_port=(port, port_origin),
    )
    return _Reading(
        "Kubeflow PyTorchJob (PET_*)",
        nnodes,
        node_rank,
        nproc,
        addr,
        port,
        "processes" if world_size else None,
        origins,
    )


def _slurm(env) -> _Reading | None:
    nnodes = _int(env, "SLURM_NNODES", 1) or _int(env, "SLURM_JOB_NUM_NODES", 1)
    if nnodes is None:
        return None
    node_rank = _int(env, "SLURM_NODEID")
    addr_name, addr = _first(env, "MASTER_ADDR")
    addr_origin = f"MASTER_ADDR={addr}"
    if not addr:
        list_name, nodelist = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nodelist:
            hosts = expand_nodelist(nodelist)
            if len(hosts) != nnodes:
                raise TopologyError(f"{list_name}={nodelist!r} names {len(hosts)} hosts but SLURM_NNODES={nnodes}")
            addr, addr_origin = hosts[0], f"first host of {list_name}={nodelist}"
    port, port_origin = _port(env, "MASTER_PORT")
    origins = _origins(
        nnodes=(nnodes, f"SLURM_NNODES={nnodes}"),
        node_rank=(node_rank, f"SLURM_NODEID={node_rank}"),
        master_addr=(addr, addr_origin),
        master_port=(port, port_origin),
    )
    return _Reading("SLURM", nnodes, node_rank, None, addr, port, origins=origins)


def _openmpi(env) -> _Reading | None:
    size = _int(env, "OMPI_COMM_WORLD_SIZE", 1)
    if size is None:
        return None
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
    if local_size not in (None, 1):
        raise TopologyError(
            f"OMPI_COMM_WORLD_LOCAL_SIZE={local_size}: start the appliance once per node "
            "(mpirun --map-by ppr:1:node); it starts one process per GPU itself"
        )
    node_rank = _int(env, "OMPI_COMM_WORLD_RANK")
    addr_name, addr = _first(env, "MASTER_ADDR")
    port, port_origin = _port(env, "MASTER_PORT")
    origins = _origins(
        nnodes=(size, f"OMPI_COMM_WORLD_SIZE={size}"),
        node_rank=(node_rank, f"OMPI_COMM_WORLD_RANK={node_rank}"),
        master_addr=(addr, f"MASTER_ADDR={addr}"),
        master_port=(port, port_origin),
    )
    return _Reading("OpenMPI", size, node_rank, None, addr, port, origins=origins)


def _volcengine(env) -> _Reading | None:
    nnodes = _int(env, "MLP_WORKER_NUM", 1)
    if nnodes is None:
        return None
    node_rank = _int(env, "MLP_ROLE_INDEX")
    nproc = _int(env, "MLP_WORKER_GPU", 1)
    addr_name, addr = _first(env, "MLP_WORKER_0_HOST")
    port, port_origin = _port(env, "MLP_WORKER_0_PORT")
    origins = _origins(
        nnodes=(nnodes, f"MLP_WORKER_NUM={nnodes}"),
        node_rank=(node_rank, f"MLP_ROLE_INDEX={node_rank}"),
        nproc_per_node=(nproc, f"MLP_WORKER_GPU={nproc}"),
        master_addr=(addr, f"MLP_WORKER_0_HOST={addr}"),
        master_port=(port, port_origin),
    )
    return _Reading("Volcengine MLP", nnodes, node_rank, nproc, addr, port, origins=origins)


def _modelarts(env) -> _Reading | None:
    count_name, count = _first(env, "VC_WORKER_NUM", "MA_NUM_HOSTS")
    if count is None:
        return None
    nnodes = _int(env, count_name, 1)
    node_rank = _int(env, "VC_TASK_INDEX")
    addr_name, addr = _first(env, "MASTER_ADDR")
    addr_origin = f"MASTER_ADDR={addr}"
    if not addr and env.get("VC_WORKER_HOSTS", "").strip():
        hosts = [h.strip() for h in env["VC_WORKER_HOSTS"].split(",") if h.strip()]
        addr, addr_origin = hosts[0], f"first host of VC_WORKER_HOSTS={env['VC_WORKER_HOSTS']}"
    port, port_origin = _port(env, "MASTER_PORT")
    nproc = _int(env, "MA_NUM_GPUS", 1)
    origins = _origins(
        nnodes=(nnodes, f"{count_name}={nnodes}"),
        node_rank=(node_rank, f"VC_TASK_INDEX={node_rank}"),
        nproc_per_node=(nproc, f"MA_NUM_GPUS={nproc}"),
        master_addr=(addr, addr_origin),
        master_port=(port, port_origin),
    )
    return _Reading("Huawei ModelArts", nnodes, node_rank, nproc, addr, port, origins=origins)


def _sagemaker(env) -> _Reading | None:
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
    nproc = _int(env, "SM_NUM_GPUS", 1)
    port, port_origin = _port(env, "MASTER_PORT")
    origins = _origins(
        nnodes=(hosts, f"len(SM_HOSTS)={len(hosts)}"),
        node_rank=(current, f"position of SM_CURRENT_HOST={current} in sorted SM_HOSTS"),
        nproc_per_node=(nproc, f"SM_NUM_GPUS={nproc}"),
        master_addr=(hosts, f"first of sorted SM_HOSTS={hosts[0]}"),
        master_port=(port, port_origin),
    )
    return _Reading("Amazon SageMaker", len(hosts), hosts.index(current), nproc, hosts[0], port, origins=origins)


def _world_size_convention(
    env, world_size_means: str | None, processes_per_node: tuple[int, str] | None
) -> _Reading | None:
    """WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT: the seed's (and PAI-DLC's, Volcano's) convention.

    WORLD_SIZE counts nodes there, but processes under torchrun-style launchers;
    LOCAL_WORLD_SIZE or --world-size-means decides, and the reading is recorded. Read
    as processes, the processes per node come from LOCAL_WORLD_SIZE, else from
    ``processes_per_node`` (NPROC_PER_NODE or --nproc-per-node, with its name).
    """
    world_size = _int(env, "WORLD_SIZE", 1)
    if world_size is None:
        return None
    rank = _int(env, "RANK")
    local_world_size = _int(env, "LOCAL_WORLD_SIZE", 1)
    local_name = "LOCAL_WORLD_SIZE"
    if local_world_size is None and world_size_means == "processes" and processes_per_node is not None:
        local_world_size, local_name = processes_per_node
    reading = world_size_means or ("processes" if local_world_size is not None else "nodes")
    addr_name, addr = _first(env, "MASTER_ADDR")
    port, port_origin = _port(env, "MASTER_PORT")
    origins = {}
    if addr:
        origins["master_addr"] = f"MASTER_ADDR={addr}"
    if port_origin:
        origins["master_port"] = port_origin
    why = (
        "--world-size-means"
        if world_size_means
        else ("LOCAL_WORLD_SIZE is set" if local_world_size else "the seed's convention")
    )
    if reading == "nodes":
        origins["nnodes"] = f"WORLD_SIZE={world_size} read as nodes ({why})"
        if rank is not None:
            origins["node_rank"] = f"RANK={rank} read as the node rank"
        return _Reading("WORLD_SIZE/RANK (nodes)", world_size, rank, None, addr, port, "nodes", origins)
    if local_world_size is None:
        raise TopologyError(
            f"WORLD_SIZE={world_size} read as processes needs LOCAL_WORLD_SIZE (processes per node) "
            "or NPROC_PER_NODE to count the nodes"
        )
    if world_size % local_world_size:
        raise TopologyError(f"WORLD_SIZE={world_size} is not a multiple of {local_name}={local_world_size}")
    group_rank = _int(env, "GROUP_RANK")
    node_rank = group_rank if group_rank is not None else (None if rank is None else rank // local_world_size)
    origins["nnodes"] = f"WORLD_SIZE={world_size} / {local_name}={local_world_size} ({why})"
    origins["nproc_per_node"] = f"{local_name}={local_world_size}"
    if node_rank is not None:
        origins["node_rank"] = f"GROUP_RANK={group_rank}" if group_rank is not None else f"RANK={rank} // {local_name}"
    return _Reading(
        "WORLD_SIZE/RANK (processes)",
        world_size // local_world_size,
        node_rank,
        local_world_size,
        addr,
        port,
        "processes",
        origins,
    )


SCHEDULERS = (_pytorchjob, _slurm, _openmpi, _volcengine, _modelarts, _sagemaker)


def detect(
    env: Mapping[str, str],
    visible_gpus: int,
    world_size_means: str | None = None,
    nproc_per_node: int | None = None,
) -> Topology:
    """The job this node belongs to, or ``TopologyError`` saying which variables are at fault."""
    if world_size_means not in (None, "nodes", "processes"):
        raise TopologyError(f"--world-size-means must be 'nodes' or 'processes', not {world_size_means!r}")
    explicit = _explicit(env)
    schedulers = [reading for reading in (rule(env) for rule in SCHEDULERS) if reading is not None]
    for first, second in combinations(schedulers, 2):
        for name in ("nnodes", "node_rank"):
            a, b = getattr(first, name), getattr(second, name)
            if a is not None and b is not None and a != b:
                raise TopologyError(
                    f"{first.source} says {name}={a} ({first.origins[name]}) but {second.source} says "
                    f"{name}={b} ({second.origins[name]}); set NNODES/NODE_RANK explicitly"
                )
    asked_nproc = (nproc_per_node, f"--nproc-per-node {nproc_per_node}") if nproc_per_node else None
    if asked_nproc is None and _int(env, "NPROC_PER_NODE", 1):
        asked_nproc = (_int(env, "NPROC_PER_NODE", 1), "NPROC_PER_NODE")
    if explicit is None and not schedulers:
        legacy = _world_size_convention(env, world_size_means, asked_nproc)
        schedulers = [legacy] if legacy else []
    chosen = explicit or (schedulers[0] if schedulers else None)
    if chosen is None:
        chosen = _Reading("single node (no scheduler variables)", 1, 0, origins={"nnodes": "default: one node"})
    # Explicit values win; a scheduler fills in what they leave out.
    fallback = schedulers[0] if explicit and schedulers else None
    origins = dict(chosen.origins)

    def pick(name: str):
        value = getattr(chosen, name)
        if value is None and fallback is not None and getattr(fallback, name) is not None:
            value = getattr(fallback, name)
            origins[name] = fallback.origins.get(name, fallback.source)
        return value

    nnodes, node_rank = pick("nnodes"), pick("node_rank")
    if nnodes > 1 and node_rank is None:
        raise TopologyError(
            f"{chosen.source}: {nnodes} nodes but no node rank (NODE_RANK, RANK or the scheduler's index)"
        )
    node_rank = 0 if node_rank is None else node_rank
    if node_rank >= nnodes:
        raise TopologyError(
            f"{chosen.source}: node rank {node_rank} ({origins.get('node_rank')}) is not below the node count {nnodes}"
        )
    master_addr = pick("master_addr")
    if master_addr is None:
        if nnodes > 1:
            raise TopologyError(
                f"{chosen.source}: {nnodes} nodes but no master address; set MASTER_ADDR (or ADDR) to node 0's host"
            )
        master_addr = LOOPBACK
        origins["master_addr"] = "single node: loopback"
    master_port = pick("master_port")
    if master_port is None:
        master_port = DEFAULT_PORT
        origins["master_port"] = f"default {DEFAULT_PORT}"
    nproc = nproc_per_node or _int(env, "NPROC_PER_NODE", 1) or pick("nproc_per_node")
    if nproc_per_node:
        origins["nproc_per_node"] = f"--nproc-per-node {nproc_per_node}"
    elif _int(env, "NPROC_PER_NODE", 1):
        origins["nproc_per_node"] = f"NPROC_PER_NODE={nproc}"
    if nproc is None:
        nproc = max(visible_gpus, 1)
        origins["nproc_per_node"] = f"visible GPUs: {visible_gpus}" if visible_gpus else "no GPU: one CPU process"
    _check_world_size(env, chosen, world_size_means, nnodes, nproc)
    return Topology(
        nnodes, node_rank, nproc, master_addr, master_port, chosen.source, chosen.world_size_reading, origins
    )


def _check_world_size(env, chosen: _Reading, world_size_means: str | None, nnodes: int, nproc: int) -> None:
    """A WORLD_SIZE beside a scheduler's own variables must count what they say: the
    nodes or the processes (as --world-size-means says, else either); never ignored."""
    world_size = _int(env, "WORLD_SIZE", 1)
    if world_size is None or chosen.source.startswith(("WORLD_SIZE", "explicit", "Kubeflow", "single node")):
        return  # read by the convention itself, overridden by explicit values, or checked by PyTorchJob's
    readings = {"nodes": nnodes, "processes": nnodes * nproc}
    allowed = [readings[world_size_means]] if world_size_means else list(readings.values())
    if world_size not in allowed:
        raise TopologyError(
            f"WORLD_SIZE={world_size} contradicts {chosen.source}: {nnodes} node(s) x {nproc} process(es) "
            f"({chosen.origins.get('nnodes')}); unset WORLD_SIZE, or set NNODES/NODE_RANK explicitly"
        )
