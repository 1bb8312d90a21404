"""The ``brainseg`` command: data, train, evaluate, predict, export, sweep, cv and the
notebook pipeline."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import yaml

from brainseg_lib.config import Params, ParamsError, load_params, profile_path
from brainseg_lib.errors import BrainsegError
from brainseg_lib.rundir import SWEEP_FILE, eval_dir
from brainseg_lib.stores import check_database, check_tracking_uri

DEBUG_ENV = "BRAINSEG_DEBUG"  # =1: a user error's traceback too
# what a user can cause: one line, exit 2; anything else is a bug and keeps its traceback
USER_ERRORS = (BrainsegError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError)
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _runs_dir() -> Path:
    """The default runs folder (``runs_dir``, relative to the project, not the cwd)."""
    from brainseg_lib.config import Params

    defaults = Params()
    return defaults.resolve_path(defaults.runs_dir)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value read as YAML (``epochs=3``, ``augment=false``)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ParamsError(f"--set {item!r}: not a YAML value ({_first_line(err)})") from None
        if isinstance(parsed, str) and _FLOAT.fullmatch(parsed):  # YAML 1.1 reads 1e-6 as text
            parsed = float(parsed)
        out[key.strip()] = parsed
    return out


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _data_check(args: argparse.Namespace) -> int:
    from brainseg_lib.data.check import check_dataset
    from brainseg_lib.data.locate import find_real_dataset

    found = None if args.dir else find_real_dataset()
    if not args.dir and found is None:
        print("no dataset given and none found (BRAINSEG_DATA, data/brain-tumor-coco)",
              file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else found.path
    report = check_dataset(root, decode=not args.no_decode)
    print(report.format(max_issues=args.max_issues))
    if report.errors:
        return 1
    if not args.no_decode:
        from brainseg_lib.data.duplicates import near_duplicate_groups
        from brainseg_lib.data.locate import DataSource

        groups = near_duplicate_groups(DataSource(root, "real", "data check"), args.bits)
        sizes = ", ".join(f"{n} x {size}" for size, n in sorted(
            groups["cluster_sizes"].items(), key=lambda kv: int(kv[0])))
        print(f"\nnear-duplicate clusters (pHash within {args.bits} bits, transitively): "
              f"{groups['n_clusters']} over {groups['n_images']} images (clusters x size: "
              f"{sizes}); {groups['clusters_across_splits']} span several splits; "
              f"{len(groups['clean_test'])} of {groups['n_test']} test images are clean")
    return 0


def _data_download(args: argparse.Namespace) -> int:
    from brainseg_lib.data.locate import download_dataset

    print(f"dataset saved to {download_dataset(Path(args.dest) if args.dest else None)}")
    return 0


def _data_resize(args: argparse.Namespace) -> int:
    from brainseg_lib.data.resize import resize_dataset

    print(f"wrote {resize_dataset(args.src, args.dst, args.size, args.grey)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    changes = parse_overrides(args.set)  # a resumed run may take these, not the options
    options = {key: value for key, value in (("resume", args.resume), ("run_id", args.run_id))
               if value}
    params = load_params(args.params, **(changes | options))
    check_tracking_uri(params.tracking_uri)  # before minutes of loading, not after
    from brainseg_lib.training.loop import train  # torch: after the checks, not before

    result = train(params, progress=not args.no_progress, resume_overrides=changes)
    print(f"run directory: {result.run_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from brainseg_lib.evaluation.evaluate import evaluate_run
    from brainseg_lib.model.folder import is_model_dir
    from brainseg_lib.model.run_folder import run_folder_from_model

    target = Path(args.model or args.run_dir or "")
    if not args.model and not args.run_dir:
        raise ParamsError("evaluate: give a run directory or --model MODEL_DIR")
    # evaluation settings from the call: a file, or changes to the run's own settings
    settings: Any = parse_overrides(args.set)
    runs_dir = Path(settings.pop("runs_dir")) if "runs_dir" in settings else _runs_dir()
    settings = settings or None
    if args.params:
        settings = load_params(args.params, **(settings or {}))
    model_dir = target if is_model_dir(target) else None
    if args.record and (not model_dir or args.split != "test"):  # before minutes of work
        raise ParamsError("--record needs --model DIR and the test split")
    if model_dir:  # a shipped model: laid out as a run under runs_dir (the project's runs/)
        target = run_folder_from_model(target, runs_dir / f"model-{target.resolve().name}")
    metrics = evaluate_run(target, args.split, args.device, settings=settings,
                           backend=args.backend)
    print(f"wrote {eval_dir(target, args.split)}")
    if args.record:
        from brainseg_lib.model.folder import record_metrics

        record_metrics(model_dir, metrics)
        print(f"recorded the test metrics in {model_dir / 'README.md'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from brainseg_lib.inference.files import predict_files

    model = args.model or args.checkpoint
    if not model:
        raise ParamsError("predict: give --model (a model folder or run directory) or "
                          "--checkpoint FILE")
    written, skipped = predict_files(model, args.inputs, args.out, args.threshold,
                                     args.tta, args.device, args.backend)
    print(f"{len(written)} masks written to {args.out}; {len(skipped)} inputs skipped")
    return 1 if skipped else 0  # some inputs were not read: a script must notice


def _export(args: argparse.Namespace) -> int:
    from brainseg_lib.model.card import DataCredit
    from brainseg_lib.model.export import export_model
    from brainseg_lib.model.folder import is_model_dir
    from brainseg_lib.model.onnx_files import add_onnx

    if args.int8 and not args.onnx:
        raise ParamsError("export: --int8 needs --onnx (it quantises the verified model.onnx)")
    if len(args.run_dirs) == 1 and is_model_dir(args.run_dirs[0]) and not args.out:
        if not args.onnx:
            raise ParamsError(f"export {args.run_dirs[0]}: a model folder already; add --onnx "
                              "to write its ONNX files")
        record = add_onnx(Path(args.run_dirs[0]), int8=args.int8)
    else:
        if not args.out:
            raise ParamsError("export: give --out MODEL_DIR")
        given = DataCredit(args.dataset_name, args.dataset_licence)  # both needed off Kaggle
        out = export_model([Path(r) for r in args.run_dirs], Path(args.out),
                           fp16=not args.fp32, given=given, onnx=args.onnx, int8=args.int8)
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        print(f"exported {len(args.run_dirs)} run(s) to {out} ({size:.1f} MiB)")
        _track_export([Path(r) for r in args.run_dirs], out)
        if not args.onnx:
            return 0
        record = json.loads((out / "brainseg.json").read_text())["onnx"]
    print(f"ONNX {', '.join(record['files'])}: exported in {sum(record['export_seconds']):.1f} "
          f"s; verified against torch on {record['verified_on']}: max |Δprobability| "
          f"{record['max_abs_prob_diff']:.1e}, identical mask pixels "
          f"{record['mask_agreement']:.4%}")
    if "int8" in record:
        q = record["int8"]
        print(f"int8 {', '.join(q['files'])}: quantised in {sum(q['quantise_seconds']):.1f} s "
              f"(calibrated on {q['calibrated_on']}); verified the same way: max "
              f"|Δprobability| {q['max_abs_prob_diff']:.1e}, identical mask pixels "
              f"{q['mask_agreement']:.4%}")
    return 0


def _track_export(run_dirs: list[Path], out: Path) -> None:
    """The model folder, into the MLflow run of each exported run that tracked one."""
    from brainseg_lib.config import params_from_record, read_params_file
    from brainseg_lib.rundir import PARAMS_FILE
    from brainseg_lib.tracking import log_model_folder

    for run_dir in run_dirs:
        record = run_dir / PARAMS_FILE
        if record.is_file():
            params = params_from_record(read_params_file(record), str(record))
            log_model_folder(run_dir, out, params)


def _checked_grid(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's grid file, its ``--storage`` database and its tracking store, checked
    before any trial starts (each a one-line error, passwords masked)."""
    from brainseg_lib.experiments.sweep import read_grid

    grid = read_grid(Path(args.grid))
    if args.storage:
        check_database(args.storage, "--storage")
    check_tracking_uri(load_params(grid["base"], **grid["common"]).tracking_uri)
    return grid


def _sweep(args: argparse.Namespace) -> int:
    from brainseg_lib.experiments.sweep import run_sweep, run_workers

    sweep_dir = Path(args.out) if args.out else _runs_dir() / f"sweep-{Path(args.grid).stem}"
    grid = _checked_grid(args)
    if args.worker:  # trials only: the table and the test are the main command's
        sweep_dir.mkdir(parents=True, exist_ok=True)
        run_workers(Path(args.grid), grid, sweep_dir, args.parallel or 1, args.storage)
        return 0
    table = run_sweep(args.grid, sweep_dir, args.parallel, evaluate=not args.no_test,
                      storage=args.storage)
    cols = [c for c in ("variant", "status", "val_iou", "val_dice", "epochs", "minutes",
                        "selected") if c in table]
    print(table[cols].to_string(index=False))
    print(f"wrote {sweep_dir / SWEEP_FILE}")
    return 0 if table.status.isin(["finished", "pruned"]).all() else 1


def _cv(args: argparse.Namespace) -> int:
    from brainseg_lib.experiments.cv import run_cv

    overrides = parse_overrides(args.set)
    if args.run_id:
        overrides["run_id"] = args.run_id
    check_tracking_uri(load_params(args.params, **overrides).tracking_uri)
    run_cv(Path(args.params), args.folds, overrides, args.parallel,
           evaluate=not args.no_evaluate)
    return 0


def _main_profile() -> Path:
    """``reference`` where CUDA is available, else the CPU-sized ``quick``."""
    import torch

    return profile_path("reference" if torch.cuda.is_available() else "quick")


def _ensure_dataset(params: Params) -> None:
    """Try a download when no real dataset is found; on failure the run uses the synthetic
    demo (announced loudly by the run itself)."""
    from brainseg_lib.data.locate import download_dataset, find_real_dataset

    if params.synthetic or find_real_dataset(params.data_dir):
        return
    try:
        print(f"no dataset found; downloading it to {download_dataset()}")
    except (BrainsegError, OSError) as err:
        print(f"download failed: {err}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from brainseg_lib.reporting.pipeline import run_pipeline

    params_file = _main_profile() if args.params == "auto" else Path(args.params)
    overrides = parse_overrides(args.set)
    params = load_params(params_file, **overrides)
    check_tracking_uri(params.tracking_uri)
    if not args.no_download:
        _ensure_dataset(params)
    summary = run_pipeline(params_file, name=args.name, reports_dir=args.reports_dir,
                           overrides=overrides)
    return 0 if summary["status"] == "succeeded" else 1


def _add_set_option(parser: argparse.ArgumentParser, help_text: str | None) -> None:
    """``--set KEY=YAML``, repeatable; read by :func:`parse_overrides`."""
    parser.add_argument("--set", action="append", metavar="KEY=YAML", help=help_text)


def _add_backend_option(parser: argparse.ArgumentParser) -> None:
    """``--backend``: the engine that runs the network (same pre- and post-processing)."""
    parser.add_argument("--backend", default="auto",  # predictor.BACKENDS, without torch
                        choices=["auto", "torch", "onnxruntime", "onnxruntime-int8"],
                        help="auto (default): onnxruntime on the CPU when the model folder "
                        "has a verified model.onnx, else torch; onnxruntime-int8: its "
                        "verified int8 variant (brainseg export --onnx --int8)")


def _add_data_parsers(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command",
                                                                        required=True)
    check = data.add_parser("check", help="report on a COCO dataset; exit 1 on errors")
    check.add_argument("dir", nargs="?", help="dataset folder (default: the resolved one)")
    check.add_argument("--no-decode", action="store_true",
                       help="skip decoding every image (and the near-duplicate clusters)")
    check.add_argument("--bits", type=int, default=4,
                       help="pHash distance for near-duplicates (default 4)")
    check.add_argument("--max-issues", type=int, default=3,
                       help="files listed per kind of problem (each kind is counted)")
    check.set_defaults(func=_data_check)
    download = data.add_parser("download", help="download the Kaggle dataset (kagglehub)")
    download.add_argument("--dest", help="default: data/brain-tumor-coco")
    download.set_defaults(func=_data_download)
    resize = data.add_parser("resize", help="write a resized copy (e.g. for a GPU machine)")
    resize.add_argument("src")
    resize.add_argument("dst")
    resize.add_argument("--size", type=int, default=256)
    resize.add_argument("--grey", action="store_true", help="store single-channel JPEGs")
    resize.set_defaults(func=_data_resize)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model from a parameter file")
    train.add_argument("--params", required=True)
    train.add_argument("--resume", help="run directory to continue from its last.pt")
    train.add_argument("--run-id", help="name of the run directory under runs_dir")
    train.add_argument("--no-progress", action="store_true", help="epoch lines only")
    _add_set_option(train, "override one parameter, e.g. --set epochs=2")
    train.set_defaults(func=_train)


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("evaluate",
                              help="evaluate a run's best checkpoint or a model folder")
    evaluate.add_argument("run_dir", nargs="?", help="run directory (or a model folder)")
    evaluate.add_argument("--model", help="an exported model folder, e.g. models/reference")
    evaluate.add_argument("--split", default="test", choices=["train", "valid", "test"])
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--params", help="evaluation settings from this file (default: the "
                          "run's, changed by --set)")
    _add_set_option(evaluate, "an evaluation setting, e.g. --set threshold=0.4 --set tta=false")
    evaluate.add_argument("--record", action="store_true",
                          help="write the test metrics into the model folder's card")
    _add_backend_option(evaluate)
    evaluate.set_defaults(func=_evaluate)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="write mask and overlay PNGs for images")
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("--model", help="model folder (brainseg export) or run directory")
    predict.add_argument("--checkpoint", help="a checkpoint file (best.pt)")
    predict.add_argument("--out", required=True)
    predict.add_argument("--threshold", type=float)
    predict.add_argument("--tta", action="store_true")
    predict.add_argument("--device", default="auto")
    _add_backend_option(predict)
    predict.set_defaults(func=_predict)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a run (or fold runs) as an smp model folder")
    export.add_argument("run_dirs", nargs="+",
                        help="run directory; several = a fold ensemble; or a model folder "
                        "(without --out) to add its ONNX files")
    export.add_argument("--out", help="model folder, e.g. models/reference")
    export.add_argument("--onnx", action="store_true",
                        help="also write model.onnx, verified against torch on validation "
                        "images (an error when it disagrees)")
    export.add_argument("--int8", action="store_true",
                        help="with --onnx: also model.int8.onnx (int8 static quantisation "
                        "calibrated on validation images), kept only if verified the same way")
    export.add_argument("--fp32", action="store_true",
                        help="keep float32 weights (default fp16)")
    export.add_argument("--dataset-name", default="",
                        help="the training data's name for the model card; needed (with "
                        "--dataset-licence) unless the runs trained on the Kaggle dataset")
    export.add_argument("--dataset-licence", default="",
                        help="the training data's licence, e.g. 'CC BY 4.0' or 'unknown' "
                        "(the Kaggle dataset's is known: CC BY 4.0)")
    export.set_defaults(func=_export)


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="an Optuna study of training runs, one selected on "
                           "validation")
    sweep.add_argument("--grid", required=True,
                       help="grid or search-space file (see docs/how-to/sweep.md)")
    sweep.add_argument("--out", help="sweep folder (default runs/sweep-<grid name>)")
    sweep.add_argument("--parallel", type=int, default=0,
                       help="worker processes on this machine (default: the grid's "
                       "parallel, else one per GPU; 1 with --worker)")
    sweep.add_argument("--storage", help="the study's database, any SQLAlchemy URL, e.g. "
                       "postgresql://user:pw@host/db (default: SQLite in the sweep folder)")
    sweep.add_argument("--worker", action="store_true",
                       help="run trials of the shared study only (on other machines; "
                       "--parallel processes, default 1): no table, no test")
    sweep.add_argument("--no-test", action="store_true", help="skip the selected run's test")
    sweep.set_defaults(func=_sweep)


def _add_cv_parser(sub: argparse._SubParsersAction) -> None:
    cv = sub.add_parser("cv", help="grouped k-fold cross-validation and fold ensemble")
    cv.add_argument("--params", required=True)
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--run-id", help="cv folder name under runs_dir (to resume one)")
    cv.add_argument("--parallel", type=int, default=0, help="folds at once (default: per GPU)")
    cv.add_argument("--no-evaluate", action="store_true", help="train the folds only")
    _add_set_option(cv, None)
    cv.set_defaults(func=_cv)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="execute notebooks 01-04 (and 05_compare when asked)"
                         " into a dated report")
    run.add_argument("--params", required=True,
                     help="parameter file, or 'auto': reference on CUDA, quick on CPU")
    run.add_argument("--no-download", action="store_true",
                     help="without a dataset, go straight to the synthetic demo")
    run.add_argument("--name", help="label for the run (default: the profile)")
    run.add_argument("--reports-dir", default=None)
    _add_set_option(run, "override one parameter, e.g. --set epochs=2")
    run.set_defaults(func=_run)


def build_parser() -> argparse.ArgumentParser:
    """The ``brainseg`` parser: one sub-command per step, each calling its ``_<command>``."""
    parser = argparse.ArgumentParser(prog="brainseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data_parsers, _add_train_parser, _add_evaluate_parser,
                _add_predict_parser, _add_export_parser, _add_sweep_parser, _add_cv_parser,
                _add_run_parser):
        add(sub)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any,
                      **__: Any) -> str:
    """Warnings as the CLI prints them: one line each, like its errors."""
    return f"brainseg: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (:data:`USER_ERRORS`) is one line on stderr and exit 2
    (with its traceback when ``BRAINSEG_DEBUG=1``); any other exception is a bug and
    propagates with its traceback."""
    args = build_parser().parse_args(argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(f"brainseg: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
