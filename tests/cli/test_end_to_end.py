"""Real runs: synthetic layout -> XTuner's own tools/train.py on CPU -> verdict.

Nothing is mocked: the trainer is XTuner's, with mmengine, transformers and the
tiny random models of the synthetic layout. CUDA and DeepSpeed cannot run here;
the GPU path is exercised on a GPU machine (docs/GPU-VALIDATION.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.core.layout import Layout
from bench.synth.spec import DEMO_CRITERIA, DEMO_PER_DEVICE_BATCH
from bench.verdict import document as verdict_mod
from tests.conftest import DATA, llava_bench, run_argv, spawn_run, training_run, tree_digest

DEMO_ARGS = [
    "--device",
    "cpu",
    "--max-steps",
    str(DEMO_CRITERIA.max_steps),
    "--target-loss",
    str(DEMO_CRITERIA.target_loss),
    "--per-device-batch",
    str(DEMO_PER_DEVICE_BATCH),
]


def only_run_dir(results: Path) -> Path:
    (run_dir,) = [p for p in results.iterdir() if p.is_dir() and p.name != "cache"]
    return run_dir


def test_synth_is_deterministic_for_a_seed(synthetic_layout, tmp_path):
    done = llava_bench("synth", str(tmp_path / "again"))
    assert done.returncode == 0, done.stderr
    assert tree_digest(tmp_path / "again", "data", "model") == tree_digest(synthetic_layout, "data", "model")


def test_synth_refuses_a_folder_that_holds_a_layout(synthetic_layout):
    done = llava_bench("synth", str(synthetic_layout))
    assert done.returncode == 2
    assert "already holds a layout" in done.stderr


def test_synth_never_writes_over_images_it_did_not_write(tmp_path):
    """A folder holding LLaVA-Pretrain's images but no JSON or model folders yet (prepare stopped half-way)."""
    image = Layout.at(tmp_path).image_folder / "00000" / "000000000.jpg"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"the user's image")
    done = llava_bench("synth", str(tmp_path))
    assert done.returncode == 2 and "already holds a layout or part of one" in done.stderr
    assert image.read_bytes() == b"the user's image" and not Layout.at(tmp_path).llm_dir.exists()


@pytest.mark.parametrize("command", [["synth"], ["demo", "--root"]])
def test_synth_and_demo_into_a_folder_that_cannot_be_written_are_invalid(command, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = llava_bench(*command, str(blocker / "inside"))
    assert done.returncode == 2, done.stderr
    assert "cannot be written to" in done.stderr and "Traceback" not in done.stderr


def test_demo_root_is_the_layout_as_in_every_command(layout_copy):
    """An existing layout at --root is run on, not given a second one inside it (here
    refused at once: --device cuda on a machine without GPUs)."""
    done = llava_bench("demo", "--root", str(layout_copy), "--device", "cuda")
    assert done.returncode == 2 and "no CUDA GPU is visible" in done.stderr, done.stdout + done.stderr
    assert "writing the synthetic layout" not in done.stdout + done.stderr and not (layout_copy / "llava").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_layout):
    """One real training run, shared by the assertions below."""
    out = tmp_path_factory.mktemp("results")
    before = tree_digest(synthetic_layout, "data", "model")
    done = spawn_run(synthetic_layout, out, *DEMO_ARGS)
    return done, only_run_dir(out), before


def test_run_passes_with_exit_0_and_a_schema_valid_verdict(finished_run):
    done, run_dir, _ = finished_run
    assert done.returncode == 0, done.stdout + done.stderr
    verdict = json.loads((run_dir / "verdict.json").read_text())
    verdict_mod.validate(verdict)
    assert verdict["status"] == "pass"
    assert verdict["termination"] == {"kind": "completed", "detail": "", "trainer_exit_code": 0}
    assert verdict["result"]["steps_completed"] == DEMO_CRITERIA.max_steps
    assert verdict["recipe"]["precision"] == "fp32" and verdict["recipe"]["device"] == "cpu"
    assert verdict["recipe"]["xtuner_version"]
    assert "PASS" in done.stdout and str(run_dir / "verdict.json") in done.stdout


def test_the_loss_curve_falls(finished_run):
    _, run_dir, _ = finished_run
    curve = json.loads((run_dir / "verdict.json").read_text())["result"]["curve"]
    losses = [point["loss"] for point in curve]
    assert len(losses) == DEMO_CRITERIA.max_steps // 10
    quarter = len(losses) // 4
    assert sum(losses[-quarter:]) / quarter < 0.6 * sum(losses[:quarter]) / quarter
    assert min(losses) < 0.5 * losses[0]


def test_progress_lines_were_printed(finished_run):
    done, _, _ = finished_run
    assert f"step    10/{DEMO_CRITERIA.max_steps} | loss" in done.stdout
    assert "s/step | ETA" in done.stdout


def test_logs_config_and_metrics_are_kept(finished_run):
    _, run_dir, _ = finished_run
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert "Traceback" not in (run_dir / "logs" / "node-0" / "rank0.stderr.log").read_text()
    assert "Iter(train)" in (run_dir / "logs" / "node-0" / "rank0.stdout.log").read_text()
    config = (run_dir / "config.py").read_bytes()
    assert hashlib.sha256(config).hexdigest() == verdict["recipe"]["config_sha256"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == DEMO_CRITERIA.max_steps // 10


def test_the_verdict_carries_provenance_and_explained_figures(finished_run, synthetic_layout):
    _, run_dir, _ = finished_run
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert (
        verdict["inputs"]["dataset_sha256"]
        == hashlib.sha256(Layout.at(synthetic_layout).dataset_json.read_bytes()).hexdigest()
    )
    assert verdict["inputs"]["dataset_samples"] == 2048
    assert verdict["inputs"]["model_shapes"]["vit"]["image_size"] == 28
    # read back from the config XTuner ran; on CPU XTuner tokenizes, so the records it keeps are not known
    recipe = verdict["recipe"]
    assert (recipe["lr"], recipe["max_length"], recipe["paths"]["data_path"]) == (
        1e-3,
        1472,
        str(Layout.at(synthetic_layout).dataset_json),
    )
    assert recipe["unverified"] == ["records_after_filters (XTuner filters them inside the trainer)"]
    assert verdict["environment"]["gpus"] == []  # CPU
    assert verdict["environment"]["software"]["packages"]["xtuner"] == verdict["recipe"]["xtuner_version"]
    throughput = verdict["throughput"]
    assert throughput["seconds_per_step"]["median"] > 0
    assert throughput["flops_per_step"] > 0 and throughput["flop_model"]["image_tokens_per_sample"] == 4
    # the appliance's TokenCountHook logged the counts: the caption's tokens are a part of the text's
    flop_model = throughput["flop_model"]
    assert flop_model["text_tokens_source"] == "logged"
    assert 0 < flop_model["labelled_tokens_per_sample"] < flop_model["text_tokens_per_sample"]
    assert flop_model["recipe_work"] == {
        "checkpointed_llm_layers": 2,
        "vit_backward": True,
        "head_at_every_position": True,
        "selective_llm_layers": 0,
        "from": "recipe.levers",
    }
    assert throughput["mfu"] is None and throughput["flop_model"]["why_null"] == "not run on a GPU"
    assert verdict["baseline"]["speedup_vs_seed_a100"] is None  # a CPU run says nothing against an A100
    assert verdict["baseline"]["why_null"] == "not run on GPUs"
    timing = verdict["timing"]
    assert 0 < timing["startup_seconds"] < timing["wall_seconds"]
    # The appliance's own process: interpreter, imports and preflight come before the trainer.
    assert timing["preflight_seconds"] > 0
    assert timing["launch_to_first_step_seconds"] == pytest.approx(
        timing["preflight_seconds"] + timing["startup_seconds"]
    )
    # the trainer was started beside the checks and handed the command the verdict shows
    early = timing["startup"]["early_start"]
    assert 0 < early["lead_seconds"] < timing["preflight_seconds"] and early["imports_seconds"] > 0
    gate = json.loads((run_dir / "logs" / "node-0" / "trainer-gate.json").read_text())
    assert gate["argv"] == verdict["topology"]["launch_command"][2:]


def test_report_and_plot_are_written_and_redrawn(finished_run):
    _, run_dir, _ = finished_run
    report = (run_dir / "report.md").read_text()
    assert report.startswith(f"# llava-bench {run_dir.name}: PASS")
    assert "![loss and seconds per step](loss.png)" in report
    assert "| launch to first step, s (preflight + earlier attempts + trainer start-up) | " in report
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What ran, on what: the same lines in the report and on the console.
    assert "## What ran, on what" in report and "- **hardware**: CPU only (no GPU)" in report
    assert "- **software**: torch " in report and "xtuner " in report and "- **memory retry**: none" in report
    # A CPU's small figures keep three significant digits instead of reading as 0.0.
    (achieved,) = [line for line in report.splitlines() if line.startswith("| achieved TFLOP/s per device")]
    assert float(achieved.split("|")[2]) > 0, achieved
    (run_dir / "loss.png").unlink()
    done = llava_bench("report", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert (run_dir / "loss.png").is_file()
    assert done.stdout.strip() == f"written: {run_dir / 'report.md'} and {run_dir / 'loss.png'}"


def test_the_console_closes_with_what_ran(finished_run):
    done, run_dir, _ = finished_run
    report = (run_dir / "report.md").read_text()
    for label in ("hardware", "software", "topology", "recipe", "inputs"):
        (line,) = [line for line in report.splitlines() if line.startswith(f"- **{label}**: ")]
        assert f"{label}: {line.split('**: ', 1)[1]}" in done.stdout


def test_criteria_asking_more_steps_than_the_run_trained_are_not_failed(finished_run):
    """A results folder and its bare stream: the same criteria, the same answer."""
    _, run_dir, _ = finished_run
    more = ("--target-loss", "0.01", "--max-steps", str(2 * DEMO_CRITERIA.max_steps), "--json")
    folder = llava_bench("verdict", str(run_dir), *more)
    bare = llava_bench("verdict", str(run_dir / "metrics.jsonl"), *more)
    assert folder.returncode == bare.returncode == 3, folder.stderr + bare.stderr
    assert json.loads(folder.stdout)["status"] == json.loads(bare.stdout)["status"] == "error"


def test_junit_xml_for_ci_systems(finished_run, tmp_path):
    import xml.etree.ElementTree as ET

    _, run_dir, _ = finished_run
    done = llava_bench("verdict", str(run_dir), "--junit", str(tmp_path / "pass.xml"))
    assert done.returncode == 0
    suite = ET.parse(tmp_path / "pass.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "0", "0")
    done = llava_bench("verdict", str(run_dir), "--target-loss", "0.01", "--junit", str(tmp_path / "fail.xml"))
    assert done.returncode == 1
    failure = ET.parse(tmp_path / "fail.xml").getroot().find("testcase/failure")
    assert failure is not None and "never below 0.01" in failure.get("message")


def test_the_layout_is_not_modified(finished_run, synthetic_layout):
    _, _, before = finished_run
    assert tree_digest(synthetic_layout, "data", "model") == before
    assert not (synthetic_layout / "results").exists()  # --out was used


def test_verdict_recomputes_the_stored_one_exactly(finished_run):
    _, run_dir, _ = finished_run
    done = llava_bench("verdict", str(run_dir), "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (run_dir / "verdict.json").read_text()
    assert "note:" not in done.stderr
    stored = json.loads(done.stdout)
    assert stored["metrics_sha256"] == hashlib.sha256((run_dir / "metrics.jsonl").read_bytes()).hexdigest()


def test_verdict_says_when_the_stream_changed_since_the_run(finished_run, tmp_path):
    """An edited metrics.jsonl: the recomputed verdict is the stream's, and the command says
    that the stream is not the one the run recorded and that the result changed."""
    _, run_dir, _ = finished_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line["loss"] = 5.0  # never below the target
    (copy / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = llava_bench("verdict", str(copy))
    assert done.returncode == 1, done.stderr
    message = " ".join(done.stderr.split())
    assert "the metrics stream changed since the run" in message
    assert "the recomputed verdict differs from the stored one: FAIL" in message and "stored PASS" in message


def test_stop_on_target_ends_at_the_first_crossing(synthetic_layout, tmp_path):
    done = spawn_run(synthetic_layout, tmp_path, *DEMO_ARGS, "--stop-on-target", "--json")
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["termination"]["kind"] == "stopped_on_target"
    assert verdict["result"]["steps_completed"] == verdict["result"]["first_step_below_target"]
    assert verdict["result"]["steps_completed"] < DEMO_CRITERIA.max_steps


def test_user_config_at_the_root_overrides_the_template(layout_copy, tmp_path):
    """The seed's way: a config file beside data/ and model/, with relative paths."""
    rendered = DATA / "user_config.py"
    Layout.at(layout_copy).config_override.write_text(rendered.read_text())
    done = spawn_run(layout_copy, tmp_path / "out", *DEMO_ARGS, "--max-steps", "20", "--json")
    verdict = json.loads(done.stdout)
    assert verdict["recipe"]["source"] == "user"
    assert verdict["termination"]["kind"] == "completed", verdict["termination"]
    assert verdict["result"]["steps_completed"] == 20


def test_a_user_configs_verdict_says_what_ran(layout_copy, tmp_path):
    """A user config of batch 4, asked for per-device batch 8 and global batch 16: the
    run trains batch 8 with 2-fold accumulation (XTuner's own dump of the config it ran
    says so), and the verdict says the same, off the reference schedule."""
    from bench.recipe.config_facts import read_facts

    config = (DATA / "user_config.py").read_text().replace("batch_size = 8  # per device", "batch_size = 4")
    Layout.at(layout_copy).config_override.write_text(config)
    out = tmp_path / "out"
    done = spawn_run(
        layout_copy,
        out,
        "--device",
        "cpu",
        "--per-device-batch",
        "8",
        "--global-batch",
        "16",
        "--max-steps",
        "20",
        "--target-loss",
        "1e9",
        "--json",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = json.loads(done.stdout)
    recipe = verdict["recipe"]
    assert (recipe["per_device_batch"], recipe["accumulative_counts"], recipe["global_batch"], recipe["max_iters"]) == (
        8,
        2,
        16,
        40,
    )
    assert recipe["on_reference_schedule"] is False and any(
        "not the reference 1024" in note for note in verdict["notes"]
    )
    (dumped,) = (only_run_dir(out) / "xtuner").glob("*.py")  # mmengine's dump of the config it ran
    ran = read_facts(dumped.read_text())
    assert (ran.per_device_batch, ran.accumulative_counts) == (8, 2)
    # the LR, schedule and paths as the trainer's dump has them; the records XTuner kept are not known
    assert (recipe["lr"], recipe["schedule"], recipe["paths"]) == (ran.lr, ran.schedule, ran.paths)
    assert recipe["paths"]["data_path"] == "./data/llava_data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
    assert recipe["records_after_filters"] is None and recipe["unverified"] == [
        "records_after_filters (XTuner filters them inside the trainer)"
    ]
    assert any(note.startswith("not read back from the config XTuner ran or the data") for note in verdict["notes"])
    assert verdict["result"]["curve"][-1]["iter"] == 40 and verdict["result"]["steps_completed"] == 20
    assert verdict["throughput"]["samples_per_second"] == pytest.approx(
        16 / verdict["throughput"]["seconds_per_step"]["mean"]
    )


# name: (what the user config holds instead, run arguments, words in the refusal)
USER_CONFIG_REFUSALS = {
    "another precision asked": ({}, ["--precision", "bf16"], "--precision: bf16, but the config loads the LLM as fp32"),
    "a lever asked": ({}, ["--sdpa-attention"], "sdpa_attention apply to the built-in recipe"),
    "4-bit weights on CPU": (
        {"quantization_config=None": "quantization_config=dict(load_in_4bit=True, bnb_4bit_quant_type='nf4')"},
        [],
        "on CPU this one cannot: 4-bit weights",
    ),
    "a batch that is no whole number (as mmengine reads it)": (
        {"batch_size = 8  # per device": "batch_size = 16 / 2"},
        [],
        "cannot read train_dataloader.batch_size",
    ),
}


@pytest.mark.parametrize("name", list(USER_CONFIG_REFUSALS))
def test_an_option_a_user_config_cannot_take_is_refused(layout_copy, tmp_path, name):
    replacements, arguments, words = USER_CONFIG_REFUSALS[name]
    config = (DATA / "user_config.py").read_text()
    for old, new in replacements.items():
        assert old in config
        config = config.replace(old, new)
    Layout.at(layout_copy).config_override.write_text(config)
    done = spawn_run(layout_copy, tmp_path, "--device", "cpu", "--max-steps", "20", *arguments)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr


def test_a_trainer_crash_is_an_error_naming_the_cause(layout_copy, tmp_path):
    """A config error only the trainer finds (preflight cannot): the optimizer refuses a text LR."""
    config = (DATA / "user_config.py").read_text().replace("lr = 1e-3", "lr = 'fast'")
    Layout.at(layout_copy).config_override.write_text(config)
    out = tmp_path / "out"
    done = spawn_run(layout_copy, out, *DEMO_ARGS, "--json")
    assert done.returncode == 3
    verdict = json.loads(done.stdout)
    assert verdict["status"] == "error"
    assert verdict["termination"]["kind"] == "crashed"
    assert "TypeError" in verdict["reason"] and "rank0.stderr.log" in verdict["reason"]
    assert (only_run_dir(out) / "verdict.json").is_file()


def _leftovers(out: Path) -> str:
    """Processes whose command line names the run's results folder (the trainer's do)."""
    return subprocess.run(["pgrep", "-af", str(out)], capture_output=True, text=True).stdout


# SIGTERM: a scheduler's stop; SIGHUP: the terminal or ssh session that started it closed.
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_whole_run_and_leaves_an_aborted_verdict(endless_layout, tmp_path, stop):
    process = training_run(endless_layout, tmp_path)
    process.send_signal(stop)
    process.wait(timeout=60)
    assert process.returncode == 3
    verdict = json.loads((only_run_dir(tmp_path) / "verdict.json").read_text())
    verdict_mod.validate(verdict)
    assert verdict["status"] == "aborted"
    assert f"{stop.name} received" in verdict["termination"]["detail"]
    assert verdict["result"]["steps_completed"] >= 10  # the partial curve is kept
    assert _leftovers(tmp_path) == "", "trainer processes outlived the run"


def test_the_trainer_dies_with_an_appliance_killed_outright(endless_layout, tmp_path):
    """kill -9 (a scheduler's hard kill after its grace time) leaves no verdict, but no
    trainer holding the GPUs with nobody to judge or stop it either."""
    process = training_run(endless_layout, tmp_path)
    assert _leftovers(tmp_path), "the trainer should be running"
    process.kill()
    process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while _leftovers(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _leftovers(tmp_path) == "", "the trainer outlived the appliance"


def _children(pid: int) -> list[str]:
    """The command lines of a process's children (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_sigterm_during_preflight_leaves_an_aborted_verdict_and_no_child(synthetic_layout, tmp_path):
    """Preflight of LLaVA-Pretrain's 558k records takes seconds: a signal then still ends
    in a verdict (aborted, exit 3), and the children that import the model's code and
    tokenize the dataset are gone, the tokenizer's half-written folder with it."""
    process = subprocess.Popen(
        [
            *run_argv(synthetic_layout, tmp_path),
            "--tokenized-cache",
            *DEMO_ARGS,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    children = {"entrypoint.preflight.model_code", "entrypoint.preflight.tokenized_cache", "bench.trainer.gate"}
    while not children <= {
        module for child in _children(process.pid) for module in child.split()
    }:  # preflight is importing the code and tokenizing, the trainer importing
        assert time.monotonic() < deadline and process.poll() is None, "preflight never started its children"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3, stderr
    verdict = json.loads((only_run_dir(tmp_path) / "verdict.json").read_text())
    verdict_mod.validate(verdict)
    assert (
        verdict["status"] == "aborted"
        and "SIGTERM received before training started" in verdict["termination"]["detail"]
    )
    assert not list(tmp_path.rglob("xtuner"))
    assert not list(tmp_path.glob("cache/.tokenized-*"))
    llm_dir = Layout.at(synthetic_layout).llm_dir
    for child in (
        f"entrypoint.preflight.model_code {llm_dir}",
        f"entrypoint.preflight.tokenized_cache .* {llm_dir}",
        f"bench.trainer.gate {tmp_path}",
    ):  # this run's
        assert subprocess.run(["pgrep", "-f", child], capture_output=True, text=True).stdout == ""


def test_results_on_a_read_only_place_are_invalid_not_a_crash(synthetic_layout, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = spawn_run(synthetic_layout, blocker / "results", *DEMO_ARGS)
    assert done.returncode == 2
    assert "--out" in done.stderr


def test_a_broken_layout_leaves_an_invalid_verdict_and_exit_2(layout_copy, tmp_path):
    layout = Layout.at(layout_copy)
    (layout.llm_dir / "config.json").unlink()
    done = spawn_run(layout_copy, tmp_path / "out", *DEMO_ARGS)
    assert done.returncode == 2
    assert str(layout.llm_dir / "config.json") in done.stderr
    verdict = json.loads((only_run_dir(tmp_path / "out") / "verdict.json").read_text())
    verdict_mod.validate(verdict)
    assert verdict["status"] == "invalid"
    assert verdict["problems"][0]["path"] == str(layout.llm_dir / "config.json")
    # the trainer, started once the cheap checks passed, was stopped at its gate
    logs = only_run_dir(tmp_path / "out") / "logs" / "node-0"
    assert "stop" in json.loads((logs / "trainer-gate.json").read_text())
    assert "stopped at its gate before training" in (logs / "rank0.stdout.log").read_text()


def test_the_synthetic_llm_is_internlm2_with_its_own_code(synthetic_layout):
    """The layout's LLM folder is laid out as the real internlm2-chat-20b: InternLM2's
    architecture and model code (copied from the installed xtuner), its config.json
    keys, and the marker says no stand-in was needed."""
    from bench.core.layout import SYNTHETIC_MARKER_NAME

    llm_dir = Layout.at(synthetic_layout).llm_dir
    config = json.loads((llm_dir / "config.json").read_text())
    assert config["architectures"] == ["InternLM2ForCausalLM"] and config["model_type"] == "internlm2"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert config["attn_implementation"] == "eager" and config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert (llm_dir / "modeling_internlm2.py").is_file() and (llm_dir / "configuration_internlm2.py").is_file()
    marker = json.loads((Layout.at(synthetic_layout).clip_dir / SYNTHETIC_MARKER_NAME).read_text())
    assert marker["llm_stand_in"] is None


def test_without_internlm2_code_a_llama_stands_in_and_says_why(tmp_path, monkeypatch):
    """Where the installed xtuner lacks InternLM2's code (the image's pinned commit), the
    LLM is a Llama of the same shape, and the layout's marker says why."""
    from bench.core.layout import SYNTHETIC_MARKER_NAME
    from bench.synth import models as synth_models
    from bench.synth import writer as synth

    monkeypatch.setattr(synth_models, "internlm2_code_folder", lambda: None)
    layout = synth.write_synthetic_layout(tmp_path / "llava", synth.SynthSpec(samples=512, llm_train_steps=1))
    assert json.loads((layout.llm_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not (layout.llm_dir / "modeling_internlm2.py").exists()
    marker = json.loads((layout.clip_dir / SYNTHETIC_MARKER_NAME).read_text())
    assert "does not ship InternLM2's model code" in marker["llm_stand_in"]
