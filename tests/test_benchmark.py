"""benchmarks/train_step.py runs, compiles the step once and reports sanely."""

import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
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
  assert r["flat_optimizer"] is True  # optim.FlatParams, train.py's default
  # Reductions as XLA loops, as in train.py; products on YNNPACK.
  assert r["ynn_reductions"] is False
  assert r["ynn_fusions"].get("reduce", 0) == 0 and r["ynn_fusions"]["dot"]
  assert r["all_losses_finite"]
  assert r["runtime"] == {"retain_host_memory": True,
                          "unrolled_cpu_threefry": True}
  assert r["text_backbone"] == backbone
  # conftest gives every run of the suite one persistent compilation cache.
  assert r["compilation_cache_dir"] == os.environ["JAX_COMPILATION_CACHE_DIR"]
  assert isinstance(r["train_step_from_cache"], bool)
  assert r["train_step_ms_median"] > 0 and r["eval_forward_ms_median"] > 0
  assert r["flops_per_step"] > r["model_flops_per_step"] / 10 > 0
  assert r["measured_matmul_gflops"] > 1
  assert r["model_mfu_of_measured"] == pytest.approx(
      r["model_gflops"] / r["measured_matmul_gflops"], rel=1e-2, abs=1e-4)
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
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"),
       "--interleave", "3"], capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 2
  assert "--interleave needs --reference-python" in proc.stderr


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"bench_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_reference_serve_protocol():
  reference_step = _load("reference_step")
  calls = []

  def step():
    calls.append(1)
    return float("nan") if len(calls) == 4 else 1.0

  out = io.StringIO()
  reference_step.serve(step, io.StringIO(
      "train 3\n\nwalk 2\ntrain 2\nquit\ntrain 5\n"), out, info={"batch": 8})
  replies = [json.loads(line) for line in out.getvalue().splitlines()]
  assert replies[0] == {"ready": True, "batch": 8}
  assert len(replies[1]["train_step_s"]) == 3
  assert replies[1]["all_losses_finite"] is True
  assert "unknown command 'walk 2'" in replies[2]["error"]
  assert len(replies[3]["train_step_s"]) == 2
  assert replies[3]["all_losses_finite"] is False  # the NaN of call 4
  assert len(replies) == 4 and len(calls) == 5  # nothing after quit


def test_interleave_pairs_rounds():
  runner = _load("reference_runner")
  order = []

  class Fake:
    def __init__(self, name, seconds):
      self.name, self.seconds = name, list(seconds)

    def train(self, n):
      order.append(self.name)
      return [self.seconds.pop(0)] * n

  ours = Fake("ours", [0.1, 0.2])
  r = runner.interleave(ours.train, {"default": Fake("default", [0.4, 0.4]),
                                     "retain": Fake("retain", [0.2, 0.8])},
                        rounds=2, steps=3, batch=32)
  assert order == ["ours", "default", "retain"] * 2
  rates = r["train_samples_per_s_per_round"]
  assert rates == {"ours": [320.0, 160.0], "default": [80.0, 80.0],
                   "retain": [160.0, 40.0]}
  # Paired per round: default 4 and 2; retain 2 and 4.
  assert r["speedup"]["default"] == {"median": 3.0, "min": 2.0, "max": 4.0,
                                     "pooled": round(0.4 / 0.15, 3)}
  assert r["speedup"]["retain"]["median"] == 3.0
  assert r["speedup"]["retain"]["pooled"] == round(0.5 / 0.15, 3)


def test_reference_server_process(tmp_path):
  runner = _load("reference_runner")
  server_py = tmp_path / "server.py"
  server_py.write_text(
      "import sys, time\n"
      f"sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r})\n"
      "import reference_step\n"
      "reference_step.serve(lambda: time.sleep(0.01) or 1.0, sys.stdin,"
      " sys.stdout, info={'torch': 'fake'})\n")
  server = runner.ReferenceServer([sys.executable, str(server_py)])
  try:
    assert server.info == {"ready": True, "torch": "fake"}
    times = server.train(3)
    assert len(times) == 3 and min(times) >= 0.01
    assert len(server.train(1)) == 1
  finally:
    server.close()
  assert server._proc.returncode == 0  # pylint: disable=protected-access
  crash_py = tmp_path / "crash.py"
  crash_py.write_text("import sys\nsys.exit('no torch here')\n")
  with pytest.raises(SystemExit, match="exited with status 1(.|\n)*no torch"):
    runner.ReferenceServer([sys.executable, str(crash_py)])
