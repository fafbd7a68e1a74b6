r"""CH-SIMS with the reference's released hyperparameters.

  python -m decalign_jax.train --config configs/sims.py \
      --config.data.path=/data/SIMS/Processed/unaligned_39.pkl \
      --workdir runs/sims
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.data.dataset = "sims"
  c.data.standardize = ("audio", "vision")
  c.data.clip_percentiles = (0.1, 99.9)
  c.seeds = (1111, 1112, 1113, 1114, 1115)
  c.batch_size = 24
  c.num_epochs = 55
  c.early_stop_patience = 11
  c.selection_metric = "F1_score"
  m = c.model
  m.feature_dims = (768, 33, 709)
  m.d_model, m.num_heads, m.num_layers = 32, 8, 4
  m.conv_kernels = (5, 5, 5)
  m.num_prototypes = 7
  m.pde_dim = 32
  m.attn_mask = False  # see configs/mosi.py
  m.attn_dropout, m.attn_dropout_a, m.attn_dropout_v = 0.4, 0.3, 0.1
  m.relu_dropout, m.embed_dropout, m.res_dropout = 0.1, 0.3, 0.1
  m.output_dropout, m.text_dropout = 0.35, 0.25
  lc = c.loss
  lc.task_loss = "mse"
  lc.alpha, lc.beta = 0.0175, 0.0525
  lc.ct_weight, lc.ct_temperature = 0.01, 0.07
  lc.binary_task_weight = 0.01
  o = c.optim
  o.lr, o.weight_decay, o.clip = 3.5e-5, 0.005, 0.5
  o.plateau_patience = 5
  return c
