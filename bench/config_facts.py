"""What an XTuner config does, read back from its text: batch, accumulation, precision.

The verdict states what ran, so it reads these from the config XTuner is given (the
rendered template or a user's own file) and the ``--cfg-options`` passed with it, not
from what the appliance meant to render. Only plain Python is evaluated: constants,
names assigned earlier, arithmetic, ``dict(...)``, ``int(...)`` and ``float(...)``
calls, lists, and names the config imports (``Symbol``, e.g. ``torch.float16``);
anything else is unknown, never guessed.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass

UNKNOWN = object()  # a value the evaluator cannot know


@dataclass(frozen=True)
class Symbol:
    """A name the config imports or an attribute of one (``AmpOptimWrapper``, ``torch.float16``)."""

    name: str


OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}
CONVERSIONS = {"int": int, "float": float}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _evaluate(node: ast.expr, values: dict):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values.get(node.id, Symbol(node.id))
    if isinstance(node, ast.Attribute):
        dotted = _dotted(node)
        return UNKNOWN if dotted is None else Symbol(dotted)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        try:
            return OPERATORS[type(node.op)](left, right)
        except (TypeError, ZeroDivisionError, OverflowError):
            return UNKNOWN
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(operand, (int, float)) else UNKNOWN
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(item, values) for item in node.elts]
    if isinstance(node, ast.Call):
        name = _dotted(node.func)
        if name == "dict" and not node.args:
            return {kw.arg: _evaluate(kw.value, values) for kw in node.keywords if kw.arg is not None}
        if name in CONVERSIONS and len(node.args) == 1:
            argument = _evaluate(node.args[0], values)
            try:
                return CONVERSIONS[name](argument)
            except (TypeError, ValueError):
                return UNKNOWN
    return UNKNOWN


def top_level_values(config_text: str) -> dict:
    """Every top-level ``name = value`` of the config, evaluated in order (UNKNOWN where
    the evaluator cannot tell). Raises SyntaxError for text that is not Python."""
    values: dict = {}
    for statement in ast.parse(config_text).body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            values[statement.targets[0].id] = _evaluate(statement.value, values)
    return values


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def with_cfg_options(values: dict, cfg_options: list[str]) -> dict:
    """``values`` with XTuner's ``--cfg-options key.sub=value`` applied, as mmengine does."""
    import copy

    values = copy.deepcopy(values)
    for option in cfg_options:
        key, _, raw = option.partition("=")
        *parents, last = key.split(".")
        target = values
        for part in parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[last] = _literal(raw)
    return values


def lookup(values: dict, dotted: str, default=UNKNOWN):
    """``values["a"]["b"]`` for ``"a.b"``; ``default`` where a key is absent, UNKNOWN where a
    parent is not a known dict."""
    current = values
    for part in dotted.split("."):
        if not isinstance(current, dict):
            return UNKNOWN
        if part not in current:
            return default
        current = current[part]
    return current


@dataclass(frozen=True)
class ConfigFacts:
    """What the config makes XTuner do; None where it cannot be read."""

    per_device_batch: int | None
    accumulative_counts: int | None
    precision: str | None  # nf4 (4-bit weights), bf16, fp16 or fp32: the LLM's weights
    max_iters: int | None
    optimizer_wrapper: str | None = None  # the optim_wrapper's type (AmpOptimWrapper needs a GPU)

    def unreadable(self) -> list[str]:
        """The facts that could not be read, by the config key that holds each."""
        keys = {
            "per_device_batch": "train_dataloader.batch_size",
            "accumulative_counts": "optim_wrapper.accumulative_counts",
            "precision": "model.llm.torch_dtype / quantization_config",
            "max_iters": "train_cfg.max_iters",
        }
        return [key for name, key in keys.items() if getattr(self, name) is None]


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _precision(llm: dict) -> str | None:
    quantization = lookup(llm, "quantization_config", None)
    if isinstance(quantization, dict):
        if quantization.get("load_in_4bit") is True and quantization.get("bnb_4bit_quant_type") == "nf4":
            return "nf4"
        return None
    if quantization is not None:
        return None
    dtype = lookup(llm, "torch_dtype", None)
    names = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
    return names.get(dtype.name) if isinstance(dtype, Symbol) else None


def read_facts(config_text: str, cfg_options: list[str] = ()) -> ConfigFacts:
    """The facts of a config as XTuner will run it with ``cfg_options``."""
    values = with_cfg_options(top_level_values(config_text), list(cfg_options))
    llm = lookup(values, "model.llm")
    return ConfigFacts(
        per_device_batch=_positive_int(lookup(values, "train_dataloader.batch_size")),
        accumulative_counts=_positive_int(lookup(values, "optim_wrapper.accumulative_counts", 1)),
        precision=_precision(llm) if isinstance(llm, dict) else None,
        max_iters=_positive_int(lookup(values, "train_cfg.max_iters")),
        optimizer_wrapper=wrapper.name if isinstance(wrapper := lookup(values, "optim_wrapper.type"), Symbol) else None,
    )
