"""`refseg export`: a model as three ONNX graphs, and a Predictor that runs them on onnxruntime.

    refseg export --model lts-synthref --out model.onnx

writes, beside each other (``--out`` names the stem; a trailing ``.onnx`` is dropped):

    model.image.onnx     image (B, 3, S, S) uint8 RGB in [0, 255]  ->  per-image tensors f0, f1 ...
                         (B, ...): the visual encoder with the model's normalisation folded in, followed
                         by the language-free part of the head (``model.image_context``) when the model
                         has one, else the encoder maps, finest first
    model.text.onnx      input_ids, attention_mask (B, L) int64 -> tokens (B, L, D), sentence (B, D):
                         the text encoder
    model.decoder.onnx   f0, f1 ... (B_img, ...) + tokens, sentence, attention_mask + image_index (B,) int64
                         -> mask_logits (B, 1, S, S), no_target_logits (B,), prior_logits (B, 1, S/16, S/16):
                         the per-sentence head
    model.text.int8.onnx with ``--int8-text`` only: the text graph with int8 weights (see below)
    model.tokenizer/     the text encoder's tokenizer (``save_pretrained``); tokenising stays in Python
    model.tokenizer.json the same tokenizer for the ``tokenizers`` package alone, set to truncate and pad
                         as the wrapper does (checked at export; absent for a tokenizer without a Rust backend)
    model.json           image size, max_length, input/output names, the model config, the exporter
                         used and the parity measured against PyTorch at export time

Separate graphs, so that ``OnnxPredictor.set_image`` runs the visual encoder (and
the head's per-image part) once and every ``predict`` afterwards pays only for the
text encoder and the per-sentence head, exactly as ``Predictor`` does with PyTorch;
the text encoder is a graph of its own so that its time can be measured apart.
Every graph has dynamic batch axes (images, texts), the text and decoder graphs a
dynamic token length L (<= max_length: ``OnnxModel.tokenize`` pads to the longest
expression only); the image size S is fixed.

    from refseg.export import OnnxPredictor
    predictor = OnnxPredictor("model.onnx")      # same API as refseg.Predictor
    predictor.set_image("photo.jpg")
    predictor.predict(["the red star"]).masks    # (1, H, W) bool

int8 text encoder and head (opt-in: ``refseg export --int8-text --int8-head``, then
``OnnxPredictor(path, int8_text=True, int8_head=True)``): onnxruntime's dynamic quantisation of
the text graph's and the decoder graph's MatMul weights, per output channel; activations stay
float. Faster, not exact: the float graphs stay the default; the export's parity check holds
them to ``PARITY_TOLERANCE`` and only records the int8 graphs' difference. (The image graph is
not quantised: static int8 of its convolutions costs several points of oIoU.)

Per-expression graphs (what every further expression on a cached image costs) are
fused at export time (``optimize=True``, the default; ``refseg export --no-optimize``
writes them unfused): the head's attention layers are exported as onnxruntime's
``com.microsoft.MultiHeadAttention`` nodes, the text encoder with its Hugging Face
"eager" attention, and both graphs then go through onnxruntime's transformer optimiser
offline (graph rewriting only: Attention, EmbedLayerNormalization, (Bias)Gelu,
LayerNormalization; no hardware-specific kernels; see ``_optimize``). The JSON records
the fused operators (``fused_ops``); the parity check runs on the fused graphs.

Exporters: the image graph tries the new (``dynamo=True``) exporter first, the
per-expression graphs the legacy TorchScript exporter (``dynamo=False``) first, whose
graphs carry the patterns the fusions match (and which writes MultiHeadAttention
nodes); if one fails the other is used and the JSON says so. Without ``optimize``
every graph tries the new exporter first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from refseg.argtypes import positive_int
from refseg.engine.config import write_text_atomic
from refseg.modeling.base import EncoderHeadModel, RISModel
from refseg.modeling.text import TextFeatures
from refseg.predictor import Predictor

FORMAT = "refseg-onnx"
VERSION = 2  # 2: image graph holds image_context; token length is dynamic
OPSET = 18
PARITY_TOLERANCE = 1e-3  # max |mask logit| difference accepted at export time (float32 on CPU)
EXAMPLE_TEXTS = ("the red star left of the blue circle", "the largest square")


def export_paths(out: Union[str, Path]) -> Dict[str, Path]:
    """Files written for ``--out out``: ``image``, ``text``, ``text_int8`` (with ``int8_text`` only),
    ``decoder_int8`` (with ``int8_head`` only),
    ``decoder``, ``tokenizer`` (a folder), ``fast_tokenizer`` (when the tokenizer has a Rust backend) and
    ``meta``."""
    out = Path(out)
    if out.suffix == ".json":
        out = out.with_suffix("")
    stem = out.with_suffix("") if out.suffix == ".onnx" else out
    return {
        "image": stem.with_name(stem.name + ".image.onnx"),
        "text": stem.with_name(stem.name + ".text.onnx"),
        "text_int8": stem.with_name(stem.name + ".text.int8.onnx"),
        "decoder_int8": stem.with_name(stem.name + ".decoder.int8.onnx"),
        "decoder": stem.with_name(stem.name + ".decoder.onnx"),
        "tokenizer": stem.with_name(stem.name + ".tokenizer"),
        "fast_tokenizer": stem.with_name(stem.name + ".tokenizer.json"),
        "meta": stem.with_name(stem.name + ".json"),
    }


def _image_features(model: nn.Module, image: torch.Tensor) -> List[torch.Tensor]:
    """What the decoder graph reads: ``model.image_context(maps)`` (the maps themselves by default)."""
    return list(model.image_context(model.encode_image(image)))


class ImageGraph(nn.Module):
    """image (B, 3, S, S) uint8 -> tuple of per-image tensors (``_image_features``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        return tuple(_image_features(self.model, image))


class TextGraph(nn.Module):
    """input_ids, attention_mask (B, L) int64 -> tokens (B, L, D), sentence (B, D): ``model.text``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.text(input_ids, attention_mask)


class DecoderGraph(nn.Module):
    """per-image tensors + encoded text -> (mask_logits, no_target_logits, prior_logits):
    ``model.decode_context``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: List[torch.Tensor], tokens, sentence, attention_mask, image_index):
        txt = TextFeatures(tokens, attention_mask.bool(), sentence)
        out = self.model.decode_context(features, txt, image_index)
        return out["mask_logits"], out["no_target_logits"], out["prior_logits"]


@contextlib.contextmanager
def _quiet(sink: io.StringIO):
    """Exporter chatter (progress prints, optimiser and registry log lines) into ``sink``, for one call."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            # the exporters warn about every traced Python condition, dynamic-shape renames ...
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(module, args, path, input_names, output_names, dynamic_axes, exporter, opset, failures: list,
            auto: Sequence[str] = ("dynamo", "legacy"), legacy_context=contextlib.nullcontext) -> str:
    """Export one graph. ``args`` may hold a list of tensors (flattened into
    consecutive ONNX inputs); ``dynamic_axes`` maps each flat input name to
    ``{axis: name}`` of its dynamic axes (axes sharing a name have one size).
    ``auto``: the exporters tried, in order, for ``exporter="auto"``;
    ``legacy_context``: a context manager entered around the legacy exporter only.
    Returns the exporter that succeeded ("dynamo" or "legacy"); the failures
    before it are appended to ``failures``.
    """
    errors = []
    for kind in (list(auto) if exporter == "auto" else [exporter]):
        chatter = io.StringIO()  # shown only on failure
        try:
            with _quiet(chatter), (legacy_context() if kind == "legacy" else contextlib.nullcontext()):
                if kind == "dynamo":
                    from torch.export import Dim

                    names = sorted({name for axes in dynamic_axes.values() for name in axes.values()})
                    dims = {name: Dim(name) for name in names}
                    flat = iter({axis: dims[name] for axis, name in dynamic_axes[n].items()} for n in input_names)
                    shapes = tuple([next(flat) for _ in a] if isinstance(a, (list, tuple)) else next(flat)
                                   for a in args)
                    torch.onnx.export(
                        module, args, str(path), input_names=input_names, output_names=output_names,
                        dynamo=True, dynamic_shapes=shapes, opset_version=opset, external_data=False,
                    )
                else:
                    torch.onnx.export(
                        module, args, str(path), input_names=input_names, output_names=output_names,
                        dynamo=False, dynamic_axes=dynamic_axes, opset_version=opset,
                    )
            failures.extend(f"{path.name}: {err}" for err in errors)
            return kind
        except Exception as e:  # noqa: BLE001  (any exporter failure: fall back, then report all)
            detail = "\n".join((chatter.getvalue().strip().splitlines() + str(e).strip().splitlines())[-12:])
            errors.append(f"{kind}: {type(e).__name__}:\n    " + detail.replace("\n", "\n    "))
    raise RuntimeError(f"ONNX export of {path.name} failed:\n  " + "\n  ".join(errors))


class _MultiHeadAttention(torch.autograd.Function):
    """``Attention``'s core on projections without their biases: q (B, N, D), k, v (B, M, D), bias (3 D)
    (the q, k, v biases, added first), an int32 key mask (B, M) or None. Splits heads, runs scaled
    dot-product attention, merges heads. The legacy exporter writes it as one
    ``com.microsoft.MultiHeadAttention`` node (onnxruntime's fused CPU / GPU kernel, which also adds the
    biases) instead of ~18 small ops (bias Adds, reshapes, transposes, two batched MatMuls, mask
    arithmetic, Softmax)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, key_mask, heads: int):
        B, N, D = q.shape
        M = k.shape[1]
        bq, bk, bv = bias.split(D)
        q = (q + bq).view(B, N, heads, D // heads).transpose(1, 2)  # (B, h, N, D/h)
        k = (k + bk).view(B, M, heads, D // heads).transpose(1, 2)  # (B, h, M, D/h)
        v = (v + bv).view(B, M, heads, D // heads).transpose(1, 2)  # (B, h, M, D/h)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # (B, 1, 1, M)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, D/h)
        return x.transpose(1, 2).reshape(B, N, D)

    @staticmethod
    def symbolic(g, q, k, v, bias, key_mask, heads: int):
        inputs = [q, k, v, bias]
        if not (key_mask is None or key_mask.node().mustBeNone()):
            # key_padding_mask (B, M) int32, 1 = attend: masked keys get -10000 before the softmax
            # (torch: -inf); both give them weight exp(-10000) = 0 in float32
            inputs.append(key_mask)
        out = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=heads)
        return out.setType(q.type())  # (B, N, D), as q


def _fused_attention_forward(self, q, k, v, key_mask=None):
    """``refseg.modeling.common.Attention.forward`` through ``_MultiHeadAttention`` (same result)."""
    mask = None if key_mask is None else key_mask.to(torch.int32)
    F = torch.nn.functional
    zero = lambda lin: lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])  # noqa: E731
    bias = torch.cat([zero(self.q), zero(self.k), zero(self.v)])
    x = _MultiHeadAttention.apply(F.linear(q, self.q.weight), F.linear(k, self.k.weight), F.linear(v, self.v.weight),
                                  bias, mask, self.heads)
    return self.proj(x)


@contextlib.contextmanager
def _fused_attention():
    """While exporting (legacy exporter): the head's ``Attention`` layers as MultiHeadAttention nodes."""
    from refseg.modeling import common

    forward = common.Attention.forward
    common.Attention.forward = _fused_attention_forward
    try:
        yield
    finally:
        common.Attention.forward = forward


@contextlib.contextmanager
def _eager_attention(text: nn.Module):
    """While exporting: the Hugging Face text encoder with its "eager" attention (explicit MatMul /
    Softmax, the pattern onnxruntime's transformer optimiser fuses into one Attention node) instead
    of ``scaled_dot_product_attention``, whose exported mask arithmetic it does not recognise.
    Same outputs; the implementation in use before is restored afterwards."""
    hf = getattr(text, "model", None)
    before = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    switched = False
    if before not in (None, "eager") and hasattr(hf, "set_attn_implementation"):
        try:
            hf.set_attn_implementation("eager")
            switched = True
        except (ValueError, ImportError, AttributeError):  # a model without an eager path: export it as it is
            pass
    try:
        yield
    finally:
        if switched:
            hf.set_attn_implementation(before)


def _optimize(path: Path, fusions: str, num_heads: int = 0, hidden_size: int = 0) -> Dict[str, int]:
    """Rewrite the graph at ``path`` in place with onnxruntime's transformer optimiser (offline, pure
    graph rewriting: ``opt_level=0`` bakes in no hardware-specific kernels; the session still applies
    ``ORT_ENABLE_ALL`` when it loads). ``fusions``: "text" (a BERT-like encoder: EmbedLayerNormalization,
    Attention, BiasGelu, LayerNormalization) or "head" (Gelu / BiasGelu / LayerNormalization; its
    attention is already fused by ``_fused_attention``). Returns the count of each fused operator found."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # no SkipLayerNormalization: onnxruntime's CPU kernel for it took ~5% longer on the text graph than the
    # Add + LayerNormalization it replaces (interleaved runs on the 2-core dev machine); OnnxModel also
    # turns off its run-time fusion (SkipLayerNormFusion) for the per-expression graphs
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    if fusions == "head":
        options.enable_attention = False
        options.enable_embed_layer_norm = False
    tmp = path.with_name(path.name + ".tmp")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its modules log shape-inference notes to loggers of their own module names
    try:
        with _quiet(io.StringIO()):
            optimized = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                       optimization_options=options, opt_level=0)
            stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
            optimized.save_model_to_file(str(tmp))
    finally:
        root.setLevel(level)
    os.replace(tmp, path)
    return stats


@torch.no_grad()
def export_onnx(
    model: nn.Module, out: Union[str, Path], exporter: str = "auto", opset: int = OPSET, check: bool = True,
    extra_meta: Optional[dict] = None, int8_text: bool = False, optimize: bool = True, int8_head: bool = False,
) -> Dict[str, Path]:
    """Write the three graphs, the tokenizer and the JSON for ``model`` (see the module docstring).

    exporter: "auto" (new exporter, legacy on failure), "dynamo" or "legacy".
    check: run the graphs on onnxruntime against PyTorch on an example and
      raise if mask logits differ by more than ``PARITY_TOLERANCE``.
    int8_text: also write the int8 text graph (see the module docstring).
    int8_head: also write the int8 decoder graph (the per-sentence head; its MatMul weights, from the
      fused graph).
    optimize: fuse the per-expression graphs (see "Per-expression graphs" in the module
      docstring); False writes the exporter's graphs as they are.
    The model is put in eval mode on the CPU. Returns ``export_paths(out)``.
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ValueError(f"exporter must be auto, dynamo or legacy, got {exporter!r}")
    if not isinstance(model, EncoderHeadModel) or getattr(model.text, "tokenizer", None) is None:
        raise ValueError(f"{type(model).__name__}: export needs a text encoder with a Hugging Face `tokenizer`")
    text = model.text
    model = model.eval().cpu()
    paths = export_paths(out)
    paths["image"].parent.mkdir(parents=True, exist_ok=True)
    S = int(model.image_size)

    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 3, S, S), dtype=torch.uint8, generator=gen)  # (2, 3, S, S)
    tokens = text.tokenize(list(EXAMPLE_TEXTS), trim=True)  # (2, L), L < max_length: a dynamic length
    index = torch.tensor([0, 1])
    features = _image_features(model, image)
    encoded = text(tokens["input_ids"], tokens["attention_mask"])  # (2, L, D), (2, D)
    names = [f"f{i}" for i in range(len(features))]
    text_inputs, text_outputs = ["input_ids", "attention_mask"], ["tokens", "sentence"]
    decoder_inputs = names + ["tokens", "sentence", "attention_mask", "image_index"]
    outputs = ["mask_logits", "no_target_logits", "prior_logits"]
    per_token = {0: "texts", 1: "length"}

    start, failures = time.perf_counter(), []
    used_image = _export(ImageGraph(model), (image,), paths["image"], ["image"], names,
                         {"image": {0: "images"}}, exporter, opset, failures)
    # per-expression graphs: the legacy exporter first when optimising (its graphs carry the patterns
    # onnxruntime's fusions match, and the head's attention as MultiHeadAttention nodes)
    per_expression = ("legacy", "dynamo") if optimize else ("dynamo", "legacy")
    with _eager_attention(text) if optimize else contextlib.nullcontext():
        used_text = _export(TextGraph(model), (tokens["input_ids"], tokens["attention_mask"]), paths["text"],
                            text_inputs, text_outputs, {"input_ids": per_token, "attention_mask": per_token},
                            exporter, opset, failures, auto=per_expression)
    used_decoder = _export(
        DecoderGraph(model), (features, *encoded, tokens["attention_mask"], index),
        paths["decoder"], decoder_inputs, outputs,
        {**{n: {0: "images"} for n in names}, "tokens": per_token, "sentence": {0: "texts"},
         "attention_mask": per_token, "image_index": {0: "texts"}},
        exporter, opset, failures, auto=per_expression,
        legacy_context=_fused_attention if optimize else contextlib.nullcontext,
    )
    if int8_text:  # from the unfused text graph: its MatMul weights (all of them) are what gets quantised
        _quantize_text(paths["text"], paths["text_int8"])
    elif paths["text_int8"].exists():
        paths["text_int8"].unlink()  # left by an earlier export of this stem; the JSON will not name it
    fused = {}
    if optimize:
        config = getattr(getattr(text, "model", None), "config", None)
        heads, hidden = int(getattr(config, "num_attention_heads", 0)), int(getattr(config, "hidden_size", 0))
        for key, fusions in (("text", "text"), ("decoder", "head")):
            try:
                fused[key] = _optimize(paths[key], fusions, heads if key == "text" else 0,
                                       hidden if key == "text" else 0)
            except Exception as e:  # noqa: BLE001  (the unfused graph is still a correct graph: keep it)
                fused[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if int8_head:
        _quantize_text(paths["decoder"], paths["decoder_int8"])
    elif paths["decoder_int8"].exists():
        paths["decoder_int8"].unlink()
    if paths["tokenizer"].exists():
        shutil.rmtree(paths["tokenizer"])
    text.tokenizer.save_pretrained(str(paths["tokenizer"]))
    backend = _backend_tokenizer(text.tokenizer, int(text.max_length))
    if backend is not None:  # read back with the `tokenizers` package alone: no transformers import at load
        backend.save(str(paths["fast_tokenizer"]))
    elif paths["fast_tokenizer"].exists():
        paths["fast_tokenizer"].unlink()
    meta = {
        "format": FORMAT, "version": VERSION, "image_size": S, "max_length": int(text.max_length),
        "image_graph": paths["image"].name, "text_graph": paths["text"].name,
        "decoder_graph": paths["decoder"].name, "tokenizer": paths["tokenizer"].name,
        **({"fast_tokenizer": paths["fast_tokenizer"].name} if backend is not None else {}),
        **({"text_graph_int8": paths["text_int8"].name} if int8_text else {}),
        **({"decoder_graph_int8": paths["decoder_int8"].name} if int8_head else {}),
        "image_inputs": ["image"], "image_outputs": names, "text_inputs": text_inputs, "text_outputs": text_outputs,
        "decoder_inputs": decoder_inputs, "decoder_outputs": outputs,
        "exporter": {"image": used_image, "text": used_text, "decoder": used_decoder}, "opset": opset,
        "fused_ops": fused,
        "exporter_failures": failures, "torch": torch.__version__,
        "export_seconds": round(time.perf_counter() - start, 1),
        "config": model.config,
        **(extra_meta or {}),
    }
    write_text_atomic(paths["meta"], json.dumps(meta, indent=2) + "\n")
    if check:
        onnx_model = OnnxModel(paths["meta"])
        ref = model.decode(model.encode_image(image), model.encode_text(list(EXAMPLE_TEXTS)), index)
        got = onnx_model.decode(onnx_model.encode_image(image), onnx_model.encode_text(list(EXAMPLE_TEXTS)), index)
        diff = {k: float((ref[k] - got[k]).abs().max()) for k in ("mask_logits", "no_target_logits")}
        meta["parity"] = {"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE, "texts": list(EXAMPLE_TEXTS)}
        if int8_text:  # recorded, not enforced: int8 weights are not exact (see the module docstring)
            q = OnnxModel(paths["meta"], int8_text=True)
            got = q.decode(q.encode_image(image), q.encode_text(list(EXAMPLE_TEXTS)), index)
            meta["parity"]["int8_text_max_abs_diff"] = {
                k: float((ref[k] - got[k]).abs().max()) for k in ("mask_logits", "no_target_logits")}
        if int8_head:  # recorded, not enforced, as int8_text
            q = OnnxModel(paths["meta"], int8_text=int8_text, int8_head=True)
            got = q.decode(q.encode_image(image), q.encode_text(list(EXAMPLE_TEXTS)), index)
            meta["parity"]["int8_max_abs_diff"] = {
                k: float((ref[k] - got[k]).abs().max()) for k in ("mask_logits", "no_target_logits")}
        write_text_atomic(paths["meta"], json.dumps(meta, indent=2) + "\n")
        if diff["mask_logits"] > PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX and PyTorch mask logits differ by {diff['mask_logits']:.2e} "
                               f"(> {PARITY_TOLERANCE}); see {paths['meta']}")
    return paths


def _quantize_text(src: Path, dst: Path) -> None:
    """int8 per-channel dynamic quantisation of the MatMul weights of the graph ``src`` (text or decoder)
    into ``dst``; tensors whose type shape inference cannot tell (outputs of com.microsoft nodes) are float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(dst.name + ".tmp")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs "please consider pre-processing" advice to the root logger
    try:
        with _quiet(io.StringIO()):
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], extra_options={"DefaultTensorType": 1})
    finally:
        root.setLevel(level)
    os.replace(tmp, dst)


class OnnxModel(RISModel):
    """The ``encode_image`` / ``encode_text`` / ``decode`` interface of a refseg model, on onnxruntime.

    Holds no parameters; tensors in and out are CPU torch tensors so that
    ``Predictor`` drives it unchanged. ``encode_image`` returns what the
    decoder graph reads (the model's ``image_context``, computed once per
    image); ``encode_text`` = ``encode_tokens(**tokenize(texts))`` returns
    ``TextFeatures`` as the PyTorch model does.

    path: the ``--out`` given to export (``model.onnx``) or its ``model.json``.
    threads: onnxruntime intra-op threads of the image graph (0: its default); inter-op
      threads are 1 (the graphs are sequential), idle threads do not spin, and every graph
      optimisation is on.
    sentence_threads: intra-op threads of the text and decoder graphs, which run once
      per expression (default 1: their ops are small, and a second thread costs more
      in synchronisation than it gains: on the 2-core dev machine, busy with two
      1-thread trainings, an extra expression on a cached image took 11.7 ms with 1
      thread against 30.4 ms with 2 (median of 90 calls; `benchmarks/latency.py
      --sentence-threads 1` or `2` measures it on yours); 0: onnxruntime's default).
    int8_text: run the int8 text graph (exported with ``--int8-text``; not exact, see the module docstring).
    int8_head: run the int8 decoder graph (exported with ``--int8-head``; not exact either).

    ``tokenize`` calls the fast tokenizer's Rust backend directly (~0.04 ms instead of ~0.3 ms for the
    Python wrapper): ``model.tokenizer.json`` when the export wrote it (checked there against the
    wrapper, loaded without importing transformers), else the wrapper's backend after the same check
    at load time; otherwise it uses the wrapper.
    """

    def __init__(self, path: Union[str, Path], threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
                 int8_text: bool = False, sentence_threads: int = 1, int8_head: bool = False):
        super().__init__()
        import onnxruntime as ort

        from refseg.modeling.limits import ModelConfigError, check_field

        meta_path = export_paths(path)["meta"]
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: no such file; write it with `refseg export --out {path}`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a refseg ONNX export (format {self.meta.get('format')!r})")
        if self.meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: export version {self.meta.get('version')!r}, this refseg reads "
                             f"version {VERSION}; export the model again with `refseg export`")
        if int8_text and "text_graph_int8" not in self.meta:
            raise ValueError(f"{meta_path}: no int8 text graph; export with `refseg export --int8-text`")
        if int8_head and "decoder_graph_int8" not in self.meta:
            raise ValueError(f"{meta_path}: no int8 decoder graph; export with `refseg export --int8-head`")
        folder = meta_path.parent
        try:  # the sizes bound what is allocated per image and per expression: typed and in range
            for key in ("image_size", "max_length"):
                check_field(key, self.meta.get(key))
        except ModelConfigError as e:
            raise ModelConfigError(f"{meta_path}: {e}") from None
        self.image_size = int(self.meta["image_size"])
        self.config = dict(self.meta.get("config") or {})
        self.max_length = int(self.meta["max_length"])

        def options(intra: int):
            o = ort.SessionOptions()
            o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            o.inter_op_num_threads = 1
            if intra:
                o.intra_op_num_threads = int(intra)
            # idle pool threads sleep instead of spinning after each run: a spinning pool took the cores of
            # whatever ran next (the per-expression graphs, another model's session), ~1.6x its time, for
            # no gain to the image graph itself (interleaved runs, 2 cores)
            o.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return o

        providers = list(providers)
        # per-expression graphs: without onnxruntime's run-time SkipLayerNormalization fusion (see _optimize)
        self.image_session, self.text_session, self.decoder_session = (
            ort.InferenceSession(str(folder / self.meta[key]), options(intra), providers=providers,
                                 disabled_optimizers=disabled)
            for key, intra, disabled in (
                ("image_graph", threads, []),
                ("text_graph_int8" if int8_text else "text_graph", sentence_threads, ["SkipLayerNormFusion"]),
                ("decoder_graph_int8" if int8_head else "decoder_graph", sentence_threads, ["SkipLayerNormFusion"])))
        self._tokenizer_dir = folder / str(self.meta["tokenizer"])
        self._tokenizer = None
        fast = self.meta.get("fast_tokenizer")
        if fast and (folder / str(fast)).is_file():  # checked against the wrapper at export time
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_file(str(folder / str(fast)))
        else:
            self._backend = _backend_tokenizer(self.tokenizer, self.max_length)
        # the exporters drop graph inputs no output depends on (PKS's pooled-image map, read only by its
        # click loss): feed the decoder only the inputs its graph kept
        self._decoder_inputs = {i.name for i in self.decoder_session.get_inputs()}

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer wrapper (loaded on first use: the fast path reads only ``_backend``)."""
        if self._tokenizer is None:
            from refseg.modeling import hf

            self._tokenizer = hf.load_tokenizer(str(self._tokenizer_dir), "tokenizer")
        return self._tokenizer

    def encode_image(self, images: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, S, S) uint8 RGB in [0, 255] -> list of per-image tensors (B, ...), ``meta["image_outputs"]``."""
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"encode_image expects (B, 3, {self.image_size}, {self.image_size}) uint8, "
                             f"got {tuple(images.shape)} {images.dtype}")
        maps = self.image_session.run(None, {"image": images.cpu().numpy()})
        return [torch.from_numpy(m) for m in maps]

    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """list[str] (B) -> dict(input_ids, attention_mask), (B, L) int64, L = the longest
        expression's token count (at most max_length)."""
        if self._backend is not None:  # the Rust tokenizer directly: ~0.25 ms less per call than the wrapper
            enc = self._backend.encode_batch(list(texts))
            return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.int64),
                    "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)}
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="np")
        return {k: torch.from_numpy(enc[k].astype(np.int64)) for k in ("input_ids", "attention_mask")}

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """(B, L) int64 each -> TextFeatures(tokens (B, L, D), mask (B, L) bool, sentence (B, D)): the text graph."""
        feeds = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        tokens, sentence = self.text_session.run(self.meta["text_outputs"], feeds)
        return TextFeatures(torch.from_numpy(tokens), attention_mask.bool(), torch.from_numpy(sentence))

    def encode_text(self, texts: Sequence[str], trim: bool = False) -> TextFeatures:
        """list[str] (B) -> TextFeatures, as the PyTorch model's ``encode_text(texts, trim=True)``."""
        return self.encode_tokens(**self.tokenize(texts))

    def decode(self, vis: List[torch.Tensor], txt: TextFeatures, image_index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Same contract as the PyTorch model's ``decode`` (``vis`` from ``encode_image``): mask_logits
        (B, 1, S, S), no_target_logits (B,), prior_logits (B, 1, S/16, S/16)."""
        feeds = {name: m.cpu().numpy() for name, m in zip(self.meta["image_outputs"], vis)}
        feeds["tokens"] = txt.tokens.float().cpu().numpy()
        feeds["sentence"] = txt.sentence.float().cpu().numpy()
        feeds["attention_mask"] = txt.mask.to(torch.int64).cpu().numpy()
        feeds["image_index"] = image_index.to(torch.int64).cpu().numpy()
        feeds = {name: v for name, v in feeds.items() if name in self._decoder_inputs}
        outs = self.decoder_session.run(self.meta["decoder_outputs"], feeds)
        return {name: torch.from_numpy(v) for name, v in zip(self.meta["decoder_outputs"], outs)}


_TOKENIZER_PROBES = ("the red star left of the blue circle", "a", "Über-long naïve café, 3.5 m² ... ok?!",
                     "the " * 40 + "end", "")


def _backend_tokenizer(tokenizer, max_length: int):
    """The Rust ``tokenizers.Tokenizer`` under a fast Hugging Face tokenizer, set to truncate to ``max_length``
    and pad to the longest text as ``tokenizer(texts, padding="longest", truncation=True, max_length=...)``
    does, or None (a slow tokenizer, or one whose backend does not give the same ids and masks on
    ``_TOKENIZER_PROBES``, one at a time and together)."""
    import copy

    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None or tokenizer.pad_token_id is None:
        return None
    try:
        backend = copy.deepcopy(backend)
        backend.enable_truncation(max_length)
        backend.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                               pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token)
        for batch in [[t] for t in _TOKENIZER_PROBES] + [list(_TOKENIZER_PROBES)]:
            ref = tokenizer(batch, padding="longest", truncation=True, max_length=max_length)
            got = backend.encode_batch(batch)
            if [e.ids for e in got] != ref["input_ids"] or [e.attention_mask for e in got] != ref["attention_mask"]:
                return None
    except Exception:  # noqa: BLE001  (any doubt: the wrapper, which is the reference)
        return None
    return backend


class OnnxPredictor(Predictor):
    """``Predictor`` (set_image / predict / predict_batch, same ``Prediction``) on onnxruntime.

    path: the ``--out`` of ``refseg export`` (``model.onnx``) or its ``model.json``.
    threads: onnxruntime intra-op threads of the image graph (0: its default, all cores).
    int8_text: the int8 text graph (``refseg export --int8-text``), faster and not exact.
    int8_head: the int8 decoder graph (``refseg export --int8-head``), faster and not exact.
    sentence_threads: intra-op threads of the per-expression graphs (text, decoder); see OnnxModel.
    """

    def __init__(self, path: Union[str, Path], mask_threshold: float = 0.5, text_batch_size: int = 32,
                 threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",), int8_text: bool = False,
                 sentence_threads: int = 1, int8_head: bool = False):
        model = OnnxModel(path, threads=threads, providers=providers, int8_text=int8_text,
                          sentence_threads=sentence_threads, int8_head=int8_head)
        super().__init__(model, mask_threshold, text_batch_size)


def check_export_outputs(out: Union[str, Path], model: Union[str, Path]) -> None:
    """Raise OutputError if a file or folder ``--out`` names would replace the model being exported."""
    from refseg.outputs import OutputSet, check_folder_output, model_inputs

    files, folders = model_inputs("--model", model)
    outs = OutputSet(files, folders)
    for key, path in export_paths(out).items():
        if key == "tokenizer":
            check_folder_output(path, files + folders, "--out")
        else:
            outs.plan(path, "--out")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lts-synthref", help="a shipped model name or a checkpoint/run path")
    p.add_argument("--out", required=True,
                   help="output stem: model.onnx -> model.image.onnx, model.text.onnx, model.decoder.onnx, model.json, "
                        "model.tokenizer/")
    p.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                   help="torch.onnx exporter: auto tries the new (dynamo) one, then the legacy one")
    p.add_argument("--opset", type=positive_int, default=OPSET, help="ONNX opset version")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    p.add_argument("--no-optimize", action="store_true",
                   help="write the exporter's per-expression graphs unfused (no MultiHeadAttention / Attention / "
                        "LayerNorm / Gelu fusions; slower, for comparison)")
    p.add_argument("--int8-text", action="store_true",
                   help="also write MODEL.text.int8.onnx: int8 text encoder weights, ~2x faster text encoding, "
                        "not exact (OnnxPredictor(..., int8_text=True))")
    p.add_argument("--int8-head", action="store_true",
                   help="also write MODEL.decoder.int8.onnx: int8 head weights, not exact "
                        "(OnnxPredictor(..., int8_head=True))")


def main(args: argparse.Namespace) -> int:
    import refseg

    try:
        import onnx  # noqa: F401  (both exporters need it)
        import onnxruntime  # noqa: F401
    except ImportError as e:
        print(f"refseg export: error: {e.name} is not installed; pip install 'refseg[export]'", file=sys.stderr)
        return 2
    try:
        check_export_outputs(args.out, args.model)
        model = refseg.load(args.model)
        paths = export_onnx(model, args.out, exporter=args.exporter, opset=args.opset, check=not args.no_check,
                            extra_meta={"source_model": str(args.model)}, int8_text=args.int8_text,
                            int8_head=args.int8_head,
                            optimize=not args.no_optimize)
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input
        print(f"refseg export: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the exporters or the parity check failed
        print(f"refseg export: error: {e}", file=sys.stderr)
        return 1
    meta = json.loads(paths["meta"].read_text())
    for key in ("image", "text", "text_int8", "decoder", "decoder_int8", "tokenizer", "fast_tokenizer", "meta"):
        if (key != "text_int8" or args.int8_text) and (key != "decoder_int8" or args.int8_head) and \
                paths[key].exists():
            print(f"wrote {paths[key]}")
    print(f"exporter: image {meta['exporter']['image']}, text {meta['exporter']['text']}, "
          f"decoder {meta['exporter']['decoder']}; "
          f"opset {meta['opset']}; {meta['export_seconds']} s")
    for failure in meta["exporter_failures"]:
        print(f"note: fell back to the legacy exporter after: {failure}", file=sys.stderr)
    if "parity" in meta:
        d = meta["parity"]["max_abs_diff"]
        print(f"parity vs PyTorch (max |diff|): mask logits {d['mask_logits']:.2e}, "
              f"no-target logits {d['no_target_logits']:.2e} (tolerance {PARITY_TOLERANCE})")
        if "int8_text_max_abs_diff" in meta["parity"]:
            d = meta["parity"]["int8_text_max_abs_diff"]
            print(f"int8 text graph (not exact, not checked): mask logits {d['mask_logits']:.2e}, "
                  f"no-target logits {d['no_target_logits']:.2e}")
    return 0
