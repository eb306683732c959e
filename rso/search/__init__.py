"""The RSO search algorithm: schedules, candidates, visiting order and the layer-wise loop."""

from rso.search.candidates import SAMPLERS, candidate_values, get_sampler, select_candidate
from rso.search.schedule import annealed_sigma, he_std

__all__ = ["SAMPLERS", "annealed_sigma", "candidate_values", "get_sampler", "he_std", "select_candidate"]
