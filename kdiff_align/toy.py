"""``kdiff_align.toy`` is the same module as :mod:`kdiff_align.models.toy` (its home since the re-layout).

The name stays because notebooks and scripts call ``from kdiff_align import toy``; both names give one
module object, so its attributes (and anything patched on them) are shared.
"""
import sys

from .models import toy

sys.modules[__name__] = toy
