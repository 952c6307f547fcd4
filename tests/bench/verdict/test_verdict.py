"""Verdict documents: schema, throughput window, the `verdict` command on bare streams."""

from __future__ import annotations

import copy
import json
from dataclasses import MISSING, fields

import jsonschema
import pytest

from bench.core.statuses import Criteria, Termination
from bench.recipe.levers import STOCK
from bench.verdict import document as verdict_mod
from bench.verdict.metrics import MetricsStream, read_stream
from bench.verdict.run_context import RunContext, verdict_path
from tests.conftest import DATA, llava_bench

RECIPE = {
    "source": "template",
    "config_sha256": "0" * 64,
    "appliance_version": "0.1.0",
    "xtuner_version": "0.1.15.dev0",
    "xtuner_commit": "770bac38bc905794eb38e53de4f54f98e30a77dc",
    "precision": "nf4",
    "device": "cuda",
    "per_device_batch": 32,
    "accumulative_counts": 1,
    "global_batch": 64,
    "reference_global_batch": 1024,
    "on_reference_schedule": False,
    "max_iters": 500,
    "seed": 42,
    "levers": STOCK.as_dict(),
    "deviations": ["fixed random seed 42"],
    "cfg_options": [],
}


H200_ENVIRONMENT = {
    "software": {
        "python": "3.12.3",
        "platform": "Linux",
        "cuda": "13.0",
        "cudnn": 91300,
        "nccl": "2.28.9",
        "packages": {"torch": "2.11.0", "xtuner": "0.2.0"},
        "image": None,
    },
    "gpus": [
        {
            "node_rank": 0,
            "index": i,
            "name": "NVIDIA H200",
            "memory_mib": 143771,
            "driver": "580.159.04",
            "uuid": f"GPU-{i}",
        }
        for i in (0, 1)
    ],
}
REAL_INPUTS = {
    "dataset_sha256": "d" * 64,
    "dataset_samples": 558128,
    "llm": {"config_sha256": "c" * 64, "weight_shards": 21, "architectures": ["InternLM2ForCausalLM"]},
    "clip": {"config_sha256": "e" * 64, "weight_shards": 1, "architectures": ["CLIPModel"]},
    "model_shapes": {
        "llm": {"hidden": 6144, "layers": 48, "heads": 48, "kv_heads": 8, "ffn": 16384, "vocab": 92544},
        "vit": {"hidden": 1024, "layers": 24, "ffn": 4096, "image_size": 336, "patch": 14},
    },
    "sources": [
        {
            "repo_id": "internlm/internlm2-chat-20b",
            "repo_type": "model",
            "revision_requested": "main",
            "commit": "f" * 40,
            "endpoint": "https://huggingface.co",
            "files": ["config.json"],
        }
    ],
}


def context(**changes) -> RunContext:
    base = dict(
        run_id="r1",
        criteria=Criteria(max_steps=15),
        termination=Termination("completed"),
        per_device_batch=32,
        world_size=2,
        trainer_exit_code=0,
        recipe=RECIPE,
        topology={
            "nnodes": 1,
            "node_rank": 0,
            "nproc_per_node": 2,
            "master_addr": "127.0.0.1",
            "master_port": 29500,
            "source": "single node",
            "launch_command": ["torchrun"],
            "world_size": 2,
            "world_size_reading": None,
            "origins": {"nnodes": "default: one node"},
        },
        timing={
            "preflight_seconds": 12.5,
            "started_at": "t0",
            "first_record_at": "t0",
            "first_record_seconds": 130.0,
            "ended_at": "t1",
            "wall_seconds": 1.0,
        },
        environment=H200_ENVIRONMENT,
        inputs=REAL_INPUTS,
    )
    return RunContext(**{**base, **changes})


H200_NF4 = read_stream(DATA / "h200_stock_nf4_b32_20bshape.jsonl")


KINDS_OF_CONTEXT = [
    context(),
    context(termination=Termination("crashed", "exit 1")),
    context(termination=Termination("aborted", "SIGTERM")),
    context(
        termination=Termination("unknown"),
        recipe=None,
        topology=None,
        timing=None,
        per_device_batch=None,
        world_size=None,
    ),
    context(problems=[{"path": "/llava/data", "problem": "missing", "fix": "mount it"}]),
    context(criteria=Criteria(target_loss=13.0, max_steps=15, stop_on_target=True), demo=True),
    context(
        recipe={
            **RECIPE,
            "memory_fallback": {
                "reason": "trainer exit code 1; out of GPU memory",
                "folder": "attempt-1",
                "config_sha256": "1" * 64,
                "levers": {**STOCK.as_dict(), "unchecked_llm_layers": 17},
                "wall_seconds": 80.5,
                "taken_back": ["unchecked_llm_layers 17 -> 0"],
            },
        }
    ),
    context(
        interconnect={
            "backend": "nccl",
            "world_size": 2,
            "placement": [
                {"rank": r, "node_rank": 0, "local_rank": r, "host": "h", "gpu": "NVIDIA H200"} for r in (0, 1)
            ],
            "allreduce": {
                "message_bytes": 268435456,
                "iterations": 20,
                "seconds_per_allreduce": 0.001,
                "bus_bandwidth_gbps": 268.4,
            },
        }
    ),
]


@pytest.mark.parametrize("ctx", KINDS_OF_CONTEXT)
def test_every_kind_of_verdict_validates(ctx):
    for stream in (H200_NF4, MetricsStream([], 0)):
        verdict_mod.validate(verdict_mod.build(ctx, stream))


RANK_TIMES = [
    {
        "rank": rank,
        "local_rank": rank,
        "node_rank": 0,
        "host": "h",
        "iterations": 30,
        "forward_seconds_mean": 0.5 + rank,
    }
    for rank in (0, 1)
]


ROUND_TRIPS = [*KINDS_OF_CONTEXT, context(rank_times=RANK_TIMES, accumulative_counts=2)]


def test_the_round_trips_set_every_field_of_the_context():
    """So that the test below covers a new field: one of its contexts must set it."""
    defaults = {
        f.name: f.default if f.default_factory is MISSING else f.default_factory()
        for f in fields(RunContext)
        if (f.default, f.default_factory) != (MISSING, MISSING)  # required: always set
    }
    unset = {name for name, default in defaults.items() if all(getattr(ctx, name) == default for ctx in ROUND_TRIPS)}
    assert unset == set()


def test_each_field_of_the_context_has_one_place_the_schema_declares():
    """A context field is declared once, beside its place (run_context.placed); the
    schema must name that place, and no two fields may share one."""
    places = [verdict_path(f) for f in fields(RunContext)]
    assert len(set(places)) == len(places)
    for place in places:
        at = verdict_mod.schema()
        for key in place:
            at = at["properties"][key]


@pytest.mark.parametrize("ctx", ROUND_TRIPS)
def test_a_verdict_records_every_field_of_its_context(ctx):
    """`llava-bench verdict` recomputes a verdict from the context it recorded: every
    field of RunContext comes back from the verdict as it went in, so a field added
    without its place in the verdict (and the schema) fails here."""
    for stream in (H200_NF4, MetricsStream([], 0)):
        verdict = verdict_mod.build(ctx, stream)
        verdict_mod.validate(verdict)
        assert verdict_mod.context_from_verdict(verdict) == ctx


def test_problems_make_the_verdict_invalid_with_exit_2():
    built = verdict_mod.build(context(problems=[{"path": "p", "problem": "x", "fix": "y"}]), MetricsStream([], 0))
    assert (built["status"], built["exit_code"]) == ("invalid", 2)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda v: v.pop("status"),
        lambda v: v.update(status="passed"),
        lambda v: v.update(exit_code=7),
        lambda v: v["criteria"].update(max_steps=0),
        lambda v: v.update(surprise=1),
        lambda v: v["result"]["curve"].append({"iter": 1, "step": 0, "loss": 1.0, "finite": True}),
        lambda v: v.update(notes="none"),
        lambda v: v["recipe"].update(precision="int8"),
        lambda v: v["throughput"]["seconds_per_step"].update(mean="fast"),
    ],
)
def test_malformed_verdicts_are_rejected(corrupt):
    document = copy.deepcopy(verdict_mod.build(context(), H200_NF4))
    corrupt(document)
    with pytest.raises(jsonschema.ValidationError):
        verdict_mod.validate(document)


def test_every_schema_property_has_a_description():
    def walk(node, where):
        if isinstance(node, dict):
            for name, child in node.get("properties", {}).items():
                assert "description" in child, f"{where}.{name} has no description"
                walk(child, f"{where}.{name}")
            if "items" in node:
                walk(node["items"], f"{where}[]")

    walk(verdict_mod.schema(), "verdict")
    walk(verdict_mod.schema("node.schema.json"), "node")


def test_a_node_document_is_held_to_its_schema_and_the_verdicts_vocabulary():
    fingerprint = {
        "appliance_version": "0.1.0",
        "gpu_model": "cpu",
        "gpu_count": 0,
        "driver": None,
        "recipe_sha256": "",
        "dataset_sha256": None,
        "preflight": "ok",
    }
    document = {
        "node_rank": 1,
        "run_id": "20261203-000000-abcdef",
        "status": "pass",
        "reason": "node 0 reported the job's status: pass",
        "exit_code": 0,
        "node_status": "pass",
        "node_reason": "loss 1.0 < 2.3 at step 10",
        "problems": [],
        "termination": {"kind": "completed", "detail": "", "trainer_exit_code": 0},
        "fingerprint": fingerprint,
        "log_tails": {"rank0.stderr.log": ["done"]},
    }
    verdict_mod.validate_node_document(document)
    for wrong in ({"status": "passed"}, {"termination": {"kind": "finished", "detail": "", "trainer_exit_code": 0}}):
        with pytest.raises(jsonschema.ValidationError):
            verdict_mod.validate_node_document({**document, **wrong})


def test_throughput_skips_the_first_interval_and_states_the_window():
    built = verdict_mod.build(context(), H200_NF4)
    window = built["throughput"]["window"]
    assert (window["first_step"], window["last_step"], window["logged_intervals"]) == (10, 20, 3)
    times = [r.time for r in H200_NF4.records[1:]]
    assert built["throughput"]["seconds_per_step"]["median"] == pytest.approx(sorted(times)[1])
    assert built["throughput"]["samples_per_second"] == pytest.approx(64 / (sum(times) / 3))
    assert built["throughput"]["peak_memory_mib"] == 49451


def test_nan_losses_are_written_as_null_and_flagged(tmp_path):
    stream_path = tmp_path / "m.jsonl"
    stream_path.write_text('{"iter": 10, "loss": NaN, "time": 1.0}\n')
    built = verdict_mod.from_stream(stream_path, Criteria(max_steps=10))
    assert built["result"]["curve"] == [{"iter": 10, "step": 10, "loss": None, "finite": False}]
    assert built["status"] == "fail"
    json.loads(verdict_mod.dumps(built))  # strict JSON: no NaN literal


def test_verdict_command_on_the_seed_lines_is_error_naming_step_380():
    done = llava_bench("verdict", str(DATA / "seed_a100_metrics.jsonl"), "--json")
    assert done.returncode == 3, done.stderr
    document = json.loads(done.stdout)
    verdict_mod.validate(document)
    assert document["status"] == "error"
    assert "step 380" in document["reason"]


def test_verdict_command_with_overridden_criteria_passes():
    done = llava_bench("verdict", str(DATA / "seed_a100_metrics.jsonl"), "--target-loss", "2.7", "--max-steps", "380")
    assert done.returncode == 0, done.stderr
    assert "PASS" in done.stdout and "step 360" in done.stdout
    # The console says what the verdict notes, and what it knows of what ran.
    assert "note: the first logged loss (2.6702 at step 360) is already below the target 2.7" in done.stdout
    assert "speed ratio against: the seed's A100 run" in done.stdout and "hardware:" not in done.stdout


def test_verdict_command_on_a_missing_path_is_invalid(tmp_path):
    done = llava_bench("verdict", str(tmp_path / "nothing"))
    assert done.returncode == 2
    assert "nothing" in done.stderr


@pytest.mark.parametrize("max_iters, said", [(15, "iterations 11-15 ran but were not logged"), (10, None)])
def test_steps_a_completed_run_never_logged_are_named(max_iters, said):
    """--max-steps 15 logs at step 10 only (mmengine's interval): the verdict says steps 11-15 went unjudged."""
    from bench.verdict.metrics import parse_stream

    stream = parse_stream('{"iter": 10, "loss": 1.5, "time": 0.1, "data_time": 0.01, "lr": 1e-3}\n')
    context = RunContext(
        run_id="r",
        criteria=Criteria(target_loss=1.0, max_steps=max_iters),
        termination=Termination("completed"),
        recipe={"max_iters": max_iters},
    )
    notes = verdict_mod.build(context, stream)["notes"]
    assert any(said in note for note in notes) if said else not any("not logged" in note for note in notes)
