# llava-bench developer entry points. `make demo` and `make test` work on a fresh clone:
# they create .venv/ with the CI pins (xtuner 0.2.0, CPU) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints/ci.txt
# torch/torchvision are named so pip takes the pinned builds; xtuner is not a
# dependency of the package because the image installs it from a git commit.
TRAINING_STACK := torch==2.14.1 torchvision==0.29.1 xtuner==0.2.0

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)".*/\1/p' entrypoint/__init__.py)
IMAGE ?= llava-bench:$(VERSION)
# Extra --build-arg flags (e.g. FLASH_ATTN_WHEEL=...); see the ARGs at the top of the Dockerfile.
IMAGE_BUILD_ARGS ?=
LLAVA ?= ./llava
BASE_IMAGE ?= nvcr.io/nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04
# The scheduler's rank variables (entrypoint/job/topology.py RANK_VARIABLES) pass into the container.
RANK_ENV := -e NNODES \
	-e NODE_RANK \
	-e NPROC_PER_NODE \
	-e ADDR \
	-e PORT \
	-e MASTER_ADDR \
	-e MASTER_PORT \
	-e WORLD_SIZE \
	-e RANK \
	-e LOCAL_WORLD_SIZE \
	-e GROUP_RANK \
	-e PET_NNODES \
	-e PET_NODE_RANK \
	-e PET_NPROC_PER_NODE \
	-e PET_MASTER_ADDR \
	-e PET_MASTER_PORT \
	-e SLURM_NNODES \
	-e SLURM_JOB_NUM_NODES \
	-e SLURM_NODEID \
	-e SLURM_JOB_NODELIST \
	-e SLURM_NODELIST \
	-e OMPI_COMM_WORLD_SIZE \
	-e OMPI_COMM_WORLD_RANK \
	-e OMPI_COMM_WORLD_LOCAL_SIZE \
	-e MLP_WORKER_NUM \
	-e MLP_ROLE_INDEX \
	-e MLP_WORKER_0_HOST \
	-e MLP_WORKER_0_PORT \
	-e MLP_WORKER_GPU \
	-e VC_WORKER_NUM \
	-e MA_NUM_HOSTS \
	-e VC_TASK_INDEX \
	-e VC_WORKER_HOSTS \
	-e MA_NUM_GPUS \
	-e SM_HOSTS \
	-e SM_CURRENT_HOST \
	-e SM_NUM_GPUS \
	-e NCCL_SOCKET_IFNAME \
	-e NCCL_IB_HCA \
	-e GLOO_SOCKET_IFNAME

.PHONY: help venv test test-gpu demo clean-demo image run lint lock-base lock-image

help:
	@echo "make demo   synthetic layout + real XTuner run on this machine (CPU is fine)"
	@echo "make test   the test suite (unit tests and real end-to-end runs)"
	@echo "make image  build the appliance image ($(IMAGE))"
	@echo "make run LLAVA=./llava   run the image on this node with the right docker flags"

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint $(CONSTRAINTS) $(TRAINING_STACK) --editable '.[test]'
	touch $@

venv: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -rs --durations=15  # why any test was skipped; the slowest tests, to keep CI short

demo: $(BIN)/.installed
	$(BIN)/llava-bench demo --root demo

clean-demo:
	rm -rf demo

# On a GPU machine whose Python already has the training stack (docs/GPU-VALIDATION.md).
test-gpu:
	$(PYTHON) -m pytest -q -s -m gpu tests/gpu/test_gpu.py

image:
	docker build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg APPLIANCE_VERSION=$(VERSION) $(IMAGE_BUILD_ARGS) -t $(IMAGE) .

# --stop-timeout: docker stop waits for the appliance to stop the trainer (up to 30 s)
# and write the aborted verdict before it kills the container.
run:
	docker run --rm --gpus all --ipc=host --network=host --stop-timeout 60 \
	--ulimit memlock=-1 --ulimit stack=67108864 \
	--user $$(id -u):$$(id -g) \
	-v $(abspath $(LLAVA)):/llava \
	$(RANK_ENV) \
	$(IMAGE)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_architecture.py  # the import contracts

# Record the digest of the base image for users who can pull it (never invented: it is
# what the registry answers).
lock-base:
	docker pull $(BASE_IMAGE)
	docker inspect --format '{{index .RepoDigests 0}}' $(BASE_IMAGE) > constraints/base-image.digest
	@cat constraints/base-image.digest

# Re-pin constraints/image.txt from a built image (needs the NGC base and GitHub); the
# header comment is kept, the appliance and XTuner (installed by name) are left out.
lock-image: image
	{ sed -n '/^#/p' constraints/image.txt; \
	  docker run --rm --entrypoint pip $(IMAGE) freeze --exclude llava-bench --exclude xtuner; } > constraints/image.txt.new
	mv constraints/image.txt.new constraints/image.txt
