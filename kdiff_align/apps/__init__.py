"""Applications on top of the methods: the ``kdiff-align`` command line and the Python functions behind it.

``cli`` (the command, also ``python -m kdiff_align``), ``cliargs`` (its shared vocabulary), ``demo``
(the main job), ``demon`` (one prompt, plain vs Demon), ``generate`` (many prompts over torchrun ranks),
``experiment`` (resumable run folders), ``reward_specs`` (reward specs → reward functions) and
``arena`` (every method at equal NFE).
"""
