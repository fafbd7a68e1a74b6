#!/usr/bin/env bash
# Runs training on every worker of a Cloud TPU VM slice (e.g. v4-32).
#
#   launch/tpu_pod.sh TPU_NAME ZONE "TRAIN ARGS" [REPO_URL]
#
# Each worker clones (or updates) the repo, installs it with the TPU jaxlib
# and starts the same command; jax.distributed.initialize() finds the other
# workers from the TPU metadata (DECALIGN_DISTRIBUTED=1). The workdir should
# be on shared storage (e.g. gs://..., written through etils.epath and
# gcsfs) so every worker's checkpoint shards land in one place.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE \"TRAIN ARGS\" [REPO_URL]" >&2
  exit 2
fi
name=$1; zone=$2; args=$3
repo=${4:-${DECALIGN_REPO:?set DECALIGN_REPO or pass REPO_URL}}
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
  --command "set -e
    [ -d decalign_jax ] || git clone $repo decalign_jax
    cd decalign_jax && git pull --ff-only
    python3 -m pip install -q -e . 'jax[tpu]' gcsfs
    DECALIGN_DISTRIBUTED=1 python3 -m decalign_jax.train $args"
