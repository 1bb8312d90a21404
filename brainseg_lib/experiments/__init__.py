"""Experiments built from many training runs: sweeps and cross-validation."""
