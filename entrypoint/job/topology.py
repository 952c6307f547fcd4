"""The job's layout from the scheduler's environment (docs/TOPOLOGY.md).

One pure function, ``detect``, maps an environment to a ``Topology`` or raises
``TopologyError`` naming the variables at fault. It never guesses: a multi-node job
without a master address, a node rank out of range or two schedulers that disagree
are refused. Every value records where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations

from entrypoint.job.schedulers import SCHEDULERS, Reading, TopologyError, first_set, origins_of, read_int, read_port

# The variables of the explicit and the WORLD_SIZE conventions (read here), besides the
# schedulers' own.
EXPLICIT_VARIABLES = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "ADDR", "PORT", "MASTER_ADDR", "MASTER_PORT")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
# Every variable `detect` reads, and the network variables NCCL and gloo read, so that
# launchers such as `make run` can pass them into the container.
RANK_VARIABLES = tuple(
    dict.fromkeys(
        (
            *EXPLICIT_VARIABLES,
            *WORLD_SIZE_VARIABLES,
            *(variable for scheduler in SCHEDULERS for variable in scheduler.variables),
            "NCCL_SOCKET_IFNAME",
            "NCCL_IB_HCA",
            "GLOO_SOCKET_IFNAME",
        )
    )
)
DEFAULT_PORT = 29500  # passed explicitly: XTuner picks a random port per node otherwise
LOOPBACK = "127.0.0.1"


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
    port_defaulted: bool = False  # no variable named the port: the appliance may pick one

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


def _explicit(env) -> Reading | None:
    nnodes = read_int(env, "NNODES", 1)
    if nnodes is None:
        return None
    addr_name, addr = first_set(env, "ADDR", "MASTER_ADDR")
    port, port_origin = read_port(env, "PORT", "MASTER_PORT")
    node_rank = read_int(env, "NODE_RANK")
    origins = origins_of(
        nnodes=(nnodes, f"NNODES={nnodes}"),
        node_rank=(node_rank, f"NODE_RANK={node_rank}"),
        master_addr=(addr, f"{addr_name}={addr}"),
        master_port=(port, port_origin),
    )
    return Reading(
        "explicit NNODES/NODE_RANK/ADDR/PORT",
        nnodes,
        node_rank,
        None,
        addr,
        port,
        origins=origins,
        accounts_for_world_size=True,
    )


def _world_size_convention(
    env, world_size_means: str | None, processes_per_node: tuple[int, str] | None
) -> Reading | None:
    """WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT: the seed's (and PAI-DLC's, Volcano's) convention.

    WORLD_SIZE counts nodes there, but processes under torchrun-style launchers;
    LOCAL_WORLD_SIZE or --world-size-means decides, and the reading is recorded. Read
    as processes, the processes per node come from LOCAL_WORLD_SIZE, else from
    ``processes_per_node`` (NPROC_PER_NODE or --nproc-per-node, with its name).
    """
    world_size = read_int(env, "WORLD_SIZE", 1)
    if world_size is None:
        return None
    rank = read_int(env, "RANK")
    local_world_size = read_int(env, "LOCAL_WORLD_SIZE", 1)
    local_name = "LOCAL_WORLD_SIZE"
    if local_world_size is None and world_size_means == "processes" and processes_per_node is not None:
        local_world_size, local_name = processes_per_node
    reading = world_size_means or ("processes" if local_world_size is not None else "nodes")
    addr_name, addr = first_set(env, "MASTER_ADDR")
    port, port_origin = read_port(env, "MASTER_PORT")
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
        return Reading("WORLD_SIZE/RANK (nodes)", world_size, rank, None, addr, port, "nodes", origins, True)
    if local_world_size is None:
        raise TopologyError(
            f"WORLD_SIZE={world_size} read as processes needs LOCAL_WORLD_SIZE (processes per node) "
            "or NPROC_PER_NODE to count the nodes"
        )
    if world_size % local_world_size:
        raise TopologyError(f"WORLD_SIZE={world_size} is not a multiple of {local_name}={local_world_size}")
    group_rank = read_int(env, "GROUP_RANK")
    node_rank = group_rank if group_rank is not None else (None if rank is None else rank // local_world_size)
    origins["nnodes"] = f"WORLD_SIZE={world_size} / {local_name}={local_world_size} ({why})"
    origins["nproc_per_node"] = f"{local_name}={local_world_size}"
    if node_rank is not None:
        origins["node_rank"] = f"GROUP_RANK={group_rank}" if group_rank is not None else f"RANK={rank} // {local_name}"
    return Reading(
        "WORLD_SIZE/RANK (processes)",
        world_size // local_world_size,
        node_rank,
        local_world_size,
        addr,
        port,
        "processes",
        origins,
        accounts_for_world_size=True,
    )


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
    schedulers = [reading for reading in (scheduler.read(env) for scheduler in SCHEDULERS) if reading is not None]
    for first, second in combinations(schedulers, 2):
        for name in ("nnodes", "node_rank"):
            a, b = getattr(first, name), getattr(second, name)
            if a is not None and b is not None and a != b:
                raise TopologyError(
                    f"{first.source} says {name}={a} ({first.origins[name]}) but {second.source} says "
                    f"{name}={b} ({second.origins[name]}); set NNODES/NODE_RANK explicitly"
                )
    asked_nproc = (nproc_per_node, f"--nproc-per-node {nproc_per_node}") if nproc_per_node else None
    if asked_nproc is None and read_int(env, "NPROC_PER_NODE", 1):
        asked_nproc = (read_int(env, "NPROC_PER_NODE", 1), "NPROC_PER_NODE")
    if explicit is None and not schedulers:
        legacy = _world_size_convention(env, world_size_means, asked_nproc)
        schedulers = [legacy] if legacy else []
    chosen = explicit or (schedulers[0] if schedulers else None)
    if chosen is None:
        chosen = Reading(
            "single node (no scheduler variables)",
            1,
            0,
            origins={"nnodes": "default: one node"},
            accounts_for_world_size=True,
        )
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
    port_defaulted = master_port is None
    if port_defaulted:
        master_port = DEFAULT_PORT
        origins["master_port"] = f"default {DEFAULT_PORT}"
    nproc = nproc_per_node or read_int(env, "NPROC_PER_NODE", 1) or pick("nproc_per_node")
    if nproc_per_node:
        origins["nproc_per_node"] = f"--nproc-per-node {nproc_per_node}"
    elif read_int(env, "NPROC_PER_NODE", 1):
        origins["nproc_per_node"] = f"NPROC_PER_NODE={nproc}"
    if nproc is None:
        nproc = max(visible_gpus, 1)
        origins["nproc_per_node"] = f"visible GPUs: {visible_gpus}" if visible_gpus else "no GPU: one CPU process"
    _check_world_size(env, chosen, world_size_means, nnodes, nproc)
    return Topology(
        nnodes,
        node_rank,
        nproc,
        master_addr,
        master_port,
        chosen.source,
        chosen.world_size_reading,
        origins,
        port_defaulted=port_defaulted,
    )


def _check_world_size(env, chosen: Reading, world_size_means: str | None, nnodes: int, nproc: int) -> None:
    """A WORLD_SIZE beside a scheduler's own variables must count what they say: the
    nodes or the processes (as --world-size-means says, else either); never ignored."""
    world_size = read_int(env, "WORLD_SIZE", 1)
    if world_size is None or chosen.accounts_for_world_size:
        return
    readings = {"nodes": nnodes, "processes": nnodes * nproc}
    allowed = [readings[world_size_means]] if world_size_means else list(readings.values())
    if world_size not in allowed:
        raise TopologyError(
            f"WORLD_SIZE={world_size} contradicts {chosen.source}: {nnodes} node(s) x {nproc} process(es) "
            f"({chosen.origins.get('nnodes')}); unset WORLD_SIZE, or set NNODES/NODE_RANK explicitly"
        )
