"""Import the LLM folder's own model code with the installed transformers, before training.

The real internlm2-chat-20b folder brings its code (``trust_remote_code``), written
against some transformers release; code written for a newer one fails only when
every rank builds the model, after the collective check and minutes of start-up.
Preflight imports it in a child process instead (seconds, beside the deep checks) and
refuses with the missing name and the fix. The same import says whether the code
offers SDPA attention, which the attention lever needs.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from bench.core.problem import Problem
from entrypoint.launch.child import JsonChild, answer_main

PROBE_TIMEOUT_SECONDS = 180
LLM_REPO = "internlm/internlm2-chat-20b"
MISSING_NAME = re.compile(r"cannot import name '(\w+)' from '([\w.]+)'")
# Names model code imports that older transformers releases lack: the release that added each.
ADDED_IN_TRANSFORMERS = {("transformers.cache_utils", "StaticCache"): "4.38.0"}


@dataclass(frozen=True)
class ModelCode:
    """What importing the folder's code showed."""

    model_class: str | None  # module.Class of AutoModelForCausalLM, None when it failed
    supports_sdpa: bool
    problems: list[Problem] = field(default_factory=list)


def _import_model_class(folder: Path) -> dict:
    """In the child: the causal-LM class the config names, imported as XTuner will."""
    import transformers

    config = json.loads((folder / "config.json").read_text())
    reference = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if reference:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model_class = get_class_from_dynamic_module(reference, str(folder))
    else:
        model_class = getattr(transformers, (config.get("architectures") or ["?"])[0])
    return {
        "model_class": f"{model_class.__module__}.{model_class.__qualname__}",
        "supports_sdpa": bool(getattr(model_class, "_supports_sdpa", False)),
        "shape_mismatches": _shape_mismatches(folder, model_class),
    }


def _shape_mismatches(folder: Path, model_class) -> list[list]:
    """[shard, tensor, its shape there, the shape the config gives it] for every weight of
    the safetensors shards whose header disagrees with the model the config builds (on
    the meta device: no memory): a wrong shard fails only when every rank loads it."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    with torch.device("meta"):
        expected = {name: list(t.shape) for name, t in model_class._from_config(config).state_dict().items()}
    mismatches = []
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            with shard.open("rb") as stream:
                header = json.loads(stream.read(int.from_bytes(stream.read(8), "little")))
        except (OSError, ValueError, MemoryError):
            continue  # a shard that is not whole: the deep checks name it
        for name, entry in header.items():
            if name in expected and isinstance(entry, dict) and entry.get("shape") != expected[name]:
                mismatches.append([shard.name, name, entry.get("shape"), expected[name]])
    return mismatches


def _code_file(folder: Path) -> Path:
    """The file the failure is in: the module auto_map names for the model, else config.json."""
    try:
        reference = json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    except (OSError, ValueError, KeyError, TypeError):
        return folder / "config.json"
    module = (reference[0] if isinstance(reference, list) else reference).split(".")[0]
    return folder / f"{module}.py"


def import_problem(folder: Path, error: str, transformers_version: str) -> Problem:
    """The refusal for code that does not import: the missing name and what would fix it."""
    revision = f"llava-bench prepare --revision {LLM_REPO}=<commit>"
    missing = MISSING_NAME.search(error)
    if missing:
        name, module = missing.groups()
        added = ADDED_IN_TRANSFORMERS.get((module, name))
        fix = (
            f"the code needs {module}.{name}, which transformers {transformers_version} lacks"
            + (f" (added in {added})" if added else "")
            + f": put the revision of {LLM_REPO} written for transformers {transformers_version} there ({revision}), "
            "or run an image whose transformers has it"
        )
    else:
        fix = (
            f"download the model folder again, or the revision written for transformers {transformers_version} "
            f"({revision})"
        )
    return Problem(
        str(_code_file(folder)),
        f"the model's code does not import with transformers {transformers_version}: {error}",
        fix,
    )


class ModelCodeProbe(JsonChild):
    """The child process that imports the code; started early, read when needed, never
    left running (a context manager)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        super().__init__("entrypoint.preflight.model_code", str(self.folder))

    def result(self) -> ModelCode:
        answer = self.answer(PROBE_TIMEOUT_SECONDS)
        if "error" in answer:
            problem = import_problem(self.folder, answer["error"], metadata.version("transformers"))
            return ModelCode(None, False, [problem])
        problems = [
            Problem(
                str(self.folder / shard),
                f"{name} is {shape} in the shard, but the model config.json describes makes it {wanted}",
                f"the shard does not belong to this config: download {LLM_REPO} again (llava-bench prepare)",
            )
            for shard, name, shape, wanted in answer.get("shape_mismatches", [])[:5]
        ]
        return ModelCode(answer["model_class"], answer["supports_sdpa"], problems)


if __name__ == "__main__":
    answer_main(_import_model_class, Path(sys.argv[1]))
