"""An out-of-memory failure under the appliance's memory defaults ends in one retry
with them re-sized, not in a lost run, and the verdict's timing counts both attempts.

A real CPU run: XTuner's train.py, twice. What cannot happen on a CPU is simulated,
and only that: the memory model's choice (on GPUs it picks unchecked layers from the
cards' memory; here it is set to one layer), and running out of memory, which the LLM
folder's model code reports as CUDA does whenever a layer runs without checkpointing.
"""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from bench.core.layout import Layout
from bench.core.statuses import Criteria
from bench.recipe.levers import Levers
from bench.recipe.render import RecipeOptions
from bench.synth.spec import DEMO_PER_DEVICE_BATCH
from entrypoint import run as pipeline
from entrypoint.preflight import stage as run_preflight
from entrypoint.request import RunRequest
from tests.conftest import spawn_run

# Raised by InternLM2Model.forward when it trains without checkpointing.
OUT_OF_MEMORY = """
        if self.training and not self.gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.38 GiB (simulated by the test)")
"""


def without_checkpointing_out_of_memory(layout: Layout) -> None:
    code = layout.llm_dir / "modeling_internlm2.py"
    text = code.read_text()
    anchor = "        if self.gradient_checkpointing and self.training and use_cache:"
    assert text.count(anchor) == 1, "InternLM2Model.forward changed: place the simulated failure elsewhere"
    code.write_text(text.replace(anchor, OUT_OF_MEMORY.strip("\n") + "\n" + anchor))


def test_the_run_restarts_once_with_the_memory_levers_re_sized_and_times_both_attempts(
    layout_copy, tmp_path, monkeypatch, capsys
):
    layout = Layout.at(layout_copy)
    without_checkpointing_out_of_memory(layout)
    chosen = Levers(unchecked_llm_layers=1)
    monkeypatch.setattr(run_preflight, "resolve_levers", lambda *args, **kwargs: (chosen, []))
    request = RunRequest(
        root=layout.root,
        out=tmp_path,
        criteria=Criteria(target_loss=1e9, max_steps=20),
        recipe=RecipeOptions(max_steps=20, per_device_batch=DEMO_PER_DEVICE_BATCH),
        device="cpu",
    )
    result = pipeline.execute(request, Console(file=None, soft_wrap=True))
    verdict = result.document
    assert result.exit_code == 0, verdict["reason"]
    assert verdict["status"] == "pass" and verdict["termination"]["kind"] == "completed"
    fallback = verdict["recipe"]["memory_fallback"]
    assert "out of GPU memory" in fallback["reason"] and "--unchecked-llm-layers 0" in fallback["reason"]
    assert fallback["taken_back"] == ["unchecked_llm_layers 1 -> 0"]
    assert fallback["levers"]["unchecked_llm_layers"] == 1 and verdict["recipe"]["levers"]["unchecked_llm_layers"] == 0
    run_dir = result.path.parent
    first = run_dir / fallback["folder"]
    assert "unchecked_llm_layers=1" in (first / "config.py").read_text()
    assert "CUDA out of memory" in (first / "logs" / "node-0" / "rank0.stderr.log").read_text()
    assert "LeveredLLaVAModel" not in (run_dir / "config.py").read_text()
    assert verdict["recipe"]["config_sha256"] != fallback["config_sha256"]
    assert json.loads((run_dir / "verdict.json").read_text())["recipe"]["memory_fallback"] == fallback
    assert fallback["shortfall_mib"] == round(3.38 * 1024, 1)  # the simulated "Tried to allocate 3.38 GiB"
    assert "restarting once with them re-sized" in capsys.readouterr().out
    # the timing counts both attempts: the first one's time is in the launch to the first step
    timing = verdict["timing"]
    first, second = timing["attempts"]
    assert first["termination"] == "crashed" and "out of GPU memory" in first["detail"]
    assert second["termination"] == "completed" and second["started_at"] == timing["started_at"]
    assert timing["earlier_attempts_seconds"] >= first["wall_seconds"] == fallback["wall_seconds"]
    assert timing["launch_to_first_step_seconds"] == pytest.approx(
        timing["preflight_seconds"] + timing["earlier_attempts_seconds"] + timing["startup_seconds"]
    )
    assert timing["launch_to_first_step_seconds"] > timing["earlier_attempts_seconds"] + timing["startup_seconds"]
    report = (run_dir / "report.md").read_text()
    assert "Training attempts:" in report and "1. " in report and "2. " in report
    assert "The retry re-sized unchecked_llm_layers 1 -> 0." in report


def test_an_out_of_memory_failure_under_the_users_own_choice_is_not_retried(layout_copy, tmp_path):
    layout = Layout.at(layout_copy)
    without_checkpointing_out_of_memory(layout)
    done = spawn_run(
        layout.root,
        tmp_path,
        "--device",
        "cpu",
        "--unchecked-llm-layers",
        "1",
        "--per-device-batch",
        str(DEMO_PER_DEVICE_BATCH),
        "--max-steps",
        "20",
        "--json",
    )
    verdict = json.loads(done.stdout)
    assert done.returncode == 3 and verdict["status"] == "error"
    assert "memory_fallback" not in verdict["recipe"]
    assert "out of GPU memory; hint: fewer LLM layers unchecked (--unchecked-llm-layers 0)" in verdict["reason"]
