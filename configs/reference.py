r"""A config of the reference PyTorch DecAlign (its JSON), converted.

Evaluate a reference checkpoint (no hand edits):

  python -m decalign_jax.train \
      --config configs/reference.py:/path/config.json,mosi \
      --config.init_from=/path/decalign-mosi.pth \
      --config.data.path=/data/MOSI/mosi_aligned_50.pkl \
      --workdir runs/ref_mosi --mode test

The argument is `<json path>[,<dataset>[,<bert dir>]]`; the dataset (mosi,
mosei, sims, iemocap) is needed when the JSON has no `dataset_name`, as in
the reference's released `config/*.json`; the BERT directory (a local
save_pretrained copy of the reference's `pretrained` model, e.g.
bert-base-uncased) when the JSON has `use_bert: true`. Drop `--mode test` to
fine-tune from the checkpoint.
"""

from decalign_jax import convert


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/reference.py needs the reference JSON: "
                     "--config configs/reference.py:/path/config.json[,mosi]")
  path, dataset, bert_dir = (arg.split(",") + ["", ""])[:3]
  config = convert.config_from_reference(path, dataset=dataset or None,
                                         text_model_dir=bert_dir or None)
  config.unlock()
  return config
