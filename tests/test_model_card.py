"""The model card's Hugging Face metadata header parses with huggingface_hub (offline) and
carries the licence, library and test figures; the folder carries a licence file."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from brainseg_lib.cli import main
from brainseg_lib.model.export import export_model
from conftest import ROOT, tiny_params


def _figures(card: ModelCard) -> dict[str, float]:
    return {r.metric_type: r.metric_value for r in card.data.eval_results or []}


def test_the_shipped_models_card_parses_with_its_test_figures():
    folder = ROOT / "models" / "reference"
    card = ModelCard((folder / "README.md").read_text())
    info = json.loads((folder / "brainseg.json").read_text())
    assert card.data.license == "cc-by-4.0"
    assert card.data.library_name == "segmentation-models-pytorch"
    assert {"resnet18", "unet", "medical-imaging"} <= set(card.data.tags)
    assert "resnet18 encoder and decoder widths [128, 64, 32, 16, 8]" in card.text
    headline = info["test_metrics"]["headline"]["metrics"]
    figures = _figures(card)
    assert figures["pooled_iou"] == round(headline["pooled_iou"], 4) == 0.6446
    assert figures["mean_image_dice"] == round(headline["mean_image_dice"], 4)
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert "CC BY 4.0" in (folder / "LICENSE").read_text()
    assert set(info["sha256"]) == {"model.safetensors", "config.json"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_root):
    from brainseg_lib.training.loop import train

    tmp = tmp_path_factory.mktemp("card")
    return train(tiny_params(tmp, synthetic_root, epochs=1, run_id="a", bootstrap=20),
                 progress=False).run_dir


def test_an_exported_card_parses_before_and_after_its_test_is_recorded(run, tmp_path):
    folder = export_model([run], tmp_path / "m")
    card = ModelCard((folder / "README.md").read_text())  # raises on a malformed header
    assert card.data.license == "other" and not card.data.eval_results  # not Kaggle's data
    assert (folder / "LICENSE").is_file()
    assert main(["evaluate", "--model", str(folder), "--record", "--backend", "torch",
                 "--set", f"runs_dir={tmp_path / 'runs'}"]) == 0
    card = ModelCard((folder / "README.md").read_text())
    metrics = json.loads((folder / "brainseg.json").read_text())["test_metrics"]
    assert _figures(card)["pooled_iou"] == round(metrics["headline"]["metrics"]["pooled_iou"],
                                                 4)
    assert card.data.model_name == "brainseg-m"


def test_a_model_trained_on_other_data_is_not_credited_to_the_kaggle_dataset(run, tmp_path,
                                                                            capsys):
    """Bug: every export wrote the Kaggle dataset's CC BY 4.0 licence and credit, also for a
    model trained (or fine-tuned) on a user's own COCO data."""
    folder = export_model([run], tmp_path / "lib")  # a library call: 'unknown', said so
    info = json.loads((folder / "brainseg.json").read_text())
    assert (info["dataset"]["name"], info["dataset"]["licence"]) == ("unknown", "unknown")
    for text in ((folder / "LICENSE").read_text(), (folder / "README.md").read_text()):
        assert "Kaggle" not in text and "CC BY 4.0" not in text
    assert ModelCard((folder / "README.md").read_text()).data.license == "other"
    # the command needs both, naming the run's data record
    assert main(["export", str(run), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run / "env.json") in err[0] and "--dataset-licence" in err[0]
    assert not (tmp_path / "cli").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "cli"), "--dataset-name",
                 "St Elsewhere MRI 2025", "--dataset-licence", "internal use only"]) == 0
    card = ((tmp_path / "cli") / "README.md").read_text()
    assert "St Elsewhere MRI 2025, licence internal use only" in card and "Kaggle" not in card
    assert "internal use only" in (tmp_path / "cli" / "LICENSE").read_text()


def test_a_run_on_the_kaggle_annotations_is_credited_to_them(run, tmp_path):
    kaggle_run = tmp_path / "kaggle-run"
    shutil.copytree(run, kaggle_run)
    env = json.loads((kaggle_run / "env.json").read_text())
    env["dataset"] |= {"annotations_sha256": "1d5a88d9b6437eab",  # a resized copy of it
                       "derived_from": {"source_annotations_sha256": "f5ad933edb55cdc5"}}
    (kaggle_run / "env.json").write_text(json.dumps(env))
    folder = export_model([kaggle_run], tmp_path / "m")
    assert "pkdarabi / Roboflow" in (folder / "LICENSE").read_text()
    assert "(Kaggle pkdarabi / Roboflow COCO export), licence CC BY 4.0" in (
        folder / "README.md").read_text()
    assert ModelCard((folder / "README.md").read_text()).data.license == "cc-by-4.0"
