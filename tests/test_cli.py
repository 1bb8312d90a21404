"""``brainseg data check`` and parameter errors from the command line."""

import json
import re
import shutil

from brainseg_lib.cli import main
from brainseg_lib.data.coco import ANNOTATION_FILE


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
