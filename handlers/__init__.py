"""Explainable similarity serving: shifted-reference bi-encoders for TorchServe."""
from .encoder import Encoder, load_encoder
from .attribution import explain

__all__ = ["Encoder", "load_encoder", "explain"]
