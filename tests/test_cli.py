"""``brainseg data check`` and parameter errors from the command line."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from brainseg_lib.cli import main
from brainseg_lib.data.coco import ANNOTATION_FILE
from conftest import ROOT


def test_data_check_on_a_clean_dataset(synthetic_root, capsys):
    assert main(["data", "check", str(synthetic_root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    columns = next(line.split() for line in lines if line.startswith("split "))[1:6]
    table = {words[0]: dict(zip(columns, map(int, words[1:6]), strict=True))
             for words in map(str.split, lines)
             if words[:1] in (["train"], ["valid"], ["test"]) and len(words) > 5}
    # each split's counts as its annotation file has them (the synthetic tumours are boxes)
    expected = {}
    for split in ("train", "valid", "test"):
        coco = json.loads((synthetic_root / split / ANNOTATION_FILE).read_text())
        per_image = [sum(a["image_id"] == img["id"] for a in coco["annotations"])
                     for img in coco["images"]]
        expected[split] = {"images": len(coco["images"]), "annots": len(coco["annotations"]),
                           "rects": len(coco["annotations"]),
                           "no-ann": per_image.count(0), "multi": sum(n > 1 for n in per_image)}
    assert table == expected
    assert [table[s]["images"] for s in ("train", "valid", "test")] == [16, 6, 6]
    assert re.search(r"errors: (\d+), warnings: (\d+)", out).groups() == ("0", "0")


def test_data_check_exits_non_zero_and_names_the_file(synthetic_root, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(synthetic_root, root)
    data = json.loads((root / "train" / ANNOTATION_FILE).read_text())
    data["annotations"].append({"id": 999, "image_id": 4242, "category_id": 1,
                                "bbox": [0, 0, 2, 2], "segmentation": []})
    (root / "train" / ANNOTATION_FILE).write_text(json.dumps(data))
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "[error] train:" in out and "unknown image id 4242" in out


def test_train_with_an_unknown_key_fails_before_work(tmp_path, capsys):
    f = tmp_path / "p.yaml"
    f.write_text("profile: x\nepochz: 3\n")
    assert main(["train", "--params", str(f)]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_download_offline_fails_fast_with_manual_steps(monkeypatch, capsys):
    from brainseg_lib.data import locate

    monkeypatch.setattr(locate, "_online", lambda *a, **k: False)
    assert main(["data", "download"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach Kaggle" in err and "BRAINSEG_DATA" in err


def test_auto_params_pick_the_cpu_profile_without_cuda(monkeypatch):
    import torch

    from brainseg_lib.cli import _main_profile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _main_profile().name == "quick.yaml"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _main_profile().name == "reference.yaml"


def _brainseg(*argv: str, **env: str) -> subprocess.CompletedProcess:
    """``brainseg ARGV`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "brainseg_lib.cli", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT)} | env)


def test_a_user_error_is_one_line_and_exit_2_with_its_traceback_on_request(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("profile: x\nepochs: many\n")
    done = _brainseg("train", "--params", str(bad))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"brainseg: error: {bad}: parameter 'epochs' = 'many': expected <class 'int'>"]
    debug = _brainseg("train", "--params", str(bad), BRAINSEG_DEBUG="1")
    assert debug.returncode == 2
    assert debug.stderr.startswith("Traceback") and "ParamsError" in debug.stderr
    assert debug.stderr.splitlines()[-1] == done.stderr.strip()


def test_a_bug_is_not_dressed_as_a_user_error(tmp_path, monkeypatch, capsys):
    from brainseg_lib.data import resize

    def shape_bug(*_args):  # what a torch shape error or CUDA out-of-memory raises
        raise RuntimeError("The size of tensor a (64) must match the size of tensor b (32)")

    monkeypatch.setattr(resize, "resize_dataset", shape_bug)
    with pytest.raises(RuntimeError, match="size of tensor a"):
        main(["data", "resize", str(tmp_path / "a"), str(tmp_path / "b")])
    assert "brainseg: error" not in capsys.readouterr().err


BUGGY_BRAINSEG = """
import sys
from brainseg_lib.data import resize
def out_of_memory(*_args):
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
resize.resize_dataset = out_of_memory
from brainseg_lib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_in_a_real_process_keeps_its_traceback_and_exit_status(tmp_path):
    done = subprocess.run([sys.executable, "-c", BUGGY_BRAINSEG, "data", "resize",
                           str(tmp_path), str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 1  # Python's own status for an uncaught exception, not 2
    assert done.stderr.startswith("Traceback") and "in out_of_memory" in done.stderr
    assert "brainseg: error" not in done.stderr


def test_a_bad_set_value_is_one_line(capsys):
    assert main(["train", "--params", "params/smoke.yaml", "--set", "epochs=[1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set 'epochs=[1'" in err
