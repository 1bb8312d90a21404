"""Training: augmentation, losses, device-resident batches, the step (``trainer``), the run
(``loop``: resume, budget, records) and data parallelism (``distributed``).

May import: the foundations, ``data``, ``model`` and ``inference`` (validation runs through
the predictor).
"""
