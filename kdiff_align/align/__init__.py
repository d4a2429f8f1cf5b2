"""Inference-time alignment methods built on the core: Sampling Demon, SMC tempering, inexact Newton, guidance, search."""
from . import demon, guidance, newton, resampling, search, smc
