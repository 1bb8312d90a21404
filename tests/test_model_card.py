"""The model card's Hugging Face metadata header parses with huggingface_hub (offline) and
carries the licence, library and test figures; the folder carries a licence file."""

import json

import pytest
from huggingface_hub import ModelCard

from brainseg_lib.cli import main
from brainseg_lib.model.package import export_model
from conftest import ROOT, tiny_params


def _figures(card: ModelCard) -> dict[str, float]:
    return {r.metric_type: r.metric_value for r in card.data.eval_results or []}


def test_the_shipped_models_card_parses_with_its_test_figures():
    folder = ROOT / "models" / "reference"
    card = ModelCard((folder / "README.md").read_text())
    info = json.loads((folder / "brainseg.json").read_text())
    assert card.data.license == "cc-by-4.0"
    assert card.data.library_name == "segmentation-models-pytorch"
    assert {"resnet34", "unet", "medical-imaging"} <= set(card.data.tags)
    headline = info["test_metrics"]["headline"]["metrics"]
    figures = _figures(card)
    assert figures["pooled_iou"] == round(headline["pooled_iou"], 4) == 0.6108
    assert figures["mean_image_dice"] == round(headline["mean_image_dice"], 4)
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert "CC BY 4.0" in (folder / "LICENSE").read_text()
    assert set(info["sha256"]) == {"model.safetensors"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_root):
    from brainseg_lib.training.loop import train

    tmp = tmp_path_factory.mktemp("card")
    return train(tiny_params(tmp, synthetic_root, epochs=1, run_id="a", bootstrap=20),
                 progress=False).run_dir


def test_an_exported_card_parses_before_and_after_its_test_is_recorded(run, tmp_path):
    folder = export_model([run], tmp_path / "m")
    card = ModelCard((folder / "README.md").read_text())  # raises on a malformed header
    assert card.data.license == "cc-by-4.0" and not card.data.eval_results
    assert (folder / "LICENSE").is_file()
    assert main(["evaluate", "--model", str(folder), "--record", "--backend", "torch",
                 "--set", f"runs_dir={tmp_path / 'runs'}"]) == 0
    card = ModelCard((folder / "README.md").read_text())
    metrics = json.loads((folder / "brainseg.json").read_text())["test_metrics"]
    assert _figures(card)["pooled_iou"] == round(metrics["headline"]["metrics"]["pooled_iou"],
                                                 4)
    assert card.data.model_name == "brainseg-m"
