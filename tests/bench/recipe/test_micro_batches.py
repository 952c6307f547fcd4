"""The micro-batches the appliance plans before launch are the ones XTuner trains on.

Held against XTuner's real dataloader, built by mmengine's Runner from the rendered
config (the tokenized dataset, the pinned DefaultSampler and default_collate_fn), for
two ranks (the sampler's rank and world size given as torch.distributed would give
them), over an epoch's end; and the padded LLM positions against XTuner's own
prepare_inputs_labels_for_multimodal with the layout's LLM.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from bench.core.layout import Layout
from bench.core.shapes import CLIP_VIT_L_336, INTERNLM2_20B, against_real_shapes
from bench.recipe.levers import Levers
from bench.recipe.micro_batches import RecordLengths, plan
from bench.recipe.render import RecipeOptions, render
from bench.recipe.tokenization import cache_name
from entrypoint import __version__
from entrypoint.preflight.tokenized_cache import build

BATCH = 8
WORLD = 2
SEED = 42


@pytest.fixture(scope="module")
def tokenized(synthetic_layout, tmp_path_factory) -> Path:
    layout = Layout.at(synthetic_layout)
    folder = tmp_path_factory.mktemp("cache") / cache_name("test", layout.llm_dir)
    build(layout.dataset_json, layout.llm_dir, folder)
    return folder


def xtuner_dataloader(layout: Layout, folder: Path, tmp_path: Path, rank: int, monkeypatch):
    """The train dataloader mmengine's Runner builds from the rendered config, on ``rank`` of WORLD."""
    import mmengine.dataset.sampler as sampler_module
    from mmengine.config import Config
    from mmengine.runner import Runner

    options = RecipeOptions(
        device="cpu",
        per_device_batch=BATCH,
        seed=SEED,
        levers=Levers(tokenized_cache=True),
        tokenized_cache_folder=folder,
    )
    config = tmp_path / f"config-{rank}.py"
    config.write_text(render(layout, options, __version__).text)
    monkeypatch.setattr(sampler_module, "get_dist_info", lambda: (rank, WORLD))
    cfg = Config.fromfile(str(config))
    return Runner.build_dataloader(cfg.train_dataloader, seed=SEED)


def test_the_plan_is_the_micro_batches_xtuners_dataloader_forms(synthetic_layout, tokenized, tmp_path, monkeypatch):
    import torch

    layout = Layout.at(synthetic_layout)
    lengths = RecordLengths.from_tokenized(tokenized)
    records = len(lengths.text_tokens)
    per_epoch = -(-(-(-records // WORLD)) // BATCH)
    planned = plan(lengths, BATCH, WORLD, 1, per_epoch + 4, SEED, image_tokens=4)
    assert planned.micro_iterations == per_epoch + 4
    checked = 0
    for rank in range(WORLD):
        loader = xtuner_dataloader(layout, tokenized, tmp_path, rank, monkeypatch)
        for epoch, rows in (
            (0, range(0, 6)),
            (0, range(per_epoch - 2, per_epoch)),
            (1, range(per_epoch, per_epoch + 4)),
        ):
            loader.sampler.set_epoch(epoch)  # what mmengine's loop does at each epoch
            batches = iter(loader)
            first = rows.start - epoch * per_epoch
            for _ in range(first):
                next(batches)
            for row in rows:
                data = next(batches)["data"]
                ids, labels = data["input_ids"], data["labels"]
                assert ids.shape == (planned.samples[row, rank], planned.text_tokens[row, rank]), (rank, row)
                assert int((labels[:, 1:] != -100).sum()) == planned.labelled[row, rank], (rank, row)
                checked += 1
    assert checked == WORLD * 12
    # the padded positions, as XTuner's LLaVA model lays the image's tokens in
    from transformers import AutoModelForCausalLM
    from xtuner.model.utils import prepare_inputs_labels_for_multimodal

    llm = AutoModelForCausalLM.from_pretrained(str(layout.llm_dir), trust_remote_code=True)
    loader = xtuner_dataloader(layout, tokenized, tmp_path, 0, monkeypatch)
    loader.sampler.set_epoch(0)
    for row, batch in zip(range(3), loader):
        data = dict(batch["data"])
        data["pixel_values"] = torch.zeros(len(data["input_ids"]), 4, llm.config.hidden_size)
        prepared = prepare_inputs_labels_for_multimodal(llm=llm, **data)
        assert prepared["inputs_embeds"].shape[1] == planned.positions[row, 0]


def test_the_longest_micro_batch_names_its_step_rank_and_records(tokenized):
    lengths = RecordLengths.from_tokenized(tokenized)
    planned = plan(lengths, BATCH, WORLD, 4, 30, SEED, image_tokens=576)
    longest = planned.longest
    assert longest.positions == planned.positions.max() == longest.text_tokens + 575
    assert longest.step == longest.micro_iteration // 4 + 1 and planned.micro_iterations == 120
    lengths_by_id = dict(zip(lengths.ids, lengths.text_tokens.tolist()))
    assert (
        len(longest.records) == longest.samples
        and max(lengths_by_id[i] for i in longest.records) == longest.text_tokens
    )
    summary = planned.summary()
    assert summary["text_tokens_per_sample"] == pytest.approx(
        float((planned.text_tokens * planned.samples).sum() / planned.samples.sum()), abs=1e-3
    )


def test_a_run_longer_than_the_epochs_it_plans_says_it_was_cut():
    lengths = RecordLengths(["a", "b", "c"], np.array([5, 9, 7]), np.array([1, 1, 1]), np.array([2, 3, 4]))
    planned = plan(lengths, 2, 1, 1, 10**9, SEED, image_tokens=4)
    assert "cut at" in planned.detail and planned.micro_iterations == 16 * 2


REAL_SHAPES = {"llm": asdict(INTERNLM2_20B), "vit": asdict(CLIP_VIT_L_336)}


def sized(folder: Path, gpu_mib: int, per_device_batch: int = 32, shapes: dict = REAL_SHAPES):
    """What `run` on GPUs of ``gpu_mib`` chooses for the tokenized dataset in ``folder`` (real shapes by default)."""
    from bench.recipe.lever_defaults import resolve_levers
    from bench.recipe.levers import LeverRequest
    from entrypoint.launch.sizing import size_run
    from entrypoint.preflight.tokenized_cache import Tokenization

    levers, _ = resolve_levers(LeverRequest(), "cuda", "nf4", supports_sdpa=True)
    options = RecipeOptions(device="cuda", per_device_batch=per_device_batch, max_steps=60, levers=levers)
    built = Tokenization("built", str(folder), None, None, 0.0, None)
    return size_run(options, LeverRequest(), built, 1, shapes, [gpu_mib], supports_sdpa=True)


def test_the_synthetic_text_is_llava_pretrains_length(tokenized):
    """About 48 padded text tokens a sample at batch 32, as the seed's A100 lines give for LLaVA-Pretrain."""
    padded = plan(RecordLengths.from_tokenized(tokenized), 32, 1, 1, 60, SEED, 576).summary()["text_tokens_per_sample"]
    assert abs(padded - 48) <= 0.15 * 48, padded


def test_longer_captions_on_the_same_gpu_leave_fewer_layers_kept(synthetic_layout, tokenized, tmp_path):
    from bench.synth.spec import SynthSpec
    from bench.synth.writer import write_real_shape_layout

    long = write_real_shape_layout(
        tmp_path / "long", replace(SynthSpec(), caption_scale=3), models_from=Path(synthetic_layout)
    )
    long_folder = tmp_path / "long-cache"
    build(long.dataset_json, long.llm_dir, long_folder)
    short_run, long_run = sized(tokenized, 143_771), sized(long_folder, 143_771)
    assert long_run.plan.longest.text_tokens > 2.5 * short_run.plan.longest.text_tokens
    kept = [
        (run.options.levers.unchecked_llm_layers, run.options.levers.selective_llm_layers)
        for run in (short_run, long_run)
    ]
    assert kept == [(2, 46), (0, 41)]  # (unchecked, selective)
    assert short_run.memory["predicted_peak_mib"] <= short_run.memory["budget_mib"]
    assert long_run.memory["predicted_peak_mib"] <= long_run.memory["budget_mib"]
    assert short_run.problem is None and long_run.problem is None


def test_a_micro_batch_no_setting_fits_is_refused_with_a_batch_that_does(tokenized):
    refused = sized(tokenized, 30_000)
    problem = refused.problem
    assert problem is not None and problem.path == "dataset"
    longest = refused.plan.longest
    assert f"step {longest.step} " in problem.problem and longest.records[0] in problem.problem
    assert "--per-device-batch 16 --global-batch 32" in problem.fix
    assert sized(tokenized, 30_000, per_device_batch=16).problem is None


def test_the_memory_figures_bound_a_smaller_model_and_say_nothing_of_a_larger_one(tokenized):
    """The figures were measured on the 20B shapes: a smaller model (a test's tiny one)
    gets them as an upper bound that refuses nothing; a larger one is not sized."""
    tiny = {"llm": {**REAL_SHAPES["llm"], "hidden": 64, "layers": 2}, "vit": REAL_SHAPES["vit"]}
    larger = {"llm": {**REAL_SHAPES["llm"], "layers": 60}, "vit": REAL_SHAPES["vit"]}
    assert [against_real_shapes(s) for s in (REAL_SHAPES, tiny, larger)] == ["real", "smaller", "larger"]
    real, bounded = sized(tokenized, 30_000), sized(tokenized, 30_000, shapes=tiny)
    assert real.problem is not None and real.memory["upper_bound"] is False
    assert bounded.problem is None and bounded.memory["upper_bound"] is True
    assert "an upper bound for this smaller model" in sized(tokenized, 143_771, shapes=tiny).described()
    unsized = sized(tokenized, 143_771, shapes=larger)
    assert unsized.memory["sized"] is False and "larger than the 20B shapes" in unsized.memory["why"]
    assert unsized.options.levers.unchecked_llm_layers == 0 and unsized.problem is None
