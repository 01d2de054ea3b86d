"""Model definitions (Flax Linen, NHWC)."""
