"""Flax EfficientNet-Lite0 (placeholder until the port lands; see issue 3)."""
