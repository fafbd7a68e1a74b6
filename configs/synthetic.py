r"""Default job: DecAlign on the embedded synthetic MMSA-format data.

  python -m decalign_jax.train --config configs/synthetic.py --workdir runs/syn

The data are generated deterministically (decalign_jax/data/synthetic.py):
MOSI-like dims (768/5/20) and length 50 with planted shared and
modality-unique factors. They are synthetic, not a benchmark. The model is
the MOSI architecture at a CPU-friendly width so the run takes a few minutes
on 2 cores.

`configs/synthetic.py:tiny` is a seconds-long smoke-test variant (tiny data
and model), used by the tests and the multi-process launcher check.
"""

from configs import mosi


def get_config(arg=None):
  c = mosi.get_config()
  c.data.source = "synthetic"
  c.seeds = ()
  c.seed = 0
  c.num_epochs = 8
  c.early_stop_patience = 4
  c.batch_size = 32
  c.selection_metric = "MAE"
  m = c.model
  m.d_model, m.num_heads, m.num_layers = 32, 4, 2
  m.pde_dim = 32
  c.optim.lr = 1e-3
  c.log_training_steps = 8
  if arg == "tiny":
    c.data.synthetic.update(num_train=64, num_valid=24, num_test=24,
                            seq_len=6)
    m.feature_dims = (16, 5, 7)
    m.d_model, m.num_heads, m.num_layers = 8, 2, 1
    m.pde_dim, m.num_prototypes = 8, 3
    c.batch_size = 16
    c.num_epochs = 2
    c.log_training_steps = 2
    # Its steps compile in seconds; a compiling child would only add start-up.
    c.runtime.compile_in_subprocess = False
  elif arg:
    raise ValueError(f"configs/synthetic.py: unknown variant {arg!r} "
                     "(only 'tiny')")
  return c
