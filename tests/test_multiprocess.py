"""2 processes x 4 devices (launch/local.sh) train like 1 process x 8."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [sys.executable, "-m", "decalign_jax.train", "--config",
        "configs/synthetic.py:tiny", "--config.num_epochs=1",
        "--config.early_stop_patience=5"]


def _final_params(workdir):
  latest = os.path.join(workdir, "ckpt", "latest")
  (step,) = os.listdir(latest)
  state = ocp.StandardCheckpointer().restore(
      os.path.join(latest, step, "state"))
  return jax.tree.map(np.asarray, state["params"])


def test_two_processes_match_one(tmp_path):
  env = dict(os.environ, LAUNCH_LOG_DIR=str(tmp_path / "logs"))
  env.pop("XLA_FLAGS", None)
  multi = str(tmp_path / "multi")
  proc = subprocess.run(
      [os.path.join(REPO, "launch", "local.sh"), "2", "4", *ARGS,
       f"--workdir={multi}"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  single = str(tmp_path / "single")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  proc = subprocess.run([*ARGS, f"--workdir={single}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  p_multi, p_single = _final_params(multi), _final_params(single)
  leaves_m = jax.tree_util.tree_leaves_with_path(p_multi)
  leaves_s = jax.tree.leaves(p_single)
  assert len(leaves_m) == len(leaves_s)
  for (path, a), b in zip(leaves_m, leaves_s):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
