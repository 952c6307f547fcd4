"""What ran, on what: the facts a reader signs the verdict on, each a (label, text) line
derived from verdict.json alone, so report.md and the console say the same words.

Absent sections (a bare stream, a run refused before training) say so instead of
leaving a line out: a missing fact is itself something the reader must see.
"""

from __future__ import annotations

from collections import Counter

# The training stack's packages, in the order a reader looks for them.
STACK = ("torch", "xtuner", "deepspeed", "transformers", "mmengine", "bitsandbytes", "flash_attn")
NOT_RECORDED = "not recorded (a bare metrics stream, or the run ended before it was read)"


def what_ran(verdict: dict) -> list[tuple[str, str]]:
    return [
        ("hardware", _hardware(verdict.get("environment"))),
        ("software", _software(verdict.get("environment"))),
        ("topology", _topology(verdict.get("topology"))),
        ("interconnect", _interconnect(verdict.get("interconnect"), verdict.get("topology"))),
        ("stragglers", _stragglers(verdict.get("ranks"))),
        ("recipe", _recipe(verdict.get("recipe"))),
        ("memory retry", _memory_retry(verdict.get("recipe"))),
        ("inputs", _inputs(verdict.get("inputs"))),
        ("speed ratio against", _baseline(verdict["baseline"])),
    ]


def _hardware(environment: dict | None) -> str:
    if environment is None:
        return NOT_RECORDED
    gpus = environment["gpus"]
    if not gpus:
        return f"CPU only (no GPU), {environment['software']['platform']}"
    kinds = Counter((gpu["name"], gpu["memory_mib"], gpu["driver"]) for gpu in gpus)
    nodes = len({gpu["node_rank"] for gpu in gpus})
    cards = "; ".join(
        f"{count} x {name} ({memory:,} MiB), driver {driver or 'unknown'}"
        for (name, memory, driver), count in kinds.items()
    )
    return f"{cards}, on {nodes} node(s)"


def _software(environment: dict | None) -> str:
    if environment is None:
        return NOT_RECORDED
    software = environment["software"]
    packages = software.get("packages") or {}
    stack = ", ".join(f"{name} {packages[name]}" for name in STACK if packages.get(name))
    cuda = ", ".join(
        f"{name} {software[key]}"
        for name, key in (("CUDA", "cuda"), ("cuDNN", "cudnn"), ("NCCL", "nccl"))
        if software.get(key)
    )
    if cuda and not environment["gpus"]:
        cuda = f"torch built with {cuda}, no GPU used"
    image = software.get("image") or {}
    where = f"image {image['appliance_version']}" if image.get("appliance_version") else "outside the image"
    return f"{stack}; {cuda or 'no CUDA'}; Python {software['python']}; {where}"


def _topology(topology: dict | None) -> str:
    if topology is None:
        return NOT_RECORDED
    return (
        f"{topology['nnodes']} node(s) x {topology['nproc_per_node']} process(es) = world size "
        f"{topology['world_size']}, read from {topology['source']}"
    )


def _interconnect(interconnect: dict | None, topology: dict | None) -> str:
    if interconnect is None:
        if not topology:
            return NOT_RECORDED
        if topology.get("world_size") == 1:
            return "one process: no interconnect to check"
        return "not measured (CPU, or no collective check ran)"
    allreduce = interconnect.get("allreduce")
    hosts = len({process["host"] for process in interconnect["placement"]})
    if not allreduce:
        return f"{interconnect['world_size']} process(es) on {hosts} host(s): one process, no all-reduce to time"
    return (
        f"all-reduce of {allreduce['message_bytes'] / 2**20:.0f} MiB over {interconnect['world_size']} processes on "
        f"{hosts} host(s): {allreduce['bus_bandwidth_gbps']:.1f} GB/s bus bandwidth (mean of "
        f"{allreduce['iterations']})"
    )


def _stragglers(ranks: dict | None) -> str:
    if ranks is None:
        return "not measured (no rank timed its forward pass)"
    if ranks["stragglers"]:
        return "; ".join(ranks["stragglers"])
    if len(ranks["per_rank"]) == 1:
        return "one rank: none to compare"
    slowest = ranks["slowest_rank"]
    return (
        f"none more than {ranks['straggler_share']:.0%} behind the median rank's forward time (slowest: rank "
        f"{slowest['rank']} on {slowest['host']}, {slowest['behind_median']:+.1%})"
    )


def _recipe(recipe: dict | None) -> str:
    if recipe is None:
        return NOT_RECORDED
    levers = recipe.get("levers") or {}
    schedule = (
        "the reference" if recipe["on_reference_schedule"] else f"not the reference {recipe['reference_global_batch']}"
    )
    kind = (
        "stock (every lever off)"
        if levers.get("stock")
        else f"{len(recipe['deviations'])} change(s) from the pinned config"
    )
    return (
        f"XTuner {recipe['xtuner_version']}, {recipe['precision']}, global batch {recipe['global_batch']} "
        f"({schedule}), seed {recipe['seed']}, {kind}; XTuner commit {recipe['xtuner_commit'] or 'unknown'}, "
        f"config.py sha256 {recipe['config_sha256']}, appliance {recipe['appliance_version']}"
    )


def _memory_retry(recipe: dict | None) -> str:
    fallback = (recipe or {}).get("memory_fallback")
    if not fallback:
        return "none" if recipe else NOT_RECORDED
    return (
        f"the first attempt ran {fallback['wall_seconds']:.0f} s and ended: {fallback['reason']}; the retry "
        f"re-sized {', '.join(fallback['taken_back'])} (first attempt kept in {fallback['folder']})"
    )


def _inputs(inputs: dict | None) -> str:
    if inputs is None:
        return NOT_RECORDED
    models = "; ".join(
        f"{name} {', '.join(inputs[key]['architectures']) or 'unknown'} ({inputs[key]['weight_shards']} weight "
        f"file(s), config sha256 {inputs[key]['config_sha256']})"
        for name, key in (("LLM", "llm"), ("CLIP", "clip"))
    )
    sources = ", ".join(f"{source['repo_id']}@{source['commit']}" for source in inputs.get("sources") or [])
    return f"dataset {inputs['dataset_samples']:,} records, sha256 {inputs['dataset_sha256']}; {models}" + (
        f"; downloaded from {sources}" if sources else ""
    )


def _baseline(baseline: dict) -> str:
    seed = (
        f"the seed's A100 run of the pinned recipe ({baseline['seed_a100_seconds_per_step']:.2f} s/step at batch "
        f"{baseline['seed_a100_per_device_batch']} per GPU)"
    )
    if baseline["speedup_vs_seed_a100"] is None:
        return f"{seed}: not computed, {baseline['why_null']}"
    return f"{seed}: {baseline['speedup_vs_seed_a100']:.2f} x its samples per second per GPU"
