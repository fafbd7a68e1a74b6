"""The CPU runtime switches of decalign_jax.runtime change speed, not numbers."""

import json
import os
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from decalign_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, *args: str) -> dict:
  """Runs `code` in a fresh interpreter (the switches are process-wide)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                       capture_output=True, text=True, env=env, timeout=300,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("key,count,expected", [
    # Known-answer vectors of Threefry-2x32-20 (Random123 kat_vectors).
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3),
     (0xc4923a9c, 0x483df7a0)),
])
def test_threefry_known_answers(key, count, expected):
  u32 = lambda v: np.asarray([v], np.uint32)  # noqa: E731
  got = runtime.threefry2x32(u32(key[0]), u32(key[1]), u32(count[0]),
                             u32(count[1]))
  assert [int(g[0]) for g in got] == list(expected)


def test_unrolled_threefry_gives_jax_bits_without_a_loop():
  res = _run("""
      import json
      import jax, jax.numpy as jnp, numpy as np
      from decalign_jax import runtime

      def draws(seed):
        key = jax.random.key(seed)
        k1, k2 = jax.random.split(key)
        return [jax.random.bits(k1, (3, 1000)),
                jax.random.bernoulli(k2, 0.9, (7, 13, 5)),
                jax.random.normal(jax.random.fold_in(key, 3), (257,)),
                jax.random.key_data(jax.random.split(key, 4))]

      f = jax.jit(draws)
      hlo_before = f.lower(0).compile().as_text()
      before = [np.asarray(x) for x in f(0)]
      assert runtime.use_unrolled_cpu_threefry()
      jax.clear_caches()
      f = jax.jit(draws)
      hlo_after = f.lower(0).compile().as_text()
      after = [np.asarray(x) for x in f(0)]
      print(json.dumps(dict(
          equal=[bool(np.array_equal(a, b)) for a, b in zip(before, after)],
          loop_before=" while(" in hlo_before,
          loop_after=" while(" in hlo_after)))
  """)
  assert res["equal"] == [True] * 4
  # The switch did change the program: the loop is gone.
  assert res["loop_before"] and not res["loop_after"]


_FAULTS = """
    import json, resource, sys
    from decalign_jax import runtime
    retain = sys.argv[1] == "1"
    applied = runtime.retain_host_memory() if retain else False
    import jax, jax.numpy as jnp
    # ~64 MB temporaries per call, allocated by XLA from a worker thread.
    f = jax.jit(lambda x: (jnp.tanh(x) @ jnp.tanh(x).T).sum())
    x = jnp.ones((4096, 4096), jnp.float32) * 1e-3
    faults = []
    for _ in range(4):
      r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    print(json.dumps(dict(applied=applied, faults=faults[2:])))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc mallopt")
def test_retain_host_memory_stops_per_step_page_faults():
  default, retained = _run(_FAULTS, "0"), _run(_FAULTS, "1")
  assert retained["applied"]
  # Default glibc: each call faults the temporaries in again (64 MB = 16k
  # pages); retained: the pages are reused.
  assert min(default["faults"]) > 8000, default
  assert max(retained["faults"]) < 0.1 * min(default["faults"]), (
      default, retained)


def test_compiler_options_take_reductions_off_ynnpack():
  off = ml_collections.ConfigDict(dict(ynn_reductions=False))
  cpus = jax.devices("cpu")
  opts = runtime.compiler_options(off, cpus)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 64)),
                  jnp.float32)

  def f(x):
    return jnp.sum(x * x, axis=0), x @ x.T

  def roots(jitted):
    return runtime.ynn_fusion_roots(jitted.lower(x).compile().as_text())

  default = roots(jax.jit(f))
  assert default["reduce"] >= 1 and default["dot"] == 1  # XLA:CPU's default
  jitted = jax.jit(f, compiler_options=opts)
  assert roots(jitted) == {"dot": 1}
  for got, want in zip(jitted(x), jax.jit(f)(x)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  # On: XLA's default. Another backend: no XLA:CPU option at all.
  on = ml_collections.ConfigDict(dict(ynn_reductions=True))
  assert runtime.compiler_options(on, cpus) == {}
  assert runtime.compiler_options(
      off, [types.SimpleNamespace(platform="gpu")]) == {}


def test_compilation_cache_dir_resolution(tmp_path):
  cfg = ml_collections.ConfigDict(dict(compilation_cache_dir="~/jit"))
  home = os.path.expanduser("~")
  assert runtime.compilation_cache_dir(cfg, {}) == os.path.join(home, "jit")
  # The environment wins (JAX reads it itself); '' or no field is off.
  env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
  assert runtime.compilation_cache_dir(cfg, env) == str(tmp_path)
  cfg.compilation_cache_dir = ""
  assert runtime.compilation_cache_dir(cfg, {}) is None
  assert runtime.compilation_cache_dir(ml_collections.ConfigDict(), {}) is None


def test_configure_turns_on_the_persistent_cache(tmp_path):
  # A fresh process: JAX's cache is set up once, at the first compile.
  code = textwrap.dedent(f"""
      import jax, jax.numpy as jnp, ml_collections, os
      from decalign_jax import runtime
      from configs import synthetic
      cfg = synthetic.get_config().runtime
      cfg.compilation_cache_dir = {str(tmp_path / "jit")!r}
      runtime.configure(cfg)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
      print(jax.config.jax_compilation_cache_dir)
      jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
      """)
  env = {k: v for k, v in os.environ.items()
         if k != "JAX_COMPILATION_CACHE_DIR"}
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == [str(tmp_path / "jit")]
  assert os.listdir(tmp_path / "jit")  # the compiled program was stored


def test_compile_reporting_cache_tells_a_load_from_a_compile():
  x = jax.numpy.arange(5.0)
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    # Two jit objects of one new program: the first compiles and stores it
    # in conftest's cache, the second loads it.
    salt = time.time_ns() % 10**9 / 7.0 + 0.25  # a program new to any cache
    make = lambda: lambda v: jax.numpy.cumsum(v * salt) ** 2  # noqa: E731
    _, first = runtime.compile_reporting_cache(jax.jit(make()).lower(x))
    _, second = runtime.compile_reporting_cache(jax.jit(make()).lower(x))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
  assert (first, second) == (False, True)
