"""benchmarks/train_step.py runs, compiles the step once and reports sanely."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("extra,backbone", [
    ((), None),
    (("--text-layers", "1", "--text-hidden", "64"),
     {"num_hidden_layers": 1, "hidden_size": 64}),
])
def test_train_step_benchmark_json(extra, backbone):
  # LLVM at -O0: the run is compile-bound, and nothing asserted below (HLO
  # counts, FLOPs, one compile) depends on the backend's optimisation level.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"),
       "--batch", "4", "--steps", "2", "--warmup", "1", "--eval-steps", "1",
       "--num-layers", "1",
       *extra], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["jit_cache_entries"] == 1  # one compile for every step
  assert r["num_layers"] == 1
  assert r["attention_kernel"] == "cpu"  # 'auto' on one CPU device
  assert r["packed_state"] is True  # the train loop's carry, as in train.py
  # Reductions as XLA loops, as in train.py; products on YNNPACK.
  assert r["ynn_reductions"] is False
  assert r["ynn_fusions"].get("reduce", 0) == 0 and r["ynn_fusions"]["dot"]
  assert r["all_losses_finite"]
  assert r["runtime"] == {"retain_host_memory": True,
                          "unrolled_cpu_threefry": True}
  assert r["text_backbone"] == backbone
  assert r["train_step_ms_median"] > 0 and r["eval_forward_ms_median"] > 0
  assert r["flops_per_step"] > r["model_flops_per_step"] / 10 > 0
  # Reference figures exist for batch 32 and 512 only, never with a backbone.
  assert r["reference"] == {} and r["speedup_vs_reference"] == {}


def test_reference_bench_arguments_are_checked(tmp_path):
  # The PyTorch side needs torch and a clone of taco-group/DecAlign, which
  # CI has neither of; what is testable here is that bad input is named.
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "reference_step.py"),
       "--reference-dir", str(tmp_path)], capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode != 0
  assert f"--reference-dir {tmp_path}: no config/dec_mosi_config.json" in (
      proc.stderr)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"),
       "--reference-python", sys.executable], capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 2
  assert "--reference-python and --reference-dir go together" in proc.stderr
