"""Integrators of the probability-flow ODE and of reverse SDEs, in k-diffusion's conventions.

``core`` holds ``odeint`` / ``oderevert`` / ``sdeint`` and the single-step methods, ``multistep`` the
one-evaluation-per-step ODE solvers, ``sde`` the stochastic families and the Brownian-tree noise,
``kdiffusion`` drop-ins with k-diffusion's ``sample_*`` names, ``likelihood`` the PF-ODE log-density.
"""
from .core import (ADAPTIVE_METHODS, FIXED_METHODS, METHODS, NFE_PER_STEP, check_method, is_tuned, needs_noise,
                   ode_step, odeint, oderevert, sde_step, sdeint)
from .kdiffusion import (sample_deis, sample_dpm_2, sample_dpm_2_ancestral, sample_dpm_adaptive, sample_dpm_fast,
                         sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde,
                         sample_dpmpp_sde, sample_euler, sample_euler_ancestral, sample_heun, sample_ipndm,
                         sample_lms, sample_unipc)
from .likelihood import log_likelihood
from .multistep import MULTISTEP_METHODS
from .sde import BROWNIAN_METHODS, SDE_METHODS, BrownianTreeNoiseSampler
from .tune import TUNE_METHODS, TunedSampler, tune_sampler
