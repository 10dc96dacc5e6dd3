"""Rewrite rules: patterns, guards and candidate replacements, one file per family."""
from .low_rank import factorize_linear
from .rule import Candidate, Match, Rule, Spectrum, match

DEFAULT_RULES = [factorize_linear]

__all__ = ["Candidate", "Match", "Rule", "Spectrum", "match", "factorize_linear", "DEFAULT_RULES"]
