"""Rewrite rules: patterns, guards and candidate replacements, one file per family."""
from .attention import approximate_attention, linformer_attention
from .low_rank import factorize_linear
from .quantize import quantize_linear, quantize_lowrank
from .rule import Candidate, Delta, Match, Rule, Spectrum, match
from .sparse_low_rank import sparsify_lowrank

DEFAULT_RULES = [factorize_linear, quantize_linear, quantize_lowrank, sparsify_lowrank, approximate_attention,
                 linformer_attention]

__all__ = ["Candidate", "Delta", "Match", "Rule", "Spectrum", "match", "factorize_linear", "quantize_linear",
           "quantize_lowrank", "sparsify_lowrank", "approximate_attention", "linformer_attention", "DEFAULT_RULES"]
