"""XTuner's LLaVADataset reading the tokenized dataset the appliance built (a speed
lever, same data).

XTuner tokenizes the whole dataset JSON on rank 0 at every start (LLaVA-Pretrain has
558k records). The appliance tokenizes it the same way before training, once, into a
folder named by the hash of everything the tokens depend on (bench/recipe/tokenization.py),
which every rank memory-maps here. Should a rank find no complete folder (the
appliance's build failed), every rank takes XTuner's own path, and rank 0 keeps its
result in the folder for later runs. Imported only by rendered configs, inside the
trainer processes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from datasets import load_from_disk
from mmengine import print_log
from mmengine.config import Config, ConfigDict
from xtuner.dataset import LLaVADataset
from xtuner.registry import BUILDER

from bench.core.tokenized_folder import is_complete, save_atomically
from bench.trainer.startup import note


def every_rank_has(folder: Path) -> bool:
    """Whether the cache is complete on every rank, so that all ranks take the same path
    (XTuner's own tokenization is collective: rank 0 works, the others wait for it)."""
    local = is_complete(folder)
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
        else:
            super().__init__(
                image_folder=image_folder,
                image_processor=image_processor,
                pad_image_to_square=pad_image_to_square,
                **kwargs,
            )
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                try:
                    save_atomically(self.text_data, folder)
                except OSError as error:  # the cache is for later runs; this one goes on
                    print_log(f"the tokenized dataset was not kept in {folder}: {error}", "current", logging.WARNING)
        note("dataset_built")
