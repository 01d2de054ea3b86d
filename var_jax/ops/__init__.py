"""Numerical building blocks shared by the VAR JAX models."""
