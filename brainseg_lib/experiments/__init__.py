"""Experiments built from many training runs: parameter sweeps and grouped cross-validation
(fold ensembles), each run an ordinary run directory trained by a subprocess.

May import: everything below it; never ``reporting`` or ``cli``.
"""
