"""Model factory: weight provenance, offline fallback in seconds, local weight files."""

import time

import pytest
import torch

from brainseg_lib.model import network as model_module
from brainseg_lib.model.network import PretrainedWeightsError, create_model


def test_random_init_gives_one_logit_channel():
    net, provenance = create_model("Unet", "resnet18", "none")
    assert "random" in provenance
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_offline_imagenet_falls_back_with_a_warning_within_the_probe_timeout(monkeypatch):
    # offline, simulated with the real probe: the hub's address is one nothing answers on
    # (192.0.2.0/24 is reserved for documentation), and the weights are not cached locally
    monkeypatch.setattr(model_module, "HUB_HOST", "192.0.2.1")
    monkeypatch.setattr(model_module, "_cached_imagenet_file", lambda encoder: None)
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="falling back to random initialisation"):
        net, provenance = create_model("Unet", "resnet18", "imagenet")
    # the 2 s probe decides, not huggingface_hub's own retries (~25 s offline)
    assert time.perf_counter() - t0 < 10
    assert provenance == "random initialisation (ImageNet weights unavailable offline)"
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_offline_imagenet_with_require_pretrained_is_an_error(monkeypatch):
    monkeypatch.setattr(model_module, "_hub_reachable", lambda timeout=2.0: False)
    monkeypatch.setattr(model_module, "_cached_imagenet_file", lambda encoder: None)
    with pytest.raises(PretrainedWeightsError, match="require_pretrained"):
        create_model("Unet", "resnet18", "imagenet", require_pretrained=True)


def test_local_weights_file(tmp_path):
    source, _ = create_model("Unet", "resnet18", "none")
    torch.save(source.encoder.state_dict(), tmp_path / "enc.pth")
    net, provenance = create_model("Unet", "resnet18", str(tmp_path / "enc.pth"))
    assert str(tmp_path / "enc.pth") in provenance
    key = "conv1.weight"
    assert torch.equal(net.encoder.state_dict()[key], source.encoder.state_dict()[key])
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(PretrainedWeightsError, match="bad.pth"):
        create_model("Unet", "resnet18", str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError):
        create_model("Unet", "resnet18", str(tmp_path / "missing.pth"))


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture or encoder"):
        create_model("Unet", "resnet-3000", "none")


def test_an_encoder_weights_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv1.weight": Trap()}, tmp_path / "evil.pth")
    with pytest.raises(PretrainedWeightsError, match="evil.pth: refused"):
        create_model("Unet", "resnet18", str(tmp_path / "evil.pth"))
    assert not marker.exists()
