"""Training: losses, optimizers, train steps and loops."""
