"""mmengine hooks the rendered config adds."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from bench.core.trainer_files import PROJECTOR_SNAPSHOTS, RANK_TIMES_FOLDER


class ProjectorSnapshotHook(Hook):
    """The projector's weights before training and after ``compared_iters``
    micro-iterations, and its gradient of the first backward pass, in the work dir.

    The projector is the only module the recipe trains, so two runs that do the same
    math give it the same first gradient (same weights, same batch) to rounding, and a
    lever that broke the gradient gives another; `llava-bench perf` compares them, and
    the weights after the first few AdamW steps too (later, rounding differences grow:
    AdamW moves a weight whose gradient's sign is rounding's by a whole step).
    Rank 0 writes them: ZeRO-2 keeps every parameter whole on every rank, and the
    gradient is rank 0's own micro-batch's, taken as it arrives, before the reduction.
    """

    priority = "LOWEST"

    def __init__(self, compared_iters: int):
        self._compared_iters = compared_iters
        self._first_gradient: dict = {}
        self._handles: list = []

    def before_train(self, runner) -> None:
        if runner.rank != 0:
            return
        projector = self._projector(runner)
        self._save(runner, PROJECTOR_SNAPSHOTS["before_train"], projector.state_dict())
        for name, parameter in projector.named_parameters():
            self._handles.append(parameter.register_hook(lambda grad, name=name: self._keep_first(name, grad)))

    def _keep_first(self, name: str, grad) -> None:
        self._first_gradient.setdefault(name, grad.detach().float().cpu().clone())

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._handles and len(self._first_gradient) == len(self._handles):
            self._save(runner, PROJECTOR_SNAPSHOTS["first_gradient"], self._first_gradient)
            for handle in self._handles:
                handle.remove()
            self._handles = []
        if runner.rank == 0 and runner.iter + 1 == self._compared_iters:  # runner.iter: this iteration's index
            self._save(runner, PROJECTOR_SNAPSHOTS["after_compared_steps"], self._projector(runner).state_dict())

    @staticmethod
    def _projector(runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        return model.projector

    @staticmethod
    def _save(runner, name: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        save_file(
            {key: value.detach().float().cpu().contiguous() for key, value in tensors.items()},
            str(Path(runner.work_dir) / name),
        )


class TokenCountHook(Hook):
    """Logs the padded text tokens and the labelled tokens a sample, as running means
    over the run, for the verdict's FLOP model (bench/verdict/flops.py): XTuner's own counts
    are one iteration's and leave out which positions the loss reads.

    Text tokens leave out the image placeholder, which becomes the image's tokens;
    labelled tokens are the positions whose next token has a label (the loss's terms).
    mmengine logs a scalar's latest value unless its name matches its mean pattern,
    so the means are kept here.
    """

    priority = 55  # before LoggerHook, as XTuner's ThroughputHook

    def __init__(self):
        self.samples = 0
        self.text_tokens = 0
        self.labelled_tokens = 0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        from xtuner.utils import IGNORE_INDEX, IMAGE_TOKEN_INDEX

        data = data_batch.get("data") if isinstance(data_batch, dict) else None
        input_ids, labels = (data.get("input_ids"), data.get("labels")) if isinstance(data, dict) else (None, None)
        if not (isinstance(input_ids, torch.Tensor) and isinstance(labels, torch.Tensor)):
            return  # not a LLaVA batch: nothing to count, and a measurement never stops a run
        self.samples += input_ids.shape[0]
        self.text_tokens += int(input_ids.numel() - torch.count_nonzero(input_ids == IMAGE_TOKEN_INDEX))
        self.labelled_tokens += int(torch.count_nonzero(labels[:, 1:] != IGNORE_INDEX))
        runner.message_hub.update_scalar("train/text_tokens_per_sample", self.text_tokens / self.samples)
        runner.message_hub.update_scalar("train/labelled_tokens_per_sample", self.labelled_tokens / self.samples)


class RankTimingHook(Hook):
    """Every rank's forward time per micro-iteration, in the work dir's
    ``rank-times/rank-<RANK>.json`` (bench/verdict/ranks.py says why the forward pass).

    On GPUs the forward pass is timed with CUDA events, read once the iteration is
    done, so the step gains no synchronisation; on CPU with the clock. Each rank writes
    its own file every WRITE_EVERY iterations and at the end.
    """

    priority = "LOW"
    WRITE_EVERY = 10

    def __init__(self):
        self._pending: list = []
        self._forward_seconds: list[float] = []
        self._path: Path | None = None
        self._on_gpu = False
        self._identity = {
            "rank": int(os.environ.get("RANK", "0")),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "node_rank": int(os.environ.get("GROUP_RANK", "0")),  # torchrun's node rank
            "host": socket.gethostname(),
        }

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self._on_gpu = next(model.parameters()).is_cuda
        model.register_forward_pre_hook(lambda module, args: self._pending.append([self._mark()]))
        model.register_forward_hook(lambda module, args, output: self._pending[-1].append(self._mark()))
        self._path = Path(runner.work_dir) / RANK_TIMES_FOLDER / f"rank-{self._identity['rank']}.json"
        self._path.parent.mkdir(parents=True, exist_ok=True)

    def _mark(self):
        if not self._on_gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        for start, end in (pair for pair in self._pending if len(pair) == 2):
            if isinstance(start, float):
                self._forward_seconds.append(end - start)
            else:
                end.synchronize()
                self._forward_seconds.append(start.elapsed_time(end) / 1000)
        self._pending = []
        if (runner.iter + 1) % self.WRITE_EVERY == 0:
            self._write()

    def after_train(self, runner) -> None:
        self._write()

    def _write(self) -> None:
        if self._path is not None:
            partial = self._path.with_name(f".{self._path.name}")
            partial.write_text(json.dumps({**self._identity, "forward_seconds": self._forward_seconds}))
            partial.replace(self._path)
