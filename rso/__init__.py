"""rso: train neural networks without gradients by Random Search Optimization, and compare with backprop."""

__version__ = "0.1.0"
