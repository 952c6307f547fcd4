"""What an XTuner config makes the trainer do, read back the way XTuner's ``train.py``
reads it: mmengine's ``Config`` from the file's text, then the ``--cfg-options`` merged
as mmengine's ``DictAction`` parses them.

The verdict states what ran from this reading, not from what the appliance meant to
render, so a user's config that reassigns a value (``batch_size //= 4``), computes it
or inherits it reads back as XTuner will run it. Imported names (types, dtypes) come
back as their dotted names: nothing the config imports is imported or built. A value
that is absent or of the wrong kind is None, which callers name as unverified; it is
never replaced by a default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

# ConfigFacts field: the config key it is read from (paths: see PATH_KEYS)
FACT_KEYS = {
    "per_device_batch": "train_dataloader.batch_size",
    "accumulative_counts": "optim_wrapper.accumulative_counts",
    "precision": "model.llm.torch_dtype / quantization_config",
    "max_iters": "train_cfg.max_iters",
    "optimizer_wrapper": "optim_wrapper.type",
    "lr": "optim_wrapper.optimizer.lr",
    "schedule": "param_scheduler",
    "max_length": "train_dataloader.dataset.max_length",
}
# what the trainer loads: the config keys that name each path
PATH_KEYS = {
    "llm": "model.llm.pretrained_model_name_or_path",
    "tokenizer": "train_dataloader.dataset.tokenizer.pretrained_model_name_or_path",
    "visual_encoder": "model.visual_encoder.pretrained_model_name_or_path",
    "image_processor": "train_dataloader.dataset.image_processor.pretrained_model_name_or_path",
    "data_path": "train_dataloader.dataset.data_path",
    "image_folder": "train_dataloader.dataset.image_folder",
}
DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


class ConfigUnreadable(ValueError):
    """The config does not load as mmengine loads it (the trainer would fail the same way)."""


@dataclass(frozen=True)
class ConfigFacts:
    """What the config makes XTuner do; None where it cannot be read."""

    per_device_batch: int | None
    accumulative_counts: int | None
    precision: str | None  # nf4 (4-bit weights), bf16, fp16 or fp32: the LLM's weights
    max_iters: int | None
    optimizer_wrapper: str | None = None  # the optim_wrapper's type (AmpOptimWrapper needs a GPU)
    lr: float | None = None
    # each LR scheduler: its type's name and its plain settings (begin, end, factors)
    schedule: list[dict] | None = None
    max_length: int | None = None
    paths: dict[str, str | None] = field(default_factory=dict)  # PATH_KEYS' names

    def unreadable(self) -> list[str]:
        """The facts that could not be read, by the config key that holds each."""
        missing = [FACT_KEYS[f.name] for f in fields(self) if f.name in FACT_KEYS and getattr(self, f.name) is None]
        return missing + [PATH_KEYS[name] for name in PATH_KEYS if self.paths.get(name) is None]

    @property
    def schedule_epochs(self) -> float | None:
        """Where the LR schedule ends, in epochs (its last scheduler's end)."""
        ends = [s.get("end") for s in self.schedule or []]
        return max(ends) if ends and all(isinstance(end, (int, float)) for end in ends) else None


def _lookup(values: dict, dotted: str):
    current = values
    for part in dotted.split("."):
        if not isinstance(current, dict) or part not in current:
            return None
        current = current[part]
    return current


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _short_name(value) -> str | None:
    return value.rsplit(".", 1)[-1] if isinstance(value, str) else None


def _precision(llm) -> str | None:
    if not isinstance(llm, dict):
        return None
    quantization = llm.get("quantization_config")
    if quantization is not None:
        nf4 = (
            isinstance(quantization, dict)
            and quantization.get("load_in_4bit") is True
            and quantization.get("bnb_4bit_quant_type") == "nf4"
        )
        return "nf4" if nf4 else None
    return DTYPES.get(llm.get("torch_dtype"))


def _schedule(schedulers) -> list[dict] | None:
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    if not isinstance(schedulers, list) or not all(isinstance(s, dict) for s in schedulers):
        return None
    plain = (int, float, bool, type(None))
    return [
        {"type": _short_name(s.get("type")), **{k: v for k, v in s.items() if k != "type" and isinstance(v, plain)}}
        for s in schedulers
    ]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_facts(config_text: str, cfg_options: list[str] = ()) -> ConfigFacts:
    """The facts of a config as XTuner will run it with ``cfg_options``. Raises
    ConfigUnreadable where mmengine cannot load the text (syntax or an error in it)."""
    return _read_facts(config_text, tuple(cfg_options))


@functools.cache  # preflight reads a user's config in two checks: mmengine loads it once
def _read_facts(config_text: str, cfg_options: tuple[str, ...]) -> ConfigFacts:
    from mmengine.config import Config, DictAction

    try:
        config = Config.fromstring(config_text, ".py")
        options = dict(option.partition("=")[::2] for option in cfg_options)
        config.merge_from_dict({key: DictAction._parse_iterable(value) for key, value in options.items()})
        values = config.to_dict()
    except Exception as error:  # noqa: BLE001 - whatever stops mmengine stops the trainer too
        message = str(error).strip().splitlines()
        raise ConfigUnreadable(f"{type(error).__name__}: {message[-1] if message else ''}") from None
    accumulative_counts = _lookup(values, "optim_wrapper.accumulative_counts")
    return ConfigFacts(
        per_device_batch=_positive_int(_lookup(values, "train_dataloader.batch_size")),
        accumulative_counts=1 if accumulative_counts is None else _positive_int(accumulative_counts),
        precision=_precision(_lookup(values, "model.llm")),
        max_iters=_positive_int(_lookup(values, "train_cfg.max_iters")),
        optimizer_wrapper=_short_name(_lookup(values, "optim_wrapper.type")),
        lr=_number(_lookup(values, "optim_wrapper.optimizer.lr")),
        schedule=_schedule(_lookup(values, "param_scheduler")),
        max_length=_positive_int(_lookup(values, "train_dataloader.dataset.max_length")),
        paths={
            name: value if isinstance(value := _lookup(values, key), str) else None for name, key in PATH_KEYS.items()
        },
    )
