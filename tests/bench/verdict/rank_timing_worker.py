"""Run under torchrun with gloo by tests/bench/verdict/test_ranks.py: each rank trains a tiny model
with RankTimingHook, one rank's forward pass slowed, and all-reduces its gradients
every iteration, as DeepSpeed does, so every rank's step takes the slowest's time.

XTuner's runner cannot run several processes on CPU (mmengine sets a CUDA device), so
a stand-in holds the three things the hook reads: the model, the work dir, the iteration.
"""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from bench.trainer.hooks import RankTimingHook

dist.init_process_group("gloo")
rank, slowed = dist.get_rank(), int(sys.argv[2])


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        if rank == slowed:
            time.sleep(0.02)  # a slow GPU
        return self.linear(x)


model = Tiny()
runner = SimpleNamespace(model=model, work_dir=str(Path(sys.argv[1])), iter=0)
hook = RankTimingHook()
hook.before_train(runner)
for iteration in range(30):
    runner.iter = iteration
    model(torch.randn(4, 8)).sum().backward()
    for parameter in model.parameters():
        dist.all_reduce(parameter.grad)
    hook.after_train_iter(runner, iteration)
hook.after_train(runner)
dist.destroy_process_group()
