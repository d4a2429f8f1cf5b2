"""The package's Hypothesis strategies, re-exported for the tests."""
from kdiff_align.strategies import (conditions, gaussian_problems, mixture_denoisers, seeds, sigma_ranges,  # noqa: F401
                                    sigma_schedules, uint8_images)
