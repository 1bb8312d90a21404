"""Run folders: one definition of a finished run, train.json and history.csv as every
version wrote them, and the runs 05_compare takes by default."""

import json

import pytest
import yaml

from brainseg_lib.config import ParamsError, load_params
from brainseg_lib.evaluation.compare import find_runs
from brainseg_lib.reporting.pipeline import newest_report_runs
from brainseg_lib.rundir import RunDir, RunFileError, TrainRecord, training_record
from conftest import ROOT

# train.json as the first version wrote it (no compile time, total or EMA flag) ...
OLDEST = {"best_epoch": 7, "best_val_loss": 0.0712, "epochs_run": 12,
          "stop_reason": "early stopping", "train_seconds_this_session": 431.5}
# ... and as the shipped model's run wrote it
NEWEST = {"best_epoch": 49, "best_val_iou": 0.6304613819848206, "epochs_run": 53,
          "stop_reason": "time budget", "train_seconds_this_session": 201.692385359,
          "compile_seconds": 40.54205213999998, "train_seconds_total": 191.33636790900024,
          "ema": False}
HISTORY = """epoch,train_loss,val_loss,val_iou,val_dice,lr,seconds,train_img_per_s
1,0.412,0.301,0.1021,0.1853,0.001,12.4,96.2
2,0.214,0.188,0.3342,0.5009,0.001,11.9,101
"""


def _run(tmp_path, *files, record=NEWEST):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for name in files:
        if name == "train.json":
            (run.path / name).write_text(json.dumps(record))
        elif name == "history.csv":
            (run.path / name).write_text(HISTORY)
        else:
            (run.path / name).write_bytes(b"weights")
    return run


@pytest.mark.parametrize("files, finished", [
    ((), False),
    (("last.pt", "history.csv"), False),  # interrupted
    (("best.pt", "last.pt", "history.csv"), False),  # interrupted, with a model to evaluate
    (("train.json",), False),  # a record without its model
    (("best.pt", "train.json"), True),
])
def test_a_run_is_finished_when_it_has_its_record_and_its_best_model(tmp_path, files,
                                                                      finished):
    run = _run(tmp_path, *files)
    assert run.is_finished == finished
    assert (run.train_record() is not None) == finished
    assert (training_record(run.path) is not None) == finished


def test_the_oldest_train_json_loads_with_defaults_for_what_came_later(tmp_path):
    run = _run(tmp_path, "best.pt", "train.json", record=OLDEST)
    record = run.train_record()
    assert (record.monitor, record.best_value, record.best_epoch) == ("val_loss", 0.0712, 7)
    assert record.train_seconds_total is None and record.compile_seconds == 0.0
    assert not record.ema
    assert {k: v for k, v in record.to_json().items() if k in OLDEST} == OLDEST


def test_the_newest_train_json_round_trips_unchanged_keys_unknown_ones_included(tmp_path):
    precision = {"name": "bf16", "reason": "forced by amp: bf16", "cpu_bf16_flags": [],
                 "probe_seconds_per_step": None}
    stored = NEWEST | {"precision": precision, "energy_joules": 12.5}  # a later key too
    run = _run(tmp_path, "best.pt", "train.json", record=stored)
    record = run.train_record()
    assert record.precision == precision and record.extra == {"energy_joules": 12.5}
    run.write_train_record(record)
    assert json.loads((run.path / "train.json").read_text()) == stored
    assert TrainRecord.from_json(record.to_json(), "x") == record


def test_a_train_json_that_is_no_record_names_the_file(tmp_path):
    broken = {k: v for k, v in NEWEST.items() if k != "epochs_run"}
    run = _run(tmp_path, "best.pt", "train.json", record=broken)
    with pytest.raises(RunFileError, match=r"run/train.json: .*missing epochs_run"):
        run.train_record()


def test_history_reads_what_training_wrote_and_writes_it_back(tmp_path):
    run = _run(tmp_path, "history.csv")
    rows = run.history()
    assert [r["epoch"] for r in rows] == [1, 2] and isinstance(rows[0]["epoch"], int)
    assert rows[1]["val_iou"] == 0.3342
    run.write_history(rows)
    assert run.history() == rows
    assert RunDir(tmp_path / "none").history() == []


def test_where_a_run_trained_comes_from_its_environment_record(tmp_path):
    run = _run(tmp_path, "best.pt", "train.json")
    assert training_record(run.path)["device"] == "an unrecorded device"
    (run.path / "env.json").write_text(json.dumps({"device": "cuda:0", "gpu": "NVIDIA H200",
                                                   "trained_on": "shipped model m"}))
    assert training_record(run.path) == NEWEST | {"device": "NVIDIA H200",
                                                  "trained_on": "shipped model m"}


def test_compare_defaults_to_the_runs_of_the_newest_report_that_exist_here(tmp_path):
    runs_dir, reports = tmp_path / "runs", tmp_path / "reports"
    for run_id in ("a", "b", "old"):
        (runs_dir / run_id).mkdir(parents=True)
        (runs_dir / run_id / "best.pt").write_bytes(b"weights")
    for day, run_id in (("2026-01-01", "old"), ("2026-01-02", "b"), ("2026-01-02", "a"),
                        ("2026-01-02", "gone")):  # "gone" was reported elsewhere
        (reports / day / run_id).mkdir(parents=True)
        (reports / day / run_id / "summary.json").write_text(json.dumps({"run_id": run_id}))
    newest = newest_report_runs(runs_dir, reports)
    assert newest == [runs_dir / "a", runs_dir / "b", runs_dir / "gone"]
    assert find_runs([], runs_dir, newest) == [runs_dir / "a", runs_dir / "b"]
    assert newest_report_runs(runs_dir, tmp_path / "no-reports") == []
    with pytest.raises(FileNotFoundError, match="no evaluated run"):
        find_runs([], runs_dir, [])  # nothing evaluated to fall back on


def test_brainseg_train_refuses_parameters_that_report_on_a_model_in_one_line(tmp_path,
                                                                              capsys):
    from brainseg_lib.cli import main

    code = main(["train", "--params", str(ROOT / "params" / "reference.yaml"),
                 "--set", f"runs_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "report_model is set (models/reference)" in err and "report_model=" in err
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


def test_model_dir_is_read_from_records_as_report_model_and_refused_in_new_files(tmp_path):
    run = RunDir(tmp_path / "old-run")
    run.path.mkdir()
    saved = load_params(ROOT / "params" / "smoke.yaml").to_dict()
    saved["model_dir"] = saved.pop("report_model")  # as a run saved before the rename
    (run.path / "params.yaml").write_text(yaml.safe_dump(saved))
    assert run.params().report_model == ""
    old_file = tmp_path / "old.yaml"
    old_file.write_text("profile: mine\nmodel_dir: models/reference\n")
    with pytest.raises(ParamsError, match=r"old.yaml: parameter renamed: 'model_dir' is now "
                                          r"'report_model'"):
        load_params(old_file)


@pytest.mark.parametrize("path", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_profile_validates(path):
    load_params(path)


@pytest.mark.parametrize("path", sorted((ROOT / "params" / "grids").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_committed_grid_validates(path):
    from brainseg_lib.experiments.sweep import read_grid

    grid = read_grid(path)
    assert all(load_params(grid["base"], **(grid["common"] | v)).report_model == ""
               for v in grid.get("variants", {}).values())  # a sweep trains
