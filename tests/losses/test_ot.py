"""Tests for decalign_jax.losses.ot."""

import functools

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from decalign_jax.losses import ot

_TOL32 = dict(rtol=1e-5, atol=1e-6)
_PAIRS = ("la", "lv", "av")



def _ot_args(g, scale=1.0):
  """(cost_la, cost_lv, cost_av, nu_l, nu_a, nu_v) of a golden fixture."""
  costs = tuple(jnp.asarray(g[f"inter/hete/cost_{p}"] * scale)
                for p in _PAIRS)
  return costs + tuple(jnp.asarray(g[f"inter/hete/nu_{m}"]) for m in "lav")


def _objective(mode, **kw):
  return jax.jit(lambda *a: ot.multimarginal_sinkhorn(
      *a, mode=mode, **kw).objective)


def _grad(mode, **kw):
  return jax.jit(jax.grad(
      lambda *a: ot.multimarginal_sinkhorn(*a, mode=mode, **kw).objective,
      argnums=tuple(range(6))))


@functools.lru_cache(maxsize=None)
def _reference_value_and_grad():
  return jax.jit(jax.value_and_grad(
      lambda c, *nus: ot.multimarginal_sinkhorn_reference(c, *nus).objective,
      argnums=(0, 1, 2, 3)))


def _centered(a):
  # Gradients w.r.t. a marginal are defined up to a constant (simplex).
  a = np.asarray(a)
  return a - a.mean()


# Costs.


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_w2_cost_brute_force(np_rng, reduction):
  mu1, mu2 = np_rng.normal(size=(3, 4)), np_rng.normal(size=(5, 4))
  v1, v2 = np_rng.uniform(0.1, 2, (3, 4)), np_rng.uniform(0.1, 2, (5, 4))
  reduce = np.mean if reduction == "mean" else np.sum
  expected = np.array([[
      reduce((mu1[i] - mu2[j])**2)
      + reduce(v1[i] + v2[j] - 2 * np.sqrt(v1[i] * v2[j] + 1e-8))
      for j in range(5)] for i in range(3)])
  with jax.enable_x64(True):
    got = ot.gaussian_w2_cost(*(jnp.asarray(a) for a in (mu1, v1, mu2, v2)),
                              reduction=reduction)
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_bad_reduction_raises():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="reduction"):
    ot.gaussian_w2_cost(z, z, z, z, reduction="max")


@pytest.mark.parametrize("mahalanobis", [False, True])
def test_sample_to_prototype_brute_force(np_rng, mahalanobis):
  x, mu = np_rng.normal(size=(17, 4)), np_rng.normal(size=(3, 4))
  var = np_rng.uniform(0.0, 1.0, (3, 4))
  var[0, 0] = 1e-6  # Clamped at the floor.
  expected = np.array([[
      np.sum((x[b] - mu[k])**2
             / (np.maximum(var[k], 1e-4) if mahalanobis else 1.0))
      for k in range(3)] for b in range(17)])
  with jax.enable_x64(True):
    got = ot.sample_to_prototype_cost(
        jnp.asarray(x), jnp.asarray(mu), jnp.asarray(var), reduction="sum",
        mahalanobis=mahalanobis, var_floor=1e-4)
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_costs_golden(golden):
  g = golden("small_regression")
  h = lambda k: jnp.asarray(g[f"inter/hete/{k}"])  # noqa: E731
  for a, b in _PAIRS:
    got = ot.gaussian_w2_cost(h(f"gmm_{a}_mu"), h(f"gmm_{a}_var"),
                              h(f"gmm_{b}_mu"), h(f"gmm_{b}_var"))
    np.testing.assert_allclose(got, g[f"inter/hete/cost_{a}{b}"], **_TOL32)
  np.testing.assert_allclose(
      ot.joint_cost_tensor(h("cost_la"), h("cost_lv"), h("cost_av")),
      g["inter/hete/joint_cost"], **_TOL32)
  for src in "lav":
    for dst in "lav".replace(src, ""):
      cost = ot.sample_to_prototype_cost(
          h(f"pooled_{src}"), h(f"gmm_{dst}_mu"), h(f"gmm_{dst}_var"))
      np.testing.assert_allclose(
          cost, g[f"inter/hete/sample_proto_cost_{src}{dst}"], **_TOL32)
      local = jnp.mean(jnp.sum(h(f"gmm_{src}_posterior") * cost, axis=1))
      np.testing.assert_allclose(local, g[f"inter/hete/local_{src}{dst}"],
                                 **_TOL32)


# Multi-marginal Sinkhorn at the golden costs.


@pytest.mark.parametrize("mode", ["reference", "ott"])
@pytest.mark.parametrize("variant", ["small_regression", "small_mosi_arch"])
def test_objective_golden(golden, mode, variant):
  g = golden(variant)
  np.testing.assert_allclose(_objective(mode)(*_ot_args(g)),
                             g["inter/hete/ot_loss"], **_TOL32)


@pytest.mark.parametrize("mode,rtol", [
    ("reference", 1e-9),
    # The reference's `+ 1e-8` in every division biases its value by ~1e-8.
    ("ott", 1e-7)])
def test_objective_golden_f64(golden, mode, rtol):
  g = golden("small_regression_f64")
  with jax.enable_x64(True):
    obj = _objective(mode, threshold=1e-13)(*_ot_args(g))
    assert obj.dtype == jnp.float64
    np.testing.assert_allclose(obj, g["inter/hete/ot_loss"], rtol=rtol)


def test_ott_gradients_match_reference(golden):
  # At the golden costs the reference's 50 iterations have converged, so its
  # unrolled gradient is the envelope gradient that the 'ott' mode returns:
  # d objective / d joint cost = plan (Danskin), d / d nu_m = potential f_m.
  g = golden("small_regression")
  args = _ot_args(g)
  _, ref = _reference_value_and_grad()(jnp.asarray(g["inter/hete/joint_cost"]),
                                       *args[3:])
  got = _grad("ott")(*args)
  out = jax.jit(ot.multimarginal_sinkhorn)(*args)
  np.testing.assert_allclose(out.plan, ref[0], rtol=1e-4, atol=1e-7)
  # The pairwise costs enter the joint cost by broadcasting.
  for axis, grad in zip((2, 1, 0), got[:3]):
    np.testing.assert_allclose(grad, ref[0].sum(axis), rtol=1e-4, atol=1e-6)
  # Gradients w.r.t. a marginal are defined up to a constant shift (the
  # simplex); the model normalises nu, which projects it out.
  for a, b in zip(got[3:], ref[1:]):
    np.testing.assert_allclose(_centered(a), _centered(b), rtol=1e-4,
                               atol=1e-6)


# Properties.


@pytest.mark.parametrize("mode,atol", [
    # The reference's `+ 1e-8` in each division leaves ~1e-7 marginal error.
    ("reference", 1e-6),
    ("ott", 1e-10)])
def test_marginals_and_objective_definition(np_rng, mode, atol):
  ks = (3, 4, 5)
  with jax.enable_x64(True):
    c_la = jnp.asarray(np_rng.uniform(0, 0.5, (ks[0], ks[1])))
    c_lv = jnp.asarray(np_rng.uniform(0, 0.5, (ks[0], ks[2])))
    c_av = jnp.asarray(np_rng.uniform(0, 0.5, (ks[1], ks[2])))
    nus = [np_rng.uniform(0.5, 1.5, k) for k in ks]
    nus = [jnp.asarray(n / n.sum()) for n in nus]
    out = jax.jit(functools.partial(
        ot.multimarginal_sinkhorn, mode=mode, num_iters=100,
        threshold=1e-12))(c_la, c_lv, c_av, *nus)
    plan = np.asarray(out.plan)
    joint = (np.asarray(c_la)[:, :, None] + np.asarray(c_lv)[:, None, :]
             + np.asarray(c_av)[None])
    np.testing.assert_allclose(out.joint_cost, joint, rtol=1e-14)
    for axis, nu in zip([(1, 2), (0, 2), (0, 1)], nus):
      np.testing.assert_allclose(plan.sum(axis), nu, atol=atol)
    expected = np.sum(plan * joint) + 0.1 * np.sum(plan * (np.log(plan) - 1))
    np.testing.assert_allclose(out.objective, expected, rtol=1e-10)


def test_zero_mass_entry(golden):
  # A prototype whose posterior underflows everywhere has nu = 0 exactly.
  args = list(_ot_args(golden("small_regression")))
  args[4] = args[4].at[1].set(0.0)
  args[4] = args[4] / args[4].sum()
  ref = jax.jit(functools.partial(ot.multimarginal_sinkhorn,
                                  mode="reference"))(*args)
  out = jax.jit(ot.multimarginal_sinkhorn)(*args)
  np.testing.assert_array_equal(out.plan[:, 1, :], 0.0)
  np.testing.assert_allclose(out.objective, ref.objective, rtol=1e-5)
  grads = _grad("ott")(*args)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_bad_mode_raises():
  z, n = jnp.zeros((2, 2)), jnp.full((2,), 0.5)
  with pytest.raises(ValueError, match="ot_mode"):
    ot.multimarginal_sinkhorn(z, z, z, n, n, n, mode="log")


def test_ott_compiles_once_and_vmaps(np_rng):
  traces = []

  def loss(c_la, c_lv, c_av, nu):
    traces.append(1)
    return ot.multimarginal_sinkhorn(c_la, c_lv, c_av, nu, nu, nu).objective

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  nu = jnp.full((4,), 0.25)
  batch = []
  for scale in (0.1, 0.3, 3.0):
    c = [jnp.asarray(np_rng.uniform(0, scale, (4, 4)), jnp.float32)
         for _ in range(3)]
    grads = grad_fn(*c, nu)
    assert all(np.all(np.isfinite(g)) for g in grads)
    batch.append(jnp.stack(c))
  assert len(traces) == 1
  objs = jax.jit(jax.vmap(loss, in_axes=(0, 0, 0, None)))(
      *jnp.stack(batch).transpose(1, 0, 2, 3), nu)
  single = jax.jit(loss)
  for b in range(3):
    np.testing.assert_allclose(objs[b], single(*batch[b], nu), rtol=1e-6)


def test_reference_finite_difference_f64(np_rng):
  with jax.enable_x64(True):
    c = [jnp.asarray(np_rng.uniform(0, 0.4, (3, 3))) for _ in range(3)]
    nus = [jnp.asarray(n / n.sum())
           for n in np_rng.uniform(0.5, 1.5, (3, 3))]

    f = jax.jit(lambda *a: ot.multimarginal_sinkhorn(
        *a, mode="reference", num_iters=10).objective)
    jax.test_util.check_grads(f, (*c, *nus), order=1, modes=("rev",),
                              eps=1e-6, atol=1e-6, rtol=1e-6)


# Stress: the reference's kernel clamp at large costs.

_SCALES = (1, 10, 30, 100, 150, 300, 1000)


@pytest.mark.parametrize("scale", _SCALES)
def test_stress_reference_mode(golden, scale):
  s = golden("sinkhorn_stress")
  assert float(s["lambda_ot"]) == 0.1 and int(s["ot_num_iters"]) == 50
  nus = tuple(jnp.asarray(s[f"nu_{m}"]) for m in "lav")
  key = f"scale{scale}/"
  value, grads = _reference_value_and_grad()(jnp.asarray(s[key + "cost"]),
                                             *nus)
  np.testing.assert_allclose(value, s[key + "objective"], **_TOL32)
  np.testing.assert_allclose(grads[0], s[key + "grad_cost"], **_TOL32)
  for m, grad in zip("lav", grads[1:]):
    # At scale 100 the kernel spans ~e^-100 and float32 round-off in the
    # potentials is ~4e-6: the reference's own value is 4.3e-6 from its
    # float64 value, ours 0.9e-6, so the two are compared to 5e-6.
    np.testing.assert_allclose(grad, s[key + f"grad_nu_{m}"], rtol=1e-5,
                               atol=5e-6)


@pytest.mark.parametrize("scale", [100, 300, 1000])
def test_stress_ott_mode_does_not_collapse(golden, scale):
  s = golden("sinkhorn_stress")
  g = golden("small_regression")
  # The stress costs are exactly `scale * joint_cost`, hence pairwise.
  np.testing.assert_array_equal(
      s[f"scale{scale}/cost"], np.float32(scale) * g["inter/hete/joint_cost"])
  args = _ot_args(g, np.float32(scale))
  out = jax.jit(functools.partial(ot.multimarginal_sinkhorn,
                                  max_iterations=10000))(*args)
  plan = np.asarray(out.plan)
  assert np.all(np.isfinite(plan))
  for axis, nu in zip([(1, 2), (0, 2), (0, 1)], args[3:]):
    np.testing.assert_allclose(plan.sum(axis), nu, atol=1e-4)
  # <P, C> >= min C and eps * sum P (log P - 1) >= -eps (log K^3 + 1).
  k = plan.shape[0]
  lower = float(np.min(out.joint_cost)) - 0.1 * (3 * np.log(k) + 1)
  assert float(out.objective) >= lower
  assert float(out.objective) > 0.5 * float(np.min(out.joint_cost))
  if scale == 1000:
    # The reference collapses: its kernel is the 1e-30 floor everywhere.
    assert float(s["scale1000/objective"]) < 1e-3
    assert float(s["scale1000/objective"]) < 1e-4 * float(out.objective)
