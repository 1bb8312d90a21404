"""Metric formulas, each named for what it measures (``functional``), lesion-wise metrics
(``lesion``), pixel calibration (``calibration``) and their confidence intervals
(``intervals``). Pure: counts in, numbers out.

May import: nothing of brainseg_lib but the foundations.
"""
