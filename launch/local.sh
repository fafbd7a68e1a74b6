#!/usr/bin/env bash
# Runs a command as N cooperating JAX processes on this machine, each with
# D (fake) CPU devices, joined by jax.distributed over loopback with gloo CPU
# collectives. The same program then runs as on N hosts.
#
#   launch/local.sh 2 4 python -m decalign_jax.train \
#       --config configs/synthetic.py --workdir runs/mp
#
# Process 0 prints to the terminal; process i > 0 logs to
# ${LAUNCH_LOG_DIR:-.}/process_<i>.log.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
n=$1; d=$2; shift 2
port=${JAX_COORDINATOR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logdir=${LAUNCH_LOG_DIR:-.}
mkdir -p "$logdir"
pids=()
for ((i = 0; i < n; i++)); do
  env JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n" \
      JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$d" \
      "$@" > >(if [ "$i" = 0 ]; then cat; else cat > "$logdir/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
