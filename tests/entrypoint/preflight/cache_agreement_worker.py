"""Run under torchrun with gloo by tests/entrypoint/preflight/test_tokenized_cache.py: each rank writes whether it
takes the cached path, given a cache folder of its own that holds the cache or not."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from bench.trainer.cached_dataset import every_rank_has

dist.init_process_group("gloo")
rank = dist.get_rank()
folder = Path(sys.argv[1])
(folder / f"answer{rank}.json").write_text(json.dumps(every_rank_has(folder / f"rank{rank}")))
dist.destroy_process_group()
