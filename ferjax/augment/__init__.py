"""Semantic augmentation: latent-perturbation sampling and class-balancing policies."""
