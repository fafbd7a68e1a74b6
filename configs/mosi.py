r"""CMU-MOSI with the reference's released hyperparameters.

  python -m decalign_jax.train --config configs/mosi.py \
      --config.data.path=/data/MOSI/mosi_aligned_50.pkl --workdir runs/mosi

Text is the pickle's precomputed 768-d `text` features.
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.data.dataset = "mosi"
  c.seeds = (1111, 1112, 1113, 1114, 1115)
  c.batch_size = 32
  c.num_epochs = 18
  c.early_stop_patience = 6
  c.selection_metric = "loss"  # the reference's "MOSI" = validation loss
  m = c.model
  m.feature_dims = (768, 5, 20)
  m.d_model, m.num_heads, m.num_layers = 64, 8, 5
  m.num_prototypes = 7
  m.pde_dim = 64
  # The reference sets attn_mask=true, which had no effect under cross-modal
  # attention; False trains what the reference trained.
  m.attn_mask = False
  m.embed_dropout, m.res_dropout = 0.1, 0.05
  lc = c.loss
  lc.task_loss = "mse"
  lc.alpha, lc.beta = 0.05, 0.07
  lc.ct_weight, lc.ct_temperature = 0.003, 0.1
  o = c.optim
  o.lr, o.weight_decay, o.clip = 6e-5, 0.005, 0.6
  o.plateau_patience = 5
  return c
