"""The ``brainseg`` command: data, train, evaluate, predict and the notebook pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from brainseg_lib.coco import DatasetError
from brainseg_lib.config import ParamsError, load_params, profile_path


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value read as YAML (``epochs=3``, ``augment=false``)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _data_check(args: argparse.Namespace) -> int:
    from brainseg_lib.datatools import check_dataset
    from brainseg_lib.locate import find_real_dataset

    found = None if args.dir else find_real_dataset()
    if not args.dir and found is None:
        print("no dataset given and none found (BRAINSEG_DATA, data/brain-tumor-coco)",
              file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else found.path
    report = check_dataset(root, decode=not args.no_decode)
    print(report.format(max_issues=args.max_issues))
    return 1 if report.errors else 0


def _data_download(args: argparse.Namespace) -> int:
    from brainseg_lib.locate import download_dataset

    print(f"dataset saved to {download_dataset(Path(args.dest) if args.dest else None)}")
    return 0


def _data_resize(args: argparse.Namespace) -> int:
    from brainseg_lib.datatools import resize_dataset

    print(f"wrote {resize_dataset(args.src, args.dst, args.size, args.grey)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from brainseg_lib.modeling.train import train

    overrides = parse_overrides(args.set)
    if args.resume:
        overrides["resume"] = args.resume
    if args.run_id:
        overrides["run_id"] = args.run_id
    params = load_params(args.params, **overrides)
    result = train(params, progress=not args.no_progress)
    print(f"run directory: {result.run_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from brainseg_lib.evaluate import evaluate_run

    evaluate_run(args.run_dir, args.split, args.device)
    print(f"wrote {Path(args.run_dir) / f'eval-{args.split}'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from brainseg_lib.modeling.predict import predict_files

    written, skipped = predict_files(args.checkpoint, args.inputs, args.out, args.threshold,
                                     args.tta, args.device)
    print(f"{len(written)} masks written to {args.out}; {len(skipped)} inputs skipped")
    return 0 if written or not skipped else 1


def _main_profile() -> Path:
    """``reference`` where CUDA is available, else the CPU-sized ``quick``."""
    import torch

    return profile_path("reference" if torch.cuda.is_available() else "quick")


def _ensure_dataset(params_file: Path, overrides: dict[str, Any]) -> None:
    """Try a download when no real dataset is found; on failure the run uses the synthetic
    demo (announced loudly by the run itself)."""
    from brainseg_lib.locate import download_dataset, find_real_dataset

    params = load_params(params_file, **overrides)
    if params.synthetic or find_real_dataset(params.data_dir):
        return
    try:
        print(f"no dataset found; downloading it to {download_dataset()}")
    except (RuntimeError, OSError) as err:
        print(f"download failed: {err}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from brainseg_lib.pipeline import run_pipeline

    params_file = _main_profile() if args.params == "auto" else Path(args.params)
    overrides = parse_overrides(args.set)
    if not args.no_download:
        _ensure_dataset(params_file, overrides)
    summary = run_pipeline(params_file, name=args.name, reports_dir=args.reports_dir,
                           overrides=overrides)
    return 0 if summary["status"] == "succeeded" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command",
                                                                        required=True)
    check = data.add_parser("check", help="report on a COCO dataset; exit 1 on errors")
    check.add_argument("dir", nargs="?", help="dataset folder (default: the resolved one)")
    check.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    check.add_argument("--max-issues", type=int, default=50)
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

    tr = sub.add_parser("train", help="train a model from a parameter file")
    tr.add_argument("--params", required=True)
    tr.add_argument("--resume", help="run directory to continue from its last.pt")
    tr.add_argument("--run-id", help="name of the run directory under runs_dir")
    tr.add_argument("--no-progress", action="store_true", help="epoch lines only")
    tr.add_argument("--set", action="append", metavar="KEY=YAML",
                    help="override one parameter, e.g. --set epochs=2")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="evaluate a run's best checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"])
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=_evaluate)

    pr = sub.add_parser("predict", help="write mask and overlay PNGs for images")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--out", required=True)
    pr.add_argument("--threshold", type=float)
    pr.add_argument("--tta", action="store_true")
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=_predict)

    run = sub.add_parser("run", help="execute the four notebooks into a dated report")
    run.add_argument("--params", required=True,
                     help="parameter file, or 'auto': reference on CUDA, quick on CPU")
    run.add_argument("--no-download", action="store_true",
                     help="without a dataset, go straight to the synthetic demo")
    run.add_argument("--name", help="label for the run (default: the profile)")
    run.add_argument("--reports-dir", default=None)
    run.add_argument("--set", action="append", metavar="KEY=YAML",
                     help="override one parameter, e.g. --set epochs=2")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ParamsError, DatasetError, FileNotFoundError, FileExistsError, ValueError,
            RuntimeError) as err:
        print(f"brainseg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
