"""Deep preflight: everything that can be known before loading 40 GB of weights.

Record shapes, duplicate ids, every referenced image (opened and decoded, in
parallel), model folders against their own index and config, the CLIP geometry the
recipe assumes. Like the layout checks, it lists all problems and writes nothing.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.core.inputs import DatasetJson
from bench.core.layout import SYNTHETIC_MARKER_NAME, Layout
from bench.core.problem import Problem
from entrypoint.preflight.layout_checks import examples

LLM_ARCHITECTURES = {
    "InternLM2ForCausalLM",  # the real model
    "LlamaForCausalLM",  # Llama-shaped stand-ins (the synthetic layout)
}
CLIP_IMAGE_SIZE, CLIP_PATCH = 336, 14  # max_length = 2048 - (336/14)^2 assumes these


def record_problems(records: list, json_path: Path) -> list[Problem]:
    """Shape of every record: id, image, human/gpt turns, exactly one <image>; unique ids."""
    kinds: dict[str, list[str]] = {}

    def note(kind: str, index: int, record) -> None:
        name = record.get("id") if isinstance(record, dict) else None
        kinds.setdefault(kind, []).append(f"#{index}" + (f" (id {name})" if name else ""))

    for index, record in enumerate(records):
        if not isinstance(record, dict):
            note("is not an object", index, record)
            continue
        if not isinstance(record.get("id"), str) or not record["id"]:
            note("has no string id", index, record)
        if not isinstance(record.get("image"), str) or not record["image"]:
            note("has no image path", index, record)
        turns = record.get("conversations")
        if (
            not isinstance(turns, list)
            or len(turns) < 2
            or not all(
                isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str)
                for t in turns
            )
        ):
            note("has no list of human/gpt turns with string values", index, record)
            continue
        if turns[0]["from"] != "human" or not any(t["from"] == "gpt" for t in turns):
            note("does not start with a human turn followed by a gpt answer", index, record)
        if sum(t["value"].count("<image>") for t in turns if t["from"] == "human") != 1:
            note("does not hold exactly one <image> in its human turns", index, record)
    mixed = _mixed_field_types([r for r in records if isinstance(r, dict)])
    counts = Counter(r.get("id") for r in records if isinstance(r, dict) and isinstance(r.get("id"), str))
    duplicates = [name for name, count in counts.items() if count > 1]
    problems = [
        Problem(
            str(json_path),
            f"{len(where)} record(s) {kind}: {examples(where)}",
            "the JSON is not LLaVA-Pretrain's: download blip_laion_cc_sbu_558k.json again",
        )
        for kind, where in kinds.items()
    ]
    problems += [
        Problem(
            str(json_path),
            mixed_one,
            "give the field one type in every record, or remove it (the recipe reads id, image and conversations)",
        )
        for mixed_one in mixed
    ]
    if duplicates:
        problems.append(
            Problem(
                str(json_path),
                f"{len(duplicates)} duplicate id(s): {examples(duplicates)}",
                "each sample must appear once: download the JSON again",
            )
        )
    return problems


# The CLIP image processor guesses the channel axis: an image with a side of 3 px or
# less is taken for channels first (1 px: "mean must have 1 elements" at the first
# batch; 3 px: read as another image, silently).
SMALLEST_IMAGE_SIDE = 4


def _decode(path: str) -> str | None:
    """None if the image opens and decodes fully and the image processor reads it as an
    image, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            small = min(image.size) < SMALLEST_IMAGE_SIDE
        return (
            f"are smaller than {SMALLEST_IMAGE_SIDE} px on a side (the CLIP image processor takes such a side for "
            "the channel axis)"
            if small
            else None
        )
    except FileNotFoundError:
        return "missing"
    except Exception as error:  # noqa: BLE001 - any decoder failure is the finding
        return f"does not decode ({type(error).__name__})"


def _json_type(value):
    """What Arrow infers a JSON value as: numbers are one type (ints widen to floats),
    None goes with any; a list or object by what it holds."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return ("list", _merged([_json_type(item) for item in value]))
    if isinstance(value, dict):
        return ("object", tuple(sorted((key, _json_type(item)) for key, item in value.items())))
    return type(value).__name__


class _Conflict(Exception):
    pass


def _merge(a, b):
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "list":
        return ("list", _merge(a[1], b[1]))
    if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "object":
        fields = dict(a[1])
        for key, kind in b[1]:
            fields[key] = _merge(fields.get(key), kind)
        return ("object", tuple(sorted(fields.items())))
    raise _Conflict


def _merged(kinds):
    merged = None
    for kind in kinds:
        merged = _merge(merged, kind)
    return merged


def _describe(kind) -> str:
    return kind if isinstance(kind, str) else {"list": "a list", "object": "an object"}[kind[0]]


def _mixed_field_types(records: list[dict]) -> list[str]:
    """Fields whose type varies between records, as XTuner's dataset (datasets' Arrow
    tables) refuses them, each with two records that disagree. The turns are checked on
    their own; a record's other fields one by one (a fast pass: most are strings)."""
    seen: dict[str, tuple] = {}  # field -> (its type so far, the record that set it)
    said = {}
    for record in records:
        for key, value in record.items():
            if key == "conversations" or key in said:
                continue
            before = seen.get(key)
            refused = ": the datasets library XTuner builds its dataset with refuses a field whose type varies"
            try:
                kind = _json_type(value)
            except _Conflict:  # a list whose items differ, within one record
                said[key] = f"field {key!r} holds a list of mixed types in record {record.get('id')!r}{refused}"
                continue
            try:
                merged = _merge(before[0] if before else None, kind)
            except _Conflict:
                said[key] = (
                    f"field {key!r} holds {_describe(before[0])} in record {before[1]!r} and {_describe(kind)} "
                    f"in record {record.get('id')!r}{refused}"
                )
                continue
            if before is None or merged != before[0]:
                seen[key] = (merged, record.get("id") if before is None else before[1])
    return list(said.values())


def image_problems(
    records: list,
    image_folder: Path,
    sample: int | None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Problem]:
    """Open and decode every referenced image (or a seeded sample), on every core."""
    names = sorted({r["image"] for r in records if isinstance(r, dict) and isinstance(r.get("image"), str)})
    if sample is not None and sample < len(names):
        names = random.Random(seed).sample(names, sample)
    failures: dict[str, list[str]] = {}
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        paths = [str(image_folder / name) for name in names]
        for done, (name, failure) in enumerate(
            zip(names, pool.map(_decode, paths, chunksize=64), strict=True), start=1
        ):
            if failure:
                failures.setdefault(failure, []).append(name)
            if progress:
                progress(done, len(names))
    checked = f"of {len(names)} checked" + (" (a sample)" if sample is not None and sample < len(names) else "")
    return [
        Problem(
            str(image_folder),
            f"{len(bad)} image(s) {failure} {checked}: {examples(bad)}",
            "replace those images, or remove their records from the dataset JSON"
            if failure.startswith("are smaller")
            else "unzip images.zip again (llava-bench prepare skips the intact ones)",
        )
        for failure, bad in failures.items()
    ]


def _config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the layout checks already name a missing config


def llm_problems(folder: Path) -> list[Problem]:
    """Architecture, and every shard of the index whole (the layout checks found them present)."""
    config = _config(folder)
    if config is None:
        return []
    problems = []
    architectures = set(config.get("architectures") or [])
    if not architectures & LLM_ARCHITECTURES:
        problems.append(
            Problem(
                str(folder / "config.json"),
                f"architectures {sorted(architectures)} is not InternLM2 (or a Llama-shaped stand-in)",
                "put internlm/internlm2-chat-20b in this folder",
            )
        )
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            return [*problems, Problem(str(index_path), "the index does not parse", "download the model folder again")]
        for shard in shards:
            path = folder / shard
            if path.is_file() and (damage := safetensors_damage(path)) is not None:
                problems.append(Problem(str(path), damage, "download this shard again"))
    return problems


def safetensors_damage(path: Path) -> str | None:
    """What is wrong with a safetensors file's frame, or None: an 8-byte header length,
    the JSON header, then the tensor bytes up to the largest end offset the header
    names. Reads only the header, so it costs nothing on 40 GB of shards."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        length = int.from_bytes(stream.read(8), "little")
        if size < 8 or 8 + length > size:
            return f"{size} bytes: shorter than its own safetensors header (truncated?)"
        try:
            header = json.loads(stream.read(length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "the safetensors header does not parse"
    if size < 8 + length + end:
        return f"{size} bytes, but its header describes {8 + length + end} (truncated?)"
    return None


def clip_problems(folder: Path, synthetic: bool) -> list[Problem]:
    """The vision tower and its preprocessor must agree, and be ViT-L/14 at 336 px."""
    config = _config(folder)
    if config is None:
        return []
    vision = config.get("vision_config", config)
    size, patch = vision.get("image_size"), vision.get("patch_size")
    problems = []
    try:
        preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        preprocessor = None
    crop = (preprocessor or {}).get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if preprocessor is not None and crop != size:
        problems.append(
            Problem(
                str(folder / "preprocessor_config.json"),
                f"crops {crop} px but the vision tower takes {size} px",
                "download openai/clip-vit-large-patch14-336 again",
            )
        )
    if not synthetic and (size, patch) != (CLIP_IMAGE_SIZE, CLIP_PATCH):
        problems.append(
            Problem(
                str(folder / "config.json"),
                f"image size {size}, patch {patch}: the recipe needs CLIP ViT-L/14 at 336 px (576 image tokens)",
                "put openai/clip-vit-large-patch14-336 in this folder",
            )
        )
    return problems


def deep_problems(layout: Layout, dataset: DatasetJson, sample: int | None = None, progress=None) -> list[Problem]:
    """All deep problems of a layout that passed the layout checks."""
    records = dataset.records
    synthetic = (layout.clip_dir / SYNTHETIC_MARKER_NAME).is_file()
    return [
        *record_problems(records, layout.dataset_json),
        *image_problems(records, layout.image_folder, sample, progress=progress),
        *llm_problems(layout.llm_dir),
        *clip_problems(layout.clip_dir, synthetic),
    ]
