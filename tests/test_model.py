"""Shapes, loss terms and switches of the DecAlign module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decalign_jax.config_defaults import base_config
from decalign_jax.models import transformer
from decalign_jax.tasks import sentiment


def _config(**model):
  c = base_config()
  m = c.model
  m.feature_dims = (12, 5, 7)
  m.d_model, m.num_heads, m.num_layers = 16, 4, 2
  m.num_prototypes, m.pde_dim = 3, 8
  for k, v in model.items():
    m[k] = v
  return c


def _inputs(b=6, t=9):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
          for d in (12, 5, 7)]


def _run(cfg, x, train=False):
  model = sentiment.build_model(cfg)
  params = model.init(jax.random.key(0), *x)["params"]
  return model, params, model.apply({"params": params}, *x, train=train,
                                    rngs={"dropout": jax.random.key(1)})


def test_shapes_and_loss_terms():
  x = _inputs()
  _, params, (logits, aux) = _run(_config(), x)
  assert logits.shape == (6, 1)
  assert aux["final_rep"].shape == (6, 6 * 16)
  for k in ("dec", "hete", "homo"):
    assert aux["losses"][k].shape == () and np.isfinite(aux["losses"][k])
  # cos^2 is in [0, 1]; MMD and moment distances are >= 0.
  assert 0 <= aux["losses"]["dec"] <= 1
  assert aux["losses"]["homo"] >= 0
  assert aux["s"]["a"].shape == (6, 9, 16)
  assert set(params) >= {"proj_l", "proj_a", "proj_v", "encoder_com",
                         "trans_l", "pde_v", "out_layer"}


def test_classification_head_and_projection_skip():
  cfg = _config(feature_dims=(16, 5, 7))
  with cfg.unlocked():
    cfg.data.train_mode, cfg.data.num_classes = "classification", 4
  x = _inputs()
  x[0] = jnp.ones((6, 9, 16))
  _, params, (logits, _) = _run(cfg, x)
  assert logits.shape == (6, 4)
  assert "proj_l" not in params  # d_l == d_model: identity projection


def test_conv_kernel_shortens_sequence():
  _, _, (_, aux) = _run(_config(conv_kernels=(3, 3, 3)), _inputs())
  assert aux["s"]["l"].shape == (6, 7, 16)


def test_active_modalities_zero_alignment_and_fusion_slots():
  _, _, (_, aux) = _run(_config(active_modalities=("text", "vision")),
                        _inputs())
  assert float(aux["losses"]["hete"]) == 0.0
  assert float(aux["losses"]["homo"]) == 0.0
  np.testing.assert_array_equal(aux["final_rep"][:, 16:32], 0.0)  # h_a
  assert np.abs(aux["final_rep"][:, :16]).sum() > 0


def test_sequence_mask_ignores_padded_frames():
  cfg = _config(use_sequence_mask=True)
  x = _inputs()
  model, params, (logits, _) = _run(cfg, x)
  # Changing audio/vision only where frames are all-zero changes nothing
  # in the pooled unique/common features' masks; zeroing a tail frame
  # removes it from pooling.
  x2 = list(x)
  x2[1] = x[1].at[0, -3:].set(0.0)
  _, aux2 = model.apply({"params": params}, *x2)
  assert float(aux2["masks"]["a"][0, -3:].sum()) == 0.0
  assert float(aux2["masks"]["a"][1].sum()) == 9.0


def test_causal_mask_self_and_cross():
  m = transformer.causal_mask(3, [3, 2])
  expected = np.array([[1, 0, 0, 1, 0], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1]],
                      bool)
  np.testing.assert_array_equal(m, expected)
  # With causal_in_cross the future of the context cannot change the first
  # query step's output; without it (the reference) it can.
  enc = lambda flag: transformer.TransformerEncoder(  # noqa: E731
      8, 2, 1, causal=True, causal_in_cross=flag)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 4, 8)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(1, 4, 8)), jnp.float32)
  ctx2 = ctx.at[:, 2:].add(1.0)
  for flag, same in ((True, True), (False, False)):
    e = enc(flag)
    p = e.init(jax.random.key(0), q, (ctx,))
    out1 = e.apply(p, q, (ctx,))[:, 0]
    out2 = e.apply(p, q, (ctx2,))[:, 0]
    assert np.allclose(out1, out2) == same


def test_dropout_only_in_training():
  cfg = _config()
  x = _inputs()
  model, params, (l_train, _) = _run(cfg, x, train=True)
  l_eval, _ = model.apply({"params": params}, *x)
  l_eval2, _ = model.apply({"params": params}, *x)
  np.testing.assert_array_equal(l_eval, l_eval2)
  assert not np.allclose(l_train, l_eval)


def test_grad_is_finite_through_every_branch():
  cfg = _config()
  x = _inputs()
  model, params, _ = _run(cfg, x)

  def loss(p):
    logits, aux = model.apply({"params": p}, *x)
    return logits.sum() + sum(aux["losses"].values())

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  # The distribution encoders only receive gradient from the homo loss.
  assert np.abs(grads["pde_l"]["net_3"]["kernel"]).sum() > 0


@pytest.mark.parametrize("mode", ["ott", "reference"])
def test_ot_modes_agree_at_init(mode):
  _, _, (_, aux) = _run(_config(ot_mode=mode), _inputs())
  _, _, (_, aux_ref) = _run(_config(ot_mode="reference"), _inputs())
  np.testing.assert_allclose(aux["losses"]["hete"],
                             aux_ref["losses"]["hete"], rtol=1e-4)
