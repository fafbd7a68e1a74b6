"""Host-side runtime settings for fast training on CPU hosts.

Two process-wide switches, both measured on the MOSI benchmark
(`benchmarks/train_step.py`) and applied by `decalign_jax.train` before JAX
starts its thread pools (`config.runtime`):

* `retain_host_memory`: XLA:CPU allocates each step's temporaries (about 2 GB
  at batch 128, 8 GB at batch 512) with `posix_memalign` from the thread that
  runs the executable. glibc serves that from a per-thread arena, which cannot
  grow with `brk`, so every step gets fresh `mmap` pages and page-faults
  through all of them again (2M faults, 6 of the 7 s of a batch-512 step).
  One arena, no `mmap` and no trimming keep the pages between steps; the
  price is that the process does not return freed memory to the OS.
* `use_unrolled_cpu_threefry`: JAX lowers Threefry-2x32 on CPU as a 5-trip
  `while` loop (to keep compiles short), which XLA:CPU cannot fuse with the
  dropout that consumes the bits. The straight-line lowering below gives the
  same bits (tested) and makes the dropout masks of a step 3x cheaper.

And JAX's persistent compilation cache (`compilation_cache_dir`, default
`~/.cache/decalign_jax/jit`; `$JAX_COMPILATION_CACHE_DIR` wins, '' turns it
off): later runs of the same configuration load the train step instead of
compiling it (40 s for MOSI on two cores). On CPU with `retain_host_memory`
it also makes their steps faster: compiling in the process leaves ~200k
free chunks of LLVM's memory scattered through glibc's one arena, and the
thunk runtime's small aligned allocations (`memalign` bypasses glibc's
per-thread cache) then land in those cold holes; `_int_malloc` became 13%
of the profile. The MOSI step at batch 32 ran 88-99 ms in a process that
compiled it and 63-66 ms in one that loaded it (same executable; compiled
and reloaded in one process it is 88 ms, so it is the heap, not the code).
So `train.py` compiles a run's programs in a child process first
(`precompile.py`, `config.runtime.compile_in_subprocess`) and loads them.

And one compile option for the jitted train step (`compiler_options`,
passed to `jax.jit` by `train.make_step_fns`):

* `ynn_reductions=False`: XLA:CPU hands reductions to YNNPACK by default.
  Inside the batch-32 MOSI step those calls take 0.3-0.5 ms for a
  `[32, 7, 64]` or `[32, 3200]` multiply-and-sum that takes 30-60 us alone,
  dispatch included (the profile shows their callers waiting on the thread
  pool, whose other thread runs another thunk). With XLA's loops instead,
  and the bias gradients as products (`models/dots.py`, `column_sum`), the
  step is 9-12% faster at batch 32 and 3.6% at batch 512
  (`benchmarks/README.md`). Products stay on YNNPACK. The eval forward,
  without bias gradients, is 4% faster with YNNPACK's reductions and keeps
  them.
"""

import collections
import ctypes
import ctypes.util
import functools
import logging
import os
import re
import sys
from typing import Any

import jax
import jax.extend.random as jex_random
from jax.interpreters import mlir
import numpy as np

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_host_memory(top_pad_bytes: int = 64 << 20) -> bool:
  """Makes glibc malloc keep freed memory for reuse (see module docstring).

  Call before JAX creates its threads (before the first computation):
  threads that already own an arena keep it.

  Args:
    top_pad_bytes: extra bytes requested from the OS on each heap growth.

  Returns:
    True if applied; False where the C library is not glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  ok = all(mallopt(p, v) == 1 for p, v in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
      (_M_TRIM_THRESHOLD, -1),  # -1 disables trimming (mallopt(3))
      (_M_TOP_PAD, top_pad_bytes)))
  if not ok:
    log.warning("mallopt refused a setting; host memory is not retained")
  return ok


# Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as
# easy as 1, 2, 3", SC 2011), the generator behind jax.random's default keys.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KS_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x, r):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(key1, key2, x1, x2):
  """The Threefry-2x32 block function, unrolled: `(x1, x2) -> (y1, y2)`.

  All arguments are uint32 arrays that broadcast together.
  """
  ks = (key1, key2, key1 ^ key2 ^ _KS_PARITY)
  x = [x1 + ks[0], x2 + ks[1]]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x[0] = x[0] + x[1]
      x[1] = _rotl(x[1], r) ^ x[0]
    x[0] = x[0] + ks[(i + 1) % 3]
    x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
  return tuple(x)


@functools.cache
def use_unrolled_cpu_threefry() -> bool:
  """Lowers `threefry2x32_p` on CPU without the loop (same bits).

  Process-wide and idempotent; affects programs compiled afterwards.

  Returns:
    True once registered.
  """
  rule = mlir.lower_fun(threefry2x32, multiple_results=True)
  mlir.register_lowering(jex_random.threefry2x32_p, rule, platform="cpu")
  return True


# YNNPACK fusion kinds to keep with `ynn_reductions=False`: everything XLA:CPU
# gives YNNPACK by default except reductions.
_YNN_WITHOUT_REDUCTIONS = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                           "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")


def compiler_options(runtime_config, devices) -> dict[str, str]:
  """`jax.jit(compiler_options=...)` for programs on `devices`.

  Args:
    runtime_config: `config.runtime`.
    devices: the devices the program runs on (e.g. `mesh.devices.flat`).

  Returns:
    `{"xla_cpu_experimental_ynn_fusion_type": ...}` without reductions when
    `runtime_config.ynn_reductions` is off and every device is a CPU; else
    `{}` (other backends get no XLA:CPU option).
  """
  if runtime_config.get("ynn_reductions", True):
    return {}
  if not all(d.platform == "cpu" for d in devices):
    return {}
  return {"xla_cpu_experimental_ynn_fusion_type": _YNN_WITHOUT_REDUCTIONS}


_COMPUTATION_ROOT = re.compile(
    r"\n%(\S+) [^\n]*\{\n(?:[^\n]*\n)*?\s*ROOT %\S+ = \S+ ([\w-]+)\(")
_YNN_CALL = re.compile(r"kind=kCustom, calls=%([^,\s]+)[^\n]*__ynn_fusion")


def ynn_fusion_roots(hlo_text: str) -> collections.Counter:
  """Counts the YNNPACK fusions of a compiled XLA:CPU module by root op.

  Args:
    hlo_text: `jax.jit(f).lower(...).compile().as_text()`.

  Returns:
    e.g. `Counter({"dot": 392})`; a `"reduce"` entry means reductions run
    on YNNPACK.
  """
  roots = dict(_COMPUTATION_ROOT.findall(hlo_text))
  return collections.Counter(roots.get(c, "?")
                             for c in _YNN_CALL.findall(hlo_text))


def compilation_cache_dir(runtime_config, environ=None) -> str | None:
  """The persistent compilation cache directory to use, or None for none.

  Args:
    runtime_config: `config.runtime`; its `compilation_cache_dir` ('' = off,
      `~` expanded) applies unless the environment names one.
    environ: the environment (default `os.environ`).

  Returns:
    `$JAX_COMPILATION_CACHE_DIR` if set (JAX reads it itself), else the
    configured directory, else None.
  """
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  path = runtime_config.get("compilation_cache_dir", "")
  return os.path.expanduser(path) if path else None


_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_cache_hits = collections.Counter()


def _count_cache_hit(event: str, **_) -> None:
  if event == _CACHE_HIT_EVENT:
    _cache_hits[event] += 1


@functools.cache
def _record_cache_hits() -> None:
  """Counts JAX's persistent-cache hits in `_cache_hits` (registered once)."""
  jax.monitoring.register_event_listener(_count_cache_hit)


def compile_reporting_cache(lowered) -> tuple[Any, bool]:
  """`lowered.compile()`, and whether JAX loaded it from its persistent cache.

  Args:
    lowered: `jax.jit(f).lower(...)`.

  Returns:
    `(compiled, from_cache)`; `from_cache` is True when JAX reported a hit
    of its persistent compilation cache during this compile.
  """
  _record_cache_hits()
  before = _cache_hits[_CACHE_HIT_EVENT]
  compiled = lowered.compile()
  return compiled, _cache_hits[_CACHE_HIT_EVENT] > before


def configure(runtime_config) -> dict[str, bool]:
  """Applies `config.runtime`; returns what was applied.

  The two switches only change XLA:CPU programs and are harmless on other
  backends; the compilation cache serves every backend. Call this before
  the first JAX computation (JAX sets its cache up at the first compile).

  Returns:
    which of the two switches took effect (the cache is not listed:
    `compilation_cache_dir` says where it is).
  """
  applied = {"retain_host_memory": False, "unrolled_cpu_threefry": False}
  if runtime_config.retain_host_memory:
    applied["retain_host_memory"] = retain_host_memory()
  if runtime_config.unrolled_cpu_threefry:
    applied["unrolled_cpu_threefry"] = use_unrolled_cpu_threefry()
  cache_dir = compilation_cache_dir(runtime_config)
  if cache_dir and cache_dir != os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  return applied
