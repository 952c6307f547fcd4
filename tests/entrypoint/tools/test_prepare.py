"""`llava-bench prepare` against a real local HTTP server speaking the hub's API
(tests/entrypoint/tools/hub_server.py), serving tiny repos made from the synthetic layout."""

from __future__ import annotations

import json
import shutil
import socket
import zipfile

import pytest

from bench.core.layout import Layout
from bench.synth.spec import DEMO_SAMPLES
from tests.conftest import llava_bench, tree_digest
from tests.entrypoint.tools.hub_server import Hub, _commit

LLM_REPO = "models/internlm/internlm2-chat-20b"
CLIP_REPO = "models/openai/clip-vit-large-patch14-336"
DATA_REPO = "datasets/liuhaotian/LLaVA-Pretrain"


def write_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.fixture
def hub_root(synthetic_layout, tmp_path):
    """The three repos as the hub holds them, with files prepare must leave behind."""
    source = Layout.at(synthetic_layout)
    root = tmp_path / "hub"
    shutil.copytree(source.llm_dir, root / LLM_REPO)
    shutil.copytree(source.clip_dir, root / CLIP_REPO)
    for repo in (LLM_REPO, CLIP_REPO):
        (root / repo / "tf_model.h5").write_bytes(b"tensorflow weights: not needed")
        (root / repo / "flax_model.msgpack").write_bytes(b"flax weights: not needed")
    dataset = root / DATA_REPO
    dataset.mkdir(parents=True)
    shutil.copy(source.dataset_json, dataset)
    (dataset / "blip_laion_cc_sbu_558k_meta.json").write_text("[]")
    images = sorted(source.image_folder.rglob("*.jpg"))
    write_zip(dataset / "images.zip", {str(p.relative_to(source.image_folder)): p.read_bytes() for p in images})
    return root


def prepare(root, endpoint, *args, tmp_path):
    env_home = tmp_path / "hf-home"
    import os

    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(env_home), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return llava_bench("prepare", "--root", str(root), *args, env=env)


def test_prepare_makes_a_valid_layout_with_only_the_needed_files(hub_root, synthetic_layout, tmp_path):
    target = tmp_path / "llava"
    with Hub(hub_root) as hub:
        done = prepare(target, hub.endpoint, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid layout" in done.stdout
    assert llava_bench("validate", "--root", str(target), "--deep").returncode == 0
    layout = Layout.at(target)
    assert not list(target.rglob("tf_model.h5")) and not list(target.rglob("flax_model.msgpack"))
    assert not (layout.pretrain_dir / "blip_laion_cc_sbu_558k_meta.json").exists()
    assert tree_digest(target, "data/llava_data/LLaVA-Pretrain/images") == tree_digest(
        synthetic_layout, "data/llava_data/LLaVA-Pretrain/images"
    )
    source = json.loads((layout.llm_dir / ".llava-bench-source.json").read_text())
    assert source["commit"] == _commit(hub_root / LLM_REPO)  # the hash the hub resolved, nothing else
    assert source["revision_requested"] == "main"
    from bench.core.inputs import describe, load_dataset

    recorded = {
        s["repo_id"]: s["commit"] for s in describe(layout, load_dataset(layout.dataset_json))["sources"]
    }  # what the verdict records
    assert recorded["liuhaotian/LLaVA-Pretrain"] == _commit(hub_root / DATA_REPO)
    # The tokenized dataset lies next to the data, where every run finds it.
    from entrypoint.preflight.tokenized_cache import cache_folder

    (prepared,) = layout.pretrain_dir.glob("tokenized-*")
    assert (prepared / "dataset_info.json").is_file() and f"tokenized dataset: {DEMO_SAMPLES} records" in done.stdout
    assert cache_folder(layout, tmp_path / "results", load_dataset(layout.dataset_json).sha256) == prepared
    # A second prepare fetches nothing and unpacks nothing.
    with Hub(hub_root) as hub:
        again = prepare(target, hub.endpoint, tmp_path=tmp_path)
        assert again.returncode == 0
        assert not [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert "0 images unpacked, 2048 already there" in again.stdout
    assert f"tokenized dataset: already in {prepared}" in again.stdout


def test_a_cut_connection_resumes_with_a_byte_range(hub_root, tmp_path):
    # huggingface_hub writes in 10 MiB chunks: a 24 MiB shard cut at 15 MiB leaves 10 MiB to resume from.
    shard = hub_root / LLM_REPO / "model-extra.safetensors"
    shard.write_bytes(bytes(range(256)) * (24 * 2**20 // 256))
    target = tmp_path / "llava"
    with Hub(hub_root) as hub:
        hub.cut_after[shard.name] = 15 * 2**20
        first = prepare(target, hub.endpoint, "--only", "models", tmp_path=tmp_path)
        assert first.returncode == 2 and "run prepare again: it resumes" in first.stderr
        assert not (Layout.at(target).llm_dir / ".llava-bench-source.json").exists()  # not complete, not marked so
        second = prepare(target, hub.endpoint, "--only", "models", tmp_path=tmp_path)
        ranges = [r[2] for r in hub.requests if r[0] == "GET" and r[1].endswith(shard.name) and r[2]]
    assert second.returncode == 2  # models done; the dataset (not asked for) is what validate still misses
    assert "images" in second.stderr and "internlm2-chat-20b" not in second.stderr.split("left:", 1)[-1]
    assert ranges == [f"bytes={10 * 2**20}-"]
    assert (Layout.at(target).llm_dir / shard.name).read_bytes() == shard.read_bytes()


def test_a_zip_member_escaping_the_folder_is_refused_and_nothing_unpacked(hub_root, tmp_path):
    write_zip(hub_root / DATA_REPO / "images.zip", {"00000/ok.jpg": b"fine", "../../escape.jpg": b"evil"})
    target = tmp_path / "llava"
    with Hub(hub_root) as hub:
        done = prepare(target, hub.endpoint, "--only", "dataset", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "outside" in done.stderr and "../../escape.jpg" in done.stderr
    assert not list(tmp_path.rglob("escape.jpg"))
    assert not (Layout.at(target).image_folder / "00000" / "ok.jpg").exists()


def test_not_enough_disk_is_refused_before_downloading(hub_root, tmp_path):
    target = tmp_path / "llava"
    with Hub(hub_root) as hub:
        hub.reported_sizes["images.zip"] = 10**16  # the hub says the archive is 10 PB
        done = prepare(target, hub.endpoint, tmp_path=tmp_path)
        assert not [r for r in hub.requests if "/resolve/" in r[1]]
    assert done.returncode == 2
    assert "GB more under" in done.stderr and "free" in done.stderr
    assert not (target / "model").exists()


def test_an_unreachable_hub_names_the_endpoint_and_the_mirror_variable(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    done = prepare(tmp_path / "llava", closed, tmp_path=tmp_path)
    assert done.returncode == 2
    assert closed in done.stderr and "HF_ENDPOINT" in done.stderr


def test_a_pinned_revision_is_requested_and_recorded(hub_root, tmp_path):
    commit = _commit(hub_root / CLIP_REPO)
    target = tmp_path / "llava"
    with Hub(hub_root) as hub:
        done = prepare(
            target,
            hub.endpoint,
            "--only",
            "models",
            "--revision",
            f"openai/clip-vit-large-patch14-336={commit}",
            tmp_path=tmp_path,
        )
        assert any(r[1].endswith(f"/clip-vit-large-patch14-336/revision/{commit}") for r in hub.requests)
    assert done.returncode == 2  # the dataset was not asked for
    source = json.loads((Layout.at(target).clip_dir / ".llava-bench-source.json").read_text())
    assert (source["revision_requested"], source["commit"]) == (commit, commit)


def test_a_malformed_revision_pin_is_invalid(tmp_path):
    done = llava_bench("prepare", "--root", str(tmp_path / "llava"), "--revision", "no-equals-sign")
    assert done.returncode == 2
    assert "REPO=REVISION" in done.stderr


def test_an_endpoint_without_a_scheme_is_invalid_naming_the_variable(tmp_path):
    done = prepare(tmp_path / "llava", "hf-mirror.com", tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "HF_ENDPOINT='hf-mirror.com' is not an http(s) address" in done.stderr
    assert "https://hf-mirror.com" in done.stderr
