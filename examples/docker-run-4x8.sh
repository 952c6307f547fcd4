#!/usr/bin/env bash
# A 4-node x 8-GPU cluster without a scheduler. On node-0 run `./docker-run-4x8.sh 0`,
# on the others `... 1`, `... 2`, `... 3`; node-0 is the rendezvous host (ports 29500
# and 29501 open between the nodes). The explicit variables are what
# `llava-bench topology` reads first. --stop-timeout gives `docker stop` time for the
# aborted verdict.
set -euo pipefail
NODE_RANK=${1:?usage: $0 NODE_RANK (0-3)}
docker run --rm --gpus all --ipc=host --network=host --stop-timeout 60 \
  --ulimit memlock=-1 --ulimit stack=67108864 \
  -v "$PWD/llava:/llava" \
  -e NNODES=4 -e NODE_RANK="$NODE_RANK" -e NPROC_PER_NODE=8 -e ADDR=node-0 -e PORT=29500 \
  "${IMAGE:-llava-bench:0.1.0}"
