"""RLCD: Reinforcement Learning from Contrast Distillation (Yang et al., arXiv 2307.12950)."""

__version__ = "0.1.0"
