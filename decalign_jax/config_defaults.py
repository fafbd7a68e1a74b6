"""Defaults of every DecAlign config field (the reference trainer's defaults).

Each dataset config starts from `base_config()` and overrides what the
reference's released `config/*.json` sets.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """All fields, at the reference trainer's defaults."""
  c = ml_collections.ConfigDict()
  c.task = "sentiment"
  c.seed = 1111
  # Several seeds -> one run per seed under workdir/seed_<s>, mean +- std.
  c.seeds = ()
  c.batch_size = 32
  c.num_epochs = 100
  c.early_stop_patience = 20
  # A metric name from decalign_jax.metrics, or "loss" (validation task loss).
  c.selection_metric = "loss"
  c.scheduler_metric = ""  # "" -> same as selection_metric
  c.log_training_steps = 10
  # Device mesh axes; the batch is split over "data" (and "fsdp").
  c.mesh = [("data", -1)]
  # Parameter / optimizer-state layout: (regex on the state path, strategy)
  # with strategy "replicate" or "fsdp" (needs an "fsdp" mesh axis).
  c.sharding_rules = [(".*", "replicate")]
  # Carry a replicated train state between steps as one flat buffer per
  # dtype (decalign_jax/packing.py): same numbers, less per-step host work,
  # about one more copy of the state in the step's temporaries.
  c.pack_state = True
  # With a packed state, run the optimizer and the logged norms on the
  # parameters as one flat vector (optim.FlatParams): same numbers up to
  # float summation order, ~4,000 fewer small CPU kernels per MOSI step.
  c.flat_optimizer = True
  # A reference PyTorch checkpoint (.pth or .npz state_dict) to start from.
  c.init_from = ""
  # XLA:CPU speed-ups (see decalign_jax/runtime.py): two process-wide
  # switches applied by train.py before JAX starts, and a compile option of
  # the jitted train step (ynn_reductions=False: reductions as XLA loops,
  # not YNNPACK calls). None changes a number beyond float summation order.
  # compilation_cache_dir: JAX's persistent compilation cache, so that later
  # runs load the train step ('' = off; $JAX_COMPILATION_CACHE_DIR wins).
  # compile_in_subprocess: on CPU, compile the steps in a child process into
  # that cache and load them here: a process that compiled the step runs it
  # 30-50% slower (heap fragmentation; train.compile_in_child).
  c.runtime = ml_collections.ConfigDict(dict(
      retain_host_memory=True, unrolled_cpu_threefry=True,
      ynn_reductions=False,
      compilation_cache_dir="~/.cache/decalign_jax/jit",
      compile_in_subprocess=True))

  c.data = ml_collections.ConfigDict()
  c.data.source = "mmsa"  # "mmsa" (a pickle at data.path) or "synthetic"
  c.data.dataset = "mosi"  # metric family: mosi | mosei | sims | iemocap
  c.data.path = ""
  c.data.train_mode = "regression"  # or "classification"
  c.data.num_classes = 1
  c.data.standardize = ()  # modalities standardized with train statistics
  c.data.clip_percentiles = (0.5, 99.5)
  c.data.synthetic = ml_collections.ConfigDict(dict(
      seed=0, num_train=1024, num_valid=256, num_test=256, seq_len=50))

  m = c.model = ml_collections.ConfigDict()
  m.feature_dims = (768, 74, 35)
  m.d_model = 40
  m.num_heads = 10
  m.num_layers = 5
  m.conv_kernels = (1, 1, 1)
  m.num_prototypes = 8
  m.gmm_em_iters = 5
  m.gmm_var_floor = 1e-4
  m.lambda_ot = 0.1
  m.ot_num_iters = 50
  m.ot_mode = "ott"  # "ott" (log domain, OTT-JAX) or "reference"
  m.hetero_cost_reduction = "mean"
  m.local_proto_mahalanobis = False
  m.pde_dim = 40
  m.mmd_bandwidth = 1.0
  m.use_sequence_mask = False
  m.use_cross_modal_attention = True
  m.attn_mask = True
  # The reference ignores attn_mask under cross-modal attention; True
  # applies it (position-aligned causal mask over each context segment).
  m.causal_in_cross = True
  m.active_modalities = ("text", "audio", "vision")
  m.attn_dropout = 0.1
  m.attn_dropout_a = 0.0
  m.attn_dropout_v = 0.0
  m.relu_dropout = 0.1
  m.embed_dropout = 0.25
  m.res_dropout = 0.1
  m.output_dropout = 0.0
  m.text_dropout = 0.0
  # Cross-modal attention core: 'auto' = the fused C++ kernel of
  # models/cpu_attention.py on a single CPU device (built on first use),
  # else XLA; 'cpu' = the kernel or an error; 'xla' = never the kernel.
  # The kernel library also draws the model's dropout masks (the same bits).
  m.attention_kernel = "auto"
  # A local BERT-family directory (save_pretrained: config.json,
  # model.safetensors, tokenizer). Set: fine-tune it on the pickle's
  # `text_bert` ids; empty: use the precomputed `text` features.
  m.text_model_dir = ""
  m.freeze_text = False

  lc = c.loss = ml_collections.ConfigDict()
  lc.task_loss = "l1"  # mse | l1 | smooth_l1 (regression)
  lc.smooth_l1_beta = 1.0
  lc.binary_task_weight = 0.0
  lc.class_weights = ml_collections.FieldReference(None, field_type=list)
  lc.dec_weight = 1.0
  lc.alpha = 0.1
  lc.beta = 0.1
  lc.ct_weight = 0.0
  lc.ct_temperature = 0.1

  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-3
  # Learning rate of the text backbone (the reference's bert_learning_rate);
  # None: same as lr.
  o.text_lr = ml_collections.FieldReference(None, field_type=float)
  o.weight_decay = 0.0
  o.clip = 0.8
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  # Extra per-group learning rates: [(regex on the param path, lr or None
  # to freeze)], first match wins.
  o.groups = []
  o.plateau_factor = 0.1
  o.plateau_patience = 20
  o.plateau_rtol = 1e-4

  e = c.eval = ml_collections.ConfigDict()
  e.batch_size = 0  # 0 -> batch_size
  # Reproduce the reference's 3-class Non0_acc_2 bug (see metrics.py).
  e.reference_non0 = False
  return c
