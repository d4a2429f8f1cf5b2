"""Sampling Demon (Yeh, Lee & Chen, ICLR 2025): reward alignment by choosing among candidate noises.

``sampler`` holds the method (``sample_demon``, its weights, candidates, look-aheads and cost);
``generator`` the seed's ``DemonGenerator`` class, which runs it on one prompt and writes a run folder.
"""
from .generator import (MODEL_ENV, REFERENCE_GRID, DemonGenerater, DemonGenerator, RewardDemon, default_pipeline,
                        karras_grid, plot_rewards, save_comparison)
from .sampler import (AUTO_BETA_VARIANCE, DEMON_TYPES, R_OF_C, SPREAD_MIN, auto_beta, auto_betas, combine_noise,
                      demon_candidates, demon_cost, demon_steps, demon_weights, finite_mean_std, heun_variance_ratio,
                      lookahead, rollout_steps, sample_demon)
