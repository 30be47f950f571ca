"""Flax InceptionV3 (placeholder until the port lands; see issue 2)."""
