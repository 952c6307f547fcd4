"""The verdict's recipe section: what ran, read back from the config XTuner was given
(bench/recipe/config_facts.py reads it as XTuner's train.py does), with the run's
micro-batches and what the memory model chose for them."""

from __future__ import annotations

from bench.recipe.config_facts import read_facts
from bench.recipe.render import REFERENCE_GLOBAL_BATCH, RecipeOptions, RenderedRecipe
from entrypoint import __version__
from entrypoint.launch.sizing import Sizing
from entrypoint.preflight.environment import xtuner_provenance


def recipe_record(
    recipe: RenderedRecipe, options: RecipeOptions, world_size: int, sizing: Sizing | None = None
) -> dict:
    """What ran, read back from the config XTuner was given and its --cfg-options; with
    the run's micro-batches and what the memory model predicted for them (``sizing``)."""
    xtuner_version, xtuner_commit = xtuner_provenance()
    facts = read_facts(recipe.text, recipe.cfg_options)
    global_batch = facts.per_device_batch * facts.accumulative_counts * world_size
    records = sizing.plan.records if sizing is not None else None
    return {
        "source": recipe.source,
        "config_sha256": recipe.sha256,
        "appliance_version": __version__,
        "xtuner_version": xtuner_version,
        "xtuner_commit": xtuner_commit,
        "precision": facts.precision,
        "device": options.device,
        "per_device_batch": facts.per_device_batch,
        "accumulative_counts": facts.accumulative_counts,
        "global_batch": global_batch,
        "reference_global_batch": REFERENCE_GLOBAL_BATCH,
        "on_reference_schedule": global_batch == REFERENCE_GLOBAL_BATCH,
        "max_iters": facts.max_iters,
        "lr": facts.lr,
        "schedule": facts.schedule,
        "max_length": facts.max_length,
        "paths": facts.paths,
        "records_after_filters": records,
        # read back from neither the config nor the tokenized dataset: not restated from defaults
        "unverified": facts.unreadable()
        + ([] if records is not None else ["records_after_filters (XTuner filters them inside the trainer)"]),
        "seed": options.seed,
        "levers": options.levers.as_dict(),
        "deviations": recipe.deviations,
        "cfg_options": recipe.cfg_options,
        **(
            {"micro_batches": sizing.plan.summary(), "memory": sizing.memory}
            if sizing is not None
            else {"micro_batches": None, "memory": None}
        ),
    }
