"""Model loaders: everything that turns weights on disk into a ``Pipeline``.

``pipeline`` (the model-agnostic ``Pipeline``), ``sd`` (SD 1.x/2.x/SDXL diffusers folders), ``sd3``
(rectified-flow SD3 folders), ``toy`` (the shipped digits / Fashion-MNIST models), ``mixture`` (a
closed-form toy), and ``load`` with the dispatchers ``from_pretrained`` and ``load_model``.
"""
from . import mixture, pipeline, sd, sd3, toy
from .load import from_pretrained, load_model
from .pipeline import Pipeline
from .sd3 import FlowPipeline
