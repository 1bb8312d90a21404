"""The model: the smp network and its input normalisation, device and precision, the one
forward pass, checkpoints that load without running code, and exported model folders (smp's
format + a model card).

May import: the foundations and ``data``.
"""
