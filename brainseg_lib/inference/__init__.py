"""Inference: a trained model (checkpoint, run or model folder, single or ensemble) turned
into probabilities for images of any size (``predictor``), and ``brainseg predict``'s files.

May import: the foundations, ``data`` and ``model``.
"""
