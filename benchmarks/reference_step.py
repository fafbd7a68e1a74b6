r"""The reference PyTorch DecAlign's training step, timed like train_step.py.

Runs in a Python environment with PyTorch and the reference's requirements,
against a local clone of https://github.com/taco-group/DecAlign:

  /path/to/torch-env/bin/python benchmarks/reference_step.py \
      --reference-dir /path/to/DecAlign --batch 32

`train_step.py --reference-python ... --reference-dir ...` runs this script
itself, right after its own timing, so that both numbers come from one run.
Nothing is imported from decalign_jax (this file must run without JAX).

The step is the body of the reference's `DecAlignTrainer.do_train`, composed
from the trainer's own methods: `model.zero_grad()`, forward in train mode,
`_main_loss` + `_combined_loss` + `ct_weight * _contrastive_loss`,
`backward`, `clip_grad_norm_(clip)`, `Adam.step` (the config's lr and L2
weight decay), `loss.item()`. The config is `config/dec_mosi_config.json`
with `use_bert` off (features 768/5/20, T = 50), as in
`bench_reference_cpu_*.json`. The same synthetic batch is reused every step.
The eval forward is `model.eval()` under `torch.no_grad()`.

Prints one JSON line. With `--serve` it instead warms up, prints a `ready`
line and then answers each `train N` line on stdin with the times of N more
steps (one JSON line), until `quit` or end of input: `train_step.py
--interleave` keeps one such process per malloc mode and alternates blocks
of its own steps with theirs, so that both sides see the same machine state.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

SEQ_LEN = 50


def percentiles(times_s):
  ms = 1e3 * np.asarray(times_s)
  return (float(np.median(ms)), float(np.percentile(ms, 10)),
          float(np.percentile(ms, 90)))


def serve(train_step, stdin, stdout, info=None):
  """Answers `train N` with the times of N calls of `train_step`.

  Args:
    train_step: runs one step, returns its loss.
    stdin: command lines: `train N` or `quit` (end of input also stops).
    stdout: one JSON line per command, after a first `{"ready": true, ...}`
      (with `info`): `{"train_step_s": [...], "all_losses_finite": ...}`,
      or `{"error": ...}` for a line that is not a command.
    info: fields of the `ready` line (versions, threads, malloc settings).
  """
  def reply(obj):
    stdout.write(json.dumps(obj) + "\n")
    stdout.flush()

  reply({"ready": True, **(info or {})})
  for line in stdin:
    words = line.split()
    if not words:
      continue
    if words == ["quit"]:
      break
    if len(words) != 2 or words[0] != "train" or not words[1].isdigit():
      reply({"error": f"unknown command {line.strip()!r}: expected "
                      "'train N' or 'quit'"})
      continue
    times, losses = [], []
    for _ in range(int(words[1])):
      t0 = time.perf_counter()
      losses.append(train_step())
      times.append(time.perf_counter() - t0)
    reply({"train_step_s": times,
           "all_losses_finite": bool(np.all(np.isfinite(losses)))})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reference-dir", required=True,
                 help="a clone of taco-group/DecAlign")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--eval-steps", type=int, default=20)
  # The CPUs this process may run on (taskset), not the machine's count:
  # two threads on one allowed core would oversubscribe it.
  p.add_argument("--threads", type=int, default=(
      len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
      else os.cpu_count()))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--serve", action="store_true",
                 help="after the warm-up, time steps on request (stdin "
                 "'train N' / 'quit'; see serve())")
  args = p.parse_args(argv)

  ref = os.path.abspath(args.reference_dir)
  config_file = os.path.join(ref, "config", "dec_mosi_config.json")
  if not os.path.exists(config_file):
    raise SystemExit(f"--reference-dir {ref}: no config/dec_mosi_config.json "
                     "there; expected a clone of taco-group/DecAlign")
  sys.path.insert(0, ref)
  import torch  # pylint: disable=g-import-not-at-top
  from config import get_config_regression  # pylint: disable=g-import-not-at-top
  from models import build_model  # pylint: disable=g-import-not-at-top
  from trains.ATIO import DecAlignTrainer  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  cfg = get_config_regression("decalign", "mosi", config_file=config_file)
  cfg.use_bert = False
  cfg.batch_size = args.batch
  model = build_model(cfg)
  trainer = DecAlignTrainer(cfg)
  n_params = sum(int(x.numel()) for x in model.parameters())
  optimizer = torch.optim.Adam(
      [{"params": model.parameters(),
        "weight_decay": getattr(cfg, "weight_decay", 0.0)}],
      lr=cfg.learning_rate)

  rs = np.random.default_rng(args.seed)
  text, audio, vision = (
      torch.from_numpy(rs.standard_normal(
          (args.batch, SEQ_LEN, d)).astype(np.float32))
      for d in cfg.feature_dims)
  labels = torch.from_numpy(
      rs.uniform(-3.0, 3.0, (args.batch, 1)).astype(np.float32))

  def train_step():
    model.zero_grad()
    outputs = model(text, audio, vision)
    loss = trainer._combined_loss(  # pylint: disable=protected-access
        trainer._main_loss(outputs["output_logit"], labels),  # pylint: disable=protected-access
        outputs)
    ct_weight = getattr(cfg, "ct_weight", 0.0)
    if ct_weight > 0:
      loss = loss + ct_weight * trainer._contrastive_loss(  # pylint: disable=protected-access
          outputs.get("final_rep"), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    optimizer.step()
    return loss.item()

  model.train()
  if args.serve:
    for _ in range(args.warmup):
      train_step()
    serve(train_step, sys.stdin, sys.stdout, info={
        "batch": args.batch, "n_params": n_params,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "malloc_env": {k: v for k, v in os.environ.items()
                       if k.startswith("MALLOC_")}})
    return
  losses, times = [], []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    losses.append(train_step())
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  med, p10, p90 = percentiles(times)

  model.eval()
  etimes = []
  with torch.no_grad():
    for i in range(2 + args.eval_steps):
      t0 = time.perf_counter()
      model(text, audio, vision)["output_logit"].sum().item()
      if i >= 2:
        etimes.append(time.perf_counter() - t0)
  emed, _, _ = percentiles(etimes)

  print(json.dumps({
      "bench": "decalign_reference_pytorch_cpu",
      "reference_dir": ref,
      "batch": args.batch,
      "n_params": n_params,
      "timed_steps": args.steps,
      "train_step_ms_median": round(med, 3),
      "train_step_ms_p10": round(p10, 3),
      "train_step_ms_p90": round(p90, 3),
      "train_samples_per_s": round(1e3 * args.batch / med, 2),
      "eval_forward_ms_median": round(emed, 3),
      "eval_samples_per_s": round(1e3 * args.batch / emed, 2),
      "loss_first": round(losses[0], 6),
      "loss_last": round(losses[-1], 6),
      "all_losses_finite": bool(np.all(np.isfinite(losses))),
      "threads": torch.get_num_threads(),
      "torch": torch.__version__,
      "malloc_env": {k: v for k, v in os.environ.items()
                     if k.startswith("MALLOC_")},
      "max_rss_mb": round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "python": platform.python_version(),
  }))


if __name__ == "__main__":
  main()
