"""`effnet evaluate` repeats the trainer's figures on its own splits and refuses what it cannot measure;
`effnet predict` answers files as the service's decoder and temperature do, with an error line per bad file."""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cli.main import main as effnet
from store import read_manifest
from tests.support.serving import FASHION_CLASSES, make_checkpoint
from tests.training.tiny import tiny_cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tiny trained checkpoint (with a validation split and a temperature) and two random ones."""
    from training.train import main as train_main

    home = tmp_path_factory.mktemp("bentoml")
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    try:
        trained = train_main(tiny_cfg(tmp_path_factory.mktemp("run"), epochs=1, eval_every=0), progress=False)["tag"]
        fashion = make_checkpoint(home, "fashion-random", "compact", FASHION_CLASSES, 32, grayscale=True)
        # random weights, no validation split; its temperature is set below to show predict applies it
        plain = make_checkpoint(home, "plain-random", "compact", ["a", "b", "c", "d"], 32)
        man_path = read_manifest(plain, home)[1] / "manifest.json"
        man = json.loads(man_path.read_text())
        man_path.write_text(json.dumps({**man, "temperature": 2.5}))
        yield {"home": home, "trained": trained, "fashion": fashion, "plain": plain}
    finally:
        if old is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old


def run(capsys, *argv):
    code = effnet(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_on_the_test_split_gives_the_manifests_own_figures(store, capsys, tmp_path):
    png = tmp_path / "confusion.png"
    code, out, _ = run(capsys, "evaluate", store["trained"], "--data", "fake", "--json", "--png", str(png))
    assert code == 0
    got = json.loads(out)
    m = read_manifest(store["trained"], store["home"])[0].metrics
    assert got["images"] == m["test_images"] == 32
    assert got["top1"] == m["top1"] == got["manifest_top1"] and got["top5"] == m["top5"]
    assert got["per_class"] == m["per_class"]
    assert sum(map(sum, got["confusion"])) == 32
    # the expected calibration error with and without the manifest's temperature, as the trainer recorded it
    assert got["ece"] == pytest.approx(m["score_temperature"]["ece_test_before"], abs=1e-5)
    assert got["ece_with_temperature"] == pytest.approx(m["score_temperature"]["ece_test_after"], abs=1e-5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and got["confusion_png"] == str(png)


def test_evaluate_on_the_validation_split_is_the_one_the_trainer_chose_on(store, capsys, tmp_path):
    code, out, _ = run(capsys, "evaluate", store["trained"], "--data", "fake", "--split", "val", "--no-png")
    assert code == 0
    m = read_manifest(store["trained"], store["home"])[0].metrics
    assert f"val split: {m['val_images']} images" in out
    assert f"top-1  {m['val_top1']:.2%}   (the manifest records {m['val_top1']:.2%} on {m['val_images']} images)" in out
    assert "per class:" in out and not list(tmp_path.iterdir())


@pytest.mark.parametrize("tag, argv, message", [
    ("nope:latest", ["--data", "fake"], "checkpoint 'nope:latest' not found"),
    ("trained", ["--data", "nope"], "unknown data 'nope'"),
    ("trained", ["--data", "imagefolder:/no/such/folder"], "must hold train/ and val/"),
    ("plain", ["--data", "fake", "--split", "val"], "records no validation split"),
    ("trained", ["--data", "imagefolder:/x", "--split", "val"], "use --data fake or --split test"),
    ("fashion", ["--data", "fake"], "has the classes 4 [a, b, c, d], the checkpoint 10 [T-shirt/top"),
])
def test_evaluate_refuses_what_it_cannot_measure_with_exit_2_and_a_message(store, capsys, tag, argv, message):
    code, out, err = run(capsys, "evaluate", store.get(tag, tag), *argv, "--no-png")
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def _png(seed: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert(mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    (folder / "a.png").write_bytes(_png(1))
    (folder / "more" / "b.png").write_bytes(_png(2, "L"))
    (folder / "notes.txt").write_text("not an image, and not named like one: skipped")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"%PDF-1.4 not a picture")
    return folder, bad


def _expected(store, data: bytes) -> np.ndarray:
    """The plain checkpoint's scores for `data`, computed here from its weights and manifest."""
    from store import load_checkpoint, to_model_input
    from store.images import decode_image

    model, man = load_checkpoint(store["plain"], home=store["home"])
    x = torch.from_numpy(decode_image(data, max_pixels=10**7, min_side=man.resolution))
    with torch.no_grad():
        return torch.softmax(model(to_model_input(x, man)) / man.temperature, 1)[0].numpy()


def test_predict_json_answers_every_file_of_a_folder_with_calibrated_scores(store, capsys, files):
    folder, _ = files
    code, out, err = run(capsys, "predict", store["plain"], str(folder), "--json", "--top-k", "3")
    assert code == 0 and err == ""
    got = json.loads(out)
    assert [a["file"] for a in got] == [str(folder / "a.png"), str(folder / "more" / "b.png")]
    for answer, data in zip(got, (_png(1), _png(2, "L"))):
        scores = _expected(store, data)  # divided by the manifest's temperature 2.5
        top = np.argsort(-scores, kind="stable")[:3]
        assert [p["index"] for p in answer["predictions"]] == list(top)
        assert [p["label"] for p in answer["predictions"]] == [["a", "b", "c", "d"][i] for i in top]
        np.testing.assert_allclose([p["score"] for p in answer["predictions"]], scores[top], atol=1e-5)


def test_predict_csv_gives_a_row_per_prediction_and_one_per_failed_file(store, capsys, files):
    folder, bad = files
    code, out, err = run(capsys, "predict", store["plain"], str(folder / "a.png"), str(bad), "--csv", "--top-k", "2")
    assert code == 1 and "1 of 2 file(s) not answered" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["file"], r["rank"]) for r in rows] == [(str(folder / "a.png"), "1"), (str(folder / "a.png"), "2"),
                                                      (str(bad), "")]
    assert float(rows[0]["score"]) >= float(rows[1]["score"]) and rows[0]["error"] == ""
    assert "PDF is not a supported image format" in rows[2]["error"]


def test_predict_table_shows_an_error_line_for_a_bad_file_not_a_traceback(store, capsys, files, tmp_path):
    folder, bad = files
    code, out, err = run(capsys, "predict", store["plain"], str(bad), str(folder / "a.png"), str(tmp_path / "gone.png"))
    lines = out.splitlines()
    assert code == 1 and len(lines) == 3 and "Traceback" not in err
    assert lines[0].startswith(str(bad)) and "error: PDF is not a supported image format" in lines[0]
    assert lines[1].startswith(str(folder / "a.png")) and len(lines[1].split()) == 1 + 2 * 4  # 4 classes: label score
    assert "error: cannot read the file" in lines[2]


def test_predict_refuses_an_empty_folder_and_a_bad_checkpoint_with_exit_2(store, capsys, tmp_path):
    code, _, err = run(capsys, "predict", store["plain"], str(tmp_path))
    assert code == 2 and "no image files under" in err
    code, _, err = run(capsys, "predict", "nope:latest", str(tmp_path))
    assert code == 2
