"""Inference-time alignment methods built on the core: Sampling Demon, SMC tempering, inexact Newton."""
from . import demon, newton, smc
