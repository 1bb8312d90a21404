"""The model: the smp network and its input normalisation, device and precision, the one
forward pass, checkpoints that load without running code, and exported model folders (smp's
format + a model card).

- ``network``, ``device``, ``checkpoint``: the network, where it runs, its checkpoints.
- ``folder``: reading a model folder (``ModelInfo`` is its ``brainseg.json``), hashes
  verified, networks loaded; ``schema``: what an untrusted ``brainseg.json`` must be, checked
  first; ``card``: its model card and licence (one template).
- ``export``: a run (or fold runs) written as a model folder; ``onnx_files``: its ONNX files
  written, verified and found again (``onnx_export``: the engines); ``run_folder``: a model
  folder laid out as a run; ``parent``: the weights a fine-tuning run starts from.

Import the modules themselves: importing this package loads nothing heavy.

May import: the foundations and ``data``.
"""
