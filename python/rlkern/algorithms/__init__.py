"""Thin training classes built on rlkern's kernels."""

from .alphazero import AlphaZero
