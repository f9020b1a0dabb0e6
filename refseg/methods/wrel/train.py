"""LRB-WREL's three stages on top of LTS: teacher, reference bank, EMA student.

    refseg train --method wrel --accurate-fraction 0.1 --data data/aerial-small --out runs/wrel-p10 \\
        --wrel-teacher-steps 3000 --max-steps 3000 --cache-dir cache/
    refseg train --resume runs/wrel-p10        # skips finished stages, continues the unfinished one exactly

Run folder:

    RUN/config.json log.csv tb/ last/ best/   stage 3, the run as refseg.load / refseg eval / ship_model see it
    RUN/data/                                 the weak split (with --accurate-fraction)
    RUN/cache/                                the feature cache of all stages (unless --cache-dir names one)
    RUN/stage1-teacher/                       stage 1, an ordinary run folder (train_subset accurate)
    RUN/stage2-bank/                          stage 2: log.csv, last/ (bank, ref ids, enriched text features)

1. Teacher: the generic loop on the accurate refs (wrel_teacher_steps).
2. Reference bank (bank.py): wrel_bank_prompts vectors per weak ref, fitted
   through the frozen teacher to the ref's mask (``train_bank``); then the
   bank-enriched text features, stored in fp16.
3. Student: the generic loop on all train sentences from the teacher's
   weights; weak sentences read their enriched features and an EMA teacher
   follows the student (``student_extras``, ``ema_momentum``).
Frozen encoders and the feature cache are required; one process. Design
reasoning, the EMA schedule and the choices: docs/methods/wrel.md.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from refseg.engine import checkpoint as ckpt
from refseg.engine import distributed
from refseg.engine import train as engine
from refseg.engine.config import TRAIN_SPLIT, TrainConfig, flat_view, read_config_file
from refseg.engine.ema import ema_copy
from refseg.engine.run_folder import check_resume_config, drop_replaced, open_run
from refseg.methods.wrel.config import WRELConfig
from refseg.modeling.text import TextFeatures

STAGE1, STAGE2 = "stage1-teacher", "stage2-bank"
EMA_MOMENTA = (0.95, 0.99, 0.999, 0.9995)  # at epoch 0, epoch 1, end of the second ramp, after it
EMA_BREAKS = (1.0, 3.0)  # epochs at which the two linear ramps end (in the reference run)
PROMPT_INIT_STD = 0.02


# ---- the EMA teacher ----------------------------------------------------------------


def ema_momentum(step: int, total_steps: int, steps_per_epoch: int, reference_epochs: float,
                 rescale: str = "horizon") -> float:
    """The EMA momentum used after optimiser step `step` (0-based) of a run of total_steps (docs/methods/wrel.md).

    rescale: "horizon" or "breaks", how a run shorter than the reference is treated (docs/methods/wrel.md)."""
    r = reference_epochs * steps_per_epoch / total_steps  # how many times longer the reference run is
    if r > 1:  # a shorter run: the same fraction of the run
        e = step * reference_epochs / total_steps  # position in epochs of the reference run
    else:
        e = step / steps_per_epoch
    (m0, m1, m2, m3), (b1, b2) = EMA_MOMENTA, EMA_BREAKS
    if e < b1:
        m = m0 + (m1 - m0) * e / b1
    elif e < b2:
        m = m1 + (m2 - m1) * (e - b1) / (b2 - b1)
    else:
        m = m3
    if rescale == "horizon" and r > 1:  # about 1 / (1 - m) steps averaged: the same fraction of a run r times shorter
        m = max(0.0, 1.0 - (1.0 - m) * r)
    return m


class WeakText:
    """Stage 3's `prepare`: the text features of weak sentences swapped for their bank-enriched ones.

    enriched: {"ref_id" (R,) int64, "tokens" (R, L, D), "mask" (R, L) bool,
    "sentence" (R, D)}, the stored output of stage 2, on the training device.
    """

    def __init__(self, enriched: Dict[str, torch.Tensor]):
        self.row_of = {int(r): i for i, r in enumerate(enriched["ref_id"].tolist())}
        self.enriched = enriched

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        hits = [(i, self.row_of[r]) for i, r in enumerate(batch["ref_id"].tolist()) if r in self.row_of]
        if not hits:
            return batch
        txt = batch["txt"]
        device = txt.tokens.device
        pos = torch.tensor([i for i, _ in hits], device=device)
        rows = torch.tensor([r for _, r in hits], device=device)
        tokens, mask, sentence = txt.tokens.clone(), txt.mask.clone(), txt.sentence.clone()
        tokens[pos] = self.enriched["tokens"][rows].to(tokens.dtype)  # (n, L, D)
        mask[pos] = self.enriched["mask"][rows].to(mask.dtype)  # (n, L)
        sentence[pos] = self.enriched["sentence"][rows].to(sentence.dtype)  # (n, D)
        return {**batch, "txt": TextFeatures(tokens, mask, sentence)}


def student_extras(enriched: Dict[str, torch.Tensor], options: WRELConfig, device: torch.device) -> engine.LoopExtras:
    """Stage 3's changes to the generic loop: weak sentences read their enriched text (WeakText) and are
    shown unflipped (their bank prompts were fitted to the unflipped image: "the one on the left" is
    another object in the mirror image), accurate ones appear options.accurate_repeat times per epoch,
    and an EMA teacher follows the student (ema_momentum), validated and kept in best/ unless
    options.final is student."""
    repeat = options.accurate_repeat
    return engine.LoopExtras(
        repeats=lambda sample: 1 if sample.weak else repeat,
        augmentable=lambda sample: not sample.weak,
        prepare=WeakText({k: v.to(device) for k, v in enriched.items()}),
        ema=functools.partial(ema_momentum, reference_epochs=options.ema_epochs, rescale=options.ema_rescale),
        score_ema=options.final == "teacher")


# ---- stage 2: the reference bank ---------------------------------------------------------


def weak_refs(samples) -> List[tuple]:
    """[(ref_id, data set row of its first sentence, expression)] of the weak refs, grouped by image
    (images in order of first appearance, refs in data set order within an image): the bank's rows."""
    first: Dict[int, int] = {}
    image_rank: Dict[int, int] = {}
    for i, s in enumerate(samples):
        image_rank.setdefault(s.image_id, len(image_rank))
        if s.weak and not s.no_target:
            first.setdefault(s.ref_id, i)
    order = sorted(first, key=lambda r: (image_rank[samples[first[r]].image_id], first[r]))
    return [(r, first[r], samples[first[r]].text) for r in order]


def stage_done(folder: Path) -> bool:
    """Whether a stage's last/ checkpoint has reached the stage's length."""
    found = ckpt.find_checkpoint(folder, "last")
    if found is None:
        return False
    state = json.loads((found / ckpt.STATE_JSON).read_text())
    if "n_batches" in state:  # stage 2
        return state["position"] >= state["n_batches"]
    return state["step"] >= state["total_steps"]


def bank_text(site: str, text: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              class_txt: TextFeatures, prompts: torch.Tensor) -> TextFeatures:
    """The text features the teacher reads for class names completed by bank rows `prompts` (b, P, D).

    site encoder: the rows are word embeddings, read by `text` with the
    tokenised class names input_ids / attention_mask (b, L).
    site features: the rows are offsets from the class name's sentence
    vector in the encoder's output space: prompt j of ref b is
    class_txt.sentence[b] + prompts[b, j], appended to class_txt (the
    encoder's output for the class names, e.g. the feature cache's) as
    extra tokens (bank.py). Offsets, so that a bank starting near
    zero starts near "the class name said again" rather than at tokens of
    an unseen scale.
    """
    from refseg.methods.wrel.bank import append_prompt_features, encode_with_prompts

    if site == "encoder":
        return encode_with_prompts(text, input_ids, attention_mask, prompts)
    if site == "features":
        return append_prompt_features(class_txt, class_txt.sentence[:, None, :].to(prompts.dtype) + prompts)
    raise ValueError(f"unknown reference-bank site {site!r}")


def train_bank(cfg: TrainConfig, teacher: nn.Module, train_ds, cache, out: Path, resume: bool,
               device: torch.device) -> Path:
    """Stage 2 (docs/methods/wrel.md): optimise the bank through the frozen teacher; returns out/last.

    train_ds: the RefSegDataset of the training split ("full"); cache: its FeatureCache.
    """
    w = cfg.methods["wrel"]
    from tqdm.auto import tqdm

    from refseg.engine.optim import resolve_amp
    from refseg.engine.runlog import RunLog
    from refseg.methods.wrel.bank import ReferenceBank, class_name_tokens, prompt_slots

    refs = weak_refs(train_ds.samples)
    if not refs:
        raise engine.TrainError(f"no weak refs in split {TRAIN_SPLIT!r}: nothing for the reference bank")
    ref_ids = torch.tensor([r for r, _, _ in refs], dtype=torch.int64)
    input_ids, attention_mask = class_name_tokens(teacher.text, [t for _, _, t in refs], device)  # (R, L)
    fits = prompt_slots(attention_mask, w.bank_prompts)  # (R,)
    short = sorted({t for (_, _, t), k in zip(refs, fits.tolist()) if k < w.bank_prompts})
    if short and cfg.run.progress:
        print(f"refseg train (wrel): {short} leave room for only {int(fits.min())} of the "
              f"{w.bank_prompts} prompts (text length {input_ids.shape[1]})", file=sys.stderr)
    bank = ReferenceBank(len(refs), w.bank_prompts, teacher.text.dim, PROMPT_INIT_STD,
                         generator=torch.Generator().manual_seed(cfg.run.seed)).to(device)
    size = w.bank_batch or cfg.optim.batch_size
    batches = [list(range(i, min(i + size, len(refs)))) for i in range(0, len(refs), size)]
    save_every = cfg.run.save_every or max(1, math.ceil(len(batches) / 10))
    loss_fn = engine.loss_function(cfg)
    amp_dtype = resolve_amp(cfg.optim.amp, device)
    if amp_dtype != torch.bfloat16:  # fp16 would need a scaler for these tiny gradients; run in full precision
        amp_dtype = None

    position = 0
    found = ckpt.find_checkpoint(out, "last") if resume else None
    if found is not None:
        state = ckpt.load_training_state(found, bank, None, restore_rng=False)
        if not torch.equal(ckpt.load_extra(found, "rows")["ref_id"], ref_ids):
            raise engine.TrainError(f"{found} holds a bank for other weak refs than the data's")
        if state.get("n_batches") != len(batches) or not 0 <= state.get("position", -1) <= len(batches):
            raise engine.TrainError(f"{found / ckpt.STATE_JSON}: the bank was saved in {state.get('n_batches')} "
                                    f"batches of weak refs, the config now cuts them into {len(batches)} "
                                    f"(wrel.bank_batch {w.bank_batch}, optim.batch_size {cfg.optim.batch_size}): "
                                    "resume with the settings it was made with")
        was = flat_view(state.get("config", {})).get("wrel_bank_site", "encoder")  # banks made before the option: encoder
        if was != w.bank_site:
            raise engine.TrainError(f"{found} holds a bank of site {was!r}, the config asks for "
                                    f"wrel.bank_site {w.bank_site!r}: resume with the site it was made with")
        position = state["position"]

    def save(extra_tensors: Optional[Dict[str, torch.Tensor]] = None) -> Path:
        extra = {"rows": {"ref_id": ref_ids}}
        if extra_tensors is not None:
            extra["enriched"] = extra_tensors
        state = {"step": position, "position": position, "n_batches": len(batches), "n_refs": len(refs),
                 "config": cfg.to_dict()}
        return ckpt.save_checkpoint(out / "last", bank, None, state, extra=extra)

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, True)
    bar = tqdm(total=len(batches), initial=position, desc="reference bank", unit="batch",
               disable=not cfg.run.progress, dynamic_ncols=True)
    while position < len(batches):
        idx = torch.tensor(batches[position], device=device)
        batch = cache.batch([refs[i][1] for i in batches[position]], device)  # txt: the cached class names
        prompts = bank.prompts[idx].detach().clone().requires_grad_(True)  # (b, P, D)
        optimizer = torch.optim.Adam([prompts], lr=w.bank_lr)
        losses = []
        for _ in range(w.bank_iters):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                txt = bank_text(w.bank_site, teacher.text, input_ids[idx], attention_mask[idx],
                                batch["txt"], prompts)
                result = teacher.decode(batch["vis"], txt, batch["image_index"])
                loss = loss_fn(result, batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            (loss * len(idx)).backward()  # the sum of the refs' own losses: each ref's gradient is its own
            optimizer.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            bank.prompts[idx] = prompts.detach()
            pred = result["mask_logits"].detach() > 0  # at the last step's prompts
            gt = batch["mask"] > 0.5
            iou = ((pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1).clamp(min=1)).mean()
        position += 1
        log.scalars(position, 0, {"bank/loss_first": losses[0], "bank/loss_last": losses[-1],
                                  "bank/iou_last": float(iou)})
        bar.update(1)
        bar.set_postfix(loss=f"{losses[0]:.3f}->{losses[-1]:.3f}", refresh=False)
        if position % save_every == 0 and position < len(batches):
            save()
    bar.close()

    # the bank-enriched text features of every weak ref, for stage 3
    parts: Dict[str, List[torch.Tensor]] = {"tokens": [], "mask": [], "sentence": []}
    with torch.no_grad():
        for rows in batches:
            idx = torch.tensor(rows, device=device)
            txt = bank_text(w.bank_site, teacher.text, input_ids[idx], attention_mask[idx],
                            cache.text([refs[i][1] for i in rows], device) if w.bank_site == "features"
                            else None, bank.prompts[idx])
            parts["tokens"].append(txt.tokens.half().cpu())
            parts["mask"].append(txt.mask.cpu())
            parts["sentence"].append(txt.sentence.half().cpu())
    enriched = {k: torch.cat(v) for k, v in parts.items()}
    enriched["ref_id"] = ref_ids
    log.close()
    return save(enriched)


# ---- the three stages ---------------------------------------------------------------------


def _stage_model(folder: Path, template: Optional[nn.Module], device: torch.device) -> nn.Module:
    """A fresh model holding a finished stage's weights (best/, else last/)."""
    found = ckpt.find_checkpoint(folder, "best") or ckpt.find_checkpoint(folder, "last")
    if found is None:
        raise engine.TrainError(f"{folder} holds no complete checkpoint")
    if template is None:
        return ckpt.load_model(found, device=device)
    model = copy.deepcopy(template).to(device)
    ckpt.load_training_state(found, model, None, restore_rng=False)
    return model


def _ema_of(student: nn.Module, run: Path) -> nn.Module:
    """The EMA teacher of a finished stage 3: the student's copy holding RUN/last/ema.safetensors."""
    found = ckpt.find_checkpoint(run, "last")
    teacher = ema_copy(student)
    ckpt.load_weights(teacher, ckpt.load_extra(found, "ema"), source=f"{found}/ema.safetensors")
    return teacher


def _note(cfg: TrainConfig, text: str) -> None:
    if cfg.run.progress:
        print(f"refseg train (wrel): {text}", file=sys.stderr)


def stage1_budget(cfg: TrainConfig) -> float:
    """With time_budget, the teacher's share of it: its share of the optimiser steps of stages 1 and 3
    (stage 3 gets what is left once the bank is done)."""
    o = cfg.optim
    if not o.time_budget:
        return 0.0
    teacher = cfg.methods["wrel"].teacher_steps or o.max_steps
    return o.time_budget * teacher / max(1, teacher + o.max_steps) if o.max_steps else o.time_budget / 2


def train_wrel(cfg: TrainConfig, model: Optional[nn.Module] = None, data=None) -> Dict[str, Any]:
    """Run (or resume) the three stages; returns the engine's summary of stage 3 plus "stages".

    model / data: as for engine.train (model is copied for each stage; data,
    when given, is used as it is, already weak).
    """
    cfg.validate()
    if distributed.env_info().enabled:
        raise engine.TrainError("method wrel runs in one process (drop --nproc)")
    if cfg.run.cache_features == "off":
        raise engine.TrainError("method wrel needs the feature cache (frozen encoders): drop --cache-features off")
    run = Path(cfg.run.out or f"runs/wrel-{datetime.now():%Y%m%d-%H%M%S}")
    lock = open_run(run, cfg)  # refuses a folder holding a run (unless resumed / overwritten), locks it
    try:
        return _train_wrel(cfg, model, data, run)
    finally:
        lock.release()


def _train_wrel(cfg: TrainConfig, model: Optional[nn.Module], data, run: Path) -> Dict[str, Any]:
    """train_wrel's stages, in the run folder `run` that it has checked and locked."""
    from refseg.data.dataset import RefSegDataset
    from refseg.data.refer import load_refer
    from refseg.engine import cache as feature_cache

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = engine.resolve_device(cfg.run.device)
    resume = cfg.run.resume is not None
    if resume and (run / "config.json").exists():  # before config.json is rewritten with this config
        check_resume_config(cfg, read_config_file(run / "config.json"), run / "config.json")
    run.mkdir(parents=True, exist_ok=True)
    with engine.writing(run / "config.json"):
        cfg.updated(out=str(run), resume=None, overwrite=False).save(run / "config.json")
    if data is None:
        d = cfg.data
        data_dir = engine.weak_data_dir(cfg, run) if d.accurate_fraction is not None else d.path
        data = load_refer(data_dir, split_by=d.split_by, images_dir=d.images)
    split = TRAIN_SPLIT
    if split not in data.splits():
        raise engine.TrainError(f"no split {split!r} in {data.ann_dir} (splits: {', '.join(data.splits())})")
    samples = data.samples(split)
    n_weak = sum(s.weak for s in samples)
    if n_weak == 0 or n_weak == len(samples):
        raise engine.TrainError(f"{data.ann_dir}: {n_weak} of {len(samples)} train sentences are weak; method wrel "
                                "needs both kinds (pass --accurate-fraction p < 1, or a split made by refseg weaken)")
    cache_dir = cfg.run.cache_dir or str(run / "cache")
    w = cfg.methods["wrel"]
    stages: Dict[str, Any] = {}
    started = time.time()

    # 1. teacher on the accurate refs
    stage1 = run / STAGE1
    if resume and stage_done(stage1):
        _note(cfg, f"stage 1 done ({stage1})")
    else:
        _note(cfg, "stage 1/3: teacher on the accurate refs")
        again = resume and ckpt.find_checkpoint(stage1, "last") is not None
        cfg1 = cfg.updated(method="plain", train_subset="accurate", accurate_fraction=None,
                           data=str(data.ann_dir), images=str(data.images_dir), split_by=data.split_by,
                           max_steps=w.teacher_steps or cfg.optim.max_steps, cache_dir=cache_dir,
                           out=str(stage1), resume=str(stage1) if again else None,
                           time_budget=stage1_budget(cfg))
        stages["teacher"] = engine.train(cfg1, copy.deepcopy(model) if model is not None else None, data,
                                         opened=True)
    teacher = _stage_model(stage1, model, device)

    # 2. reference bank through the frozen teacher
    stage2 = run / STAGE2
    if resume and stage_done(stage2):
        _note(cfg, f"stage 2 done ({stage2})")
    else:
        _note(cfg, "stage 2/3: reference bank")
        train_ds = RefSegDataset(data, split, cfg.data.size, "full")
        cache = feature_cache.get_cache(teacher, train_ds, device, cache_dir, workers=cfg.run.workers,
                                        progress=cfg.run.progress)
        train_bank(cfg, teacher, train_ds, cache, stage2, resume, device)
    enriched = ckpt.load_extra(ckpt.find_checkpoint(stage2, "last"), "enriched")
    del teacher

    # 3. student on the mixed data, EMA teacher
    missing = sorted({s.ref_id for s in samples if s.weak} - set(enriched["ref_id"].tolist()))
    if missing:
        raise engine.TrainError(f"{len(missing)} weak train refs have no reference-bank row (e.g. ref ids "
                                f"{missing[:5]}): the bank in {STAGE2}/ was made for other data")
    if resume and stage_done(run):
        _note(cfg, f"stage 3 done ({run})")
        return {"run": str(run), "stages": stages, "done": True}
    _note(cfg, "stage 3/3: student on the mixed data, EMA teacher")
    again = resume and ckpt.find_checkpoint(run, "last") is not None
    budget = cfg.optim.time_budget
    budget3 = max(1.0, budget - (time.time() - started)) if budget else 0.0  # what is left
    cfg3 = cfg.updated(cache_dir=cache_dir, out=str(run), resume=str(run) if again else None, time_budget=budget3)
    student = _stage_model(stage1, model, device)
    extras = student_extras(enriched, w, device)
    summary = engine.train(cfg3, student, data, extras=extras, opened=True)
    if ckpt.find_checkpoint(run, "best") is None:  # no validation split: best/ is the end of training
        scored = _ema_of(student, run) if extras.score_ema else student
        with engine.writing(run / "best"):
            ckpt.save_checkpoint(run / "best", scored, None,
                                 {"step": summary["step"], "note": "no validation: the end of training",
                                  "config": cfg3.to_dict()}, include_frozen=cfg.run.save_frozen)
    drop_replaced(run)  # what --overwrite set aside
    summary["stages"] = stages
    summary["seconds"] = round(time.time() - started, 1)
    return summary
