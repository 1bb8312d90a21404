"""brainseg_lib: segment brain tumours in MRI slices (COCO data, smp U-Net, honest metrics).

One concern per subpackage; imports flow one way (``tests/test_layers.py`` enforces it)::

    config, io, errors               foundations: parameters, atomic writes, the one user error type
    rundir, metrics, stores          run folders, metric formulas, early checks of store URLs
    tracking                         optional MLflow logging (``tracking_uri``) for the layers above
    data                             COCO reading, locating, caching, checks, near-duplicates, folds
    model                            the network, safe checkpoints, model folders
    training                         the fit (step, loop, DDP), validated through the predictor
    inference                        predicting with a trained model
    evaluation                       scoring a model on a split, choosing settings on validation
    experiments | reporting          sweeps and CV | notebooks, figures, reports
    cli                              the ``brainseg`` command

Importing the package itself loads nothing heavy: ``brainseg --help`` and ``brainseg data
check`` never import torch or matplotlib.
"""

__version__ = "0.2.0"
