"""The pipelines (configs + params + compiled functions) of the three families over one base (``base``): ``var``
(VQVAE + VAR), ``elm`` and ``bigr`` (binary autoencoder + generator); ``pretrained`` loads any of them from files."""
