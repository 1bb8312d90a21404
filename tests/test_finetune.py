"""Fine-tuning from a model folder or a run (``init_from``): the network is checked before
training, the run starts from the parent's weights, and the parent is recorded."""

import json

import pytest
import torch

from brainseg_lib.cli import main
from brainseg_lib.inference.predictor import load_model
from brainseg_lib.model.export import export_model
from brainseg_lib.training.distributed import DistContext
from brainseg_lib.training.loop import TrainingSession, train
from brainseg_lib.training.trainer import validate
from conftest import ROOT, tiny_params


@pytest.fixture(scope="module")
def parent(tmp_path_factory, synthetic_root):
    """A trained resnet18 run and its export: the models fine-tuned from."""
    tmp = tmp_path_factory.mktemp("parent")
    params = tiny_params(tmp, synthetic_root, epochs=3, lr=0.003, run_id="parent",
                         monitor="val_iou", patience=0)
    run = train(params, progress=False).run_dir
    return run, export_model([run], tmp / "models" / "parent")


def test_a_parent_of_another_encoder_fails_before_training(parent, tmp_path, synthetic_root,
                                                            capsys):
    run, _ = parent
    code = main(["train", "--params", str(ROOT / "params" / "smoke.yaml"), "--no-progress",
                 "--set", f"data_dir={synthetic_root}", "--set", "synthetic=false",
                 "--set", "image_size=64", "--set", f"runs_dir={tmp_path / 'runs'}",
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "encoder=resnet34",
                 "--set", f"init_from={run}", "--run-id", "child"])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1, out.err
    assert "the parent is Unet/resnet18" in err[0] and "this run is Unet/resnet34" in err[0]
    assert str(run) in err[0]
    assert "epoch" not in out.out  # nothing trained
    assert not (tmp_path / "runs" / "child").exists()  # not even an empty run folder


@pytest.mark.parametrize("change, theirs, ours", [
    (["image_size=96"], "image_size 64", "image_size 96"),
    (["normalize_mean=[0.5,0.5,0.5]", "normalize_std=[0.25,0.25,0.25]"],
     "mean [0.485, 0.456, 0.406] std [0.229, 0.224, 0.225]",
     "mean [0.5, 0.5, 0.5] std [0.25, 0.25, 0.25]"),
])
def test_a_parent_fed_other_input_is_refused_leaving_no_run_folder(parent, tmp_path,
                                                                   synthetic_root, capsys,
                                                                   change, theirs, ours):
    _, folder = parent
    sets = [f"data_dir={synthetic_root}", "synthetic=false", "image_size=64",
            f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
            "encoder=resnet18", f"init_from={folder}", *change]
    code = main(["train", "--params", str(ROOT / "params" / "smoke.yaml"), "--no-progress",
                 "--run-id", "child", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(folder) in err[0] and theirs in err[0] and ours in err[0]
    assert not (tmp_path / "runs" / "child").exists()


@pytest.mark.parametrize("which", ["model folder", "run directory"])
def test_fine_tuning_starts_from_the_parents_weights(parent, tmp_path, synthetic_root, which):
    run, folder = parent
    source = folder if which == "model folder" else run
    params = tiny_params(tmp_path, synthetic_root, init_from=str(source), run_id="child",
                         epochs=1)
    session = TrainingSession.open(params, DistContext(), {})
    p_model = load_model(source, "cpu").model
    args = (session.valid_batches, session.trainer.loss_fn, params, session.device)
    ours, theirs = validate(session.trainer.eval_model, *args), validate(p_model, *args)
    assert ours == pytest.approx(theirs, abs=1e-6)  # the first validation: the parent's
    assert ours["val_iou"] > 0
    env = json.loads((session.run_dir / "env.json").read_text())
    assert env["parent"]["path"] == str(source)
    assert len(env["parent"]["sha256"]) == 64 and "fine-tuned from" in env["weights"]


def test_frozen_encoder_epochs_train_the_decoder_only(parent, tmp_path, synthetic_root):
    _, folder = parent
    params = tiny_params(tmp_path, synthetic_root, init_from=str(folder), run_id="child",
                         epochs=1, freeze_encoder_epochs=1, monitor="val_loss", patience=0)
    child = train(params, progress=False).run_dir
    before = load_model(folder, "cpu").model.state_dict()
    after = torch.load(child / "last.pt", weights_only=True)["model"]
    weights = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    encoder = [k for k in weights if k.startswith("encoder.")]
    assert all(torch.equal(before[k], after[k].float()) for k in encoder)
    assert any(not torch.equal(before[k], after[k].float()) for k in weights
               if k.startswith("decoder."))
    card = (export_model([child], tmp_path / "m") / "README.md").read_text()
    assert "## Fine-tuned from" in card and str(folder) in card
