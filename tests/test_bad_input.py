"""The bad-input corpus: every entry point given broken, hostile or odd input.

Each case in CASES builds one bad input in a temporary folder and names the
exception it must raise and a pattern its message must match: the pattern
always holds the file, field or value at fault, so a vague message fails
the test as surely as a deep traceback (an AttributeError from inside a
loader) does. GRACEFUL lists the odd-but-valid inputs and the documented
result each must give. The command-line cases check that bad input ends a
command with one line on stderr, a non-zero status and no output file.
"""

import io
import json
import os
import pickle
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _serve_fixtures import RedModel, png_bytes, red_square_image, tiny_lts, tiny_lts_file
from fixtures import edit, make_refcoco
from PIL import Image
from safetensors.torch import save_file

from refseg.cli import main as cli
from refseg.data import ImageReadError, ReferFileNotFoundError, ReferFormatError, load_image_rgb, load_refer
from refseg.data.refer import load_refs_file
from refseg.data.atomic import INCOMPLETE_MARKER
from refseg.engine.checkpoint import CheckpointError, load_model
from refseg.engine.config import ConfigError, TrainConfig
from refseg.expressions import check_expressions
from refseg.predictor import Predictor

# ---- crafted files ------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (8-bit grey); its pixel data is a stub."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def noise_png(h=32, w=32) -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def jpeg_bytes(h=64, w=64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class RunsCode:
    """Pickles to a call of os.system: unpickling it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write(tmp: Path, name: str, data) -> Path:
    path = tmp / name
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


# ---- the corpus -----------------------------------------------------------------------------------
# Each builder takes the case's tmp folder and returns a callable that must raise.


def image_case(name, data, **kwargs):
    return lambda tmp: (lambda: load_image_rgb(write(tmp, name, data), **kwargs))


def refer_case(refs=None, instances=None, then=None):
    """Edit the hand-made RefCOCO folder, then load it (and run `then(data)` if given)."""
    def build(tmp):
        fx = make_refcoco(tmp / "refcoco")
        edit(fx.root, refs=refs, instances=instances)

        def run():
            data = load_refer(fx.root)
            if then is not None:
                then(data)
        return run
    return build


def refs_bytes_case(data_fn):
    """Replace refs(unc).p with raw bytes built by data_fn(tmp)."""
    def build(tmp):
        fx = make_refcoco(tmp / "refcoco")
        (fx.root / "refs(unc).p").write_bytes(data_fn(tmp))
        return lambda: load_refer(fx.root)
    return build


def instances_case(text):
    def build(tmp):
        fx = make_refcoco(tmp / "refcoco")
        write(fx.root, "instances.json", text)
        return lambda: load_refer(fx.root)
    return build


def set_ref(key, value, index=0):
    def fn(refs):
        refs[index][key] = value
    return fn


def config_case(name, text):
    return lambda tmp: (lambda: TrainConfig.load(write(tmp, name, text)))


def expression_case(value):
    return lambda tmp: (lambda: check_expressions(value))


def weights_case(files):
    """A .safetensors (+ .json) pair written by files(tmp) -> path given to load_model."""
    return lambda tmp: (lambda: load_model(files(tmp)))


def _weights(tmp, meta):
    save_file({"w": torch.zeros(2)}, str(tmp / "m.safetensors"))
    write(tmp, "m.json", meta if isinstance(meta, str) else json.dumps(meta))
    return tmp / "m.safetensors"


def _pickle_as_weights(tmp):
    torch.save({"w": RunsCode(tmp / "pwned")}, tmp / "evil.pt")
    return tmp / "evil.pt"


def _corrupt_checkpoint(tmp, how):
    from _engine_fixtures import tiny_model

    from refseg.engine.checkpoint import save_checkpoint

    save_checkpoint(tmp / "run" / "best", tiny_model(), include_frozen=True)
    path = tmp / "run" / "best" / "model.safetensors"
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip one byte of the tensor data: same size, different SHA-256
        data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    return tmp / "run"


def _staged_folder(tmp):
    fx = make_refcoco(tmp / "refcoco")
    write(fx.root, INCOMPLETE_MARKER, "{}")
    return lambda: load_refer(fx.root)


CASES = [
    # images
    ("image-zero-bytes", image_case("empty.png", b""), ImageReadError, r"empty\.png: the file is empty \(0 bytes\)"),
    ("image-truncated-png", image_case("cut.png", noise_png()[:120]), ImageReadError, r"cut\.png"),
    ("image-truncated-jpeg", image_case("cut.jpg", jpeg_bytes()[:-300]), ImageReadError, r"cut\.jpg: .*truncated"),
    ("image-corrupt-png-data", image_case("crc.png", noise_png()[:60] + b"\xff" * 40 + noise_png()[100:]),
     ImageReadError, r"crc\.png"),
    ("image-text-with-jpg-name", image_case("notes.jpg", "shopping list: eggs"), ImageReadError,
     r"notes\.jpg: cannot identify image file"),
    ("image-html-with-png-name", image_case("page.png", "<!doctype html><html></html>"), ImageReadError,
     r"page\.png"),
    ("image-pdf-with-jpeg-name", image_case("doc.jpeg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"), ImageReadError,
     r"doc\.jpeg"),
    ("image-decompression-bomb", image_case("bomb.png", png_claiming(30_000, 30_000)), ImageReadError,
     r"bomb\.png: .*900000000 pixels.*decompression bomb"),
    ("image-over-max-pixels", image_case("big.png", png_claiming(5_000, 4_000), max_pixels=10_000_000),
     ImageReadError, r"big\.png: 5000x4000 = 20 MP is over the limit of 10 MP"),
    ("image-is-a-folder", lambda tmp: (lambda: load_image_rgb((tmp / "dir.png").mkdir() or tmp / "dir.png")),
     ImageReadError, r"dir\.png: not a regular file"),
    ("image-missing", lambda tmp: (lambda: load_image_rgb(tmp / "nowhere.png")), FileNotFoundError,
     r"image file not found: .*nowhere\.png"),
    ("image-float-tiff-out-of-range", lambda tmp: (
        lambda: (Image.fromarray(np.full((4, 4), 2.5, np.float32)).save(tmp / "f.tiff"),
                 load_image_rgb(tmp / "f.tiff"))), ImageReadError, r"f\.tiff: float image values must lie in \[0, 1\]"),
    # expressions
    ("text-empty", expression_case(""), ValueError, r"#0: the expression is empty"),
    ("text-whitespace", expression_case(["the red star", " \t\n "]), ValueError, r"#1: the expression is empty"),
    ("text-not-utf8-argv", expression_case("the \udcff\udcfe star"), ValueError,
     r"#0: not valid UTF-8 text \(undecodable byte 0xff at character 4\)"),
    ("text-lone-surrogate-json", expression_case(json.loads('"a \\ud83d b"')), ValueError,
     r"lone surrogate U\+D83D at character 2"),
    ("text-bytes", expression_case(b"the red star"), ValueError, r"expected a str or a list of str, got bytes"),
    ("text-none-in-list", expression_case(["ok", None]), ValueError, r"#1: expected a str, got NoneType"),
    ("text-empty-list", expression_case([]), ValueError, r"no expression given"),
    # refer data sets: instances.json
    ("instances-zero-bytes", instances_case(""), ReferFormatError, r"instances\.json: not valid JSON"),
    ("instances-not-utf8", instances_case(b'{"images": "\xff\xfe"}'), ReferFormatError,
     r"instances\.json: not valid JSON"),
    ("instances-top-level-list", instances_case("[1, 2]"), ReferFormatError,
     r"instances\.json: expected a JSON object .*got a list"),
    ("instances-image-entry-string", refer_case(instances=lambda i: i["images"].insert(0, "x.jpg")),
     ReferFormatError, r"instances\.json: field 'images' item #0 is a str"),
    ("instances-annotation-entry-null", refer_case(instances=lambda i: i["annotations"].append(None)),
     ReferFormatError, r"field 'annotations' item #6 is a NoneType"),
    ("instances-negative-height", refer_case(instances=lambda i: i["images"][0].update(height=-24)),
     ReferFormatError, r"image 1: fields 'height' x 'width' = -24 x 32 must be positive"),
    ("instances-categories-dict", refer_case(instances=lambda i: i.update(categories={"1": "person"})),
     ReferFormatError, r"field 'categories' must be a list"),
    # refer data sets: refs fields of the wrong type
    ("refs-split-int", refer_case(refs=set_ref("split", 5)), ReferFormatError,
     r"ref 10: field 'split' must be a non-empty string, got 5"),
    ("refs-no-target-string", refer_case(refs=set_ref("no_target", "false")), ReferFormatError,
     r"ref 10: field 'no_target' must be true or false, got 'false'"),
    ("refs-click-center-strings", refer_case(refs=set_ref("click_center", ["x", "y"])), ReferFormatError,
     r"ref 10: field 'click_center' must hold numbers"),
    ("refs-click-corners-nan", refer_case(refs=set_ref("click_corners", [[0, 0], [float("nan"), 1]])),
     ReferFormatError, r"ref 10: field 'click_corners' holds a NaN"),
    ("refs-class-name-list", refer_case(refs=set_ref("class_name", ["man"])), ReferFormatError,
     r"ref 10: field 'class_name' must be a string"),
    ("refs-ann-id-missing", refer_case(refs=set_ref("ann_id", 555)), ReferFormatError,
     r"ref 10: field 'ann_id' = 555 has no entry"),
    ("refs-image-file-missing", refer_case(then=lambda d: (d.images_dir / d.images[2]["file_name"]).unlink()
                                           or d.load_image(2)),
     ReferFileNotFoundError, r"image 2: file not found: .*COCO_train2014_000000000002\.png"),
    ("refs-image-file-not-an-image", refer_case(then=lambda d: write(d.images_dir, d.images[3]["file_name"], "hi")
                                                and d.load_image(3)),
     ImageReadError, r"COCO_val2014_000000000003\.png"),
    ("rle-counts-garbage", refer_case(instances=lambda i: i["annotations"][1].update(
        segmentation=[{"size": [24, 32], "counts": "zzzz"}]), then=lambda d: d.get_mask(102)),
     ReferFormatError, r"annotation 102: field 'segmentation' RLE counts string is corrupt .*h \* w = 768"),
    ("rle-counts-wrong-total", refer_case(instances=lambda i: i["annotations"][2].update(
        segmentation={"size": [30, 20], "counts": [10, 5]}), then=lambda d: d.get_mask(103)),
     ReferFormatError, r"annotation 103: field 'segmentation' RLE counts .* adding up to h \* w = 600"),
    ("refs-zero-bytes", refs_bytes_case(lambda tmp: b""), ReferFormatError, r"refs\(unc\)\.p: the refs file is empty"),
    ("refs-truncated-pickle", refs_bytes_case(lambda tmp: pickle.dumps([{"ref_id": 1}] * 50)[:-30]),
     ReferFormatError, r"refs\(unc\)\.p: cannot unpickle refs"),
    ("refs-pickle-runs-code", refs_bytes_case(lambda tmp: pickle.dumps([RunsCode(tmp / "pwned")])),
     ReferFormatError, r"refs\(unc\)\.p: .*global '(posix|os)\.system' is not allowed"),
    ("data-set-still-staged", lambda tmp: _staged_folder(tmp), ReferFormatError,
     r"refcoco is incomplete: .*\.refseg-incomplete present"),
    # training configs
    ("config-unknown-key", config_case("cfg.json", '{"lrate": 0.1}'), ConfigError,
     r"cfg\.json: unknown TrainConfig field\(s\): lrate"),
    ("config-wrong-type", config_case("cfg.json", '{"lr": "fast"}'), ConfigError,
     r"cfg\.json: TrainConfig optim\.lr \(--lr\) must be float, got 'fast'"),
    ("config-bool-for-int", config_case("cfg.json", '{"batch_size": true}'), ConfigError,
     r"cfg\.json: TrainConfig optim\.batch_size \(--batch-size\) must be int, got True"),
    ("config-not-json", config_case("cfg.json", '{"lr": 0.1,'), ConfigError, r"cfg\.json: not valid JSON"),
    ("config-not-yaml", config_case("cfg.yaml", "lr: [0.1\nseed: 1\n"), ConfigError, r"cfg\.yaml: not valid YAML"),
    ("config-not-a-mapping", config_case("cfg.json", "[1, 2]"), ConfigError, r"cfg\.json: expected a mapping"),
    ("config-nan-lr", lambda tmp: (lambda: TrainConfig.load(write(tmp, "cfg.json", '{"lr": NaN}')).validate()),
     ConfigError, r"optim\.lr \(--lr\) must be a finite number >= 0, got nan"),
    ("config-missing", lambda tmp: (lambda: TrainConfig.load(tmp / "nope.json")), ConfigError,
     r"config file not found: .*nope\.json"),
    # checkpoints and weights
    ("weights-torch-pickle", weights_case(_pickle_as_weights), CheckpointError,
     r"evil\.pt: looks like a PyTorch pickle"),
    ("weights-empty", weights_case(lambda tmp: write(tmp, "e.safetensors", b"")), CheckpointError,
     r"e\.safetensors: not a safetensors file"),
    ("weights-json-broken", weights_case(lambda tmp: _weights(tmp, "{oops")), CheckpointError,
     r"m\.json: model JSON is not valid JSON"),
    ("weights-json-unknown-model", weights_case(lambda tmp: _weights(tmp, {"config": {"model": "unet"}})),
     CheckpointError, r"m\.json: config field 'model' must be one of .*unet"),
    ("checkpoint-truncated", weights_case(lambda tmp: _corrupt_checkpoint(tmp, "truncate")), CheckpointError,
     r"run holds no complete checkpoint"),
    ("checkpoint-bit-flip", weights_case(lambda tmp: _corrupt_checkpoint(tmp, "flip")), CheckpointError,
     r"best/model\.safetensors: size or SHA-256 differs"),
]


@pytest.mark.parametrize("build, error, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(tmp_path, build, error, pattern):
    run = build(tmp_path)
    with pytest.raises(error, match=pattern) as info:
        run()
    assert "\n" not in str(info.value).strip() or error is CheckpointError
    assert not list(tmp_path.rglob("pwned")), "a crafted file ran code"


def test_the_corpus_is_large_and_named_uniquely():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


# ---- documented graceful results ------------------------------------------------------------------


@pytest.fixture(scope="module")
def red():
    return Predictor(RedModel())


def test_one_pixel_image_gives_a_one_pixel_mask(red):
    red.set_image(np.array([[[230, 30, 30]]], np.uint8))
    result = red.predict(["the red thing", "the grey thing"])
    assert result.masks.shape == (2, 1, 1) and result.masks[0, 0, 0]


def test_extreme_aspect_ratio_keeps_its_size(red):
    img = np.full((1, 3000, 3), 128, np.uint8)
    img[0, 1000:1500] = (230, 30, 30)
    red.set_image(img)
    mask = red.predict("the red stripe").masks[0]
    assert mask.shape == (1, 3000)
    assert mask[0, 1050:1450].all() and not mask[0, :900].any() and not mask[0, 1600:].any()


def test_sixteen_bit_and_palette_pngs(tmp_path):
    Image.fromarray(np.array([[0, 257, 65535]], np.uint16)).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "g16.png")[0, :, 0], [0, 1, 255])
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image_rgb(tmp_path / "p.png")[0], [[10, 20, 30], [200, 100, 0]])


def test_animated_gif_reads_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert tuple(load_image_rgb(tmp_path / "a.gif")[0, 0]) == (255, 0, 0)


def test_long_and_odd_expressions_are_segmented():
    """10 000 characters: the tokenizer keeps the first max_length tokens, so the answer is the prefix's."""
    predictor = Predictor(tiny_lts())
    predictor.set_image(red_square_image())
    words = ("the red square on the left of the big blue circle " * 200)[:10_000]
    prefix = " ".join(words.split()[:30])
    emoji = "the 🔴 square 🌟 \x00 ‮"
    result = predictor.predict([words, prefix, emoji])
    assert result.masks.shape == (3, 90, 120) and np.isfinite(result.logits).all()
    np.testing.assert_allclose(result.logits[0], result.logits[1], atol=1e-5)


# ---- the REST API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from refseg.serve import create_app

    with TestClient(create_app({"red": RedModel()}, default="red", demo=False, max_pixels=1_000_000)) as c:
        yield c


def test_server_refuses_a_bomb_from_its_header_fast(client):
    start = time.perf_counter()
    r = client.post("/segment", files={"image": ("b.png", png_claiming(30_000, 30_000), "image/png")},
                    data={"text": "x"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    assert "30000x30000" in r.json()["error"]["message"] or "pixels" in r.json()["error"]["message"]
    assert time.perf_counter() - start < 2.0


def test_server_refuses_a_file_sent_as_text(client):
    files = [("image", ("x.png", png_bytes(red_square_image()), "image/png")), ("text", ("t.txt", b"red", "text/plain"))]
    r = client.post("/segment", files=files)
    assert r.status_code in (400, 422), r.text  # Starlette may refuse the second file itself
    assert r.json()["error"]["code"] in ("bad_text", "bad_form")


def test_server_reads_non_utf8_text_as_latin1(client):
    img = png_bytes(red_square_image())
    body = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
            + img + b'\r\n--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nthe \xe9t\xe9 red\r\n--b--\r\n')
    r = client.post("/segment", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["text"] == "the été red"


# ---- the command line: one line, non-zero status, no output ----------------------------------------


def _one_line_error(capsys, command: str, *names):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"refseg {command}: error:"), err
    for name in names:
        assert name in err, err


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_lts_file(tmp_path_factory.mktemp("tiny"))


def test_cli_train_config_errors(tmp_path, capsys):
    write(tmp_path, "cfg.json", '{"lrate": 1}')
    assert cli(["train", "--config", str(tmp_path / "cfg.json"), "--data", str(tmp_path)]) == 2
    _one_line_error(capsys, "train", "cfg.json", "lrate")
    (tmp_path / "run").mkdir()
    write(tmp_path / "run", "config.json", '{"model": "lts",')
    assert cli(["train", "--resume", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "train", "config.json", "not valid JSON")


def test_cli_stats_on_a_broken_data_set(tmp_path, capsys):
    fx = make_refcoco(tmp_path / "refcoco")
    write(fx.root, "instances.json", "[]")
    assert cli(["stats", str(fx.root)]) != 0
    _one_line_error(capsys, "stats", "instances.json", "JSON object")


@pytest.mark.parametrize("image, text, names", [
    ("crc.png", "the red square", ["crc.png"]),
    ("good.png", "the \udcff square", ["--text #0", "0xff"]),
    ("good.png", "  ", ["--text #0", "empty"]),
    ("missing.png", "the red square", ["missing.png"]),
], ids=["corrupt-image", "non-utf8-text", "blank-text", "missing-image"])
def test_cli_predict_writes_nothing_on_bad_input(tmp_path, capsys, weights, image, text, names):
    write(tmp_path, "good.png", png_bytes(red_square_image()))
    write(tmp_path, "crc.png", png_bytes(red_square_image())[:80])
    argv = ["predict", "--model", str(weights), "--image", str(tmp_path / image), "--text", text,
            "--out", str(tmp_path / "out.png"), "--mask-out", str(tmp_path / "mask.png")]
    assert cli(argv) == 2
    _one_line_error(capsys, "predict", *names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crc.png", "good.png"]


def test_cli_predict_batch_skips_unreadable_images(tmp_path, capsys, weights):
    images = tmp_path / "images"
    images.mkdir()
    write(images, "a.png", png_bytes(red_square_image()))
    write(images, "b.png", b"not an image")
    write(images, "c.png", png_bytes(red_square_image(60, 80)))
    write(tmp_path, "q.csv", "image,text\na.png,the red square\nb.png,the red square\nc.png,the red square\n")
    out = tmp_path / "out"
    argv = ["predict", "--model", str(weights), "--images", str(images), "--queries", str(tmp_path / "q.csv"),
            "--out-dir", str(out)]
    assert cli(argv) == 1
    assert "b.png" in capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["image"], "error" in r) for r in lines] == [("a.png", False), ("c.png", False), ("b.png", True)]
    assert sorted(p.name for p in out.iterdir()) == ["a_0.png", "a_overlay.png", "c_0.png", "c_overlay.png",
                                                     "results.jsonl"]
    assert Image.open(out / "c_0.png").size == (80, 60)


def test_cli_predict_queries_file_errors_name_the_line(tmp_path, capsys, weights):
    write(tmp_path, "q.csv", b"image,text\na.png,the red\nb.png,the \xff star\n")
    argv = ["predict", "--model", str(weights), "--images", str(tmp_path), "--queries", str(tmp_path / "q.csv"),
            "--out-dir", str(tmp_path / "out")]
    assert cli(argv) == 2
    _one_line_error(capsys, "predict", "q.csv:3", "not UTF-8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, names", [
    ("{mask_refine: 2", ["--options", "not JSON"]),
    ("[2]", ["--options", "JSON object"]),
    ('{"dim": 1024}', ["shape"]),
    ('{"no_such_option": 1}', ["no_such_option"]),
], ids=["not-json", "not-an-object", "changes-weights", "unknown-option"])
def test_cli_predict_bad_options_write_nothing(tmp_path, capsys, weights, options, names):
    write(tmp_path, "good.png", png_bytes(red_square_image()))
    argv = ["predict", "--model", str(weights), "--options", options, "--image", str(tmp_path / "good.png"),
            "--text", "the red square", "--out", str(tmp_path / "out.png")]
    assert cli(argv) == 2
    _one_line_error(capsys, "predict", *names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.png"]
