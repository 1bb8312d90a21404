"""Training and inference (nnU-Net style split: train.py fits, predict.py applies)."""
