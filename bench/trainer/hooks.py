"""mmengine hooks the rendered config adds."""
from __future__ import annotations

from pathlib import Path

import torch

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from bench.trainer import PROJECTOR_SNAPSHOTS


class ProjectorSnapshotHook(Hook):
    """The projector's weights before and after training, in the work dir.

    The projector is the only module the recipe trains, so two runs that did the same
    training end with the same projector (to their run-to-run noise); `llava-bench perf`
    compares them, which a loss comparison alone cannot do at a tiny learning rate.
    Rank 0 writes them: ZeRO-2 keeps every parameter whole on every rank.
    """

    priority = "LOWEST"

    def before_train(self, runner) -> None:
        self._save(runner, PROJECTOR_SNAPSHOTS["before_train"])

    def after_train(self, runner) -> None:
        self._save(runner, PROJECTOR_SNAPSHOTS["after_train"])

    @staticmethod
    def _save(runner, name: str) -> None:
        if runner.rank != 0:
            return
        from safetensors.torch import save_file

        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        tensors = {key: value.detach().float().cpu().contiguous() for key, value in model.projector.state_dict().items()}
        save_file(tensors, str(Path(runner.work_dir) / name))


class TokenCountHook(Hook):
    """Logs the padded text tokens and the labelled tokens a sample, as running means
    over the run, for the verdict's FLOP model (bench/flops.py): XTuner's own counts
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

        data = data_batch["data"]
        input_ids, labels = data["input_ids"], data["labels"]
        self.samples += input_ids.shape[0]
        self.text_tokens += int(input_ids.numel() - torch.count_nonzero(input_ids == IMAGE_TOKEN_INDEX))
        self.labelled_tokens += int(torch.count_nonzero(labels[:, 1:] != IGNORE_INDEX))
        runner.message_hub.update_scalar("train/text_tokens_per_sample", self.text_tokens / self.samples)
        runner.message_hub.update_scalar("train/labelled_tokens_per_sample", self.labelled_tokens / self.samples)
