"""Matmuls with a backward pass that XLA:CPU runs on its fast path.

XLA:CPU gives a dot to XNNPACK only when the left operand contracts over its
minor dimension. The weight gradient of `y = x @ w`, `x^T @ g`, and the key /
value gradients of attention contract over the major one; XLA then runs them
on its generic Eigen path, 1.3-2.5x slower at our shapes (measured, see
`benchmarks/README.md`), and they were the largest single cost of the
backward. `linear` (for `nn.Dense`) and `tn_product` (for the backward of
`attention.py`) materialise, on CPU, the transpose of the *small* operand
(and of the small result) behind `optimization_barrier`s, so that XLA cannot
fold the transposes back into the dot, and compute a plain product.
`lax.platform_dependent` picks that form at lowering time on CPU only; on
GPU/TPU the backward is the usual one. Forward values are unchanged; gradients
differ from autodiff's only by float summation order.

`Dense` (an `nn.Dense` with these products) also takes its bias gradient,
the sum of the output gradient over all rows, as a `ones @ g` product on CPU
(`column_sum`). XLA:CPU's own reduction over the major axis is a two-stage
strided loop, about 0.4 ms per `[1600, 256]` gradient inside the step (alone:
0.24 ms, against 0.04 ms for the product). `train.py` compiles the step with
reductions as XLA loops, not YNNPACK calls (`runtime.compiler_options`); the
products for the bias gradients are what makes that pay: together the MOSI
step is 9-12% faster at batch 32 (`benchmarks/README.md`).

Limits of `linear`'s `custom_vjp`: forward-mode autodiff (`jax.jvp`,
`jax.hessian`) is not defined through it; it is meant for `jit` with `Auto`
mesh axes (`sharding.make_mesh`), not for per-device code under `shard_map` or
`Explicit` axes, where autodiff's own rules handle the shardings.
"""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

_barrier = lax.optimization_barrier


def _swap(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _cpu_or_default(cpu, default, *args):
  return lax.platform_dependent(*args, cpu=cpu, default=default)


# --- y = x @ w over the last axis of x (nn.Dense) --------------------------


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x [..., K] @ w [K, N] -> [..., N]` (gradients in the inputs' dtypes)."""
  return jnp.matmul(x, w)


def _linear_bwd(res, g):
  x, w = res
  dx = jnp.matmul(g, w.T)
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  if x2.shape[1] <= g2.shape[1]:
    # Transpose the narrower operand: [K, M] @ [M, N].
    cpu = lambda a, b: jnp.matmul(_barrier(a.T), b)  # noqa: E731
  else:
    # (g^T x)^T: [N, M] @ [M, K], then a small [N, K] transpose.
    cpu = lambda a, b: _barrier(jnp.matmul(_barrier(b.T), a)).T  # noqa: E731
  dw = _cpu_or_default(cpu, lambda a, b: jnp.matmul(a.T, b), x2, g2)
  return dx.astype(x.dtype), dw.astype(w.dtype)


def _linear_fwd(x, w):
  return linear(x, w), (x, w)


linear.defvjp(_linear_fwd, _linear_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kw):
  """Drop-in `dot_general` for `nn.Dense` (`nn.Dense(..., dot_general=...)`).

  Dense's contraction (last axis of the input with the kernel's first, no
  batch axes) at default precision goes through `linear`; anything else falls
  back to `lax.dot_general`.

  Args:
    lhs: the input `[..., K]`.
    rhs: the kernel `[K, N]`.
    dimension_numbers: as for `lax.dot_general`.
    precision: as for `lax.dot_general`.
    preferred_element_type: as for `lax.dot_general`.
    **kw: further `lax.dot_general` arguments (force the fallback).

  Returns:
    `lax.dot_general(lhs, rhs, dimension_numbers, ...)`.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  standard = (tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)
              and not lb and not rb and rhs.ndim == 2 and precision is None
              and preferred_element_type is None and not kw)
  if not standard:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kw)
  return linear(lhs, rhs)


def dense_conv_general_dilated(lhs, rhs, window_strides, padding,
                               lhs_dilation=None, rhs_dilation=None,
                               dimension_numbers=None, **kw):
  """Drop-in `conv_general_dilated` for `nn.Conv(..., conv_general_dilated=)`.

  A width-1, stride-1, undilated, ungrouped convolution over channel-last
  inputs (the reference's `Conv1d(kernel_size=1)` input projections) is a
  dense layer: it goes through `linear`, whose weight gradient is a plain
  product, where XLA:CPU computes the convolution's weight gradient as a
  50-wide convolution behind a transpose of the whole input (about 2 ms of
  thread time a step at batch 32 for the 768-d text). Anything else is
  `lax.conv_general_dilated`.

  Args:
    lhs: input `[B, T, C_in]`.
    rhs: kernel `[W, C_in, C_out]`.
    window_strides: as for `lax.conv_general_dilated`.
    padding: as for `lax.conv_general_dilated`.
    lhs_dilation: as for `lax.conv_general_dilated`.
    rhs_dilation: as for `lax.conv_general_dilated`.
    dimension_numbers: as for `lax.conv_general_dilated`.
    **kw: further `lax.conv_general_dilated` arguments.

  Returns:
    `[B, T', C_out]`.
  """
  pointwise = (
      rhs.ndim == 3 and rhs.shape[0] == 1
      and tuple(window_strides) == (1,)
      # Width 1: 'SAME' pads nothing either.
      and (padding in ("VALID", "SAME")
           or tuple(map(tuple, padding)) == ((0, 0),))
      and all(d is None or tuple(d) == (1,) for d in (lhs_dilation,
                                                         rhs_dilation))
      and dimension_numbers == lax.ConvDimensionNumbers((0, 2, 1), (2, 1, 0),
                                                        (0, 2, 1))
      and kw.get("feature_group_count", 1) == 1
      and kw.get("batch_group_count", 1) == 1
      and kw.get("precision") is None
      and kw.get("preferred_element_type") is None)
  if not pointwise:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, **kw)
  return linear(lhs, rhs[0])


# --- y + b over the last axis, and nn.Dense ---------------------------------


def column_sum(g: jax.Array) -> jax.Array:
  """`g [..., N]` summed over all leading axes -> `[N]`.

  On CPU, for float32, a `[1, M] x [M, N]` product with ones (see the module
  docstring); elsewhere a plain reduction.
  """
  g2 = g.reshape(-1, g.shape[-1])
  if g2.dtype != jnp.float32:
    return g2.sum(0)

  def cpu(a):
    return jnp.matmul(jnp.ones((1, a.shape[0]), a.dtype), a)[0]

  return _cpu_or_default(cpu, lambda a: a.sum(0), g2)


@jax.custom_vjp
def bias_add(y: jax.Array, b: jax.Array) -> jax.Array:
  """`y [..., N] + b [N]`; the gradient of `b` is `column_sum(g)`."""
  return y + b


def _bias_add_fwd(y, b):
  return bias_add(y, b), None


def _bias_add_bwd(_, g):
  return g, column_sum(g)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


class Dense(nn.Dense):
  """`nn.Dense` with XLA:CPU's fast backward: `linear` and `bias_add`.

  Same parameters and forward as `nn.Dense`; a `dot_general` (or
  `dot_general_cls`) given by the caller replaces `dense_dot_general`.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias,
                                              dtype=self.dtype)
    if self.dot_general_cls is not None:
      dot_general = self.dot_general_cls()
    else:
      dot_general = self.dot_general or dense_dot_general
    y = dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                    precision=self.precision)
    return y if bias is None else bias_add(y, bias)


# --- attention's key / value gradients over batch axes [..., T, C] ---------


def tn_product(a: jax.Array, b: jax.Array) -> jax.Array:
  """`einsum('...qk,...qc->...kc', a, b)`: contraction over the major axis.

  Args:
    a: `[..., Q, K]`, the large operand (attention-weight sized).
    b: `[..., Q, C]`, the small one (C a head's width).

  Returns:
    `[..., K, C]`; on CPU computed as a plain `[C, Q] x [Q, K]` product.
  """
  return _cpu_or_default(
      # (b^T a)^T with both small transposes materialised: [..., C, Q] x
      # [..., Q, K] is a plain product.
      lambda a, b: _swap(_barrier(jnp.matmul(_barrier(_swap(b)), a))),
      lambda a, b: jnp.einsum("...qk,...qc->...kc", a, b),
      a, b)
