"""ONNX export: onnxruntime must give PyTorch's logits, through OnnxPredictor and the raw graphs.

Tolerance: 1e-3 max absolute difference of mask logits (float32 on CPU; the
measured difference is ~1e-6 on the tiny LTS, ~1e-5 on EfficientNet-Lite0 +
MiniLM with a perturbed head). The tiny LTS's head is perturbed so that its
logits vary (see _serve_fixtures.tiny_lts).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _serve_fixtures import perturb_head, red_square_image, tiny_lts, tiny_lts_file

from refseg.export import PARITY_TOLERANCE, OnnxModel, OnnxPredictor, export_onnx, export_paths
from refseg.predictor import Predictor

TOL = 1e-3
TEXTS = ["the red square", "the blue circle on the left", "the third star from the top right corner"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, --out path) for the tiny LTS exported with the default exporter (and the int8 text graph)."""
    model = tiny_lts()
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(model, out, int8_text=True)
    return model, out


def test_files_and_metadata(exported):
    model, out = exported
    paths = export_paths(out)
    for key in ("image", "text", "decoder", "meta"):
        assert paths[key].is_file()
    assert (paths["tokenizer"] / "tokenizer_config.json").is_file()
    meta = json.loads(paths["meta"].read_text())
    assert meta["image_size"] == model.image_size and meta["max_length"] == model.text.max_length
    assert meta["parity"]["max_abs_diff"]["mask_logits"] <= PARITY_TOLERANCE == TOL


@torch.no_grad()
def test_graphs_match_pytorch_with_dynamic_batches(exported):
    model, out = exported
    onnx_model = OnnxModel(out)
    S = model.image_size
    images = torch.randint(0, 256, (3, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([2, 0, 2])
    ref = model.decode(model.encode_image(images), model.encode_text(TEXTS), index)
    got = onnx_model.decode(onnx_model.encode_image(images), onnx_model.encode_text(TEXTS), index)
    assert ref["mask_logits"].std() > 0.3, "constant logits would make the comparison vacuous"
    for key in ("mask_logits", "no_target_logits", "prior_logits"):
        assert got[key].shape == ref[key].shape, key
        diff = float((got[key] - ref[key]).abs().max())
        assert diff < TOL, f"{key}: max |onnx - torch| = {diff:.2e}"


def test_per_expression_graphs_get_their_own_thread_count(exported):
    _, out = exported
    m = OnnxModel(out, threads=2)  # sentence_threads defaults to 1
    threads = [sess.get_session_options().intra_op_num_threads
               for sess in (m.image_session, m.text_session, m.decoder_session)]
    assert threads == [2, 1, 1]
    m = OnnxModel(out, threads=2, sentence_threads=2)
    assert m.decoder_session.get_session_options().intra_op_num_threads == 2


def test_onnx_predictor_matches_predictor(exported):
    model, out = exported
    image = red_square_image(57, 93)  # not square: letterbox + inverse are exercised
    torch_p, onnx_p = Predictor(model), OnnxPredictor(out, threads=1)
    torch_p.set_image(image)
    onnx_p.set_image(image)
    a, b = torch_p.predict(TEXTS), onnx_p.predict(TEXTS)
    assert b.masks.shape == a.masks.shape == (3, 57, 93)
    diff = float(np.abs(a.logits - b.logits).max())
    assert diff < TOL, f"full-resolution logits differ by {diff:.2e}"
    assert np.abs(a.no_target_prob - b.no_target_prob).max() < TOL
    undecided = np.abs(a.logits) < TOL  # a pixel on the threshold may fall either way
    assert ((a.masks == b.masks) | undecided).all()

    batch = list(onnx_p.predict_batch([image, image[::-1].copy()], [TEXTS[:1], TEXTS[1:]], images_per_batch=2))
    ref = list(torch_p.predict_batch([image, image[::-1].copy()], [TEXTS[:1], TEXTS[1:]], images_per_batch=2))
    for x, y in zip(batch, ref):
        assert np.abs(x.logits - y.logits).max() < TOL


@torch.no_grad()
def test_text_graph_matches_pytorch_at_any_token_length(exported):
    """The text graph alone, on batches padded to 3 different lengths (the export example had one)."""
    model, out = exported
    onnx_model = OnnxModel(out)
    for texts in (["red"], TEXTS, ["the " * 30 + "square"]):  # 3 tokens, the longest of TEXTS, truncated
        tokens = onnx_model.tokenize(texts)
        assert tokens["input_ids"].shape[1] == min(max(len(model.text.tokenizer(t)["input_ids"]) for t in texts),
                                                   model.text.max_length)
        ref_tokens, ref_sentence = model.text(tokens["input_ids"], tokens["attention_mask"])
        got = onnx_model.encode_tokens(**tokens)
        real = tokens["attention_mask"].bool()
        assert float((got.tokens - ref_tokens)[real].abs().max()) < TOL
        assert float((got.sentence - ref_sentence).abs().max()) < TOL


def test_old_export_versions_are_refused(exported, tmp_path):
    _, out = exported
    paths = export_paths(out)
    meta = json.loads(paths["meta"].read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(ValueError, match="version 1"):
        OnnxModel(old)


@torch.no_grad()
def test_int8_text_graph_is_quantised_close_and_opt_in(exported, tmp_path):
    import onnx

    model, out = exported
    paths = export_paths(out)
    meta = json.loads(paths["meta"].read_text())
    assert meta["text_graph_int8"] == paths["text_int8"].name
    graph = onnx.load(str(paths["text_int8"])).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) >= 4, "the text graph's MatMul weights should be stored as int8"
    assert "int8_text_max_abs_diff" in meta["parity"]

    tokens = OnnxModel(out).tokenize(TEXTS)
    ref = OnnxModel(out).encode_tokens(**tokens).sentence
    got = OnnxModel(out, int8_text=True).encode_tokens(**tokens).sentence
    assert float((got - ref).abs().max()) > 0, "the int8 graph ran the float weights"
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.95

    plain = tmp_path / "plain.json"  # an export without --int8-text
    plain.write_text(json.dumps({k: v for k, v in meta.items() if k != "text_graph_int8"}))
    with pytest.raises(ValueError, match="--int8-text"):
        OnnxModel(plain, int8_text=True)


def test_predict_needs_an_image(exported):
    with pytest.raises(RuntimeError, match="set_image"):
        OnnxPredictor(exported[1]).predict("the red square")


def test_auto_falls_back_to_the_legacy_exporter(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("the new exporter cannot do this")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    meta = json.loads(export_onnx(tiny_lts(), tmp_path / "m.onnx")["meta"].read_text())
    assert meta["exporter"] == {"image": "legacy", "text": "legacy", "decoder": "legacy"}
    # the per-expression graphs try the legacy exporter first (fused export): only the image graph fell back
    assert len(meta["exporter_failures"]) == 1 and meta["exporter_failures"][0].startswith("m.image.onnx")
    assert all("the new exporter cannot do this" in f for f in meta["exporter_failures"])
    assert meta["parity"]["max_abs_diff"]["mask_logits"] < TOL

    meta = json.loads(export_onnx(tiny_lts(), tmp_path / "plain.onnx", optimize=False)["meta"].read_text())
    assert len(meta["exporter_failures"]) == 3 and meta["fused_ops"] == {}


def test_per_expression_graphs_fall_back_to_the_new_exporter(tmp_path, monkeypatch):
    """The fused export prefers the legacy exporter for the text and head graphs; without it, the new
    exporter's (unfused attention) graphs are used and still match PyTorch."""
    real_export = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("no legacy exporter here")
        return real_export(*args, dynamo=True, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    meta = json.loads(export_onnx(tiny_lts(), tmp_path / "m.onnx")["meta"].read_text())
    assert meta["exporter"] == {"image": "dynamo", "text": "dynamo", "decoder": "dynamo"}
    assert len(meta["exporter_failures"]) == 2
    assert "MultiHeadAttention" not in meta["fused_ops"]["decoder"]
    assert meta["parity"]["max_abs_diff"]["mask_logits"] < TOL


def _op_types(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _loaded_nodes(path, tmp_path) -> int:
    """Nodes of the graph as onnxruntime runs it after constant folding (ORT_ENABLE_BASIC): the legacy
    exporter writes shape arithmetic and Constant nodes that onnxruntime folds away when it loads."""
    import onnx
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    o.optimized_model_filepath = str(tmp_path / (Path(path).name + ".basic.onnx"))
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return len(onnx.load(o.optimized_model_filepath).graph.node)


def test_per_expression_graphs_are_fused(exported, tmp_path):
    """Default export: fused attention in the text and head graphs, fewer nodes than the plain export,
    same outputs as the plain export and as PyTorch (the parity tests above run on these graphs)."""
    model, out = exported
    paths = export_paths(out)
    meta = json.loads(paths["meta"].read_text())
    attention_layers = sum(type(m).__name__ == "Attention" for m in model.head.modules())
    assert meta["fused_ops"]["decoder"]["MultiHeadAttention"] == attention_layers > 0
    assert meta["fused_ops"]["text"]["Attention"] == model.text.model.config.num_hidden_layers
    assert {"MultiHeadAttention"} <= _op_types(paths["decoder"])
    assert {"Attention", "EmbedLayerNormalization", "BiasGelu"} <= _op_types(paths["text"])
    assert not {"Softmax", "SkipLayerNormalization"} & _op_types(paths["text"])

    plain = export_onnx(model, tmp_path / "plain.onnx", optimize=False)
    for key in ("text", "decoder"):
        assert _loaded_nodes(paths[key], tmp_path) < _loaded_nodes(plain[key], tmp_path), key
    assert "MultiHeadAttention" not in _op_types(plain["decoder"]) and "Attention" not in _op_types(plain["text"])
    image = red_square_image(64, 64)
    fused_p, plain_p = OnnxPredictor(out, threads=1), OnnxPredictor(plain["meta"], threads=1)
    fused_p.set_image(image)
    plain_p.set_image(image)
    a, b = fused_p.predict(TEXTS), plain_p.predict(TEXTS)
    assert np.abs(a.logits - b.logits).max() < TOL


def test_a_wrong_fused_graph_fails_the_parity_check(tmp_path, monkeypatch):
    """The parity check holds the fused graphs to PARITY_TOLERANCE: a MultiHeadAttention node that
    ignores the text padding mask (a plausible fusion bug) must fail the export."""
    from refseg import export as export_module

    real = export_module._MultiHeadAttention.symbolic

    def maskless(g, q, k, v, bias, key_mask, heads):
        return real(g, q, k, v, bias, None, heads)

    monkeypatch.setattr(export_module._MultiHeadAttention, "symbolic", staticmethod(maskless))
    with pytest.raises(RuntimeError, match="differ by"):
        export_onnx(tiny_lts(), tmp_path / "m.onnx")


def test_cli_exports_a_checkpoint_by_path(tmp_path, capsys):
    from refseg.cli import main as cli

    weights = tiny_lts_file(tmp_path / "ckpt")
    out = tmp_path / "onnx" / "model.onnx"
    assert cli(["export", "--model", str(weights), "--out", str(out), "--exporter", "legacy"]) == 0
    printed = capsys.readouterr().out
    assert "parity vs PyTorch" in printed
    meta = json.loads(export_paths(out)["meta"].read_text())
    assert meta["exporter"] == {"image": "legacy", "text": "legacy", "decoder": "legacy"}
    assert meta["parity"]["max_abs_diff"]["mask_logits"] < TOL


def test_cli_reports_an_unknown_model(tmp_path, capsys):
    from refseg.cli import main as cli

    assert cli(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) != 0
    assert "error" in capsys.readouterr().err


def test_tokenize_matches_the_hugging_face_tokenizer(exported):
    """OnnxModel.tokenize calls the Rust tokenizer directly; ids and masks must be the wrapper's."""
    _, out = exported
    m = OnnxModel(out)
    assert m._backend is not None, "a fast tokenizer: the direct path should be taken"
    batches = [TEXTS, ["red"], ["the " * 30 + "square", "a b"], ["ÄÖÜ naïve  café — 3½ m²", "x" * 100]]
    for texts in batches:
        got = m.tokenize(texts)
        ref = m.tokenizer(texts, padding="longest", truncation=True, max_length=m.max_length, return_tensors="np")
        for key in ("input_ids", "attention_mask"):
            assert got[key].dtype == torch.int64
            assert np.array_equal(got[key].numpy(), ref[key]), (texts, key)


def test_pks_with_region_map_exports_and_matches(tmp_path):
    """A PKS click-mode model (region map, joint peak): its decoder graph drops the pooled-image input that only
    the click loss reads, and the ONNX predictor must still feed it the right inputs and match PyTorch."""
    from _engine_fixtures import SIZE, TINY_LTS

    from refseg.methods import MODELS

    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_LTS.items() if k in ("visual", "text", "max_length", "dim", "depth", "heads")}
    model = MODELS["pks"](image_size=SIZE, region_head=True, peak_source="joint", fpn_width=16, **kwargs).eval()
    perturb_head(model, 1)  # a fresh head's last layers start at zero: perturb so that logits vary
    gen = torch.Generator().manual_seed(1)
    out = tmp_path / "pks.onnx"
    export_onnx(model, out)
    meta = json.loads(export_paths(out)["meta"].read_text())
    assert len(meta["image_outputs"]) == len(model.encode_image(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)))
    assert meta["parity"]["max_abs_diff"]["mask_logits"] < TOL
    onnx_model = OnnxModel(out)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen)
    index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ref = model.decode(model.encode_image(images), model.encode_text(TEXTS), index)
    got = onnx_model.decode(onnx_model.encode_image(images), onnx_model.encode_text(TEXTS), index)
    assert float(ref["mask_logits"].std()) > 1e-3
    assert float((ref["mask_logits"] - got["mask_logits"]).abs().max()) < TOL
