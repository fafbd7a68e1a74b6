"""The fused CPU attention kernel: build, load, call.

`cpu_attention.cc` computes `attention.py`'s softmax-dropout attention and
its FlashAttention backward per (batch, head) pair, four query rows at a
time, inside the cache, with the dropout draws of `dropout.random_bits16`
bit for bit. It reads heads-first `[..., T, C]` operands or, with
`heads_last`, the projections' `[B, T, H, C]` layout in place. XLA:CPU instead writes the
`[B, H, Q, K]` logits, weights and dropout bits to memory several times per
layer, which at batch 512 of the MOSI shape (~80 MB per array) is most of
the attention's time (`benchmarks/README.md`). No library provides such a
kernel for XLA:CPU (Pallas has no CPU backend), hence the C++. The same
library draws `dropout.keep_mask`'s masks (`keep_mask` below) for the
model's other dropouts when the kernel is selected.

The kernel is compiled on first use with the host's C++ compiler
(`$CXX`, else `c++`; `-O3 -march=native`) against the XLA FFI headers that
ship with jaxlib, into `$DECALIGN_JAX_KERNEL_CACHE` (default
`~/.cache/decalign_jax/kernels`), keyed by the source, jaxlib, the compiler
and the CPU's feature flags; later processes load the built library.
`resolve('auto')` falls back to the XLA path when no compiler is found or the
build fails, with one warning; `resolve('cpu')` raises instead.

Scope: float32, head dims 4/8/16/32/64, Threefry keys (or no dropout). The
custom call is not partitioned by GSPMD: under a multi-device mesh XLA would
gather its operands, so `'auto'` uses it on a single CPU device only. A query
row whose keys are all masked returns zeros (the XLA path returns NaN); the
causal masks of `transformer.py` never produce one.
"""

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from decalign_jax.models import dropout as dropout_lib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "cpu_attention.cc")
HEAD_DIMS = (4, 8, 16, 32, 64)
IMPLEMENTATIONS = ("auto", "xla", "cpu")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_TARGETS = {"fwd": "DecalignAttentionFwd", "bwd": "DecalignAttentionBwd",
            "keep": "DecalignDropoutKeep"}
_FFI_NAME = "decalign_cpu_attention_{}"


class KernelUnavailable(RuntimeError):
  """The kernel could not be built or loaded on this machine."""


def _cache_dir() -> str:
  if os.environ.get("DECALIGN_JAX_KERNEL_CACHE"):
    return os.environ["DECALIGN_JAX_KERNEL_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "decalign_jax", "kernels")


def _cpu_flags() -> bytes:
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return b"".join(line for line in f if line.startswith(b"flags"))[:4096]
  except OSError:
    import platform  # pylint: disable=g-import-not-at-top
    return platform.processor().encode()


def _compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not cxx:
    raise KernelUnavailable("no C++ compiler found (set $CXX)")
  return cxx


def build() -> str:
  """Compiles the kernel if no matching build is cached; returns its path."""
  cxx = _compiler()
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True,
                             check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelUnavailable(f"C++ compiler {cxx!r} does not run: {e}") from e
  with open(SOURCE, "rb") as f:
    source = f.read()
  digest = hashlib.sha256(b"\0".join([
      source, jaxlib.__version__.encode(), version, " ".join(_FLAGS).encode(),
      _cpu_flags()])).hexdigest()[:16]
  out_dir = _cache_dir()
  target = os.path.join(out_dir, f"cpu_attention_{digest}.so")
  if os.path.exists(target):
    return target
  cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", ""]
  tmp = None
  try:
    os.makedirs(out_dir, exist_ok=True)
    # Build next to the target, then rename: concurrent builders (xdist
    # workers, several processes of one job) never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd[-1] = tmp
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
      raise KernelUnavailable(
          f"building {SOURCE} failed ({' '.join(cmd)}):\n"
          f"{proc.stderr[-2000:]}")
    os.replace(tmp, target)
  except (OSError, subprocess.SubprocessError) as e:
    # An unwritable cache dir or a hung compiler: 'auto' must still fall back.
    raise KernelUnavailable(f"building {SOURCE} into {out_dir} failed: {e}"
                            ) from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  return target


@functools.cache
def _register() -> str:
  """Builds, loads and registers the FFI targets once per process."""
  path = build()
  try:
    lib = ctypes.cdll.LoadLibrary(path)
  except OSError as e:
    raise KernelUnavailable(f"cannot load {path}: {e}") from e
  for kind, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(
        _FFI_NAME.format(kind), jax.ffi.pycapsule(getattr(lib, symbol)),
        platform="cpu")
  return path


def resolve(implementation: str, field: str = "model.attention_kernel"
            ) -> str:
  """Maps the config choice to 'cpu' or 'xla'.

  Args:
    implementation: 'auto' (the kernel on a single CPU device when it builds,
      else XLA), 'cpu' (the kernel; an error if it cannot be built) or 'xla'.
    field: config field named in errors.

  Returns:
    'cpu' or 'xla'.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{field}={implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")
  if implementation == "xla":
    return "xla"
  if implementation == "cpu":
    try:
      _register()
    except KernelUnavailable as e:
      raise ValueError(f"{field}='cpu' but the kernel is unavailable: {e}"
                       ) from e
    return "cpu"
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return "xla"
  try:
    _register()
  except KernelUnavailable as e:
    warnings.warn(f"{field}='auto': using XLA attention, the CPU kernel is "
                  f"unavailable: {e}", stacklevel=2)
    return "xla"
  return "cpu"


def supports(q: jax.Array, k: jax.Array, key: jax.Array | None,
             heads_last: bool = False) -> bool:
  """Whether the kernel handles these operands (else use the XLA path)."""
  rows = math.prod(q.shape[:-1])
  return (q.dtype == jnp.float32 and k.dtype == jnp.float32
          and q.shape[-1] in HEAD_DIMS and q.ndim >= 3 and rows < 2**32
          and (q.ndim == 4 or not heads_last)
          and (key is None
               or dropout_lib._threefry_key_words(key) is not None))  # pylint: disable=protected-access


def keep_mask(words: jax.Array, shape, threshold: int) -> jax.Array:
  """`dropout.keep_mask`'s boolean mask, drawn by the kernel library.

  Bit for bit `random_bits16(key, shape) < threshold`, in one pass that
  writes a byte per element (XLA writes the 16-bit draws, then compares).

  Args:
    words: the Threefry key's two uint32 words.
    shape: mask shape, at least 1-D, fewer than 2^32 rows.
    threshold: keep where the 16-bit draw is below it, in [1, 2^16).

  Returns:
    `bool[shape]`.
  """
  _register()
  # Under vmap each key draws its own mask: one call per key.
  return jax.ffi.ffi_call(_FFI_NAME.format("keep"),
                          jax.ShapeDtypeStruct(tuple(shape), jnp.bool_),
                          vmap_method="sequential")(
                              words.astype(jnp.uint32),
                              threshold=np.int64(threshold))


def _attrs(rate: float, head_dim: int, heads_last: bool) -> dict:
  threshold = dropout_lib.keep_threshold(rate)
  scale = 2**16 / threshold if threshold else 0.0
  return {"threshold": np.int64(threshold), "drop_scale": np.float32(scale),
          "inv_div": np.float32(1.0 / math.sqrt(head_dim)),
          "heads_last": bool(heads_last)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(q, k, v, mask, words, rate, heads_last):
  return _fused_fwd(q, k, v, mask, words, rate, heads_last)[0]


def _fused_fwd(q, k, v, mask, words, rate, heads_last):
  # Row max and sum per (pair, query row): [B, H, Q, 2] for either layout.
  rows = ((q.shape[0], q.shape[2], q.shape[1]) if heads_last
          else q.shape[:-1])
  out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((*rows, 2), q.dtype))
  out, stats = jax.ffi.ffi_call(_FFI_NAME.format("fwd"), out_types)(
      q, k, v, mask, words, **_attrs(rate, q.shape[-1], heads_last))
  return out, (q, k, v, mask, words, out, stats)


def _fused_bwd(rate, heads_last, res, g):
  q, k, v, mask, words, out, stats = res
  out_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(_FFI_NAME.format("bwd"), out_types)(
      q, k, v, mask, words, out, stats, g,
      **_attrs(rate, q.shape[-1], heads_last))
  return dq, dk, dv, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array | None, key: jax.Array | None, rate: float,
              heads_last: bool = False) -> jax.Array:
  """`dropout(softmax(q k^T / sqrt(C), mask)) @ v` by the kernel.

  Args:
    q: `[..., Q, C]` float32 queries, or `[B, Q, H, C]` with `heads_last`.
    k: `[..., K, C]` keys (`[B, K, H, C]`).
    v: `[..., K, C]` values (`[B, K, H, C]`).
    mask: optional `[Q, K]` bool, True = attend.
    key: Threefry PRNG key, or None when `rate` is 0.
    rate: attention dropout rate.
    heads_last: operands in the `[B, T, H, C]` layout; the dropout mask is
      still that of the heads-first `[B, H, Q, K]` weights.

  Returns:
    The output in the layout of `q`, equal to the XLA path to float32
    rounding, with the same dropout mask.
  """
  _register()
  q_len, k_len = (q.shape[1], k.shape[1]) if heads_last else (
      q.shape[-2], k.shape[-2])
  if mask is None:
    mask = jnp.ones((q_len, k_len), jnp.uint8)
  if mask.shape != (q_len, k_len):
    raise ValueError(f"attention mask has shape {mask.shape}; expected "
                     f"(queries, keys) = {(q_len, k_len)}")
  words = jnp.zeros((2,), jnp.uint32)
  if key is not None:
    words = jnp.stack(dropout_lib._threefry_key_words(key)).astype(jnp.uint32)  # pylint: disable=protected-access
  return _fused(q, k, v, mask.astype(jnp.uint8), words, float(rate),
                bool(heads_last))
