"""Inference-time alignment methods on the core: Sampling Demon, SMC, inexact Newton, DPS, guidance, search."""
from . import demon, dps, guidance, newton, resampling, search, smc
