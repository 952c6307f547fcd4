"""From nothing to a valid layout: download the models and the dataset from the
Hugging Face Hub (or a mirror named by HF_ENDPOINT), then unpack images.zip.

Resumable at every stage: huggingface_hub keeps partial downloads and resumes them
with byte ranges; unpacking skips images already there and writes each one under a
temporary name first. The commit each repo resolved to is written next to its files
(``SOURCE_RECORD_NAME``) only after the download completed, so nothing
half-written looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bench.core.layout import SOURCE_RECORD_NAME, Layout

DATASET_FILES = ("blip_laion_cc_sbu_558k.json", "images.zip")
MODEL_SUFFIXES = (".json", ".py", ".txt", ".model", ".tiktoken")  # configs, remote code, tokenizers


class PrepareError(RuntimeError):
    """A refusal with its fix, for the user (exit 2)."""


@dataclass(frozen=True)
class HubRepo:
    repo_type: str  # "model" or "dataset"
    repo_id: str
    part: str  # what --only selects: "models" or "dataset"
    target: Callable[[Layout], Path]


REPOS = (
    HubRepo("model", "internlm/internlm2-chat-20b", "models", lambda layout: layout.llm_dir),
    HubRepo("model", "openai/clip-vit-large-patch14-336", "models", lambda layout: layout.clip_dir),
    HubRepo("dataset", "liuhaotian/LLaVA-Pretrain", "dataset", lambda layout: layout.pretrain_dir),
)


def needed_files(repo: HubRepo, siblings: dict[str, int]) -> dict[str, int]:
    """The files the recipe needs (name -> size): no TF/Flax weights, safetensors over .bin."""
    if repo.repo_type == "dataset":
        return {name: size for name, size in siblings.items() if name in DATASET_FILES}
    files = {name: size for name, size in siblings.items() if "/" not in name and name.endswith(MODEL_SUFFIXES)}
    safetensors = {n: s for n, s in siblings.items() if n.endswith(".safetensors")}
    weights = safetensors or {n: s for n, s in siblings.items() if n.startswith("pytorch_model") and n.endswith(".bin")}
    return {**files, **weights}


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def resolve(repo: HubRepo, revision: str | None) -> tuple[str, dict[str, int]]:
    """(commit the hub resolved, needed files with sizes)."""
    import requests
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        info = HfApi().repo_info(repo.repo_id, repo_type=repo.repo_type, revision=revision, files_metadata=True)
    except OfflineModeIsEnabled:
        raise PrepareError(
            "HF_HUB_OFFLINE is set: nothing can be downloaded; unset it, or lay out the files by hand"
        ) from None
    except (requests.ConnectionError, requests.Timeout) as error:
        raise PrepareError(
            f"cannot reach the hub at {_endpoint()} ({type(error).__name__}); point HF_ENDPOINT at a mirror "
            "you can reach (and HTTPS_PROXY if you need a proxy), or check the network"
        ) from None
    except HfHubHTTPError as error:
        raise PrepareError(
            f"{repo.repo_id} at {_endpoint()}: {error}; check the name, the revision and HF_TOKEN"
        ) from None
    siblings = {s.rfilename: s.size or 0 for s in info.siblings or []}
    return info.sha, needed_files(repo, siblings)


def _missing_bytes(target: Path, files: dict[str, int]) -> int:
    return sum(
        size for name, size in files.items() if not (target / name).is_file() or (target / name).stat().st_size != size
    )


def check_disk(root: Path, needed: int) -> None:
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise PrepareError(
            f"prepare needs {needed / 1e9:.1f} GB more under {root} (downloads plus unpacked images) "
            f"but {probe} has {free / 1e9:.1f} GB free; free space or choose another --root"
        )


def download(repo: HubRepo, target: Path, commit: str, files: dict[str, int], revision: str | None) -> None:
    from huggingface_hub import snapshot_download

    target.mkdir(parents=True, exist_ok=True)
    snapshot_download(
        repo.repo_id, repo_type=repo.repo_type, revision=commit, local_dir=target, allow_patterns=sorted(files)
    )
    record = {
        "repo_id": repo.repo_id,
        "repo_type": repo.repo_type,
        "revision_requested": revision or "main",
        "commit": commit,
        "endpoint": _endpoint(),
        "files": sorted(files),
    }
    (target / SOURCE_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _safe_member(name: str) -> PurePosixPath | None:
    """The member's path inside the destination, or None if it would escape it."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        return None
    return path


def unpack_images(archive: Path, layout: Layout, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Stream images.zip into images/, skipping complete files; (unpacked, skipped).

    Refuses the whole archive before writing anything if one member would land
    outside the images folder.
    """
    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.infolist() if not m.is_dir()]
        unsafe = [m.filename for m in members if _safe_member(m.filename) is None]
        if unsafe:
            raise PrepareError(
                f"{archive} has members that would be written outside {layout.image_folder} "
                f"(e.g. {unsafe[0]!r}); nothing was unpacked; get the archive again from the hub"
            )
        # The archive may or may not hold a top-level images/ folder.
        nested = all(_safe_member(m.filename).parts[0] == "images" for m in members)
        destination = layout.pretrain_dir if nested else layout.image_folder
        unpacked = skipped = 0
        total = sum(m.file_size for m in members)
        done = 0
        for member in members:
            out = destination / _safe_member(member.filename)
            if out.is_file() and out.stat().st_size == member.file_size:
                skipped += 1
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                partial = out.with_name(out.name + ".part")
                with zipped.open(member) as source, open(partial, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                os.replace(partial, out)
                unpacked += 1
            done += member.file_size
            if progress:
                progress(done, total)
    return unpacked, skipped


def prepare(
    root: Path, only: str | None, revisions: dict[str, str], say: Callable[[str], None], progress=None
) -> list[str]:
    """Download what is missing, unpack the images; the lines of what was done."""
    import requests

    layout = Layout.at(root)
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint and urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise PrepareError(f"HF_ENDPOINT={endpoint!r} is not an http(s) address; write it as https://{endpoint}")
    chosen = [repo for repo in REPOS if only in (None, repo.part)]
    unknown = set(revisions) - {repo.repo_id for repo in REPOS}
    if unknown:
        raise PrepareError(f"--revision names unknown repos {sorted(unknown)}; known: {[r.repo_id for r in REPOS]}")
    plans = []
    for repo in chosen:
        commit, files = resolve(repo, revisions.get(repo.repo_id))
        plans.append((repo, commit, files, _missing_bytes(repo.target(layout), files)))
    unpack_bytes = (
        sum(files.get("images.zip", 0) for repo, _, files, _ in plans if repo.repo_type == "dataset")
        if not layout.image_folder.is_dir()
        else 0
    )
    check_disk(layout.root, sum(missing for *_, missing in plans) + unpack_bytes)
    done = []
    for repo, commit, files, missing in plans:
        target = repo.target(layout)
        say(f"{repo.repo_id} @ {commit[:12]}: {len(files)} files, {missing / 1e6:.1f} MB to fetch into {target}")
        try:
            download(repo, target, commit, files, revisions.get(repo.repo_id))
        except (requests.ConnectionError, requests.Timeout, OSError) as error:
            raise PrepareError(
                f"the download of {repo.repo_id} broke off ({type(error).__name__}); run prepare again: it resumes"
            ) from None
        done.append(f"{repo.repo_id}: commit {commit} ({len(files)} files, {missing / 1e6:.1f} MB fetched)")
    if any(repo.repo_type == "dataset" for repo in chosen):
        unpacked, skipped = unpack_images(layout.images_zip, layout, progress)
        done.append(f"images.zip: {unpacked} images unpacked, {skipped} already there")
    return done
