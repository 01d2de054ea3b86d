"""Evaluation metrics for generative models: FID, Inception Score and improved precision/recall."""
