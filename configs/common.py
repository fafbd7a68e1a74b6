"""Shared config pieces; every field and its default is in
`decalign_jax.config_defaults.base_config`."""

from decalign_jax.config_defaults import base_config  # noqa: F401
