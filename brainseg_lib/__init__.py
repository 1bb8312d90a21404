"""brainseg_lib: segment brain tumours in MRI slices (COCO data, smp U-Net, honest metrics).

The notebooks and the ``brainseg`` command are thin layers over this public API.
"""

from brainseg_lib import compare, datatools, explore, folds, metrics, plots, report, runs
from brainseg_lib.coco import DatasetError
from brainseg_lib.config import (
    Params,
    ParamsError,
    load_params,
    params_from_dict,
    params_from_notebook,
)
from brainseg_lib.dataset import build_loaders, load_dataset, load_split_arrays
from brainseg_lib.evaluate import evaluate_run
from brainseg_lib.locate import data_source, resolve_data
from brainseg_lib.model import create_model
from brainseg_lib.modeling.predict import load_checkpoint, predict_files
from brainseg_lib.modeling.train import finished_run, read_history, train
from brainseg_lib.modeling.trainer import TrainingDivergedError

__all__ = [
    "compare", "datatools", "explore", "folds", "metrics", "plots", "report", "runs",
    "DatasetError", "Params", "ParamsError", "TrainingDivergedError", "build_loaders",
    "create_model", "data_source", "evaluate_run", "finished_run", "load_checkpoint",
    "load_dataset",
    "load_params", "load_split_arrays", "params_from_dict", "params_from_notebook",
    "predict_files", "read_history", "resolve_data", "train",
]
__version__ = "0.1.0"
