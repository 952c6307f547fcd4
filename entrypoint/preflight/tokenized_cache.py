"""The tokenized dataset, built before training and shared by every rank.

`llava-bench prepare` builds it next to the data (prepare_tokenized), so that even
the first run finds it. Otherwise preflight starts the build
(bench/recipe/tokenization.py) in a child process as soon as it has read the dataset
JSON, so the tokenization runs beside the deep checks, the model code's import and the
collective check; the run waits for it only if it is still working when the trainer
is about to start. The result is the cache folder under the results folder (named by
bench/recipe/tokenization.py's cache_name), memory-mapped by every rank
(bench/trainer/cached_dataset.py); each node builds its own unless the nodes share the
folder, and of two builders the first to finish is kept. A failed build costs time,
never the run: the trainer then finds no cache and tokenizes with XTuner's own code.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.core.inputs import load_dataset
from bench.core.layout import Layout
from bench.core.tokenized_folder import damage, is_complete, partial_folder, save_atomically
from bench.recipe.tokenization import (
    RECIPE_MAX_LENGTH,
    Tokenized,
    as_table,
    batch_encoder,
    cache_name,
    concatenate,
    special_ids,
    tokenize_records,
)
from entrypoint.launch.child import JsonChild, answer_main

BUILD_TIMEOUT_SECONDS = 1800  # XTuner's own tokenization of 558,128 records took 490 s


# What the fork-started tokenizing processes inherit: the records and the tokenizer.
_INHERITED: dict = {}


def _tokenize(records: list[dict], tokenizer) -> Tokenized:
    return tokenize_records(records, batch_encoder(tokenizer), *special_ids(tokenizer), RECIPE_MAX_LENGTH)


def _tokenize_span(span: tuple[int, int]) -> tuple[int, Tokenized]:
    return span[0], _tokenize(_INHERITED["records"][span[0] : span[1]], _INHERITED["tokenizer"])


def tokenize_in_processes(records: list[dict], tokenizer, processes: int) -> Tokenized:
    """``tokenize_records`` over consecutive spans of the records in ``processes`` forked
    processes (the Python between the batch calls is most of the time), joined."""
    step = -(-len(records) // processes)
    spans = [(start, min(start + step, len(records))) for start in range(0, len(records), step)]
    if len(spans) == 1:
        return _tokenize(records, tokenizer)
    _INHERITED.update(records=records, tokenizer=tokenizer)
    try:
        with multiprocessing.get_context("fork").Pool(len(spans)) as pool:
            return concatenate(pool.map(_tokenize_span, spans))
    finally:
        _INHERITED.clear()


def build(json_path: Path, llm_dir: Path, folder: Path) -> dict:
    """In the child: tokenize the JSON with the LLM folder's tokenizer (built as the
    recipe builds it) on every core, and save the cache; how long each part took."""
    started = time.monotonic()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process a core instead of Rust's threads
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), trust_remote_code=True, padding_side="right")
    loaded = time.monotonic()
    records = json.loads(json_path.read_bytes())
    read = time.monotonic()
    tokenized = tokenize_in_processes(records, tokenizer, len(os.sched_getaffinity(0)))
    done = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(datasets.Dataset(as_table(tokenized, records)), folder)
    return {
        "records": len(records),
        "kept": len(tokenized.kept),
        "tokens": int(tokenized.offsets[-1]),
        "processes": len(os.sched_getaffinity(0)),
        "seconds": {
            "imports_and_tokenizer": round(loaded - started, 3),
            "read_json": round(read - loaded, 3),
            "tokenize": round(done - read, 3),
            "save": round(time.monotonic() - done, 3),
        },
    }


def cache_folder(layout: Layout, results_parent: Path, dataset_sha256: str) -> Path:
    """The tokenized dataset a run reads: the one prepare built next to the data where
    it is complete, else the run's own under its results folder (the run never writes
    into the layout's data)."""
    name = cache_name(dataset_sha256, layout.llm_dir)
    prepared = layout.pretrain_dir / name
    return prepared if is_complete(prepared) else results_parent / "cache" / name


def prepare_tokenized(layout: Layout) -> str:
    """prepare's last part: the tokenized dataset next to the data (under the layout's
    results folder where the data folder cannot be written); what was done, in a line.
    A failure is said, never raised: the first run then builds it."""
    if not (layout.dataset_json.is_file() and (layout.llm_dir / "tokenizer_config.json").is_file()):
        return "tokenized dataset: not built (the dataset JSON or the LLM's tokenizer is missing)"
    try:
        name = cache_name(load_dataset(layout.dataset_json).sha256, layout.llm_dir)
        parent = layout.pretrain_dir if os.access(layout.pretrain_dir, os.W_OK) else layout.results_dir / "cache"
        if is_complete(parent / name):
            return f"tokenized dataset: already in {parent / name}"
        answer = build(layout.dataset_json, layout.llm_dir, parent / name)
    except Exception as error:  # noqa: BLE001 - any failure only defers the build to the first run
        return f"tokenized dataset: not built ({type(error).__name__}: {error}); the first run builds it"
    seconds = sum(answer["seconds"].values())
    return (
        f"tokenized dataset: {answer['kept']} records, {answer['tokens']} tokens in {seconds:.0f} s, in {parent / name}"
    )


@dataclass(frozen=True)
class Tokenization:
    """How this run's tokens were had: the verdict's ``timing.startup.tokenization``."""

    source: str  # "cache": complete before the run; "built": by this run; "failed": the trainer tokenizes
    folder: str
    build: dict | None  # the child's answer (records, kept, tokens, seconds of its parts)
    build_seconds: float | None  # the child's start to its answer
    wait_seconds: float  # how long the launch waited for it
    detail: str | None  # why a build failed, or what was wrong with the cache it replaced

    def as_dict(self) -> dict:
        return asdict(self)


class CacheBuild:
    """The build of one run: started by preflight (nothing to do when the cache is
    complete), waited for before launch, never left running; a stopped build leaves no
    partial folder behind."""

    def __init__(self, json_path: Path, llm_dir: Path, folder: Path):
        self.folder = folder
        self._started = time.monotonic()
        self._damaged = damage(folder) if folder.is_dir() else None  # said when it is built again
        self._child = (
            None
            if is_complete(folder)
            else JsonChild("entrypoint.preflight.tokenized_cache", str(json_path), str(llm_dir), str(folder))
        )

    def __enter__(self) -> CacheBuild:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        """The child killed if it still runs, its half-written folder removed."""
        if self._child is not None:
            self._child.stop()
            shutil.rmtree(partial_folder(self.folder, self._child.pid), ignore_errors=True)

    def wait(self, say: Callable[[str], None]) -> Tokenization:
        if self._child is None:
            return Tokenization("cache", str(self.folder), None, None, 0.0, None)
        waiting = time.monotonic()
        if self._child.running():
            say(f"tokenizing the dataset ({waiting - self._started:.0f} s so far; the trainer starts when it is done)")
        answer = self._child.answer(BUILD_TIMEOUT_SECONDS)
        self._stop()
        answered = time.monotonic()
        timings = (round(answered - self._started, 3), round(answered - waiting, 3))
        if "error" in answer or not is_complete(self.folder):
            detail = answer.get("error", "the build answered, but left no complete cache")
            say(f"the appliance's tokenization failed ({detail}); the trainer tokenizes with XTuner's own code")
            return Tokenization("failed", str(self.folder), None, *timings, detail)
        replaced = f"the cache there was damaged ({self._damaged}) and was built again" if self._damaged else None
        if replaced:
            say(f"tokenized dataset in {self.folder}: {replaced}")
        return Tokenization("built", str(self.folder), answer, *timings, replaced)


if __name__ == "__main__":
    answer_main(build, *map(Path, sys.argv[1:4]))
