"""Applications built on the library: command-line jobs and their Python functions."""
