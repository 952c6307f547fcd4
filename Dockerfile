# llava-bench: the appliance image (docs/RECIPE.md, "XTuner versions"). Everything the training stack needs is
# pinned in constraints/image.txt; the appliance itself is installed last, so a code
# change rebuilds one thin layer. Build: make image.
ARG BASE_IMAGE=nvcr.io/nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04
FROM ${BASE_IMAGE}
# Declared again so the labels and image.json below can name it.
ARG BASE_IMAGE

ARG PYTHON=python3.10
ARG TORCH_REQUIREMENTS="torch==2.1.2+cu118 torchvision==0.16.2+cu118"
# The index that serves TORCH_REQUIREMENTS besides the default one; empty: the default only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu118
ARG XTUNER_COMMIT=770bac38bc905794eb38e53de4f54f98e30a77dc
ARG XTUNER_REQUIREMENT="xtuner[deepspeed] @ git+https://github.com/InternLM/xtuner.git@${XTUNER_COMMIT}"
ARG CONSTRAINTS=constraints/image.txt
# A prebuilt flash-attn wheel (URL or path) for cu118 / torch 2.1; empty: none.
ARG FLASH_ATTN_WHEEL=""
# The appliance version (entrypoint/__init__.py); the build checks it against the code.
ARG APPLIANCE_VERSION

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/llava-bench/venv \
    PATH=/opt/llava-bench/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp/llava-bench-home \
    XDG_CACHE_HOME=/tmp/llava-bench-home/.cache \
    HF_HOME=/tmp/llava-bench-home/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/llava-bench-home/.cache/triton \
    MPLCONFIGDIR=/tmp/llava-bench-home/.cache/matplotlib

# Python in a virtualenv, git for the pinned XTuner commit, and the X/GL libraries
# that opencv-python (imported by mmengine and XTuner) links against.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ${PYTHON} ${PYTHON}-venv git ca-certificates \
       libgl1 libglib2.0-0 libsm6 libice6 libxext6 libx11-6 libxcb1 \
    && rm -rf /var/lib/apt/lists/* \
    && ${PYTHON} -m venv ${VIRTUAL_ENV}

COPY constraints/ /opt/llava-bench/constraints/
RUN pip install --constraint /opt/llava-bench/${CONSTRAINTS} ${TORCH_INDEX_URL:+--extra-index-url ${TORCH_INDEX_URL}} ${TORCH_REQUIREMENTS}
# The pinned commit declares python_requires >=3.8,<3.11: a newer PYTHON needs the flag, and its code runs there.
RUN pip install --constraint /opt/llava-bench/${CONSTRAINTS} --ignore-requires-python "${XTUNER_REQUIREMENT}"
RUN if [ -n "${FLASH_ATTN_WHEEL}" ]; then pip install --no-deps "${FLASH_ATTN_WHEEL}"; fi

# The appliance, last. APPLIANCE_VERSION (make image passes it) must match the code, so
# the label cannot drift; image.json records what this image was built from, and the
# verdict reads it (the XTuner commit actually installed is read from pip's record).
COPY pyproject.toml README.md /opt/llava-bench/src/
COPY entrypoint/ /opt/llava-bench/src/entrypoint/
COPY bench/ /opt/llava-bench/src/bench/
COPY schemas/ /opt/llava-bench/src/schemas/
RUN pip install --constraint /opt/llava-bench/${CONSTRAINTS} /opt/llava-bench/src \
    && version="$(python -c 'import entrypoint; print(entrypoint.__version__)')" \
    && if [ "${version}" != "${APPLIANCE_VERSION}" ]; then \
         echo "build arg APPLIANCE_VERSION='${APPLIANCE_VERSION}' but the code is ${version}: build with make image" >&2; exit 1; \
       fi \
    && mkdir -p /etc/llava-bench "${HOME}" \
    && chmod 1777 "${HOME}" \
    && python -c "import json, sys, torch; json.dump(dict(appliance_version='${APPLIANCE_VERSION}', base_image='${BASE_IMAGE}', xtuner_requirement='${XTUNER_REQUIREMENT}', torch=torch.__version__, cuda=torch.version.cuda), sys.stdout)" > /etc/llava-bench/image.json

LABEL org.opencontainers.image.title="llava-bench" \
      org.opencontainers.image.description="LLaVA-InternLM2-20B pretraining benchmark appliance (XTuner + DeepSpeed ZeRO-2)" \
      org.opencontainers.image.version="${APPLIANCE_VERSION}" \
      io.llava-bench.xtuner-commit="${XTUNER_COMMIT}" \
      io.llava-bench.xtuner-requirement="${XTUNER_REQUIREMENT}" \
      io.llava-bench.torch="${TORCH_REQUIREMENTS}" \
      io.llava-bench.base-image="${BASE_IMAGE}"

WORKDIR /tmp/llava-bench-home
ENTRYPOINT ["llava-bench"]
CMD ["run", "--root", "/llava"]
