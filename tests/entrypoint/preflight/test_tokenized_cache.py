"""The tokenized-cache lever: built beside the checks, reused by later runs with
XTuner's losses, every rank agreeing on hit or miss, and XTuner's own tokenization
where a build fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.core.layout import Layout
from bench.core.tokenized_folder import COMPLETENESS_RECORD
from bench.recipe.tokenization import cache_name
from tests.conftest import short_cpu_run, torchrun_gloo


def _losses(verdict: dict) -> list[float]:
    return [point["loss"] for point in verdict["result"]["curve"]]


def test_the_tokenized_cache_is_built_then_reused_with_xtuners_losses(synthetic_layout, tmp_path):
    """Real CPU runs: XTuner's own tokenization (no cache), then the cache lever twice:
    the first run's appliance tokenizes before training, the second finds the cache;
    the same tokens give the same losses in all three."""
    verdicts = []
    for lever in ("--no-tokenized-cache", "--tokenized-cache", "--tokenized-cache"):
        done = short_cpu_run(synthetic_layout, tmp_path, lever)
        assert done.returncode == 0, done.stderr[-3000:]
        verdicts.append(json.loads(done.stdout))
    (cache,) = (tmp_path / "cache").iterdir()
    assert (cache / "dataset_info.json").is_file() and cache.name.startswith("tokenized-")
    assert verdicts[0]["timing"]["startup"].get("tokenization") is None
    built, found = (v["timing"]["startup"]["tokenization"] for v in verdicts[1:])
    assert built["source"] == "built" and built["folder"] == str(cache) and built["build"]["kept"] > 0
    assert found["source"] == "cache" and found["build"] is None and found["wait_seconds"] == 0
    assert [v["recipe"]["levers"]["tokenized_cache"] for v in verdicts] == [False, True, True]
    assert any(str(cache) in d for d in verdicts[1]["recipe"]["deviations"])
    trainer = verdicts[2]["timing"]["startup"]["trainer"]
    assert 0 < trainer["runner_seconds"] and 0 <= trainer["dataset_seconds"]
    (rank,) = verdicts[2]["ranks"]["per_rank"]  # one CPU process, timed by its hook
    assert rank["rank"] == 0 and rank["iterations"] > 0 and verdicts[2]["ranks"]["stragglers"] == []
    # a cache damaged on disk (an arrow file emptied, as a power loss leaves it) is built again, and said so
    (arrow,) = cache.glob("*.arrow")
    arrow.write_bytes(b"")
    done = short_cpu_run(synthetic_layout, tmp_path, "--tokenized-cache")
    assert done.returncode == 0, done.stderr[-3000:]
    rebuilt = json.loads(done.stdout)
    tokenization = rebuilt["timing"]["startup"]["tokenization"]
    assert tokenization["source"] == "built" and f"{arrow.name} is 0" in tokenization["detail"]
    assert "was built again" in tokenization["detail"] and arrow.stat().st_size > 0
    assert _losses(rebuilt) == _losses(verdicts[2])
    curves = [[p["loss"] for p in v["result"]["curve"]] for v in verdicts]
    assert curves[1] == curves[0] and curves[2] == curves[0]


def test_a_failed_build_leaves_the_tokenization_to_xtuner_and_the_run_passes(synthetic_layout, tmp_path):
    """The cache's folder cannot be made (a file stands where it goes): the appliance's
    build fails, the trainer tokenizes with XTuner's code, cannot keep the result either,
    and trains; the verdict says why."""
    (tmp_path / "cache").write_text("not a folder")
    done = short_cpu_run(synthetic_layout, tmp_path, "--tokenized-cache")
    assert done.returncode == 0, done.stderr[-3000:]
    tokenization = json.loads(done.stdout)["timing"]["startup"]["tokenization"]
    assert tokenization["source"] == "failed" and "Error" in tokenization["detail"]
    assert "XTuner's own code" in done.stderr + done.stdout


def test_the_cache_folder_changes_with_the_dataset_or_the_tokenizer(layout_copy):
    llm_dir = Layout.at(layout_copy).llm_dir
    name = cache_name("a" * 64, llm_dir)
    assert name == cache_name("a" * 64, llm_dir) != cache_name("b" * 64, llm_dir)
    (llm_dir / "tokenizer_config.json").write_text((llm_dir / "tokenizer_config.json").read_text() + " ")
    assert name != cache_name("a" * 64, llm_dir)


def test_a_layout_for_start_up_timing_holds_more_records_than_images(tmp_path):
    """`perf --records 558128` times the start-up with LLaVA-Pretrain's record count
    without writing as many images: the extra records reuse the images in turn."""
    from bench.synth.spec import SynthSpec
    from bench.synth.writer import write_synthetic_layout
    from entrypoint.preflight.deep import record_problems
    from entrypoint.preflight.layout_checks import check_layout

    layout = write_synthetic_layout(tmp_path / "llava", SynthSpec(samples=512, records=1300, llm_train_steps=1))
    records = json.loads(layout.dataset_json.read_text())
    assert len(records) == 1300 and len({r["id"] for r in records}) == 1300
    assert len({r["image"] for r in records}) == 512 == len(list(layout.image_folder.rglob("*.jpg")))
    assert records[512]["conversations"] == records[0]["conversations"]
    assert check_layout(layout) == [] and record_problems(records, layout.dataset_json) == []


@pytest.mark.parametrize("holders, cached", [((0, 1), True), ((1,), False)])
def test_every_rank_takes_the_cached_path_or_none_does(tmp_path, holders, cached):
    """A real torchrun of two gloo ranks: where only one rank sees a complete cache (a
    node whose results folder lacks it), both tokenize, since XTuner's tokenization is
    collective; where all see it, all load it."""
    for rank in holders:
        (tmp_path / f"rank{rank}").mkdir()
        (tmp_path / f"rank{rank}" / COMPLETENESS_RECORD).write_text('{"files": {}}')
    done = torchrun_gloo(Path(__file__).parent / "cache_agreement_worker.py", 2, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads((tmp_path / f"answer{rank}.json").read_text()) for rank in (0, 1)] == [cached, cached]
