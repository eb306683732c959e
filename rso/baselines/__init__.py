"""Backprop baselines to compare RSO with."""

from rso.baselines.backprop import make_optimizer, train_epoch

__all__ = ["make_optimizer", "train_epoch"]
