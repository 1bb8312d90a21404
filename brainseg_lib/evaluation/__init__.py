"""Evaluation: predictions of a split with its losses, post-processing, settings chosen on
validation, the scored result and its files, and paired comparisons of runs.

May import: the foundations, ``metrics``, ``data``, ``model``, ``training`` (losses) and
``inference``.
"""
