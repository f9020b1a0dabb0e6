"""The command line attacked through its arguments and its outputs.

Outputs: no output may overwrite an input (same path, a symlink or a hard
link to it), two outputs may not collide, an image is written in the format
its suffix names (masks: lossless only), a failed run leaves no file and no
partial set, and files get mode 0o666 & ~umask. Arguments: a count, a thread
number, a device or a fraction out of range ends every command with one line
and exit status 2 before any work.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _serve_fixtures import png_bytes, red_square_image, tiny_lts_file
from fixtures import make_refcoco
from PIL import Image

from refseg.argtypes import check_device
from refseg.cli import main as cli


def run(argv) -> int:
    """refseg.cli.main's exit status, argparse's SystemExit included."""
    try:
        return cli([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def one_line_error(capsys, command: str, *names) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"refseg {command}: error:"), err
    for name in names:
        assert str(name) in err, err
    return err


def files_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def terminal_line(text: str) -> str:
    """What a terminal shows for one line of output: each carriage return writes again from column 0."""
    shown = ""
    for part in text.split("\r"):
        shown = part + shown[len(part):]
    return shown


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_lts_file(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(red_square_image()))
    return path


# ---- outputs that would destroy an input ---------------------------------------------------------


@pytest.mark.parametrize("flag", ["--out", "--mask-out"])
@pytest.mark.parametrize("how", ["same-path", "symlink", "hard-link", "dotted-path"])
def test_predict_refuses_an_output_that_is_the_input_image(tmp_path, capsys, photo, flag, how):
    before = photo.read_bytes()
    target = {"same-path": photo, "dotted-path": tmp_path / "." / "photo.png",
              "symlink": tmp_path / "link.png", "hard-link": tmp_path / "hard.png"}[how]
    if how == "symlink":
        target.symlink_to(photo)
    elif how == "hard-link":
        os.link(photo, target)
    listing = files_under(tmp_path)
    # the model does not exist: the refusal must come before it is loaded
    assert run(["predict", "--model", tmp_path / "no-model", "--image", photo, "--text", "the red square",
                flag, target]) == 2
    one_line_error(capsys, "predict", str(target), "--image")
    assert photo.read_bytes() == before
    assert files_under(tmp_path) == listing


def test_predict_refuses_an_output_that_is_the_model_card(tmp_path, capsys, weights, photo):
    card = weights.with_suffix(".json")
    before = card.read_bytes()
    assert run(["predict", "--model", weights, "--image", photo, "--text", "x", "--out", card]) == 2
    one_line_error(capsys, "predict", str(card), "--model")
    assert card.read_bytes() == before


def test_predict_refuses_two_outputs_of_the_same_file(tmp_path, capsys, photo):
    assert run(["predict", "--model", tmp_path / "no-model", "--image", photo, "--text", "x",
                "--out", tmp_path / "o.png", "--mask-out", tmp_path / "O.PNG"]) == 2
    one_line_error(capsys, "predict", "--out", "--mask-out", "O.PNG")
    assert files_under(tmp_path) == ["photo.png"]


def test_export_refuses_to_overwrite_the_model_card(tmp_path, capsys, weights):
    card = weights.with_suffix(".json")
    before = card.read_bytes()
    assert run(["export", "--model", weights, "--out", weights.with_suffix("")]) == 2
    one_line_error(capsys, "export", str(card), "--model")
    assert card.read_bytes() == before


def test_eval_refuses_to_overwrite_its_data(tmp_path, capsys):
    fx = make_refcoco(tmp_path / "data")
    instances = fx.root / "instances.json"
    before = instances.read_bytes()
    assert run(["eval", "--checkpoint", tmp_path / "no-model", "--data", fx.root, "--split", "val",
                "--out", instances]) == 2
    one_line_error(capsys, "eval", str(instances), "--data")
    assert instances.read_bytes() == before


def test_weaken_refuses_to_replace_its_own_data(tmp_path, capsys):
    fx = make_refcoco(tmp_path / "data")
    listing = files_under(fx.root)
    assert run(["weaken", "--data", fx.root, "--accurate-fraction", "0.5", "--out", fx.root, "--overwrite"]) == 2
    one_line_error(capsys, "weaken", "--out", "--data")
    assert files_under(fx.root) == listing


# ---- formats, collisions, all-or-nothing, modes ---------------------------------------------------


def test_predict_writes_the_format_its_suffix_names_with_the_umask_mode(tmp_path, capsys, weights, photo):
    old = os.umask(0o027)
    try:
        argv = ["predict", "--model", weights, "--image", photo, "--text", "the red square", "--text", "grey",
                "--out", tmp_path / "overlay.jpg", "--mask-out", tmp_path / "mask.tif"]
        assert run(argv) == 0
    finally:
        os.umask(old)
    with Image.open(tmp_path / "overlay.jpg") as im:
        assert im.format == "JPEG"
    for k in range(2):
        with Image.open(tmp_path / f"mask_{k}.tif") as im:
            assert im.format == "TIFF" and set(np.unique(np.asarray(im)).tolist()) <= {0, 255}
    for name in ("overlay.jpg", "mask_0.tif", "mask_1.tif"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert files_under(tmp_path) == ["mask_0.tif", "mask_1.tif", "overlay.jpg", "photo.png"]


@pytest.mark.parametrize("flag, name, says", [
    ("--mask-out", "mask.jpg", "lossy"),
    ("--mask-out", "mask.jpeg", "lossy"),
    ("--out", "overlay.xyz", "'.xyz'"),
    ("--out", "overlay", "no suffix"),
    ("--mask-out", "mask.psd", "'.psd'"),  # Pillow reads PSD, never writes it
])
def test_predict_refuses_a_suffix_it_cannot_honour(tmp_path, capsys, photo, flag, name, says):
    assert run(["predict", "--model", tmp_path / "no-model", "--image", photo, "--text", "x",
                flag, tmp_path / name]) == 2
    one_line_error(capsys, "predict", flag, name, says)
    assert files_under(tmp_path) == ["photo.png"]


@pytest.mark.parametrize("names", [("a.png", "a.jpg"), ("sub/x.png", "sub__x.png"), ("Cat.png", "cat.png")],
                         ids=["suffix", "folder-flattened", "case"])
def test_predict_batch_refuses_outputs_that_collide(tmp_path, capsys, names):
    images = tmp_path / "images"
    for name in names:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(png_bytes(red_square_image()))
    (tmp_path / "q.csv").write_text("image,text\n" + "".join(f"{n},the red square\n" for n in names))
    out = tmp_path / "out"
    assert run(["predict", "--model", tmp_path / "no-model", "--images", images, "--queries", tmp_path / "q.csv",
                "--out-dir", out]) == 2
    one_line_error(capsys, "predict", *names)
    assert not out.exists()


def test_predict_batch_refuses_to_replace_an_input_image(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "a_overlay.png"):
        (images / name).write_bytes(png_bytes(red_square_image()))
    before = (images / "a_overlay.png").read_bytes()
    (tmp_path / "q.csv").write_text("image,text\na.png,the red square\na_overlay.png,the red square\n")
    assert run(["predict", "--model", tmp_path / "no-model", "--images", images, "--queries", tmp_path / "q.csv",
                "--out-dir", images]) == 2
    one_line_error(capsys, "predict", "a_overlay.png", "--images")
    assert (images / "a_overlay.png").read_bytes() == before
    assert files_under(images) == ["a.png", "a_overlay.png"]


def test_predict_batch_failure_leaves_no_partial_set(tmp_path, capsys, weights, monkeypatch):
    import refseg.vis

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(png_bytes(red_square_image()))
    (tmp_path / "q.csv").write_text("image,text\na.png,the red square\nb.png,the red square\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_0.png").write_bytes(b"an older result")
    real, calls = refseg.vis.overlay, []

    def overlay_then_disk_full(*args, **kwargs):  # the second image's overlay fails as on a full disk
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(out / "b_overlay.png"))
        return real(*args, **kwargs)

    monkeypatch.setattr(refseg.vis, "overlay", overlay_then_disk_full)
    assert run(["predict", "--model", weights, "--images", images, "--queries", tmp_path / "q.csv",
                "--out-dir", out, "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().split("\n")[-1]
    assert "No space left on device" in err.split("\r")[-1]
    assert len(calls) == 2
    assert files_under(out) == ["a_0.png"] and (out / "a_0.png").read_bytes() == b"an older result"


def test_eval_outputs_follow_the_umask(tmp_path, capsys, weights):
    fx = make_refcoco(tmp_path / "data")
    old = os.umask(0o002)
    try:
        assert run(["eval", "--checkpoint", weights, "--data", fx.root, "--split", "val", "--device", "cpu",
                    "--threads", "1", "--out", tmp_path / "r.json", "--markdown", tmp_path / "r.md",
                    "--save-vis", "1", "--vis-dir", tmp_path / "vis"]) == 0
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["n"] == 1
    for path in (tmp_path / "r.json", tmp_path / "r.md", tmp_path / "vis" / "1003.png"):
        assert path.stat().st_mode & 0o777 == 0o664, path
    assert files_under(tmp_path / "vis") == ["1003.png"]


def test_an_error_never_lands_on_the_line_of_a_progress_bar(tmp_path, capsys, weights):
    fx = make_refcoco(tmp_path / "data")
    image = fx.root / "images" / "COCO_train2014_000000000001.jpg"
    image.write_bytes(image.read_bytes()[:200])  # header intact, pixel data cut
    assert run(["eval", "--checkpoint", weights, "--data", fx.root, "--split", "train", "--batch-size", "1",
                "--device", "cpu", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "eval train" in err  # the bar was drawn
    shown = terminal_line(err.rstrip("\n").split("\n")[-1])
    assert shown.startswith("refseg eval: error:") and "COCO_train2014_000000000001.jpg" in shown, repr(err)


# ---- arguments: one line, exit 2, before any work ----------------------------------------------------

BAD_ARGUMENTS = [
    (["predict", "--image", "x.png", "--text", "x"], "--threads", "-1"),
    (["predict", "--image", "x.png", "--text", "x"], "--device", "banana"),
    (["predict", "--image", "x.png", "--text", "x"], "--device", "cuda:99"),
    (["predict", "--image", "x.png", "--text", "x"], "--threshold", "nan"),
    (["predict", "--image", "x.png", "--text", "x"], "--threshold", "1.5"),
    (["eval", "--checkpoint", "m", "--data", "d"], "--batch-size", "0"),
    (["eval", "--checkpoint", "m", "--data", "d"], "--batch-size", "-4"),
    (["eval", "--checkpoint", "m", "--data", "d"], "--max-samples", "-1"),
    (["eval", "--checkpoint", "m", "--data", "d"], "--save-vis", "-2"),
    (["eval", "--checkpoint", "m", "--data", "d"], "--threads", "-1"),
    (["eval", "--checkpoint", "m", "--data", "d"], "--device", "banana"),
    (["make-data", "--out", "o"], "--seed", "-1"),
    (["make-data", "--out", "o"], "--workers", "0"),
    (["make-data", "--out", "o"], "--no-target-fraction", "1.5"),
    (["make-data", "--out", "o"], "--no-target-fraction", "nan"),
    (["weaken", "--data", "d", "--out", "o"], "--accurate-fraction", "2"),
    (["weaken", "--data", "d", "--out", "o", "--accurate-fraction", "0.5"], "--seed", "-3"),
    (["train", "--data", "d"], "--nproc", "0"),
    (["export", "--out", "o"], "--opset", "0"),
    (["bench"], "--threads", "0"),
    (["bench"], "--seed", "-1"),
    (["bench"], "--device", "banana"),
]


@pytest.mark.parametrize("argv, flag, value", BAD_ARGUMENTS,
                         ids=[f"{a[0]}{f}={v}" for a, f, v in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, flag, value):
    monkeypatch.chdir(tmp_path)
    assert run(argv + [flag, value]) == 2
    one_line_error(capsys, argv[0], flag, repr(value))
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("value, says", [("banana", "unknown device"), ("cuda:99", "cuda:99")])
def test_train_refuses_a_device_in_one_line(tmp_path, capsys, value, says):
    fx = make_refcoco(tmp_path / "data")
    assert run(["train", "--data", fx.root, "--device", value, "--max-steps", "1", "--out", tmp_path / "run"]) == 2
    one_line_error(capsys, "train", "device", says)
    assert not (tmp_path / "run").exists()


def test_cuda_on_a_machine_without_it_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_device("cuda")
    assert check_device("cpu") == "cpu" and check_device("auto") == "auto"


def test_make_data_and_stats_exit_2_on_bad_input(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert run(["make-data", "--preset", "tiny", "--out", tmp_path / "taken"]) == 2
    one_line_error(capsys, "make-data", "taken", "exists")
    assert run(["stats", tmp_path / "taken"]) == 2
    one_line_error(capsys, "stats", "taken")
    fx = make_refcoco(tmp_path / "refcoco")
    (fx.root / "instances.json").write_text("[]")
    assert run(["stats", fx.root]) == 2
    one_line_error(capsys, "stats", "instances.json")
