"""kdiff_align: k-diffusion-style sampling primitives and inference-time alignment methods.

The core sits at the top level (``schedules``, ``sampling``, ``cond``, ``external``, ``image``, ``utils``,
``metrics``, ``testing``); above it are the model loaders (``models``) and reward sources (``rewards``),
then the methods (``align``), then the applications (``apps``). Imports point down only.
"""
from . import cond, external, image, models, sampling, schedules, testing, utils
from .cond import cfg_denoiser, condition_denoiser
from .image import from_latent_to_pil, from_pil, from_pil_to_latent, get_init_latent, to_pil
from .models import Pipeline, from_pretrained
from .sampling import TunedSampler, ode_step, odeint, oderevert, sde_step, sdeint, tune_sampler
from .schedules import (append_zero, get_sigmas_exponential, get_sigmas_karras, get_sigmas_polyexponential,
                        get_sigmas_vp, revert_sigmas)

__version__ = "0.1.0"
