"""The typed evaluation record keeps metrics.json exactly as it was, and the evaluation's
settings stay the evaluation group of the parameters."""

import dataclasses
import json

import pytest

from brainseg_lib.config import Params, names
from brainseg_lib.errors import BrainsegError
from brainseg_lib.evaluation.records import console_summary
from brainseg_lib.evaluation.result import EvalSettings, Evaluation, MetricBlock, SettingScores
from brainseg_lib.reporting import headline
from conftest import ROOT

# metrics.json of the shipped model on the real test split, as `brainseg evaluate --model
# models/reference` wrote it at the commit before the typed record (53edf26), untouched
BEFORE = ROOT / "tests" / "data" / "metrics_before_records.json"
CARD = ROOT / "models" / "reference" / "brainseg.json"


def _record() -> dict:
    return json.loads(BEFORE.read_text())


@pytest.mark.parametrize("load", [_record, lambda: json.loads(CARD.read_text())["test_metrics"]],
                         ids=["metrics.json", "model card"])
def test_a_written_record_reads_back_to_the_same_json_key_for_key_in_order(load):
    x = load()
    again = Evaluation.from_json(x).to_json()
    assert again == x
    assert json.dumps(again) == json.dumps(x)  # the same order too: the file is unchanged


def test_the_record_reads_fields_not_composed_keys():
    x = _record()
    record = Evaluation.from_json(x)
    assert record.headline.full.metrics == x["headline"]["metrics"]
    assert record.headline.clean.ci95 == x["headline_clean"]["ci95"]
    by_size = record.scores["selected_original_resolution"].groups["size_quintile"]
    assert by_size["Q1"].images == x["selected_original_resolution_by_size_quintile"]["Q1"][
        "images"]
    assert record.header.clean_test.images == x["clean_test"]["images"] < x["dataset"]["images"]
    assert record.calibration.scaled.reliability == x["calibration"]["temperature_scaled"][
        "reliability"]
    assert dataclasses.asdict(record.header.chosen) == x["chosen_on_valid"]


def test_a_record_without_clean_subset_or_intervals_writes_neither():
    x = {k: v for k, v in _record().items() if not k.endswith("_clean")}
    x.pop("clean_test")
    x["calibration"] = {k: v for k, v in x["calibration"].items() if not k.endswith("_clean")}
    x["headline"] = {k: v for k, v in x["headline"].items() if k != "ci95"}
    record = Evaluation.from_json(x)
    assert record.headline.clean is None and record.headline.full.ci95 is None
    assert record.to_json() == x
    assert "clean subset" not in console_summary(record)


def test_a_group_block_writes_its_image_count_first():
    block = MetricBlock("s", {"pooled_iou": 0.5}, {"pooled_iou": [0.4, 0.6]}, images=7)
    assert list(block.to_json()) == ["images", "setting", "metrics", "ci95"]
    scores = SettingScores(block, None, {"subclass": {"0": block}})
    assert list(scores.to_json("selected")) == ["selected", "selected_by_subclass"]


@pytest.mark.parametrize("change", [lambda x: x.pop("headline"), lambda x: x.pop("loss"),
                                    lambda x: x.update(headline_typo={})])
def test_a_record_that_an_evaluation_would_not_write_is_a_one_line_error(change):
    x = _record()
    change(x)
    with pytest.raises(BrainsegError, match="metrics record"):
        Evaluation.from_json(x)


def test_eval_settings_are_the_evaluation_group_of_params():
    """Same names, in order, same types and defaults: a parameter added to the evaluation
    group (or changed) must be added here too."""
    ours = dataclasses.fields(EvalSettings)
    theirs = Params.__dataclass_fields__
    assert tuple(f.name for f in ours) == names(groups=("evaluation",))
    for f in ours:
        assert (f.type, f.default) == (theirs[f.name].type, theirs[f.name].default), f.name
    assert dataclasses.asdict(EvalSettings.from_params(Params())) == dataclasses.asdict(
        EvalSettings())


def test_reports_read_the_typed_record_and_the_json_alike():
    x = _record()
    record = Evaluation.from_json(x)
    assert headline.evaluation_headline(record) == headline.evaluation_headline(x)
    assert headline.table_notes(record) == headline.table_notes(x)
    assert headline.settings_table(record).equals(headline.settings_table(x))
    raw = x["calibration"]["raw"]  # a calibration block has no setting: read all the same
    assert headline.block_figure(raw, "ece", 4) == headline.block_figure(
        record.calibration.raw, "ece", 4) == f"{raw['metrics']['ece']:.4f} [" + ", ".join(
        f"{v:.3f}" for v in raw["ci95"]["ece"]) + "]"
