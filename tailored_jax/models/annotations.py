"""Annotations the models put on activations: logical layouts (for the trainer's mesh) and
names (for the remat policies)."""

from __future__ import annotations

import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name


def constrain(x, axes: tuple):
  """Pins an activation's layout by logical axis names when the trainer traces under
  `sharding.activation_layout` (a no-op elsewhere: decoding, tests without a mesh)."""
  return nn.with_logical_constraint(x, axes)


def tag(x, name: str):
  """Names an activation for the 'save_attention' remat policy."""
  return checkpoint_name(x, name)


def tag_all(arrays, names) -> tuple:
  return tuple(tag(x, name) for x, name in zip(arrays, names))
