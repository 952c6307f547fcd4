"""Where things live in the mounted layout (README, "Running the benchmark").

One place names every path, so preflight, recipe rendering and the synthetic
layout cannot disagree about the folder structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LLM_DIRNAME = "internlm2-chat-20b"
CLIP_DIRNAME = "clip-vit-large-patch14-336"
DATASET_JSON_NAME = "blip_laion_cc_sbu_558k.json"
# Written by `llava-bench synth` into its CLIP folder (so it travels with the model, e.g.
# through a hub): deep checks then accept that folder's tiny geometry.
SYNTHETIC_MARKER_NAME = "llava-bench-synthetic.json"
# Written by `llava-bench prepare` next to the files of each hub repo it downloaded.
SOURCE_RECORD_NAME = ".llava-bench-source.json"
CONFIG_OVERRIDE_NAME = "llava_internlm2_chat_20b_clip_vit_large_p14_336_e1_gpu8_pretrain.py"


@dataclass(frozen=True)
class Layout:
    """Absolute paths of one mounted layout rooted at ``root``."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> "Layout":
        return cls(Path(root).expanduser().absolute())

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def pretrain_dir(self) -> Path:
        return self.data_dir / "llava_data" / "LLaVA-Pretrain"

    @property
    def dataset_json(self) -> Path:
        return self.pretrain_dir / DATASET_JSON_NAME

    @property
    def image_folder(self) -> Path:
        return self.pretrain_dir / "images"

    @property
    def images_zip(self) -> Path:
        return self.pretrain_dir / "images.zip"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def llm_dir(self) -> Path:
        return self.model_dir / LLM_DIRNAME

    @property
    def clip_dir(self) -> Path:
        return self.model_dir / CLIP_DIRNAME

    @property
    def config_override(self) -> Path:
        return self.root / CONFIG_OVERRIDE_NAME

    @property
    def results_dir(self) -> Path:
        return self.root / "results"
