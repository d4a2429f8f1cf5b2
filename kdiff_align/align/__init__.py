"""Inference-time alignment methods on the core: Sampling Demon, SMC, inexact Newton, DPS, guidance, search,
noise optimisation (DNO, D-Flow)."""
from . import demon, dps, guidance, newton, noise_opt, resampling, search, smc
