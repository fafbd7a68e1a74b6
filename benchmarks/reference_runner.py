"""The reference side of `train_step.py`: PyTorch processes, side by side.

`run_reference` runs `reference_step.py` once per glibc malloc mode and
returns its timings; `ReferenceServer` keeps a `reference_step.py --serve`
process alive to time reference steps on request, and `interleave` pairs
rounds of our steps with rounds of each server's (`--interleave`).
"""

import json
import os
import subprocess
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# glibc told to keep freed memory, as for bench_reference_cpu_malloc_retain.
RETAIN_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0",
                     "MALLOC_TRIM_THRESHOLD_": "100000000000",
                     "MALLOC_TOP_PAD_": "1073741824"}


def reference_modes(args) -> tuple[str, ...]:
  return (("default", "retain") if args.reference_malloc == "both"
          else (args.reference_malloc,))


def reference_env(mode: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  if mode == "retain":
    env.update(RETAIN_MALLOC_ENV)
  return env


def reference_command(args, serve: bool = False) -> list[str]:
  return [args.reference_python,
          os.path.join(ROOT, "benchmarks", "reference_step.py"),
          "--reference-dir", args.reference_dir, "--batch", str(args.batch),
          "--steps", str(args.steps), "--warmup", str(args.warmup),
          "--eval-steps", str(args.eval_steps), "--seed", str(args.seed),
          *(["--serve"] if serve else [])]


class ReferenceServer:
  """A `reference_step.py --serve` process: times reference steps on request.

  Its stderr goes to a temporary file (a pipe nobody reads could fill up
  and stall it) and is quoted when it fails.
  """

  def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
    self.cmd = cmd
    self._stderr = tempfile.TemporaryFile(mode="w+")
    self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._stderr,
                                  text=True)
    self.info = self._read()
    if not self.info.get("ready"):
      self._fail(f"expected a ready line, got {self.info}")

  def _fail(self, what: str):
    self._proc.kill()
    self._proc.wait()
    self._stderr.seek(0)
    raise SystemExit(f"reference server ({' '.join(self.cmd)}): {what}\n"
                     f"{self._stderr.read()[-3000:]}")

  def _read(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      self._fail(f"exited with status {self._proc.wait()}")
    reply = json.loads(line)
    if "error" in reply:
      self._fail(reply["error"])
    return reply

  def train(self, n: int) -> list[float]:
    """Wall seconds of each of n more reference steps."""
    self._proc.stdin.write(f"train {n}\n")
    self._proc.stdin.flush()
    reply = self._read()
    if not reply["all_losses_finite"]:
      self._fail("non-finite reference loss")
    return reply["train_step_s"]

  def close(self):
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write("quit\n")
        self._proc.stdin.close()
        self._proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self._proc.kill()
        self._proc.wait()
    self._stderr.close()


def interleave(ours, servers, rounds: int, steps: int, batch: int) -> dict:
  """Rounds of `steps` steps: ours, then each server's, in turn.

  Args:
    ours: `ours(n)` runs n of our steps, returns their wall seconds.
    servers: malloc mode -> an object whose `train(n)` does the same for the
      reference (`ReferenceServer`).
    rounds: number of rounds.
    steps: steps per block.
    batch: samples per step.

  Returns:
    per-round samples/s (block medians) of each side; per mode the median,
    min and max of the per-round speed-ups and the speed-up of the pooled
    medians (all steps of each side).
  """
  times = {"ours": []} | {mode: [] for mode in servers}
  for _ in range(rounds):
    times["ours"].append(list(ours(steps)))
    for mode, server in servers.items():
      times[mode].append(list(server.train(steps)))
  rate = lambda ts: batch / float(np.median(ts))  # noqa: E731
  per_round = {side: [rate(block) for block in blocks]
               for side, blocks in times.items()}
  pooled = {side: rate(np.concatenate(blocks))
            for side, blocks in times.items()}
  speedup = {}
  for mode in servers:
    ratios = np.array(per_round["ours"]) / np.array(per_round[mode])
    speedup[mode] = {"median": round(float(np.median(ratios)), 3),
                     "min": round(float(ratios.min()), 3),
                     "max": round(float(ratios.max()), 3),
                     "pooled": round(pooled["ours"] / pooled[mode], 3)}
  return {
      "rounds": rounds,
      "steps_per_block": steps,
      "train_samples_per_s_per_round": {
          side: [round(r, 2) for r in rates]
          for side, rates in per_round.items()},
      "train_samples_per_s_pooled": {
          side: round(r, 2) for side, r in pooled.items()},
      "speedup": speedup,
  }


def run_reference(args) -> dict:
  """Runs reference_step.py under --reference-python, per malloc mode."""
  out = {}
  for mode in reference_modes(args):
    cmd = reference_command(args)
    proc = subprocess.run(cmd, env=reference_env(mode), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
      raise SystemExit(f"reference run failed ({' '.join(cmd)}):\n"
                       f"{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    out[mode] = {k: r[k] for k in (
        "train_samples_per_s", "train_step_ms_median", "train_step_ms_p10",
        "train_step_ms_p90", "eval_samples_per_s", "loss_first", "loss_last",
        "torch", "threads")}
  return out
