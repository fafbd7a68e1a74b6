"""Test setup: 8 fake CPU devices, LLVM at -O0, float64 on demand.

Also one persistent compilation cache per test run, made here in the pytest
process that first imports this file and inherited (through the environment)
by the xdist workers and by the subprocesses that tests start: tests that
build the same program again (a resumed run, a second seed, the benchmark's
step) load it instead of recompiling; every program is still compiled once
per run. A `JAX_COMPILATION_CACHE_DIR` the user set is used and kept; so is
a `DECALIGN_JAX_KERNEL_CACHE` (else the CPU attention kernel is built once
per run into a temporary directory).
"""

import atexit
import functools
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=8")
# LLVM at -O0: the suite is mostly compiling small programs, and LLVM's -O3
# passes are most of each compile (the suite: 8:14-8:26 against 9:38-10:10). XLA
# emits the same programs at every level; a vectorised reduction may sum in
# another order than at -O3, which the tolerances cover. Processes that tests
# start inherit the flags or set their own; a level the user set is kept.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="decalign_jax_test_jit_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
if "DECALIGN_JAX_KERNEL_CACHE" not in os.environ:
  # The CPU attention kernel is built once per run here, not in ~/.cache.
  _kernel_dir = tempfile.mkdtemp(prefix="decalign_jax_test_kernels_")
  os.environ["DECALIGN_JAX_KERNEL_CACHE"] = _kernel_dir
  atexit.register(shutil.rmtree, _kernel_dir, ignore_errors=True)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def rng() -> jax.Array:
  return jax.random.key(0)


@pytest.fixture
def np_rng() -> np.random.Generator:
  return np.random.default_rng(0)


@pytest.fixture
def fixtures_dir() -> str:
  return FIXTURES


@functools.lru_cache(maxsize=None)
def _load_golden(variant: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(FIXTURES, f"golden_{variant}.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture
def golden():
  """`golden(variant)`: the arrays of `fixtures/golden_<variant>.npz`.

  Cached across tests: treat the arrays as read-only.
  """
  return _load_golden
