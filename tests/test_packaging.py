"""The image recipe, its pins, the Makefile's docker flags and the examples, checked
without a Docker engine (tests/container/test_container.py builds and runs the image on one)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from entrypoint.job.topology import RANK_VARIABLES, detect

ROOT = Path(__file__).resolve().parent.parent


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_pins_the_ngc_base_and_the_xtuner_commit():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04" in text
    assert "ARG XTUNER_COMMIT=770bac38bc905794eb38e53de4f54f98e30a77dc" in text
    assert 'ENTRYPOINT ["llava-bench"]' in text and 'CMD ["run", "--root", "/llava"]' in text
    assert "--constraint" in text and (ROOT / "constraints" / "image.txt").is_file()
    # the appliance is the last thing installed: code changes rebuild one thin layer
    assert text.index("COPY entrypoint/") > text.index("XTUNER_REQUIREMENT}")


def pins(name: str) -> dict[str, str]:
    lines = [
        line for line in (ROOT / "constraints" / name).read_text().splitlines() if line and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[\w.-]+==[\w.+-]+", line) for line in lines), "only exact pins"
    names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
    assert len(names) == len(set(names)), "a package pinned twice"
    return dict(zip(names, (line.split("==")[1] for line in lines)))


@pytest.mark.parametrize("name", ["image.txt", "ci.txt"])
def test_each_constraints_file_pins_the_training_stack_and_the_appliance_dependencies(name):
    pinned = pins(name)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert re.match(r"[\w.-]+", requirement).group().lower() in pinned, requirement
    for package in ("torch", "torchvision", "transformers", "mmengine", "bitsandbytes", "peft"):
        assert package in pinned, package


def test_the_image_pins_cuda_11_8_torch_and_deepspeed():
    pinned = pins("image.txt")
    assert (pinned["torch"], pinned["torchvision"]) == ("2.1.2+cu118", "0.16.2+cu118")
    assert "deepspeed" in pinned


def test_make_run_passes_the_flags_the_mount_and_every_rank_variable():
    done = subprocess.run(["make", "-n", "run", "LLAVA=./llava"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    command = done.stdout
    for flag in (
        "--gpus all",
        "--ipc=host",
        "--network=host",
        "--stop-timeout 60",
        "--ulimit memlock=-1",
        "--ulimit stack=67108864",
        "--user $(id -u):$(id -g)",
        f"-v {ROOT / 'llava'}:/llava",
    ):
        assert flag in command, flag
    for variable in RANK_VARIABLES:
        assert f"-e {variable} " in command + " ", variable


@pytest.mark.parametrize("node_rank", range(4))
def test_the_4x8_docker_lines_give_each_node_its_place(node_rank):
    script = (ROOT / "examples" / "docker-run-4x8.sh").read_text().replace('"$NODE_RANK"', str(node_rank))
    env = dict(re.findall(r"-e (\w+)=([\w.-]+)", script))
    topology = detect(env, visible_gpus=8)
    assert (topology.nnodes, topology.node_rank, topology.nproc_per_node) == (4, node_rank, 8)
    assert (topology.master_addr, topology.master_port) == ("node-0", 29500)


def test_the_slurm_script_leaves_the_topology_to_slurm():
    script = (ROOT / "examples" / "slurm-pyxis.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in script  # one appliance per node
    env = {
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
        "MASTER_PORT": re.search(r"MASTER_PORT=(\d+)", script).group(1),
    }
    topology = detect(env, visible_gpus=8)
    assert (topology.nnodes, topology.node_rank, topology.master_addr, topology.master_port) == (4, 2, "gpu01", 29500)


def test_the_pytorchjob_manifest_matches_what_the_operator_will_set():
    job = yaml.safe_load((ROOT / "examples" / "kubeflow-pytorchjob.yaml").read_text())
    replicas = job["spec"]["pytorchReplicaSpecs"]
    pods = replicas["Master"]["replicas"] + replicas["Worker"]["replicas"]
    nproc = int(job["spec"]["nprocPerNode"])
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
    env = {
        "PET_NNODES": str(pods),
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_NODE_RANK": "3",
        "WORLD_SIZE": str(pods * nproc),
        "MASTER_ADDR": "llava-bench-master-0",
        "MASTER_PORT": "23456",
    }
    topology = detect(env, visible_gpus=8)
    assert (topology.nnodes, topology.nproc_per_node, topology.node_rank) == (4, 8, 3)
