"""`llava-bench validate` on the synthetic layout and on broken copies of it."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from bench.core.layout import Layout
from bench.synth.spec import DEMO_SAMPLES
from tests.conftest import DATA, llava_bench, tree_digest


def test_the_synthetic_layout_is_valid(synthetic_layout):
    done = llava_bench("validate", "--root", str(synthetic_layout), "--json")
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout) == {
        "root": str(synthetic_layout),
        "valid": True,
        "checked": {"records": DEMO_SAMPLES, "images_decoded": None, "model_code": None},
        "problems": [],
    }


def test_validate_says_what_it_checked_and_what_deep_adds(synthetic_layout):
    done = llava_bench("validate", "--root", str(synthetic_layout))
    assert done.returncode == 0, done.stderr
    assert f"({DEMO_SAMPLES:,} records); --deep also checks every record, decodes the images" in done.stdout
    deep = llava_bench("validate", "--root", str(synthetic_layout), "--deep", "--sample", "5")
    assert deep.returncode == 0, deep.stderr
    assert f"{DEMO_SAMPLES:,} records checked, 5 images decoded" in deep.stdout and "code imported" in deep.stdout


def test_sample_without_deep_is_refused_not_ignored(synthetic_layout):
    done = llava_bench("validate", "--root", str(synthetic_layout), "--sample", "5")
    assert done.returncode == 2 and "--sample chooses the images --deep decodes" in done.stderr


def test_deep_validation_refuses_a_dataset_too_small_for_any_run(layout_copy):
    keep_records(Layout.at(layout_copy), 60)
    done = llava_bench("validate", "--root", str(layout_copy), "--deep", "--json")
    assert done.returncode == 2, done.stdout
    (problem,) = json.loads(done.stdout)["problems"]
    assert (
        "60 record(s) make 60 iteration(s) an epoch" in problem["problem"]
        and "at least 67 records" in problem["problem"]
    )


def zip_images(layout: Layout):
    with zipfile.ZipFile(layout.images_zip, "w") as archive:
        for path in layout.image_folder.rglob("*.jpg"):
            archive.write(path, path.relative_to(layout.image_folder))
    shutil.rmtree(layout.image_folder)


def first_image(layout: Layout):
    return layout.image_folder / json.loads(layout.dataset_json.read_text())[0]["image"]


def set_first_image(layout: Layout, name: str) -> None:
    records = json.loads(layout.dataset_json.read_text())
    records[0]["image"] = name
    layout.dataset_json.write_text(json.dumps(records))


def keep_records(layout: Layout, count: int) -> None:
    layout.dataset_json.write_text(json.dumps(json.loads(layout.dataset_json.read_text())[:count]))


def link_out(path, target) -> None:
    """``path`` moved to ``target`` outside the layout, and a link left in its place."""
    shutil.move(path, target)
    path.symlink_to(target)


def remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


# (what breaks, the path the message must name, words the message must contain)
BREAKAGES = {
    "images only as zip": (zip_images, lambda layout: layout.image_folder, "unzip"),
    "no images at all": (
        lambda layout: remove(layout.image_folder),
        lambda layout: layout.image_folder,
        "download images.zip",
    ),
    "empty images folder": (
        lambda layout: (remove(layout.image_folder), layout.image_folder.mkdir()),
        lambda layout: layout.image_folder,
        "empty",
    ),
    "dataset json missing": (lambda layout: remove(layout.dataset_json), lambda layout: layout.dataset_json, "missing"),
    "dataset json truncated": (
        lambda layout: layout.dataset_json.write_bytes(layout.dataset_json.read_bytes()[:1000]),
        lambda layout: layout.dataset_json,
        "does not parse",
    ),
    "dataset json empty list": (
        lambda layout: layout.dataset_json.write_text("[]"),
        lambda layout: layout.dataset_json,
        "no records",
    ),
    "a dataset too small for any run": (
        lambda layout: keep_records(layout, 1),
        lambda layout: layout.dataset_json,
        "so the recipe's 3 % warm-up is 0 iteration(s)",
    ),
    "dataset json not a list": (
        lambda layout: layout.dataset_json.write_text('{"a": 1}'),
        lambda layout: layout.dataset_json,
        "no records",
    ),
    "llm folder missing": (
        lambda layout: remove(layout.llm_dir),
        lambda layout: layout.llm_dir,
        "llava-bench prepare --root",
    ),
    "llm config missing": (
        lambda layout: remove(layout.llm_dir / "config.json"),
        lambda layout: layout.llm_dir / "config.json",
        "config.json",
    ),
    "llm weights missing": (
        lambda layout: remove(layout.llm_dir / "model.safetensors"),
        lambda layout: layout.llm_dir,
        "no weights",
    ),
    "llm tokenizer missing": (
        lambda layout: remove(layout.llm_dir / "tokenizer.json"),
        lambda layout: layout.llm_dir / "tokenizer.model",
        "tokenizer",
    ),
    "clip weights missing": (
        lambda layout: remove(layout.clip_dir / "model.safetensors"),
        lambda layout: layout.clip_dir,
        "no weights",
    ),
    "clip preprocessor missing": (
        lambda layout: remove(layout.clip_dir / "preprocessor_config.json"),
        lambda layout: layout.clip_dir / "preprocessor_config.json",
        "preprocessor_config.json",
    ),
    "override points nowhere": (
        lambda layout: layout.config_override.write_text(
            (DATA / "user_config.py")
            .read_text()
            .replace("'./model/internlm2-chat-20b'", "'/nowhere/internlm2-chat-20b'")
        ),
        lambda layout: layout.config_override,
        "/nowhere/internlm2-chat-20b",
    ),
    "a missing image, without --deep": (
        lambda layout: first_image(layout).unlink(),
        lambda layout: layout.image_folder,
        "named by the JSON are missing",
    ),
    "an absolute image path": (
        lambda layout: set_first_image(layout, "/etc/hostname"),
        lambda layout: layout.image_folder,
        "outside the images folder",
    ),
    "an image path that climbs out": (
        lambda layout: set_first_image(layout, "../../../../../etc/hostname"),
        lambda layout: layout.image_folder,
        "outside the images folder",
    ),
    "an image that is a link out of the folder": (
        lambda layout: link_out(first_image(layout), layout.root.parent / "elsewhere.jpg"),
        lambda layout: layout.image_folder,
        "id 000000000",
    ),
    "an image folder that is a link out of the layout": (
        lambda layout: link_out(first_image(layout).parent, layout.root.parent / "elsewhere"),
        lambda layout: layout.image_folder,
        "outside the images folder",
    ),
    "results folder unwritable": (
        lambda layout: (layout.root / "results").write_text("a file, not a folder"),
        lambda layout: layout.results_dir,
        "--out",
    ),
    "override without the model paths the trainer reads": (
        lambda layout: layout.config_override.write_text("llm_name_or_path = '/nowhere/internlm2-chat-20b'\n"),
        lambda layout: layout.config_override,
        "llm (model.llm.pretrained_model_name_or_path) is not a path string in it",
    ),
    "override does not parse": (
        lambda layout: layout.config_override.write_text("model = dict(\n"),
        lambda layout: layout.config_override,
        "does not load as XTuner's trainer loads it (SyntaxError",
    ),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_broken_layout_is_named_with_exit_2(layout_copy, name):
    breaks, named_path, words = BREAKAGES[name]
    layout = Layout.at(layout_copy)
    breaks(layout)
    before = tree_digest(layout_copy, "data", "model")
    done = llava_bench("validate", "--root", str(layout_copy), "--json")
    assert done.returncode == 2
    problems = json.loads(done.stdout)["problems"]
    assert any(p["path"] == str(named_path(layout)) for p in problems), problems
    assert any(words in p["problem"] + p["fix"] for p in problems), problems
    assert tree_digest(layout_copy, "data", "model") == before  # validate never writes


def test_all_problems_are_reported_at_once(layout_copy):
    layout = Layout.at(layout_copy)
    zip_images(layout)
    remove(layout.llm_dir / "config.json")
    remove(layout.clip_dir)
    done = llava_bench("validate", "--root", str(layout_copy))
    assert done.returncode == 2
    for path in (layout.image_folder, layout.llm_dir / "config.json", layout.clip_dir):
        assert str(path) in done.stderr
    assert "unzip" in done.stderr


def test_a_missing_root_is_invalid(tmp_path):
    done = llava_bench("validate", "--root", str(tmp_path / "absent"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr


def test_a_small_last_shard_that_is_whole_is_accepted(layout_copy):
    """Shards are judged by their own safetensors header, not by their share of the total."""
    llm_dir = Layout.at(layout_copy).llm_dir
    (llm_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 10**11}, "weight_map": {"w": "model.safetensors"}})
    )
    done = llava_bench("validate", "--root", str(layout_copy), "--deep")
    assert done.returncode == 0, done.stderr


def test_run_without_a_root_writes_nothing_and_says_to_mount_one(tmp_path):
    done = llava_bench("run", "--root", str(tmp_path / "absent"))
    assert done.returncode == 2
    assert "docker run -v ./llava:/llava" in done.stderr
    assert not (tmp_path / "absent").exists()  # the missing root is not created


def test_an_override_with_existing_relative_paths_is_valid(layout_copy):
    """Relative paths built from parts (the pinned config's ``data_root + ...``), taken
    from the layout root as the trainer takes them, and one through a link to the
    layout's own folder: the layout's own files."""
    layout = Layout.at(layout_copy)
    (layout.root / "llm-link").symlink_to(layout.llm_dir)
    text = (DATA / "user_config.py").read_text()
    text = text.replace(
        "data_path = './data/llava_data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'",
        "data_root = './data/llava_data/'\ndata_path = data_root + 'LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'",
    ).replace("llm_name_or_path = './model/internlm2-chat-20b'", "llm_name_or_path = 'llm-link'")
    layout.config_override.write_text(text)
    done = llava_bench("validate", "--root", str(layout_copy))
    assert done.returncode == 0, done.stdout + done.stderr
