"""Model artifacts: safe checkpoints, smp model folders, and one-line errors for bad files."""

import json
import pickle
import pickletools
import shutil
import zipfile

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from PIL import Image

from brainseg_lib.cli import main
from brainseg_lib.inference.predictor import load_model, predict_logits
from brainseg_lib.model.checkpoint import ArtifactError, read_checkpoint, save_checkpoint
from brainseg_lib.model.export import export_model
from brainseg_lib.model.folder import networks_from_model_dir
from brainseg_lib.model.run_folder import run_folder_from_model
from conftest import tiny_params


class Trap:
    """Unpickling this writes a file: the visible side effect a malicious checkpoint has."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def malicious_checkpoint(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil" / "best.pt"
    path.parent.mkdir()
    torch.save({"model": {}, "params": {}, "payload": Trap(marker)}, path)
    assert not marker.exists()
    # the trap is real: the pickle calls open() when unpickled (read without unpickling)
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    calls = [arg for op, arg, _ in pickletools.genops(pickled)
             if op.name in ("GLOBAL", "STACK_GLOBAL") or op.name.endswith("UNICODE")]
    assert any("open" in str(arg) for arg in calls)
    return path, marker


def test_checkpoints_hold_only_plain_values(trained_run, tmp_path):
    for name in ("best.pt", "last.pt"):
        state = read_checkpoint(trained_run / name)  # weights_only=True inside
        assert "model" in state and isinstance(state["params"], dict)
    with pytest.raises(TypeError, match="float64"):
        save_checkpoint(tmp_path / "x.pt", {"value": np.float64(1.0)})


def test_a_malicious_checkpoint_is_refused_and_never_executed(malicious_checkpoint, tmp_path,
                                                              synthetic_root, capsys):
    path, marker = malicious_checkpoint
    with pytest.raises(ArtifactError, match="refused"):
        read_checkpoint(path)
    image = synthetic_root / "test" / sorted(p.name for p in (synthetic_root / "test").glob(
        "*.jpg"))[0]
    commands = [
        ["predict", str(image), "--checkpoint", str(path), "--out", str(tmp_path / "p1")],
        ["predict", str(image), "--model", str(path.parent), "--out", str(tmp_path / "p2")],
        ["evaluate", str(path.parent)],
        ["export", str(path.parent), "--out", str(tmp_path / "m")],
        ["train", "--params", "params/smoke.yaml", "--resume", str(path.parent)],
    ]
    (path.parent / "last.pt").write_bytes(path.read_bytes())
    (path.parent / "params.yaml").write_text("profile: smoke\n")
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refused" in err and str(path.parent) in err
        assert not marker.exists(), argv
    assert not (tmp_path / "m").exists() and not (tmp_path / "p1").exists()


def test_truncated_and_foreign_checkpoints_are_one_line_errors(trained_run, synthetic_root,
                                                               tmp_path, capsys):
    image = str(next((synthetic_root / "test").glob("*.jpg")))
    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained_run / "best.pt").read_bytes()[:5000])
    assert main(["predict", image, "--checkpoint", str(cut), "--out", str(tmp_path / "o")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    state = read_checkpoint(trained_run / "best.pt")
    state["params"]["encoder"] = "resnet34"  # resnet18 weights under a resnet34 label
    save_checkpoint(tmp_path / "other.pt", state)
    assert main(["predict", image, "--checkpoint", str(tmp_path / "other.pt"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "do not fit Unet/resnet34" in err and "other.pt" in err


def test_export_roundtrip_smp_format_and_model_card(trained_run, tmp_path):
    out = export_model([trained_run], tmp_path / "models" / "tiny")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                              "brainseg.json", "README.md"}
    card = (out / "README.md").read_text()
    for needed in ("not a medical device", "licence unknown", "annotations sha256",
                   "Intended use", "epochs on"):
        assert needed in card
    precision = json.loads((trained_run / "train.json").read_text())["precision"]["name"]
    assert f"epochs on cpu in {precision}," in card  # bf16 training on a CPU is said
    assert "encoder and smp's default decoder" in card  # the smoke network's decoder
    assert "Kaggle" not in card  # trained on the synthetic set, not the Kaggle dataset
    # smp itself reads it (fp16 weights), and so do we, offline and fast
    by_smp = smp.from_pretrained(str(out))
    members, params, info = networks_from_model_dir(out)
    original = load_model(trained_run)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    exported = load_model(out)
    diff = (predict_logits(original, x) - predict_logits(exported, x)).abs().max()
    assert diff < 0.05  # fp16 storage
    assert info.stored_as == "float16" and params.encoder == "resnet18"
    assert sum(p.numel() for p in by_smp.parameters()) == sum(
        p.numel() for p in members[0].parameters())


def test_predict_and_evaluate_with_a_model_folder(trained_run, tmp_path, synthetic_root,
                                                  capsys):
    model_dir = export_model([trained_run], tmp_path / "m")
    image = next((synthetic_root / "test").glob("*.jpg"))
    assert main(["predict", str(image), "--model", str(model_dir), "--out",
                 str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / f"{image.stem}_mask.png").exists()
    assert main(["evaluate", "--model", str(model_dir), "--set", "threshold=0.3",
                 "--set", f"runs_dir={tmp_path / 'runs'}"]) == 0
    per_image = (tmp_path / "runs" / "model-m" / "eval-test" / "per_image.csv").read_text()
    assert "threshold_headline" in per_image and ",0.3," in per_image


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").unlink(), "weights missing"),
    (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "config.json: sha256"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 100), "differs from"),
    (lambda d: shutil.rmtree(d), "not found"),
])
def test_broken_model_folders_are_one_line_errors(trained_run, tmp_path, capsys, damage,
                                                  message, synthetic_root):
    model_dir = export_model([trained_run], tmp_path / "m")
    damage(model_dir)
    image = next((synthetic_root / "test").glob("*.jpg"))
    if model_dir.exists():
        with pytest.raises(ArtifactError, match=message):
            networks_from_model_dir(model_dir)
    code = main(["predict", str(image), "--model", str(model_dir), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_run_folder_from_a_model_refuses_other_training_parameters(trained_run, tmp_path):
    model_dir = export_model([trained_run], tmp_path / "m")
    params = json.loads((model_dir / "brainseg.json").read_text())["params"]
    from brainseg_lib.config import params_from_dict

    same = params_from_dict(params)
    run = run_folder_from_model(model_dir, tmp_path / "runs" / "r", expected=same)
    assert (run / "best.pt").exists() and (run / "train.json").exists()
    with pytest.raises(ArtifactError, match="lr: given 0.5"):
        run_folder_from_model(model_dir, tmp_path / "runs" / "r2",
                    expected=params_from_dict(params | {"lr": 0.5}))


def test_pickle_error_type_is_what_torch_raises(tmp_path):
    """read_checkpoint maps torch's refusal; keep the assumption checked."""
    torch.save({"x": Trap(tmp_path / "m")}, tmp_path / "t.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "t.pt", weights_only=True)
    assert not (tmp_path / "m").exists()


def test_greyscale_input_predicts(trained_run, tmp_path):
    grey = tmp_path / "g.png"
    Image.fromarray(np.full((50, 70), 90, np.uint8)).save(grey)
    assert main(["predict", str(grey), "--model", str(trained_run), "--out",
                 str(tmp_path / "o")]) == 0
    mask = np.asarray(Image.open(tmp_path / "o" / "g_mask.png"))
    assert mask.shape == (50, 70)


def _contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synthetic_root):
    """One run trained once for the module; the tests only read it (exports, predictions and
    damaged copies go to their own tmp_path), and teardown checks that none wrote to it."""
    tmp = tmp_path_factory.mktemp("artifacts")
    from brainseg_lib.training.loop import train

    params = tiny_params(tmp, synthetic_root, epochs=1, limit_train_images=4, run_id="a",
                         bootstrap=0)
    run_dir = train(params, progress=False).run_dir
    before = _contents(run_dir)
    yield run_dir
    assert _contents(run_dir) == before, "a test changed the module's shared run"
