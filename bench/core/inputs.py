"""What the run was fed: dataset and model identities, and the model shapes the FLOP
model needs. Recorded in the verdict so the figures can be recomputed and compared."""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from bench.core.layout import SOURCE_RECORD_NAME, Layout
from bench.core.shapes import LLMShape, ViTShape


@dataclass(frozen=True)
class DatasetJson:
    """The dataset JSON read once: its bytes (for the hash) and its records."""

    raw: bytes
    records: list

    @cached_property
    def sha256(self) -> str:
        return _sha256(self.raw)


class BomError(ValueError):
    """The JSON starts with a UTF-8 byte-order mark."""


def load_dataset(path: Path) -> DatasetJson:
    """The dataset JSON as XTuner's LLaVADataset reads it: UTF-8 text through ``json.load``,
    which refuses a byte-order mark (``json.loads`` of the bytes would take it)."""
    raw = Path(path).read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raise BomError(f"{path} starts with a UTF-8 byte-order mark")
    return DatasetJson(raw, json.loads(raw.decode("utf-8")))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def llm_shape(config: dict) -> LLMShape:
    return LLMShape(
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        ffn=config["intermediate_size"],
        vocab=config["vocab_size"],
    )


def vit_shape(config: dict) -> ViTShape:
    vision = config.get("vision_config", config)  # a full CLIP config nests the vision tower
    return ViTShape(
        hidden=vision["hidden_size"],
        layers=vision["num_hidden_layers"],
        ffn=vision["intermediate_size"],
        image_size=vision["image_size"],
        patch=vision["patch_size"],
    )


def _model(folder: Path) -> tuple[dict, dict]:
    raw = (folder / "config.json").read_bytes()
    index = folder / "model.safetensors.index.json"
    shards = (
        len(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else len(list(folder.glob("*.safetensors"))) or len(list(folder.glob("pytorch_model*.bin")))
    )
    return {"config_sha256": _sha256(raw), "weight_shards": shards}, json.loads(raw)


def describe(layout: Layout, dataset: DatasetJson) -> dict:
    """Identities and shapes of a layout that passed preflight."""
    llm, llm_config = _model(layout.llm_dir)
    clip, clip_config = _model(layout.clip_dir)
    return {
        "dataset_sha256": dataset.sha256,
        "dataset_samples": len(dataset.records),
        "llm": {**llm, "architectures": llm_config.get("architectures", [])},
        "clip": {**clip, "architectures": clip_config.get("architectures", [])},
        "model_shapes": {"llm": asdict(llm_shape(llm_config)), "vit": asdict(vit_shape(clip_config))},
        # The hub commits `llava-bench prepare` resolved, where it downloaded the files.
        "sources": [
            json.loads(record.read_text())
            for record in (
                folder / SOURCE_RECORD_NAME for folder in (layout.llm_dir, layout.clip_dir, layout.pretrain_dir)
            )
            if record.is_file()
        ],
    }
