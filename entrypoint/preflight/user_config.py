"""A user's config at the layout root (layout.config_override), which runs as written:
it must load as XTuner's trainer loads it, train on the layout's own models and data
(those are what the checks read and the verdict describes), and not be asked for what
only the built-in recipe does."""

from __future__ import annotations

from pathlib import Path

from bench.core.layout import Layout
from bench.core.problem import Problem
from bench.recipe.config_facts import FACT_KEYS, PATH_KEYS, ConfigFacts, ConfigUnreadable, read_facts
from entrypoint.request import RunRequest


def layout_paths_problems(layout: Layout) -> list[Problem]:
    """A user config at the layout root must load, and every model and data path it
    gives the trainer must be the layout's own: those are what the checks read and the
    verdict describes (the trainer resolves relative paths from the layout root)."""
    config = layout.config_override
    if not config.is_file():
        return []
    try:
        paths = read_facts(config.read_text()).paths
    except ConfigUnreadable as error:
        return [
            Problem(
                str(config),
                f"the config override does not load as XTuner's trainer loads it ({error})",
                "fix the file or remove it to use the built-in recipe",
            )
        ]
    own = {
        "llm": layout.llm_dir,
        "tokenizer": layout.llm_dir,
        "visual_encoder": layout.clip_dir,
        "image_processor": layout.clip_dir,
        "data_path": layout.dataset_json,
        "image_folder": layout.image_folder,
    }
    problems = []
    for name, value in paths.items():
        if value is None:
            problems.append(
                Problem(
                    str(config),
                    f"{name} ({PATH_KEYS[name]}) is not a path string in it as XTuner's trainer reads it, so what "
                    "the trainer would load cannot be checked",
                    f"set it to {own[name]}, or remove the override",
                )
            )
            continue
        resolved = Path(value) if Path(value).is_absolute() else layout.root / value
        if not resolved.exists():
            problems.append(
                Problem(
                    str(config),
                    f"{name} {value!r} does not exist (resolved to {resolved})",
                    f"point it at {own[name]} or remove the override",
                )
            )
        elif resolved.resolve() != own[name].resolve():
            problems.append(
                Problem(
                    str(config),
                    f"{name} {value!r} is not the layout's {own[name]}: the appliance checks and reports the "
                    "layout's models and data, so a run on other files would be neither checked nor described",
                    f"point it at {own[name]} (put the files there), or remove the override",
                )
            )
    return problems


def user_config_problems(request: RunRequest, device: str, config: Path) -> tuple[ConfigFacts | None, list[Problem]]:
    """What a user's config does as written, and the options that cannot apply to it:
    the appliance never rewrites a user's model, so precision and levers are the file's."""
    fix = "leave the option out (the config's own value runs), edit the config, or remove it to use the built-in recipe"
    try:
        facts = read_facts(config.read_text())
    except ConfigUnreadable:
        return None, []  # the layout checks name it
    problems = []
    cpu_obstacles = [
        what
        for what, present in (
            ("4-bit weights (bitsandbytes)", facts.precision == "nf4"),
            ("AmpOptimWrapper", facts.optimizer_wrapper == "AmpOptimWrapper"),
        )
        if present
    ]
    if device == "cpu" and cpu_obstacles:
        problems.append(
            Problem(
                str(config),
                f"a user config runs as written, and on CPU this one cannot: {' and '.join(cpu_obstacles)} "
                "need CUDA (the built-in recipe has a CPU variant)",
                "run on GPUs, or remove the config",
            )
        )
    if "precision" in request.asked and facts.precision != request.recipe.precision:
        problems.append(
            Problem(
                "--precision",
                f"{request.recipe.precision}, but the config loads the LLM as "
                f"{facts.precision or 'something the appliance cannot read'}",
                fix,
            )
        )
    asked_levers = [name for name, value in vars(request.levers).items() if value not in (None, False)]
    if asked_levers:
        problems.append(
            Problem(
                "recipe levers", f"{', '.join(asked_levers)} apply to the built-in recipe, not to a user's config", fix
            )
        )
    # what the batch plan and the checks decide by; the rest, unread, is named unverified in the verdict
    decisive = [FACT_KEYS[name] for name in ("per_device_batch", "accumulative_counts", "precision")]
    unreadable = [key for key in facts.unreadable() if key in decisive]
    if unreadable:
        problems.append(
            Problem(
                str(config),
                f"cannot read {', '.join(unreadable)} from it as XTuner's trainer reads it (mmengine's Config): "
                "the appliance plans the batch and checks the GPUs by them",
                "give them plain values",
            )
        )
    return facts, problems
