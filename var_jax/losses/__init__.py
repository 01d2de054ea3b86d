"""Training losses: token cross-entropies (VAR, ELM), GAN terms (tokenizers), BAE codebook and BiGR losses."""
