r"""IEMOCAP 6-way emotion classification, reference hyperparameters.

  python -m decalign_jax.train --config configs/iemocap.py \
      --config.data.path=/data/IEMOCAP/iemocap_data.pkl --workdir runs/iemocap
"""

from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.data.dataset = "iemocap"
  c.data.train_mode = "classification"
  c.data.num_classes = 6
  c.seeds = (1111, 1112, 1113, 1114, 1115)
  c.batch_size = 32
  c.num_epochs = 50
  c.early_stop_patience = 5
  c.selection_metric = "WAF1"
  m = c.model
  m.feature_dims = (1024, 512, 1024)
  m.d_model, m.num_heads, m.num_layers = 48, 4, 4
  m.num_prototypes = 6
  m.pde_dim = 48
  m.attn_mask = False  # see configs/mosi.py
  for k in ("attn_dropout", "attn_dropout_a", "attn_dropout_v",
            "relu_dropout", "embed_dropout", "res_dropout", "output_dropout",
            "text_dropout"):
    m[k] = 0.2
  lc = c.loss
  lc.alpha, lc.beta = 0.05, 0.05
  lc.ct_weight = 0.0
  o = c.optim
  o.lr, o.weight_decay, o.clip = 1e-4, 0.005, 0.6
  o.plateau_patience = 5
  return c
