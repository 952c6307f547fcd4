"""XTuner's LLaVADataset with its tokenized text cached on disk (a speed lever, same data).

XTuner tokenizes the whole dataset JSON on rank 0 at every start (LLaVA-Pretrain has
558k records). The result depends only on the JSON, the tokenizer, the template,
max_length and the library versions, so it is saved once under the results folder in
a folder named by their hash (bench/levers.py) and memory-mapped by every rank of later
runs. Imported only by rendered configs, inside the trainer processes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from datasets import load_from_disk
from mmengine.config import Config, ConfigDict
from xtuner.dataset import LLaVADataset
from xtuner.registry import BUILDER

from bench.levers import TOKENIZED_CACHE_MARKER


def every_rank_has(folder: Path) -> bool:
    """Whether the cache is complete on every rank, so that all ranks take the same path
    (XTuner's own tokenization is collective: rank 0 works, the others wait for it)."""
    local = (folder / TOKENIZED_CACHE_MARKER).is_file()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    seen = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seen, local)
    return all(seen)


class CachedLLaVADataset(LLaVADataset):
    def __init__(self, cache_folder, image_folder, image_processor, pad_image_to_square=False, **kwargs):
        folder = Path(cache_folder)
        if every_rank_has(folder):
            torch.utils.data.Dataset.__init__(self)
            self.text_data = load_from_disk(str(folder))
            self.image_folder = image_folder
            is_config = isinstance(image_processor, (dict, Config, ConfigDict))
            self.image_processor = BUILDER.build(image_processor) if is_config else image_processor
            self.pad_image_to_square = pad_image_to_square
            return
        super().__init__(
            image_folder=image_folder,
            image_processor=image_processor,
            pad_image_to_square=pad_image_to_square,
            **kwargs,
        )
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            self._save(folder)

    def _save(self, folder: Path) -> None:
        """Into a private folder, then renamed: readers see the whole cache or none, and
        of two runs saving at once the second simply keeps the first's."""
        partial = folder.with_name(f".{folder.name}.{os.getpid()}")
        self.text_data.save_to_disk(str(partial))
        try:
            partial.rename(folder)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
