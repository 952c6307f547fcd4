"""mmengine hooks the rendered config adds."""
from __future__ import annotations

from pathlib import Path

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
