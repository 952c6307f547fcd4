"""A tokenized dataset's folder on disk, written whole or not at all: the appliance builds
it before training (entrypoint/preflight/tokenized_cache.py) and the trainer reads it,
or writes it where it tokenized the records itself (bench/trainer/cached_dataset.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

# Written last into a tokenized cache (the folder appears by one rename): each file's
# size, so that a file cut short or emptied (a power loss, a full disk) makes the cache
# incomplete, and it is built again.
COMPLETENESS_RECORD = "llava-bench-complete.json"


def damage(folder: Path) -> str | None:
    """What makes a tokenized cache incomplete, or None where it is whole."""
    try:
        sizes = json.loads((folder / COMPLETENESS_RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {COMPLETENESS_RECORD}"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is {path.stat().st_size if path.is_file() else 'missing'}, {size} bytes were written"
    return None


def is_complete(folder: Path) -> bool:
    return damage(folder) is None


def partial_folder(folder: Path, pid: int) -> Path:
    """Where process ``pid`` of this host writes ``folder`` before renaming it (the host
    too: nodes may share the results folder, and their process ids may meet)."""
    return folder.with_name(f".{folder.name}.{socket.gethostname()}.{pid}")


def save_atomically(dataset, folder: Path) -> None:
    """``dataset.save_to_disk`` into a private folder, then renamed to ``folder``: readers
    see the whole dataset or none, and of two writers at once the second keeps the first's."""
    partial = partial_folder(folder, os.getpid())
    dataset.save_to_disk(str(partial))
    sizes = {path.name: path.stat().st_size for path in partial.iterdir() if path.is_file()}
    (partial / COMPLETENESS_RECORD).write_text(json.dumps({"files": sizes}))
    if folder.is_dir() and not is_complete(folder):  # a damaged cache is replaced, a whole one kept
        shutil.rmtree(folder, ignore_errors=True)
    try:
        partial.rename(folder)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
