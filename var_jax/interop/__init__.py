"""Weight interop with the reference PyTorch checkpoints."""
