"""The bad-input suite: broken layouts and environments made from the synthetic layout.

For each: the exit code, a message that names the problem, and proof that not one
byte under data/ or model/ changed. Layout cases go through `validate --deep`;
environment and argument cases through `run`, which refuses before training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from bench.core.layout import SYNTHETIC_MARKER_NAME, Layout
from tests.conftest import DATA, llava_bench, spawn_run, tree_digest


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_records(layout: Layout, change) -> None:
    edit_json(layout.dataset_json, change)


def first_image(layout: Layout) -> Path:
    return layout.image_folder / json.loads(layout.dataset_json.read_text())[0]["image"]


def shard_index(layout: Layout, shards: list[str], total: int) -> None:
    (layout.llm_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}})
    )


def break_model_code(layout: Layout) -> None:
    """The LLM's own code asks transformers for a name it lacks, as InternLM2.5's code
    asks transformers 4.37 for StaticCache."""
    code = layout.llm_dir / "modeling_internlm2.py"
    text = code.read_text()
    assert "import Cache, DynamicCache" in text, "the model code's imports changed: break it another way"
    code.write_text(text.replace("import Cache, DynamicCache", "import Cache, DynamicCache, NoSuchCache", 1))


def user_config(layout: Layout, old: str, new: str, copy: tuple[Path, Path] | None = None) -> None:
    """The tests' user config at the layout root with ``old`` replaced by ``new``, after
    copying ``copy`` (source, destination) into the layout where one is given."""
    if copy is not None:
        (shutil.copytree if copy[0].is_dir() else shutil.copyfile)(*copy)
    text = (DATA / "user_config.py").read_text()
    assert old in text
    layout.config_override.write_text(text.replace(old, new))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def zip_images(layout: Layout) -> None:
    with zipfile.ZipFile(layout.images_zip, "w") as archive:
        for path in layout.image_folder.rglob("*.jpg"):
            archive.write(path, path.relative_to(layout.image_folder))
    shutil.rmtree(layout.image_folder)


# name: (break the layout, words the message must hold)
def reshape_a_tensor(layout: Layout) -> None:
    """The LLM's shard with one weight of another shape (its header says so; loading would fail)."""
    from safetensors.torch import load_file, save_file

    shard = layout.llm_dir / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})


DEEP_CASES = {
    "a field holding a list of mixed types in one record (a traceback in preflight before)": (
        lambda layout: edit_records(layout, lambda r: r[1].update(tags=[1, "a"])),
        "field 'tags' holds a list of mixed types in record '000000001'",
    ),
    "a shard whose tensor has another shape than the config's": (
        reshape_a_tensor,
        "model.norm.weight is [63] in the shard, but the model config.json describes makes it [64]",
    ),
    "a field whose type varies between records (XTuner's datasets build refuses it)": (
        lambda layout: edit_records(layout, lambda r: (r[1].update(width=336), r[2].update(width="336"))),
        "field 'width' holds number in record '000000001' and string in record '000000002'",
    ),
    "record without id": (lambda layout: edit_records(layout, lambda r: r[3].pop("id")), "has no string id"),
    "record without image": (
        lambda layout: edit_records(layout, lambda r: r[4].update(image=None)),
        "has no image path",
    ),
    "conversations not a list": (
        lambda layout: edit_records(layout, lambda r: r[5].update(conversations="hi")),
        "human/gpt turns",
    ),
    "two <image> tokens": (
        lambda layout: edit_records(layout, lambda r: r[6]["conversations"][0].update(value="<image>\n<image>")),
        "exactly one <image>",
    ),
    "no <image> token": (
        lambda layout: edit_records(layout, lambda r: r[7]["conversations"][0].update(value="describe")),
        "exactly one <image>",
    ),
    "gpt turn first": (
        lambda layout: edit_records(layout, lambda r: r[8]["conversations"].reverse()),
        "start with a human turn",
    ),
    "duplicate ids": (lambda layout: edit_records(layout, lambda r: r[9].update(id=r[10]["id"])), "duplicate id"),
    "missing image": (lambda layout: first_image(layout).unlink(), "named by the JSON are missing"),
    "truncated jpeg": (
        lambda layout: first_image(layout).write_bytes(first_image(layout).read_bytes()[:200]),
        "does not decode",
    ),
    "text file named .jpg": (lambda layout: first_image(layout).write_text("not an image"), "does not decode"),
    "wrong LLM architecture": (
        lambda layout: edit_json(layout.llm_dir / "config.json", lambda c: c.update(architectures=["BertModel"])),
        "not InternLM2",
    ),
    "model code missing": (
        lambda layout: (layout.llm_dir / "modeling_internlm2.py").unlink(),
        "config.json's auto_map names modeling_internlm2.py",
    ),
    "model code written for another transformers": (break_model_code, "does not import with transformers"),
    "index names a missing shard": (
        lambda layout: shard_index(layout, ["model.safetensors", "model-00002-of-00002.safetensors"], 900_000),
        "names model-00002-of-00002.safetensors, which is missing",
    ),
    "truncated shard": (
        lambda layout: (shard_index(layout, ["model.safetensors"], 0), truncate(layout.llm_dir / "model.safetensors")),
        "header describes",
    ),
    "index does not parse (found by the plain checks, which parse every JSON file of a model folder)": (
        lambda layout: (layout.llm_dir / "model.safetensors.index.json").write_text("{"),
        "model.safetensors.index.json: does not parse as JSON",
    ),
    "CLIP of another size": (
        lambda layout: (layout.clip_dir / SYNTHETIC_MARKER_NAME).unlink(),
        "needs CLIP ViT-L/14 at 336 px",
    ),
    "preprocessor disagrees with the tower": (
        lambda layout: edit_json(
            layout.clip_dir / "preprocessor_config.json", lambda c: c.update(crop_size={"height": 32, "width": 32})
        ),
        "crops 32 px but the vision tower takes 28 px",
    ),
}


@pytest.mark.parametrize("name", list(DEEP_CASES))
def test_deep_validate_names_each_problem_and_changes_nothing(layout_copy, name):
    breaks, words = DEEP_CASES[name]
    breaks(Layout.at(layout_copy))
    before = tree_digest(layout_copy, "data", "model")
    done = llava_bench("validate", "--root", str(layout_copy), "--deep", "--json")
    assert done.returncode == 2, done.stdout
    problems = json.loads(done.stdout)["problems"]
    assert any(words in f"{p['path']}: {p['problem']}" for p in problems), problems
    assert all(p["path"] and p["fix"] for p in problems)
    assert tree_digest(layout_copy, "data", "model") == before


def test_deep_validate_lists_the_record_problems_beside_a_plain_one(layout_copy):
    """One missing image (a plain problem) does not hide a broken record: every problem at once."""
    layout = Layout.at(layout_copy)
    first_image(layout).unlink()
    edit_records(layout, lambda r: r[3].pop("id"))
    done = llava_bench("validate", "--root", str(layout_copy), "--deep", "--json")
    assert done.returncode == 2, done.stdout
    said = [f"{p['path']}: {p['problem']}" for p in json.loads(done.stdout)["problems"]]
    assert any("missing" in line for line in said) and any("has no string id" in line for line in said), said


RUN = ["--device", "cpu", "--per-device-batch", "8", "--max-steps", "20"]
# name: (break the layout, extra run arguments, extra environment, words in stderr)
RUN_CASES = {
    "images.zip not unpacked": (zip_images, [], {}, "unzip"),
    "empty LLM folder": (lambda layout: [p.unlink() for p in layout.llm_dir.iterdir()], [], {}, "no config.json"),
    "truncated dataset JSON": (
        lambda layout: layout.dataset_json.write_bytes(layout.dataset_json.read_bytes()[:500]),
        [],
        {},
        "does not parse",
    ),
    "dataset JSON not a list": (lambda layout: layout.dataset_json.write_text("{}"), [], {}, "no records"),
    "dataset JSON with a UTF-8 byte-order mark (XTuner's json.load refuses it)": (
        lambda layout: layout.dataset_json.write_bytes(b"\xef\xbb\xbf" + layout.dataset_json.read_bytes()),
        [],
        {},
        "byte-order mark",
    ),
    "a negative seed (numpy's seed refuses it in the trainer)": (lambda layout: None, ["--seed", "-1"], {}, "--seed"),
    "an evaluation image that does not exist": (
        lambda layout: None,
        ["--eval-image", "/nonexistent.png"],
        {},
        "--eval-image",
    ),
    "a master port whose next port (the nodes' store) is out of range": (
        lambda layout: None,
        [],
        {"MASTER_PORT": "65535", "WORLD_SIZE": "1"},
        "1-65534",
    ),
    "override config points nowhere": (
        lambda layout: user_config(layout, "data_path = './data", "data_path = '/nowhere"),
        [],
        {},
        "/nowhere/llava_data",
    ),
    "override config names another dataset JSON (the verdict reported the layout's records)": (
        lambda layout: user_config(
            layout,
            "blip_laion_cc_sbu_558k.json'",
            "subset.json'",
            (layout.dataset_json, layout.pretrain_dir / "subset.json"),
        ),
        [],
        {},
        "data_path './data/llava_data/LLaVA-Pretrain/subset.json' is not the layout's",
    ),
    "override config names another LLM folder (the verdict reported the layout's model)": (
        lambda layout: user_config(
            layout,
            "llm_name_or_path = './model/internlm2-chat-20b'",
            "llm_name_or_path = './model/other-llm'",
            (layout.llm_dir, layout.model_dir / "other-llm"),
        ),
        [],
        {},
        "llm './model/other-llm' is not the layout's",
    ),
    "override config that does not load (a name it never defines)": (
        lambda layout: user_config(layout, "batch_size = 8  # per device", "batch_size = per_device"),
        [],
        {},
        "NameError: name 'per_device' is not defined",
    ),
    "--max-steps 10**18 (the trainer overflowed after 10 iterations)": (
        lambda layout: None,
        ["--max-steps", str(10**18)],
        {},
        "the LR schedule ends after 256",
    ),
    "--max-steps one past the epoch (the run went on at an LR of 1e-12)": (
        lambda layout: None,
        ["--max-steps", "257"],
        {},
        "257 optimizer steps, but the LR schedule ends after 256",
    ),
    "an image 1 px tall (the CLIP image processor fails on it at the first batch)": (
        lambda layout: __import__("PIL.Image").Image.new("RGB", (64, 1)).save(first_image(layout)),
        ["--image-sample", "0"],
        {},
        "smaller than 4 px on a side",
    ),
    "a truncated CLIP config.json (a traceback, exit 1, before)": (
        lambda layout: (layout.clip_dir / "config.json").write_text((layout.clip_dir / "config.json").read_text()[:50]),
        [],
        {},
        "config.json: does not parse as JSON",
    ),
    "an empty source record beside the LLM (prepare writes it)": (
        lambda layout: (layout.llm_dir / ".llava-bench-source.json").write_text(""),
        [],
        {},
        ".llava-bench-source.json: does not parse as JSON",
    ),
    "a corrupt image is caught before training": (
        lambda layout: first_image(layout).write_text("broken"),
        ["--image-sample", "0"],
        {},
        "does not decode",
    ),
    "results folder unwritable": (
        lambda layout: (layout.root / "results").write_text("a file, not a folder"),
        [],
        {},
        "--out",
    ),
    "GPUs required but none": (lambda layout: None, ["--device", "cuda"], {}, "no CUDA GPU is visible"),
    "non-numeric NNODES": (lambda layout: None, [], {"NNODES": "two"}, "NNODES='two'"),
    "several nodes, no master address": (
        lambda layout: None,
        [],
        {"WORLD_SIZE": "2", "RANK": "1"},
        "no master address",
    ),
    "node rank out of range": (
        lambda layout: None,
        [],
        {"NNODES": "2", "NODE_RANK": "5", "ADDR": "h"},
        "not below the node count",
    ),
    "global batch not a multiple": (lambda layout: None, ["--global-batch", "12"], {}, "not a multiple"),
    "per-device batch zero": (lambda layout: None, ["--per-device-batch", "0"], {}, "per-device-batch"),
    "model code written for another transformers": (break_model_code, [], {}, "cannot import name 'NoSuchCache'"),
    "the synthetic layout at batch 32: a 1-iteration warm-up, the LR stays at 1e-8 (it 'passed' untrained)": (
        lambda layout: None,
        ["--per-device-batch", "32"],
        {},
        "leaves the LR at 1e-8 for the whole run",
    ),
    "a one-record dataset": (
        lambda layout: edit_records(layout, lambda r: r.__delitem__(slice(1, None))),
        [],
        {},
        "1 record(s) make 1 iteration(s) an epoch",
    ),
    "simulated GPU memory not a number": (
        lambda layout: None,
        [],
        {"LLAVA_BENCH_GPU_MEMORY_CAP_MIB": "80GB"},
        "LLAVA_BENCH_GPU_MEMORY_CAP_MIB='80GB'",
    ),
}


@pytest.mark.parametrize("name", list(RUN_CASES))
def test_run_refuses_before_training_and_changes_nothing(layout_copy, name):
    breaks, arguments, environment, words = RUN_CASES[name]
    breaks(Layout.at(layout_copy))
    before = tree_digest(layout_copy, "data", "model")
    env = {**os.environ, **environment}
    done = llava_bench("run", "--root", str(layout_copy), *RUN, *arguments, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr, done.stderr
    assert tree_digest(layout_copy, "data", "model") == before
    assert not list(layout_copy.rglob("xtuner"))  # no trainer was started


def test_the_suite_holds_at_least_25_cases():
    assert len(DEEP_CASES) + len(RUN_CASES) >= 25


@pytest.mark.parametrize(
    "command",
    [["run", "--root", "/llava"], ["verdict", str(DATA / "seed_a100_metrics.jsonl")]],
)
def test_a_junit_file_that_cannot_be_written_is_refused_before_any_work(command, tmp_path):
    done = llava_bench(*command, "--junit", str(tmp_path / "absent" / "x.xml"))
    assert done.returncode == 2
    message = " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split())  # typer's error box, unwrapped
    assert "--junit" in message and "is not a writable folder" in message and "Traceback" not in message


def test_an_invalid_runs_report_names_the_problems_and_draws_no_plot(layout_copy, tmp_path):
    zip_images(Layout.at(layout_copy))
    done = spawn_run(layout_copy, tmp_path / "out", *RUN)
    assert done.returncode == 2
    (run_dir,) = list((tmp_path / "out").iterdir())
    report = (run_dir / "report.md").read_text()
    assert "## Problems (preflight refused the run)" in report and "unzip" in report
    assert "None" not in report and "## Throughput" not in report
    assert "(loss.png not drawn: no loss was logged)" in report and not (run_dir / "loss.png").exists()
    assert "## What ran, on what" in report and "- **memory retry**: not recorded" in report
    redrawn = llava_bench("report", str(run_dir))
    assert redrawn.returncode == 0, redrawn.stderr
    assert redrawn.stdout.strip() == f"written: {run_dir / 'report.md'} and no loss.png (no loss was logged)"
    assert not (run_dir / "loss.png").exists()


def as_hub_cache(layout: Layout, hub: Path) -> Path:
    """The LLM folder laid out as huggingface_hub's cache lays it out: a link into the
    cache's snapshots/<rev>/, each file a link into blobs/. Returns the snapshot folder."""
    snapshot = hub / "models--internlm--internlm2-chat-20b" / "snapshots" / "0123abc"
    blobs = hub / "models--internlm--internlm2-chat-20b" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for number, path in enumerate(sorted(layout.llm_dir.iterdir())):
        path.rename(blobs / str(number))
        (snapshot / path.name).symlink_to(blobs / str(number))
    layout.llm_dir.rmdir()
    layout.llm_dir.symlink_to(snapshot)
    return snapshot


@pytest.mark.parametrize("inside", ["data", "model/internlm2-chat-20b", "hub cache"])
def test_results_inside_data_or_model_are_refused_and_nothing_is_written_there(layout_copy, tmp_path, inside):
    """The appliance never writes the user's data or models, not even when --out points
    there, through a link as huggingface_hub's cache lays a model folder out too."""
    written = layout_copy / inside / "results"
    if inside == "hub cache":
        snapshot = as_hub_cache(Layout.at(layout_copy), tmp_path / "hub")
        written = snapshot / "results"
        inside = "model/internlm2-chat-20b"
    before = tree_digest(layout_copy, "data", "model")
    for command in (["validate"], ["run", *RUN]):
        done = llava_bench(*command, "--root", str(layout_copy), "--out", str(layout_copy / inside / "results"))
        assert done.returncode == 2, done.stdout + done.stderr
        assert "which the appliance never writes" in done.stdout + done.stderr
    assert not written.exists()
    assert tree_digest(layout_copy, "data", "model") == before


def test_results_under_a_dangling_link_are_refused_naming_its_target(layout_copy, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    done = spawn_run(layout_copy, tmp_path / "link" / "results", *RUN)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"is a link to {tmp_path / 'nowhere'}, which does not exist" in done.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    "command, content, words",
    [
        ("verdict", "not a metrics stream\n", "holds no training record"),
        ("verdict", "{", "is not a readable verdict"),
        ("report", "{", "is not a readable verdict"),
        ("report", "{}", "is not a readable verdict"),
    ],
)
def test_verdict_and_report_of_something_that_is_no_run_are_invalid(tmp_path, command, content, words):
    """A text file given as a stream, or a results folder whose verdict.json is broken
    or no verdict: exit 2, one line naming the file, no traceback."""
    if content.startswith("{"):
        path = tmp_path / "run"
        path.mkdir()
        (path / "verdict.json").write_text(content)
    else:
        path = tmp_path / "notes.txt"
        path.write_text(content)
    done = llava_bench(command, str(path))
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
