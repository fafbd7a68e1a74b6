r"""CMU-MOSEI with the reference's released hyperparameters.

  python -m decalign_jax.train --config configs/mosei.py \
      --config.data.path=/data/MOSEI/mosei_aligned_50.pkl --workdir runs/mosei
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.data.dataset = "mosei"
  c.data.standardize = ("audio", "vision")
  c.data.clip_percentiles = (0.5, 99.5)
  c.seeds = (1111, 1112, 1113, 1114, 1115)
  c.batch_size = 128
  c.num_epochs = 16
  c.early_stop_patience = 5
  c.selection_metric = "Non0_acc_2"  # the reference's "Acc_2"
  m = c.model
  m.feature_dims = (768, 74, 35)
  m.d_model, m.num_heads, m.num_layers = 64, 8, 4
  m.conv_kernels = (5, 5, 5)
  m.num_prototypes = 7
  m.pde_dim = 64
  m.attn_mask = False  # see configs/mosi.py
  for k in ("attn_dropout", "attn_dropout_a", "attn_dropout_v",
            "relu_dropout", "embed_dropout", "res_dropout", "output_dropout",
            "text_dropout"):
    m[k] = 0.125
  lc = c.loss
  lc.task_loss = "mse"
  lc.alpha, lc.beta = 0.005, 0.0
  lc.ct_weight, lc.ct_temperature = 0.001, 0.1
  o = c.optim
  o.lr, o.weight_decay, o.clip = 5e-5, 0.005, 0.6
  o.plateau_patience = 5
  return c
