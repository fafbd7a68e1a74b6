r"""Training-step and eval-forward throughput of DecAlign on MOSI shapes.

  python benchmarks/train_step.py --batch 32
  python benchmarks/train_step.py --batch 512 --steps 10 --ot-mode reference

Builds `configs/mosi.py` (d_model 64, 8 heads, 5 layers, 7 prototypes,
T = 50, feature dims 768/5/20), a synthetic in-memory split, the task from
`tasks.sentiment.make_task`, and the train step jitted exactly as `train.py`
does (state donated and, by default, packed into one buffer per dtype;
shardings over the config's mesh). The same batch is
reused every step, as in the reference PyTorch bench, and each step is timed
to completion (`block_until_ready` on the measurements, as its `loss.item()`).

Prints one JSON line: step-time median/p10/p90, samples/s, the eval forward
(jitted predict, eval mode), the XLA cost-analysis FLOPs of the step, the
achieved GFLOP/s and MFU against `--peak-gflops` (this CPU's float32 matmul
peak) and against `measured_matmul_gflops` (a 2048^2 jitted matmul timed in
the same run), and the reference numbers for the same batch size read from
`benchmarks/bench_reference_cpu_malloc_{retain,default}.json`.

With `--reference-python PY --reference-dir DIR` (a Python with PyTorch and
a clone of taco-group/DecAlign), it then runs `reference_step.py` under PY
with the same batch and step counts, once per glibc malloc mode, and adds
`reference_same_run` and `speedup_vs_reference_same_run`: both sides
measured in one run, on the same machine state.

`--interleave R` (with the two above) measures the side by side in turns
instead: one long-lived `reference_step.py --serve` process per malloc
mode, and R rounds of `--steps` steps of ours, then of each reference
process. This VM's speed drifts by 10-20% within minutes, which one block
per side cannot tell from a speed-up; per-round ratios can. It adds
`interleaved`: per-round samples/s of each side and, per malloc mode, the
median, min and max of the per-round speed-ups and the ratio of the pooled
median step times.

The XLA FLOP count includes elementwise work; `model_flops_per_step` is the
analytic matmul count (3x the forward's: one forward, two backward matmuls),
the usual MFU numerator.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import mosi  # noqa: E402  pylint: disable=g-import-not-at-top
from decalign_jax import optim  # noqa: E402
from decalign_jax import runtime  # noqa: E402
from decalign_jax import sharding  # noqa: E402
from decalign_jax import train  # noqa: E402
from decalign_jax.data import mmsa  # noqa: E402
from decalign_jax.models import cpu_attention  # noqa: E402
from decalign_jax.tasks import sentiment  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_runner import interleave  # noqa: E402  pylint: disable=g-import-not-at-top,g-bad-import-order
from reference_runner import reference_command  # noqa: E402
from reference_runner import reference_env  # noqa: E402
from reference_runner import reference_modes  # noqa: E402
from reference_runner import ReferenceServer  # noqa: E402
from reference_runner import run_reference  # noqa: E402

SEQ_LEN = 50  # MOSI aligned_50
REFERENCE_FILES = {
    "retain": os.path.join(ROOT, "benchmarks",
                           "bench_reference_cpu_malloc_retain.json"),
    "default": os.path.join(ROOT, "benchmarks",
                            "bench_reference_cpu_malloc_default.json"),
}


def make_split(num: int, seq_len: int, dims, seed: int,
               vocab_size: int = 0) -> mmsa.Split:
  """A random in-memory split: normal features, labels uniform in [-3, 3].

  With `vocab_size`, text is `[N, 3, T]` BERT inputs instead: random ids,
  an all-ones attention mask and zero segment ids.
  """
  rs = np.random.default_rng(seed)
  feats = [rs.standard_normal((num, seq_len, d)).astype(np.float32)
           for d in dims]
  if vocab_size:
    feats[0] = np.stack([rs.integers(0, vocab_size, (num, seq_len)),
                         np.ones((num, seq_len), np.int64),
                         np.zeros((num, seq_len), np.int64)], axis=1)
  return mmsa.Split(
      text=feats[0], audio=feats[1], vision=feats[2],
      label=rs.uniform(-3.0, 3.0, num).astype(np.float32),
      audio_lengths=np.full((num,), seq_len, np.int32),
      vision_lengths=np.full((num,), seq_len, np.int32),
      ids=np.array([f"s{i}" for i in range(num)], dtype=object))


def model_matmul_flops(batch: int, seq_len: int, dims, d: int,
                       num_layers: int, pde_dim: int,
                       text_backbone: dict | None = None) -> int:
  """Analytic forward matmul FLOPs (2 per multiply-add) of DecAlign."""
  bt = batch * seq_len
  flops = 2 * bt * d * sum(dims)  # input projections (kernel 1 convs)
  if text_backbone:
    h, ff = text_backbone["hidden_size"], text_backbone["intermediate_size"]
    flops += text_backbone["num_hidden_layers"] * (
        2 * bt * h * h * 4  # q, k, v, output projections
        + 2 * bt * seq_len * h * 2  # q.k logits and weights.v
        + 2 * bt * h * ff * 2)  # feed-forward
  flops += 6 * 2 * bt * d * d  # encoder_uni_* and encoder_com
  ctx = 2 * seq_len  # cross-modal: keys/values = the two other modalities
  per_layer = (2 * bt * d * d * 2  # q and out projections
               + 2 * batch * ctx * d * d * 2  # k, v projections
               + 2 * bt * ctx * d * 2  # q.k logits and weights.v
               + 2 * bt * d * 4 * d * 2)  # fc1, fc2
  flops += 3 * num_layers * per_layer
  flops += 3 * (2 * batch * d * d + 2 * batch * d * pde_dim)  # pde heads
  flops += 2 * batch * 6 * d * batch  # SupCon similarity
  return flops


def reference_numbers(batch: int) -> dict:
  out = {}
  for mode, path in REFERENCE_FILES.items():
    if not os.path.exists(path):
      continue
    with open(path) as f:
      data = json.load(f)
    for r in data["results"]:
      if r["batch"] == batch:
        out[mode] = {k: r[k] for k in (
            "train_samples_per_s", "train_step_ms_median",
            "eval_samples_per_s")}
  return out


def time_steps(train_fn, state, batch, n):
  """n steps, each waited for: (state, wall times, CPU times, losses)."""
  times, cpu_times, losses = [], [], []
  for _ in range(n):
    # Process CPU time (all threads) as well: on a shared machine the wall
    # time includes waiting for other processes, the CPU time does not.
    t, c = time.perf_counter(), time.process_time()
    state, meas = train_fn(state, batch)
    jax.block_until_ready(meas)
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
    losses.append(float(meas["loss"]))
  return state, times, cpu_times, losses


def percentiles(times_s):
  ms = 1e3 * np.asarray(times_s)
  return (float(np.median(ms)), float(np.percentile(ms, 10)),
          float(np.percentile(ms, 90)))


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """This machine's float32 GFLOP/s on a jitted n x n matmul (all threads).

  The best of three timings of `repeats` products: the denominator of
  `model_mfu_of_measured`, so that utilisation is comparable across hosts
  (the VMs this runs on have differed twofold in matmul throughput).
  """
  a = jax.numpy.ones((n, n), jax.numpy.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return repeats * 2 * n**3 / best / 1e9


def cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  if not cost:
    return None
  return float(cost.get("flops", 0.0)) or None


def text_backbone_config(layers: int, hidden: int) -> dict:
  """An HF-style BERT config.json dict (bert-base vocabulary, 64-d heads)."""
  return {"model_type": "bert", "vocab_size": 30522, "hidden_size": hidden,
          "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
          "intermediate_size": 4 * hidden, "max_position_embeddings": 512,
          "type_vocab_size": 2}


def build(batch_size: int, ot_mode: str = "ott", seed: int = 0,
          config=None, text_backbone: dict | None = None,
          num_layers: int | None = None, attention_kernel: str | None = None,
          pack_state: bool | None = None, ynn_reductions: bool | None = None,
          flat_optimizer: bool | None = None):
  """The MOSI task, train state, device batch and jitted steps.

  Args:
    batch_size: global batch.
    ot_mode: 'ott' or 'reference'.
    seed: data seed.
    config: a config to use instead of `configs/mosi.py`.
    text_backbone: a BERT config.json dict; the step then fine-tunes that
      encoder (random weights) on `[B, 3, T]` token ids.
    num_layers: layers per cross-modal transformer (default: the config's).
    attention_kernel: `model.attention_kernel` (default: the config's).
    pack_state: `config.pack_state` (default: the config's).
    ynn_reductions: `config.runtime.ynn_reductions` (default: the config's).
    flat_optimizer: `config.flat_optimizer` (default: the config's).

  Returns:
    dict with `config, task, state, carry, batch, fns, train_fn, eval_fn,
    packed, n_params`; `train_fn` steps `carry`.
  """
  jax.config.update("jax_threefry_partitionable", True)
  config = config if config is not None else mosi.get_config()
  config.batch_size = batch_size
  config.model.ot_mode = ot_mode
  if num_layers is not None:
    config.model.num_layers = num_layers
  if attention_kernel is not None:
    config.model.attention_kernel = attention_kernel
  if pack_state is not None:
    config.pack_state = pack_state
  if ynn_reductions is not None:
    config.runtime.ynn_reductions = ynn_reductions
  if flat_optimizer is not None:
    config.flat_optimizer = flat_optimizer
  mc = config.model
  dims = tuple(mc.feature_dims)
  vocab = 0
  if text_backbone:
    model_dir = tempfile.mkdtemp(prefix="bench_bert_")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
      json.dump(text_backbone, f)
    mc.text_model_dir = model_dir  # only config.json is read at build time
    vocab = text_backbone["vocab_size"]
  splits = {name: make_split(batch_size, SEQ_LEN, dims, seed + i, vocab)
            for i, name in enumerate(("train", "valid", "test"))}
  task = sentiment.make_task(config, "/tmp", splits=splits)

  mesh = sharding.make_mesh(config.mesh)
  data_sharding = sharding.data_sharding(mesh)
  tx = optim.make_optimizer(config)
  plateau = optim.make_plateau(config)
  state, state_sharding = train.init_sharded_state(task, config, mesh, tx,
                                                  plateau)
  n_params = sum(int(np.prod(x.shape))
                 for x in jax.tree.leaves(state.params))
  batch = sharding.put_batch(task.example_batch, data_sharding)
  packing = train.state_packing(config, state, state_sharding)
  fns = train.make_step_fns(
      task, tx, state_sharding, mesh, packing=packing,
      flat_optimizer=config.flat_optimizer,
      compiler_options=runtime.compiler_options(config.runtime,
                                                mesh.devices.flat))
  # `carry` is what train_fn steps (the packed state, as in train.py).
  return dict(config=config, task=task, state=state, carry=fns.pack(state),
              batch=batch, fns=fns, train_fn=fns.train, eval_fn=fns.eval,
              packed=packing is not None, n_params=n_params,
              flat_optimizer=(packing is not None and config.flat_optimizer
                              and optim.FlatParams.of(tx, state.params)
                              is not None))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=20, help="timed train steps")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--eval-steps", type=int, default=20)
  p.add_argument("--ot-mode", choices=("ott", "reference"), default="ott")
  p.add_argument("--dtype", choices=("float32",), default="float32")
  p.add_argument("--peak-gflops", type=float, default=440.0,
                 help="float32 matmul peak of this machine, GFLOP/s")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--text-layers", type=int, default=0,
                 help="0: precomputed 768-d text features (the reference's "
                 "use_bert=False); N: fine-tune an N-layer BERT backbone "
                 "(random weights) on token ids inside the step")
  p.add_argument("--text-hidden", type=int, default=768,
                 help="hidden size of that backbone (heads of 64)")
  p.add_argument("--num-layers", type=int, default=None,
                 help="layers per cross-modal transformer (MOSI: 5)")
  p.add_argument("--no-retain-host-memory", action="store_true",
                 help="leave glibc malloc at its defaults (runtime.py)")
  p.add_argument("--no-unrolled-threefry", action="store_true",
                 help="keep JAX's looped Threefry lowering on CPU")
  p.add_argument("--compilation-cache", default=None, metavar="DIR",
                 help="JAX's persistent compilation cache, as train.py's "
                 "config.runtime.compilation_cache_dir ('' = off; default: "
                 "the config's; $JAX_COMPILATION_CACHE_DIR wins). A step "
                 "loaded from it runs faster on CPU (runtime.py)")
  p.add_argument("--attention-kernel", choices=("auto", "cpu", "xla"),
                 default=None,
                 help="model.attention_kernel (default: the config's)")
  p.add_argument("--no-pack-state", action="store_true",
                 help="carry the train state as a tree of 792 arrays "
                 "instead of packed (config.pack_state=False)")
  p.add_argument("--no-flat-optimizer", action="store_true",
                 help="run the optimizer leaf by leaf (config.flat_optimizer"
                 "=False)")
  p.add_argument("--ynn-reductions", action="store_true",
                 help="let XLA:CPU give reductions to YNNPACK, its default "
                 "(config.runtime.ynn_reductions=True)")
  p.add_argument("--reference-python", default=None,
                 help="a Python with PyTorch and the reference's "
                 "requirements: after timing ours, run "
                 "benchmarks/reference_step.py with it, same batch and "
                 "step counts, and report both (needs --reference-dir)")
  p.add_argument("--reference-dir", default=None,
                 help="a clone of taco-group/DecAlign")
  p.add_argument("--reference-malloc", choices=("default", "retain", "both"),
                 default="both",
                 help="glibc malloc mode(s) for the reference run (retain: "
                 "the MALLOC_* settings of bench_reference_cpu_malloc_"
                 "retain.json)")
  p.add_argument("--interleave", type=int, default=0, metavar="R",
                 help="then R rounds of --steps steps each, alternating ours "
                 "with long-lived reference processes (one per malloc mode); "
                 "needs --reference-python")
  args = p.parse_args(argv)
  if (args.reference_python is None) != (args.reference_dir is None):
    p.error("--reference-python and --reference-dir go together")
  if args.interleave and not args.reference_python:
    p.error("--interleave needs --reference-python and --reference-dir")
  # As train.py: before the first JAX computation starts its threads.
  cache_dir = (args.compilation_cache if args.compilation_cache is not None
               else mosi.get_config().runtime.compilation_cache_dir)
  applied = runtime.configure(ml_collections.ConfigDict(dict(
      retain_host_memory=not args.no_retain_host_memory,
      unrolled_cpu_threefry=not args.no_unrolled_threefry,
      compilation_cache_dir=cache_dir)))

  load_start = os.getloadavg()[0]
  backbone = (text_backbone_config(args.text_layers, args.text_hidden)
              if args.text_layers else None)
  b = build(args.batch, args.ot_mode, args.seed, text_backbone=backbone,
            num_layers=args.num_layers,
            attention_kernel=args.attention_kernel,
            pack_state=False if args.no_pack_state else None,
            ynn_reductions=True if args.ynn_reductions else None,
            flat_optimizer=False if args.no_flat_optimizer else None)
  config, state, batch = b["config"], b["carry"], b["batch"]
  del b["state"]  # the carry holds the same values
  train_fn, eval_fn, n_params = b["train_fn"], b["eval_fn"], b["n_params"]
  mc = config.model
  dims = tuple(mc.feature_dims)
  if backbone:  # the text projection reads the backbone's hidden states
    dims = (backbone["hidden_size"],) + dims[1:]
  seq_len = SEQ_LEN

  t0 = time.perf_counter()
  lowered = train_fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled, step_from_cache = runtime.compile_reporting_cache(lowered)
  t2 = time.perf_counter()
  xla_flops = cost_flops(compiled)
  ynn_roots = runtime.ynn_fusion_roots(compiled.as_text())

  # Time the jitted function itself (the path train.py uses). jax reuses the
  # executable compiled above, so first_call_s is one step plus first-touch
  # allocation, and jit_cache_entries stays 1 (no recompilation).
  t = time.perf_counter()
  state, meas = train_fn(state, batch)
  jax.block_until_ready(meas)
  first_call_s = time.perf_counter() - t
  losses = [float(meas["loss"])]
  for _ in range(args.warmup - 1):
    state, meas = train_fn(state, batch)
    losses.append(float(meas["loss"]))
  state, times, cpu_times, timed_losses = time_steps(train_fn, state, batch,
                                                    args.steps)
  losses += timed_losses
  cache_size = train_fn._cache_size()  # pylint: disable=protected-access
  med, p10, p90 = percentiles(times)

  params = b["fns"].unpack(state).params
  t = time.perf_counter()
  jax.block_until_ready(eval_fn(params, batch))
  eval_compile_s = time.perf_counter() - t
  etimes = []
  for _ in range(args.eval_steps):
    t = time.perf_counter()
    jax.block_until_ready(eval_fn(params, batch))
    etimes.append(time.perf_counter() - t)
  emed, ep10, ep90 = percentiles(etimes)

  measured_gflops = matmul_gflops()
  model_flops = 3 * model_matmul_flops(args.batch, seq_len, dims, mc.d_model,
                                       mc.num_layers, mc.pde_dim, backbone)
  samples_per_s = args.batch / (med / 1e3)
  # The reference numbers were measured without a text backbone.
  ref = {} if backbone else reference_numbers(args.batch)
  result = {
      "bench": "decalign_jax_train_step",
      "batch": args.batch,
      "ot_mode": args.ot_mode,
      "num_layers": mc.num_layers,
      "attention_kernel": cpu_attention.resolve(mc.attention_kernel),
      "packed_state": b["packed"],
      "flat_optimizer": b["flat_optimizer"],
      "ynn_reductions": bool(config.runtime.ynn_reductions),
      # YNNPACK calls in the compiled step, by root op ("reduce": 0 when
      # reductions run as XLA loops).
      "ynn_fusions": dict(ynn_roots),
      "text_backbone": (None if backbone is None else {
          k: backbone[k] for k in ("num_hidden_layers", "hidden_size")}),
      "dtype": args.dtype,
      "n_params": n_params,
      "lower_s": round(t1 - t0, 3),
      "compile_s": round(t2 - t1, 3),
      "first_call_s": round(first_call_s, 3),
      "jit_cache_entries": cache_size,
      "timed_steps": args.steps,
      "train_step_ms_median": round(med, 3),
      "train_step_ms_p10": round(p10, 3),
      "train_step_ms_p90": round(p90, 3),
      "train_step_cpu_ms_median": round(1e3 * float(np.median(cpu_times)), 3),
      "train_steps_per_s": round(1e3 / med, 4),
      "train_samples_per_s": round(samples_per_s, 2),
      "eval_forward_ms_median": round(emed, 3),
      "eval_forward_ms_p10": round(ep10, 3),
      "eval_forward_ms_p90": round(ep90, 3),
      "eval_forward_samples_per_s": round(args.batch / (emed / 1e3), 2),
      "eval_compile_s": round(eval_compile_s, 3),
      "flops_per_step": xla_flops,
      "achieved_gflops": (round(xla_flops / (med / 1e3) / 1e9, 2)
                          if xla_flops else None),
      "mfu": (round(xla_flops / (med / 1e3) / 1e9 / args.peak_gflops, 4)
              if xla_flops else None),
      "model_flops_per_step": model_flops,
      "model_gflops": round(model_flops / (med / 1e3) / 1e9, 2),
      "model_mfu": round(model_flops / (med / 1e3) / 1e9 / args.peak_gflops,
                         4),
      "peak_gflops": args.peak_gflops,
      "measured_matmul_gflops": round(measured_gflops, 1),
      "model_mfu_of_measured": round(
          model_flops / (med / 1e3) / 1e9 / measured_gflops, 4),
      "runtime": applied,
      "loss_first": round(losses[0], 6),
      "loss_last": round(losses[-1], 6),
      "all_losses_finite": bool(np.all(np.isfinite(losses))),
      "reference": ref,
      "speedup_vs_reference": {
          k: round(samples_per_s / v["train_samples_per_s"], 2)
          for k, v in ref.items()},
      "jax": jax.__version__,
      "device": str(jax.devices()[0].device_kind),
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "affinity": len(os.sched_getaffinity(0)),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      # The step loaded from JAX's persistent cache (compile_s is then the
      # load): on CPU the process's heap has no compiler debris (runtime.py).
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir or "",
      "train_step_from_cache": step_from_cache,
      "python": platform.python_version(),
      "loadavg_1m_start_end": [round(load_start, 2),
                               round(os.getloadavg()[0], 2)],
  }
  if args.reference_python:
    same = run_reference(args)
    result["reference_same_run"] = same
    result["speedup_vs_reference_same_run"] = {
        k: round(samples_per_s / v["train_samples_per_s"], 2)
        for k, v in same.items()}
  if args.interleave:
    carry = [state]

    def ours(n):
      carry[0], block, _, block_losses = time_steps(train_fn, carry[0], batch,
                                                    n)
      if not np.all(np.isfinite(block_losses)):
        raise SystemExit(f"non-finite loss while interleaving: {block_losses}")
      return block

    servers = {mode: ReferenceServer(reference_command(args, serve=True),
                                     reference_env(mode))
               for mode in reference_modes(args)}
    try:
      result["interleaved"] = interleave(ours, servers, args.interleave,
                                         args.steps, args.batch)
    finally:
      for server in servers.values():
        server.close()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
