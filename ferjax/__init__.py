"""ferjax: long-tailed facial expression recognition in JAX.

Semantic data augmentation with a VAE-GAN, long-tail baselines, and honest per-class
evaluation. See README.md for the architecture.
"""

__version__ = "0.1.0"
