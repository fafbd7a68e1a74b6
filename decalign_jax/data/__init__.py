"""MMSA data: reader, synthetic generator and grain pipelines."""

from decalign_jax.data.mmsa import DataError
from decalign_jax.data.mmsa import FeatureStats
from decalign_jax.data.mmsa import load_mmsa
from decalign_jax.data.mmsa import Split
from decalign_jax.data.mmsa import standardize_splits
from decalign_jax.data.pipeline import BATCH_KEYS
from decalign_jax.data.pipeline import make_eval_batches
from decalign_jax.data.pipeline import make_train_iterator
from decalign_jax.data.pipeline import num_eval_batches
from decalign_jax.data.pipeline import steps_per_epoch
from decalign_jax.data.synthetic import make_synthetic_mmsa
from decalign_jax.data.synthetic import write_synthetic_mmsa

__all__ = [
    "BATCH_KEYS", "DataError", "FeatureStats", "Split", "load_mmsa",
    "make_eval_batches", "make_synthetic_mmsa", "make_train_iterator",
    "num_eval_batches", "standardize_splits", "steps_per_epoch",
    "write_synthetic_mmsa",
]
