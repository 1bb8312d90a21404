"""brainseg."""
