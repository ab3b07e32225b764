"""ferjax: long-tailed facial expression recognition in JAX.

Semantic data augmentation with a VAE-GAN, long-tail baselines, and honest per-class
evaluation. The documentation is in docs/ (docs/architecture.md for the layout).
"""

__version__ = "0.1.0"
