"""Data: COCO splits on disk, where the dataset is, decoded arrays, checks, near-duplicates, folds.

May import: the foundations (config, io, rundir). Never torch: ``brainseg data check``
stays light.
"""
