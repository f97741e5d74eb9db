"""Explainable similarity serving: shifted-reference bi-encoders and their explanations.

The library core (this package without ``serving`` and ``tools``) runs in a notebook; the
serving shell (``handlers.serving``) puts it behind TorchServe and KServe.
"""
from .attribution import GAE, LRP, METHODS, Explanation, IntegratedJacobians, explain
from .encoder import Encoder, load_encoder
from .errors import ExplanationError, InvalidOption, NoContent, OverBudget
from .reference import Reference

__all__ = [
    "Encoder", "load_encoder", "explain", "Reference",
    "METHODS", "IntegratedJacobians", "GAE", "LRP", "Explanation",
    "ExplanationError", "InvalidOption", "NoContent", "OverBudget",
]
