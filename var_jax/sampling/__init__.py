"""The samplers, one module per family: ``var`` (next-scale prediction), ``elm`` (AR / MLM over sub-tokens),
``bigr`` (masked bits + Bernoulli diffusion); ``common`` holds what they share (per-sample keys, labels, top-k/p)."""
