"""Model cards written by an attacker: encoders named by hub name or by a folder of pickles, sizes that are
zero, negative, null, of the wrong type or huge, weights holding NaN, a model whose output is NaN.

Each must end in a one-line error naming the card and the field (exit status 2 through the command line),
quickly, without downloading, unpickling or allocating; a pickle that would run code creates a marker
file, which must never appear.
"""

import json
import os
import pickle
import resource
import socket
import time

import numpy as np
import pytest
import torch
from _engine_fixtures import TINY_TEXT, TINY_VISUAL, one_thread, tiny_model  # noqa: F401 (autouse fixture)
from _serve_fixtures import perturb_head, png_bytes, red_square_image, tiny_lts_file
from safetensors.torch import load_file, save_file

import refseg
from refseg import hub
from refseg.cli import main as cli
from refseg.engine.checkpoint import CheckpointError, sha256_of
from refseg.methods import MODELS, build_model
from refseg.modeling import build_text, build_visual
from refseg.modeling.limits import ModelConfigError
from refseg.predictor import ModelOutputError, Predictor

BAD_VALUES = {"zero": 0, "negative": -1, "null": None, "1e9": 1e9, "string": "12", "true": True,
              "nan": float("nan"), "huge int": 10**30}
# (field, value) pairs among BAD_VALUES that are legitimate settings, not attacks
LEGITIMATE = {("text_depth", None), ("mask_stride", None), ("word_negatives", 0), ("mask_refine", 0),
              ("text_layers", 0), ("context_layers", 0), ("pretrain_steps", 0), ("hard_negatives", 0),
              ("rgb_weight", 0), ("feature_weight", 0)}


class Call:
    """Pickles to `fn(*args)`: what a malicious pickle does on load."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to open a network connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def _image(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(red_square_image()))
    return path


def _predict(card, image, capsys, *extra):
    """`refseg predict` on one image; returns (exit status, stderr, seconds)."""
    start = time.perf_counter()
    rc = cli(["predict", "--model", str(card), "--image", str(image), "--text", "the red square",
              "--out", str(image.parent / "out.png"), *extra])
    return rc, capsys.readouterr().err, time.perf_counter() - start


def _one_line_naming(err, *names):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def _rewrite_card(card, **config_changes):
    """Change fields of the config in ``card``'s JSON (None values are kept as null)."""
    json_path = card.with_suffix(".json")
    meta = json.loads(json_path.read_text())
    meta["config"].update(config_changes)
    json_path.write_text(json.dumps(meta))
    return json_path


@pytest.fixture
def tiny_card(tmp_path):
    """The tiny LTS (random encoders, stored whole) as ``tiny-lts.safetensors`` + ``.json``."""
    return tiny_lts_file(tmp_path)


# ---- encoders: local safetensors folders only ------------------------------------------------------


def _pickle_folder(folder, marker, with_config=True):
    """A transformers-style folder whose only weights are a pickle that would create `marker`."""
    folder.mkdir(parents=True, exist_ok=True)
    if with_config:
        (folder / "config.json").write_text(json.dumps(TINY_TEXT))
    payload = {"embeddings.word_embeddings.weight": Call(os.system, f"touch {marker}")}
    torch.save(payload, folder / "pytorch_model.bin")
    (folder / "model.ckpt").write_bytes(pickle.dumps(Call(os.system, f"touch {marker}"), protocol=2))
    return folder


@pytest.mark.parametrize("field", ["visual", "text"])
@pytest.mark.parametrize("with_config", [True, False], ids=["config.json+pickle", "pickle-only"])
def test_an_encoder_folder_of_pickles_is_refused_unread(tiny_card, tmp_path, capsys, field, with_config,
                                                        no_network):
    marker = tmp_path / "pwned"
    folder = _pickle_folder(tmp_path / "evil-encoder", marker, with_config)
    json_path = _rewrite_card(tiny_card, **{field: f"hf:{folder}"})
    rc, err, _ = _predict(tiny_card, _image(tmp_path), capsys)
    assert rc == 2
    line = _one_line_naming(err, json_path, f"'{field}'", folder)
    assert ("no *.safetensors" in line) == with_config
    assert not marker.exists() and not no_network


@pytest.mark.parametrize("field", ["visual", "text", "text_tokenizer"])
@pytest.mark.parametrize("name", ["some/hub-name", "bert-base-uncased", "https://example.com/model"])
def test_a_hub_name_is_refused_at_once_without_the_network(tiny_card, tmp_path, capsys, field, name, no_network):
    json_path = _rewrite_card(tiny_card, **{field: f"hf:{name}" if field != "text_tokenizer" else name})
    rc, err, seconds = _predict(tiny_card, _image(tmp_path), capsys)
    assert rc == 2 and seconds < 5, (rc, seconds)
    _one_line_naming(err, json_path, f"'{field}'", "not a local folder")
    assert not no_network


def _saved_bert(folder):
    """The tiny random BERT saved as a transformers folder (safetensors + the MiniLM tokenizer); the model."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from refseg.modeling.text import minilm_path

    fields = dict(TINY_TEXT)
    bert = AutoModel.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    bert.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return bert


def test_a_local_safetensors_folder_loads_offline_and_a_pickle_beside_it_is_never_read(tmp_path, no_network):
    from transformers import AutoBackbone, AutoConfig

    marker = tmp_path / "pwned"
    text_dir, visual_dir = tmp_path / "bert", tmp_path / "convnext"
    bert = _saved_bert(text_dir)
    fields = dict(TINY_VISUAL)
    convnext = AutoBackbone.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    convnext.save_pretrained(visual_dir, safe_serialization=True)
    for folder in (text_dir, visual_dir):
        torch.save({"x": Call(os.system, f"touch {marker}")}, folder / "pytorch_model.bin")

    text = build_text(f"hf:{text_dir}", max_length=8)
    want = bert.embeddings.word_embeddings.weight
    assert torch.equal(text.model.embeddings.word_embeddings.weight, want)  # the safetensors weights
    assert text.tokenize(["a red star"])["input_ids"].shape == (1, 8)
    visual = build_visual(f"hf:{visual_dir}")
    assert visual.channels == (8, 16, 24, 32)
    assert not marker.exists() and not no_network


def test_an_encoder_folder_with_nan_weights_is_refused(tmp_path, no_network):
    bert = _saved_bert(tmp_path / "bert")
    with torch.no_grad():
        bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    bert.save_pretrained(tmp_path / "bert", safe_serialization=True)
    with pytest.raises(ModelConfigError, match=r"NaN or infinite values \(tensor 'encoder.layer.0.output.dense.weight'\)"):
        build_text(f"hf:{tmp_path / 'bert'}")


def test_a_folder_whose_safetensors_is_a_pickle_is_refused(tmp_path, no_network):
    marker = tmp_path / "pwned"
    folder = _pickle_folder(tmp_path / "disguised", marker)
    torch.save({"x": Call(os.system, f"touch {marker}")}, folder / "model.safetensors")
    with pytest.raises(ModelConfigError, match=f"'text': cannot load the weights in {folder}"):
        build_text(f"hf:{folder}")
    assert not marker.exists() and not no_network


# ---- sizes and types of every field ------------------------------------------------------------------


def _numeric_fields(config):
    """Names of the fields of a card's config holding numbers or lists of numbers (not booleans)."""
    def numeric(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return sorted(k for k, v in config.items()
                  if numeric(v) or (isinstance(v, list) and v and all(numeric(x) for x in v)))


def _distinct_cards():
    """One shipped card per distinct config, with the config's numeric fields."""
    seen, out = set(), []
    for name in hub.available_models():
        config = hub.model_card(name)["config"]
        key = json.dumps(config, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def _card_copy(tmp_path, name, **changes):
    """A copy of shipped card `name` (weights linked, not copied) with `changes` in its config."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    weights = folder / f"{name}.safetensors"
    if not weights.exists():
        os.symlink(hub.WEIGHTS_DIR / f"{name}.safetensors", weights)
    meta = hub.model_card(name)
    meta["config"].update(changes)
    (folder / f"{name}.json").write_text(json.dumps(meta))
    return weights


def test_every_numeric_field_of_every_shipped_card_is_bounded(tmp_path, capsys):
    """0, -1, null, 1e9, "12", true, NaN and 10**30 in each numeric field, through `refseg predict --model
    CARD`: exit status 2 and one line naming the card file and the field, fast, with no memory growth to
    speak of."""
    image = _image(tmp_path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    tried = 0
    start = time.perf_counter()
    for name in _distinct_cards():
        fields = _numeric_fields(hub.model_card(name)["config"])
        assert {"image_size", "max_length"} <= set(fields)
        for field in fields:
            for label, value in BAD_VALUES.items():
                if (field, value) in LEGITIMATE:
                    continue
                weights = _card_copy(tmp_path, name, **{field: value})
                rc, err, _ = _predict(weights, image, capsys)
                assert rc == 2, (name, field, label, err)
                line = _one_line_naming(err, f"{weights.with_suffix('.json')}: config field '{field}'")
                assert line.startswith("refseg predict: error: "), line
                tried += 1
    assert tried >= 100 and not (tmp_path / "out.png").exists()
    assert time.perf_counter() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 300_000


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_size_and_count_argument_of_every_head_is_bounded(model):
    """Fields a card may add (the head's arguments): each bad value refused before anything is built."""
    import inspect

    from refseg.modeling.limits import FIELDS, known_fields
    from refseg.methods.lts import LTSHead
    from refseg.methods.pks import PKSHead
    from refseg.methods.sag import SaGHead

    head = {"lts": LTSHead, "sag": SaGHead, "pks": PKSHead}[model]
    params = inspect.signature(head.__init__).parameters
    numeric = [n for n, p in params.items() if p.annotation in (int, float) or "Sequence[int]" in str(p.annotation)
               or "Optional[int]" in str(p.annotation)]
    numeric = [n for n in numeric if n not in ("visual_channels", "visual_strides", "text_dim")]  # from the encoders
    assert len(numeric) >= 8 and set(numeric) <= set(FIELDS) and set(numeric) <= set(known_fields(MODELS[model], head))
    start = time.perf_counter()
    for field in numeric:
        for label, value in BAD_VALUES.items():
            if (field, value) in LEGITIMATE:
                continue
            config = {**hub.model_card(f"{model}-synthref")["config"], field: value}
            with pytest.raises(ModelConfigError, match=f"config field '{field}'"):
                build_model(config)
    assert time.perf_counter() - start < 5  # refused before any encoder is built


@pytest.mark.parametrize("changes, field", [
    ({"depth": 10**6}, "depth"),
    ({"dim": 10**9}, "dim"),
    ({"image_size": 1e9}, "image_size"),
    ({"image_size": 100}, "image_size"),  # not a multiple of 32: the maps would not line up
    ({"heads": 3}, "heads"),  # does not divide dim
    ({"max_length": "24"}, "max_length"),
    ({"decoder_widths": [48, 24, -12]}, "decoder_widths"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"model": ["lts"]}, "model"),
    ({"visual": 5}, "visual"),
    ({"dim": 2048, "depth": 64, "mlp_ratio": 16}, "LTSHead"),  # each in range, together 8 billion parameters
])
def test_bad_card_fields_through_the_command_line(tmp_path, capsys, changes, field):
    weights = _card_copy(tmp_path, "lts-synthref", **changes)
    rc, err, seconds = _predict(weights, _image(tmp_path), capsys)
    assert rc == 2 and seconds < 10, (rc, seconds, err)
    _one_line_naming(err, weights.with_suffix(".json"), field)


@pytest.mark.parametrize("encoder", [
    {"model_type": "bert", "num_hidden_layers": 10**6},
    {"model_type": "bert", "hidden_size": 1e9},
    {"model_type": "bert", "hidden_size": float("nan")},
    {"model_type": "bert", "hidden_size": 8192, "intermediate_size": 65536, "num_hidden_layers": 100},
    {"model_type": "no-such-model"},
    {"hidden_size": 32},
], ids=["layers", "float-size", "nan", "too-many-parameters", "unknown-type", "no-type"])
def test_encoder_configs_in_a_card_are_bounded(tiny_card, tmp_path, capsys, encoder):
    json_path = _rewrite_card(tiny_card, text=encoder)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="config field 'text"):
        refseg.load(tiny_card)
    assert time.perf_counter() - start < 10
    rc, err, _ = _predict(tiny_card, _image(tmp_path), capsys)
    assert rc == 2
    _one_line_naming(err, json_path, "'text")


def test_inference_options_are_bounded_too(tmp_path, capsys):
    for options in ({"mask_refine": 1e9}, {"image_size": 10**12}, {"refine_iters": -1}):
        rc, err, seconds = _predict("sag-synthref", _image(tmp_path), capsys, "--options", json.dumps(options))
        assert rc == 2 and seconds < 10
        _one_line_naming(err, next(iter(options)))


def test_training_model_kwargs_are_bounded():
    from refseg.cli import is_user_error

    for kwargs in ({"depth": 10**6}, {"image_size": 1e9}, {"dim": "128"}):
        with pytest.raises(ModelConfigError) as e:
            MODELS["lts"](**kwargs)
        assert is_user_error(e.value)


# ---- non-finite weights and outputs --------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_holding_nan_or_inf_are_refused_at_load(tiny_card, tmp_path, capsys, bad):
    weights = load_file(str(tiny_card))
    name = sorted(k for k in weights if k.startswith("head."))[3]
    weights[name].view(-1)[0] = bad
    save_file(weights, str(tiny_card))
    json_path = tiny_card.with_suffix(".json")
    meta = json.loads(json_path.read_text())
    meta["sha256"] = sha256_of(tiny_card)
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{tiny_card}: tensor '{name}' holds NaN or infinite"):
        refseg.load(tiny_card)
    rc, err, _ = _predict(tiny_card, _image(tmp_path), capsys)
    assert rc == 2
    _one_line_naming(err, tiny_card, name)


def _nan_model():
    """The tiny LTS whose output layer is NaN: every mask logit is NaN (a module that misbehaves)."""
    model = perturb_head(tiny_model().eval(), 0)
    with torch.no_grad():
        model.head.mask_out.bias.fill_(float("nan"))
    return model


def test_nan_outputs_raise_a_named_error_not_nan_masks():
    predictor = Predictor(_nan_model())
    predictor.set_image(red_square_image())
    with pytest.raises(ModelOutputError, match="NaN or infinite"):
        predictor.predict(["the red square", "the grey background"])
    with pytest.raises(ModelOutputError, match="NaN or infinite"):
        list(predictor.predict_batch([red_square_image()] * 2, [["a"], ["b"]]))
    healthy = Predictor(perturb_head(tiny_model().eval(), 0))
    healthy.set_image(red_square_image())
    result = healthy.predict(["the red square"])
    assert np.isfinite(result.logits).all() and np.isfinite(result.scores).all()


def test_nan_outputs_through_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(refseg, "load", lambda *args, **kwargs: _nan_model())
    rc, err, _ = _predict("any-model", _image(tmp_path), capsys)
    assert rc == 2
    _one_line_naming(err, "NaN or infinite")
    assert not (tmp_path / "out.png").exists()



# ---- ONNX exports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("image_size", 1e9), ("image_size", None), ("max_length", "24"),
                                          ("max_length", 10**9)])
def test_an_onnx_export_description_is_bounded_too(tmp_path, field, value):
    """The JSON beside an ONNX export sets the sizes OnnxPredictor allocates: checked before any graph loads."""
    from refseg.export import FORMAT, VERSION, OnnxPredictor, export_paths

    meta = {"format": FORMAT, "version": VERSION, "image_size": 320, "max_length": 24, field: value}
    path = export_paths(tmp_path / "model.onnx")["meta"]
    path.write_text(json.dumps(meta))
    with pytest.raises(ModelConfigError, match=f"{path}: config field '{field}'"):
        OnnxPredictor(tmp_path / "model.onnx")
