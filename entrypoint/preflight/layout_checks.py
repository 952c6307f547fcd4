"""Layout checks that decide in seconds, before any model is loaded.

Every check adds problems instead of stopping at the first, so one ``validate``
tells the user everything to fix. Nothing here writes to the layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.core.inputs import BomError, DatasetJson, load_dataset
from bench.core.layout import SOURCE_RECORD_NAME, Layout
from bench.core.problem import Problem
from entrypoint.preflight.user_config import layout_paths_problems

EXAMPLES = 3  # offending records named per kind of problem
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES) or any(folder.glob("*.safetensors"))


def _check_model(folder: Path, what: str, repo: str, extra_files: tuple[tuple[str, ...], ...]) -> list[Problem]:
    download = f"`llava-bench prepare --root {folder.parent.parent}` downloads {repo} into {folder}"
    if not folder.is_dir():
        return [Problem(str(folder), f"the {what} folder is missing", download)]
    problems = []
    if not (folder / "config.json").is_file():
        problems.append(Problem(str(folder / "config.json"), f"the {what} has no config.json", download))
    if not _has_weights(folder):
        problems.append(
            Problem(
                str(folder),
                f"the {what} folder holds no weights (none of {', '.join(WEIGHT_FILES)} or *.safetensors)",
                download,
            )
        )
    for alternatives in extra_files:
        if not any((folder / name).is_file() for name in alternatives):
            problems.append(
                Problem(str(folder / alternatives[0]), f"the {what} lacks {' or '.join(alternatives)}", download)
            )
    for name, named_by in _named_files(folder):
        if not (folder / name).is_file():
            problems.append(Problem(str(folder / name), f"{named_by} names {name}, which is missing", download))
    return problems + _unparsed_json(folder, download)


def _unparsed_json(folder: Path, download: str, names: tuple[str, ...] | None = None) -> list[Problem]:
    """Every JSON file of a folder (or those ``names``) must parse: the trainer, the
    tokenizer and the verdict read them (a truncated config.json was a traceback)."""
    problems = []
    everything = sorted(folder.glob("*.json")) + sorted(folder.glob(".*.json"))
    paths = [folder / name for name in names] if names else everything
    for path in (p for p in paths if p.is_file()):
        try:
            json.loads(path.read_bytes())
        except (OSError, ValueError) as error:
            fix = (
                "delete it, or run llava-bench prepare again (it records where the files came from)"
                if path.name == SOURCE_RECORD_NAME
                else f"the file is damaged: {download}"
            )
            problems.append(Problem(str(path), f"does not parse as JSON ({error})", fix))
    return problems


def _json(path: Path) -> dict:
    """A JSON object from the folder, or {} (a missing or broken file is its own problem)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _named_files(folder: Path) -> list[tuple[str, str]]:
    """The files a model folder's own metadata says it holds: the code modules of
    config.json's and tokenizer_config.json's auto_map (InternLM2 brings its model and
    tokenizer code) and every shard of the safetensors index; (file, which file names it)."""
    named = []
    for metadata_name in ("config.json", "tokenizer_config.json"):
        for reference in (_json(folder / metadata_name).get("auto_map") or {}).values():
            for entry in reference if isinstance(reference, list) else [reference]:
                if isinstance(entry, str):
                    named.append((f"{entry.split('--')[-1].split('.')[0]}.py", f"{metadata_name}'s auto_map"))
    weight_map = _json(folder / "model.safetensors.index.json").get("weight_map")
    if isinstance(weight_map, dict):
        named += [(shard, "model.safetensors.index.json") for shard in sorted(set(map(str, weight_map.values())))]
    return list(dict.fromkeys(named))


def _check_dataset_json(path: Path) -> tuple[DatasetJson | None, list[Problem]]:
    """The JSON read and parsed (once: 558,128 records take seconds), or the problem that leaves none."""
    fix = f"download blip_laion_cc_sbu_558k.json of liuhaotian/LLaVA-Pretrain to {path}"
    if not path.is_file():
        return None, [Problem(str(path), "the dataset JSON is missing", fix)]
    try:
        dataset = load_dataset(path)
    except BomError:
        return None, [
            Problem(
                str(path),
                "the dataset JSON starts with a UTF-8 byte-order mark, which XTuner's reader (json.load) refuses",
                f"save it without the mark: sed -i '1s/^\\xEF\\xBB\\xBF//' {path}",
            )
        ]
    except (ValueError, UnicodeDecodeError) as error:
        return None, [Problem(str(path), f"the dataset JSON does not parse ({error})", f"the file is damaged: {fix}")]
    except OSError as error:
        return None, [Problem(str(path), f"the dataset JSON cannot be read ({error.strerror})", "make it readable")]
    if not isinstance(dataset.records, list) or not dataset.records:
        return None, [Problem(str(path), "the dataset JSON holds no records (expected a non-empty list)", fix)]
    return dataset, []


def examples(items: list[str]) -> str:
    """The first EXAMPLES offenders, and "..." where there are more."""
    return ", ".join(items[:EXAMPLES]) + (" ..." if len(items) > EXAMPLES else "")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def image_index(folder: Path) -> tuple[set[str], set[str]]:
    """(the files under ``folder``, as relative paths; the relative paths of symlinks that
    lead out of it). One walk with ``os.scandir`` (a directory entry says whether it is
    a file, a folder or a link without a stat), so 558k images take a second or two;
    only links are resolved, and links that stay inside are followed."""
    root = os.path.realpath(folder)
    files, escaping = set(), set()
    pending, walked = [("", str(folder))], {root}
    while pending:
        prefix, path = pending.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                relative = prefix + entry.name
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not _inside(target, root):
                        escaping.add(relative)
                    elif os.path.isdir(target) and target not in walked:
                        walked.add(target)
                        pending.append((relative + "/", entry.path))
                    elif os.path.isfile(target):
                        files.add(relative)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append((relative + "/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files.add(relative)
    return files, escaping


def _check_image_paths(layout: Layout, records: list) -> list[Problem]:
    """Every record's image is a file inside the images folder, after symlinks: an
    absolute path, a ``..`` that climbs out, or a link that leads out is refused,
    naming the records, as is a missing image."""
    files, escaping = image_index(layout.image_folder)
    outside, missing = [], []
    for index, record in enumerate(records):
        name = record.get("image") if isinstance(record, dict) else None
        if not isinstance(name, str) or not name:
            continue  # the deep checks name records without an image
        where = f"#{index} (id {record.get('id')}): {name}"
        normal = os.path.normpath(name)
        parts = normal.split(os.sep)
        leads_out = any("/".join(parts[: i + 1]) in escaping for i in range(len(parts)))
        if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep) or leads_out:
            outside.append(where)
        elif normal not in files:
            missing.append(where)

    problems = []
    if outside:
        problems.append(
            Problem(
                str(layout.image_folder),
                f"{len(outside)} record(s) name an image outside the images folder: {examples(outside)}",
                "image paths must be relative paths inside images/: "
                "fix "
                "the JSON or the links, or download LLaVA-Pretrain again",
            )
        )
    if missing:
        problems.append(
            Problem(
                str(layout.image_folder),
                f"{len(missing)} image(s) named by the JSON are missing: {examples(missing)}",
                "unzip images.zip again (llava-bench prepare skips the intact ones)",
            )
        )
    return problems


def _check_images(layout: Layout) -> list[Problem]:
    folder = layout.image_folder
    if folder.is_dir():
        if next(os.scandir(folder), None) is None:
            return [Problem(str(folder), "the images folder is empty", f"unzip images.zip into {folder}")]
        return []
    if layout.images_zip.is_file():
        return [
            Problem(
                str(folder),
                "the images folder is missing; only images.zip is there",
                f"unzip it: cd {layout.pretrain_dir} && unzip -q images.zip -d images",
            )
        ]
    return [
        Problem(
            str(folder),
            "the images folder is missing",
            f"download images.zip of liuhaotian/LLaVA-Pretrain and unzip it into {folder}",
        )
    ]


def check_layout(layout: Layout) -> list[Problem]:
    """All problems of the mounted layout; empty when it is valid."""
    return inspect_layout(layout)[0]


def inspect_layout(layout: Layout) -> tuple[list[Problem], DatasetJson | None]:
    """All problems of the mounted layout, and its dataset JSON where that parsed."""
    if not layout.root.is_dir():
        return [
            Problem(
                str(layout.root),
                "the layout root does not exist or is not a folder",
                "mount the prepared folder there (docker run -v ./llava:/llava) or pass --root",
            )
        ], None
    dataset, dataset_problems = _check_dataset_json(layout.dataset_json)
    image_folder_problems = _check_images(layout)
    problems = [
        *dataset_problems,
        *image_folder_problems,
        *(_check_image_paths(layout, dataset.records) if dataset is not None and not image_folder_problems else []),
        *_check_model(
            layout.llm_dir, "LLM", "internlm/internlm2-chat-20b", (TOKENIZER_FILES, ("tokenizer_config.json",))
        ),
        *_check_model(
            layout.clip_dir, "CLIP model", "openai/clip-vit-large-patch14-336", (("preprocessor_config.json",),)
        ),
        *layout_paths_problems(layout),
        *_unparsed_json(layout.pretrain_dir, "download LLaVA-Pretrain again", (SOURCE_RECORD_NAME,)),
    ]
    return problems, dataset


def check_writable(folder: Path, layout: Layout | None = None) -> list[Problem]:
    """The results folder must be creatable and writable (a read-only mount needs --out),
    and outside the layout's data/ and model/, which the appliance never writes."""
    if layout is not None:
        # Compared as written and resolved, and against each model and data folder resolved
        # too: huggingface_hub's cache makes a model folder a link into its snapshots.
        where = {Path(os.path.abspath(folder)), Path(os.path.realpath(folder))}
        for protected in (layout.data_dir, layout.model_dir):
            inner = [protected, *(p for p in (protected.iterdir() if protected.is_dir() else []) if p.is_dir())]
            roots = {Path(os.path.abspath(protected)), *(Path(os.path.realpath(p)) for p in inner)}
            if any(path.is_relative_to(root) for path in where for root in roots):
                return [
                    Problem(
                        str(folder),
                        f"the results folder is inside {protected}, which the appliance never writes",
                        "pass --out to a folder outside data/ and model/ (default: the layout's results/)",
                    )
                ]
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            return [
                Problem(
                    str(folder),
                    f"{probe} is a link to {os.readlink(probe)}, which does not exist",
                    "create the link's target, or pass --out to another folder",
                )
            ]
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        return []
    return [
        Problem(
            str(folder),
            f"the results folder cannot be written ({probe} is read-only or not a folder)",
            "mount the layout read-write, or pass --out to a writable folder",
        )
    ]
