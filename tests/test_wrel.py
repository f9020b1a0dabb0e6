"""LRB-WREL (refseg/methods/wrel/: train.py, bank.py): the EMA schedule and update, the reference bank,
the hand-over between the three stages, resume inside a stage, and the baselines' runs."""

import csv
import json
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from _engine_fixtures import SIZE, TINY_LTS, make_shapes_refer, one_thread, tiny_config, tiny_model  # noqa: F401
from safetensors.torch import load_file

import refseg
from refseg.cli import main as cli
from refseg.engine import train as engine
from refseg.engine.config import ConfigError, TrainConfig
from refseg.engine import ema as ema_module
from refseg.engine.ema import ema_copy, ema_update
from refseg.methods.wrel.config import WRELConfig
from refseg.methods.wrel.train import ema_momentum, student_extras
from refseg.methods.wrel.bank import (append_prompt_features, class_name_tokens, encode_with_prompts, insert_prompts,
                                  prompt_slots)
from refseg.modeling.text import TextFeatures

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2

CPU = torch.device("cpu")
PROMPTS = 4
WREL = dict(method="wrel", accurate_fraction=0.5, max_steps=6, wrel_teacher_steps=4, wrel_bank_prompts=PROMPTS,
            wrel_bank_site="features", wrel_bank_iters=3, wrel_bank_batch=2, save_every=1, val_split="val",
            wrel_ema_epochs=10.0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """6 train images x 2 refs (one category, "square"); weakened at p = 0.5: 6 accurate refs, 6 weak."""
    return make_shapes_refer(tmp_path_factory.mktemp("wrel") / "data")


def _recording_losses(record):
    """engine.loss_function that logs (subset, ref ids) of every batch it scores, one list per stage."""
    real = engine.loss_function

    def loss_function(cfg):
        fn, calls = real(cfg), []
        record.append(calls)

        def loss(out, batch):
            calls.append(batch["ref_id"].tolist())
            return fn(out, batch)

        return loss

    return loss_function


@pytest.fixture(scope="module")
def wrel_run(shapes, tmp_path_factory):
    """One uninterrupted WREL run on the tiny data, recording what each stage saw."""
    run = tmp_path_factory.mktemp("wrel-run") / "run"
    record, start = [], {}
    real_copy = ema_module.ema_copy

    def ema_copy_recording(model):  # the trainer makes the EMA teacher when stage 3 starts
        start.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_copy(model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "loss_function", _recording_losses(record))
        mp.setattr(ema_module, "ema_copy", ema_copy_recording)
        summary = engine.train(tiny_config(shapes, run, **WREL), model=tiny_model())
    return SimpleNamespace(run=run, summary=summary, record=record, start=start)


# ---- EMA ------------------------------------------------------------------------------------


def test_ema_schedule_by_hand():
    # 4 epochs of 100 steps, written for 10: breakpoints squeezed by 0.4, epoch 1 -> step 40, epoch 3 -> step 120
    m = lambda step: ema_momentum(step, 400, 100, 10.0, "breaks")  # noqa: E731
    assert m(0) == pytest.approx(0.95)
    assert m(20) == pytest.approx(0.97)
    assert m(40) == pytest.approx(0.99)
    assert m(80) == pytest.approx(0.9945)
    assert m(119) == pytest.approx(0.99 + 0.009 * (119 / 40 - 1) / 2)
    assert m(120) == pytest.approx(0.9995) and m(399) == pytest.approx(0.9995)
    # horizon (the default): the same breakpoints, each 1 - m times r = 10 / 4 = 2.5
    h = lambda step: ema_momentum(step, 400, 100, 10.0)  # noqa: E731
    assert [h(0), h(20), h(40), h(80), h(120), h(399)] == pytest.approx([0.875, 0.925, 0.975, 0.98625, 0.99875, 0.99875])
    assert ema_momentum(0, 10, 100, 40.0) == 0.0  # r = 400: 1 - 0.05 * 400 < 0, held at 0 (the teacher copies)
    # a run at least as long as the reference keeps the schedule as written, whichever rescaling
    for total in (4000, 5000):
        for rescale in ("horizon", "breaks"):
            assert [ema_momentum(s, total, 100, 40.0, rescale) for s in (0, 50, 100, 200, 299, 300)] == pytest.approx(
                [0.95, 0.97, 0.99, 0.9945, 0.99 + 0.009 * 0.995, 0.9995])


def test_ema_update_moves_teacher_by_the_scheduled_momentum():
    student = tiny_model()
    extras = student_extras({"ref_id": torch.zeros(0, dtype=torch.long)}, WRELConfig(ema_epochs=10.0, ema_rescale="breaks"),
                            CPU)
    teacher = ema_copy(student)
    assert teacher.visual is student.visual and teacher.text is student.text  # frozen encoders shared
    assert teacher.head is not student.head
    visual_before = {k: v.clone() for k, v in student.visual.state_dict().items()}
    with torch.no_grad():
        for p in teacher.head.parameters():
            p.fill_(1.0)
        for p in student.head.parameters():
            p.fill_(3.0)
    momentum = extras.ema(20, 400, 100)  # m = 0.97: 0.97 * 1 + 0.03 * 3
    assert momentum == pytest.approx(0.97)
    ema_update(teacher, student, momentum)
    for p in teacher.head.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.06), atol=1e-6, rtol=0)
    ema_update(teacher, student, extras.ema(80, 400, 100))  # m = 0.9945: 0.9945 * 1.06 + 0.0055 * 3
    for p in teacher.head.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.07067), atol=1e-6, rtol=0)
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in student.head.parameters())
    assert all(torch.equal(v, visual_before[k]) for k, v in teacher.visual.state_dict().items())
    assert ema_copy(student).training is False


# ---- the reference bank ----------------------------------------------------------------------


def test_bank_prompts_reach_the_teacher_output_and_leave_the_class_name_alone():
    model = tiny_model().eval()
    with torch.no_grad():  # a fresh head's output layer is zero (no gradient passes it); a teacher's is trained
        model.head.mask_out.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    text = model.text
    ids, mask = class_name_tokens(text, ["square", "square"], CPU)  # [CLS] square [SEP] + 9 padding slots
    n = int(mask[0].sum())
    assert n == 3 and ids.shape[1] == 12
    prompts = torch.randn(2, PROMPTS, text.dim, requires_grad=True)
    words = text.embed_tokens(ids).detach()
    embeds, enriched_mask = insert_prompts(words, mask, prompts)
    assert torch.equal(embeds[:, :n], words[:, :n])  # the class-name tokens untouched
    assert torch.equal(embeds[:, n:n + PROMPTS], prompts.detach())
    assert torch.equal(embeds[:, n + PROMPTS:], words[:, n + PROMPTS:])
    assert enriched_mask[0].tolist() == [1] * (n + PROMPTS) + [0] * (12 - n - PROMPTS)
    assert torch.equal(ids, class_name_tokens(text, ["square", "square"], CPU)[0])

    images = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    txt = encode_with_prompts(text, ids, mask, prompts)
    out = model.decode(model.encode_image(images), txt, torch.zeros(2, dtype=torch.long))
    out["mask_logits"].sum().backward()
    per_prompt = prompts.grad.norm(dim=-1)  # (2, P)
    assert (per_prompt > 0).all(), per_prompt
    assert all(p.grad is None for p in text.parameters())  # the encoder stays frozen
    # more prompts than padding slots: the first L - n fit, the rest are left out
    many = torch.randn(2, 10, text.dim)
    embeds, enriched_mask = insert_prompts(words, mask, many)
    assert torch.equal(embeds[:, :n], words[:, :n]) and torch.equal(embeds[:, n:], many[:, :12 - n])
    assert enriched_mask.tolist() == [[1] * 12] * 2
    assert prompt_slots(mask, 10).tolist() == [9, 9] and prompt_slots(mask, PROMPTS).tolist() == [PROMPTS] * 2


def test_feature_site_prompts_are_extra_output_tokens():
    model = tiny_model().eval()
    with torch.no_grad():
        model.head.mask_out.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
        txt = model.encode_text(["square", "square"])  # [CLS] square [SEP]: n = 3 of L = 12
    n, L, D = 3, 12, model.text.dim
    before = [t.clone() for t in txt]
    prompts = torch.randn(2, PROMPTS, D, requires_grad=True)
    out = append_prompt_features(txt, prompts)
    assert out.tokens.shape == (2, L, D) and out.mask.shape == (2, L) and out.sentence.shape == (2, D)
    assert out.mask.dtype == torch.bool and out.mask[0].tolist() == [True] * (n + PROMPTS) + [False] * (L - n - PROMPTS)
    assert torch.equal(out.tokens[:, :n], txt.tokens[:, :n])  # the class name's features unchanged
    assert torch.equal(out.tokens[:, n:n + PROMPTS], prompts.detach())
    # the sentence vector: the mean over the n class-name tokens and the P prompts
    words = torch.cat([txt.tokens[:, :n], prompts.detach()], 1)  # (2, n + P, D)
    assert torch.allclose(out.sentence, words.mean(1), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(txt, before))  # the inputs are not written to

    images = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    vis = model.encode_image(images)
    model.decode(vis, out, torch.zeros(2, dtype=torch.long))["mask_logits"].sum().backward()
    assert (prompts.grad.norm(dim=-1) > 0).all(), prompts.grad.norm(dim=-1)
    assert all(p.grad is None for p in model.text.parameters())

    # the head reads a prompt as it reads a word token: the encoder's output for "the red square",
    # cut into its first 2 tokens ([CLS] the) + the others given as prompts, gives the same prediction
    with torch.no_grad():
        full = model.encode_text(["the red square"])  # [CLS] the red square [SEP]: 5 tokens
        m = int(full.mask.sum())
        head_mask = torch.zeros_like(full.mask)
        head_mask[:, :2] = True
        part = TextFeatures(full.tokens, head_mask, full.tokens[:, :2].mean(1))
        rebuilt = append_prompt_features(part, full.tokens[:, 2:m])
        assert torch.equal(rebuilt.mask, full.mask) and torch.equal(rebuilt.tokens[:, :m], full.tokens[:, :m])
        assert torch.allclose(rebuilt.sentence, full.sentence, atol=1e-5)
        index = torch.zeros(1, dtype=torch.long)
        a, b = model.decode(vis, full, index)["mask_logits"], model.decode(vis, rebuilt, index)["mask_logits"]
        assert torch.allclose(a, b, atol=1e-5) and a.std() > 0

    # more prompts than free slots: the first L - n are used, in the tokens and in the sentence vector
    many = torch.randn(2, 10, D)
    out = append_prompt_features(txt, many)
    assert out.mask.all() and torch.equal(out.tokens[:, n:], many[:, :L - n])
    assert torch.allclose(out.sentence, torch.cat([txt.tokens[:, :n], many[:, :L - n]], 1).mean(1), atol=1e-5)


# ---- the three stages -------------------------------------------------------------------------


def _weak_ref_ids(run):
    refs = pickle.loads((run / "data" / "refs(unc).p").read_bytes())
    return {r["ref_id"] for r in refs if r.get("weak")}, {r["ref_id"] for r in refs if r["split"] == "train"}


def test_stage_handover_on_tiny_data(wrel_run):
    run = wrel_run.run
    weak, train_refs = _weak_ref_ids(run)
    assert len(weak) == 6 and len(train_refs) == 12
    for path in ("stage1-teacher/last", "stage1-teacher/best", "stage2-bank/last/enriched.safetensors",
                 "stage2-bank/last/rows.safetensors", "last/ema.safetensors", "best/model.safetensors"):
        assert (run / path).exists(), path

    # stage 1 saw accurate refs only; stage 2 scored the weak refs; stage 3 saw both kinds
    stage1, stage2, stage3 = wrel_run.record
    assert len(stage1) == 4 and len(stage3) == 6 and len(stage2) == 3 * 3  # 3 batches of 2 refs x 3 iterations
    seen1 = {r for batch in stage1 for r in batch}
    assert seen1 and not seen1 & weak
    assert {r for batch in stage2 for r in batch} == weak
    seen3 = {r for batch in stage3 for r in batch}
    assert seen3 & weak and seen3 - weak

    # stage 3 started from the stage-1 teacher (best/: validated at its end)
    teacher1 = load_file(str(run / "stage1-teacher" / "best" / "model.safetensors"))
    assert teacher1.keys() == wrel_run.start.keys()
    assert all(torch.equal(teacher1[k], wrel_run.start[k]) for k in teacher1)

    # the enriched features (site features): the stage-1 teacher's text encoder on the class name, then
    # the bank's rows as extra tokens, offsets from the class name's sentence vector
    bank = load_file(str(run / "stage2-bank" / "last" / "model.safetensors"))["prompts"]
    enriched = load_file(str(run / "stage2-bank" / "last" / "enriched.safetensors"))
    assert bank.shape == (6, PROMPTS, 32) and set(enriched["ref_id"].tolist()) == weak
    assert enriched["mask"].sum(1).tolist() == [3 + PROMPTS] * 6
    model = refseg.load(run / "stage1-teacher")
    with torch.no_grad():
        name = model.encode_text(["square"])  # what the feature cache holds (in fp16) for a weak ref
    tokens, sentence = enriched["tokens"].float(), enriched["sentence"].float()
    assert torch.allclose(tokens[:, :3], name.tokens[:, :3].expand(6, 3, 32), atol=5e-3)
    assert torch.allclose(tokens[:, 3:3 + PROMPTS], name.sentence[:, None] + bank, atol=5e-3)
    assert torch.allclose(sentence, (3 * name.sentence + (name.sentence[:, None] + bank).sum(1)) / (3 + PROMPTS),
                          atol=5e-3)
    start = torch.randn(6, PROMPTS, 32, generator=torch.Generator().manual_seed(0)) * 0.02  # seed 0
    assert (bank - start).abs().max() > 0.01  # the rows moved (3 Adam steps of lr 0.01 each)

    # the bank fitted its refs' masks a little (3 Adam steps per batch)
    with open(run / "stage2-bank" / "log.csv") as f:
        rows = [r for r in csv.DictReader(f)]
    first = [float(r["value"]) for r in rows if r["tag"] == "bank/loss_first"]
    last = [float(r["value"]) for r in rows if r["tag"] == "bank/loss_last"]
    assert len(first) == 3 and all(b < a for a, b in zip(first, last))

    # the run loads as the EMA teacher, a plain LTS, and evaluates like any run
    loaded = refseg.load(run)
    ema = load_file(str(run / "last" / "ema.safetensors"))
    head = {k: v for k, v in loaded.state_dict().items() if k.startswith("head.")}
    assert head.keys() == {k for k in ema if k.startswith("head.")}
    assert all(torch.equal(head[k], ema[k]) for k in head)
    student = load_file(str(run / "last" / "model.safetensors"))
    assert any(not torch.equal(head[k], student[k]) for k in head)
    assert json.loads((run / "config.json").read_text())["model"]["method"] == "wrel"
    assert cli(["eval", "--checkpoint", str(run), "--data", str(run / "data"), "--split", "val",
                "--out", str(run / "eval.json")]) == 0
    assert json.loads((run / "eval.json").read_text())["metrics"]["n"] == 12


def test_encoder_site_bank_and_a_site_change_on_resume(wrel_run, shapes, tmp_path):
    from refseg.data import load_refer
    from refseg.data.dataset import RefSegDataset
    from refseg.engine.cache import get_cache
    from refseg.methods.wrel.train import train_bank

    run = wrel_run.run
    teacher = refseg.load(run / "stage1-teacher")
    train_ds = RefSegDataset(load_refer(run / "data"), "train", SIZE, "full")
    cache = get_cache(teacher, train_ds, CPU, str(run / "cache"), progress=False)
    out = tmp_path / "bank"
    cfg = tiny_config(shapes, tmp_path, **{**WREL, "wrel_bank_site": "encoder"})
    train_bank(cfg, teacher, train_ds, cache, out, False, CPU)
    # site encoder: the enriched features are the text encoder on class name + the bank's prompts
    bank = load_file(str(out / "last" / "model.safetensors"))["prompts"]
    enriched = load_file(str(out / "last" / "enriched.safetensors"))
    ids, mask = class_name_tokens(teacher.text, ["square"] * 6, CPU)
    with torch.no_grad():
        again = encode_with_prompts(teacher.text, ids, mask, bank)
    assert torch.allclose(again.tokens.half().float(), enriched["tokens"].float(), atol=1e-3)
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    first = [float(r["value"]) for r in rows if r["tag"] == "bank/loss_first"]
    last = [float(r["value"]) for r in rows if r["tag"] == "bank/loss_last"]
    assert len(first) == 3 and all(b < a for a, b in zip(first, last))
    # its rows mean other things than a features bank's: resuming it at the other site is refused
    with pytest.raises(engine.TrainError, match="site 'encoder'"):
        train_bank(tiny_config(shapes, tmp_path, **WREL), teacher, train_ds, cache, out, True, CPU)


def test_bank_resumed_with_another_batch_size_is_refused(wrel_run, shapes, tmp_path):
    from refseg.data import load_refer
    from refseg.data.dataset import RefSegDataset
    from refseg.engine.cache import get_cache
    from refseg.methods.wrel.train import train_bank

    run = wrel_run.run
    teacher = refseg.load(run / "stage1-teacher")
    train_ds = RefSegDataset(load_refer(run / "data"), "train", SIZE, "full")
    cache = get_cache(teacher, train_ds, CPU, str(run / "cache"), progress=False)
    shutil.copytree(run / "stage2-bank", tmp_path / "bank")
    before = (tmp_path / "bank" / "last" / "model.safetensors").read_bytes()
    with pytest.raises(engine.TrainError, match="saved in 3 batches.* now cuts them into 6"):
        train_bank(tiny_config(shapes, tmp_path, **{**WREL, "wrel_bank_batch": 1}), teacher, train_ds, cache,
                   tmp_path / "bank", True, CPU)
    assert (tmp_path / "bank" / "last" / "model.safetensors").read_bytes() == before


def _crash_in_stage(stage, after):
    """engine.loss_function whose `stage`-th loss (1, 2, 3) raises on its call number after + 1."""
    real, made = engine.loss_function, []

    def loss_function(cfg):
        fn = real(cfg)
        made.append(cfg)
        if len(made) != stage:
            return fn
        calls = []

        def loss(out, batch):
            calls.append(1)
            if len(calls) > after:
                raise KeyboardInterrupt("simulated crash")
            return fn(out, batch)

        return loss

    return loss_function


@pytest.mark.parametrize("stage, after", [(2, 4), (3, 3)])  # stage 2: inside its second batch; stage 3: after step 3
def test_resume_inside_a_stage_gives_the_uninterrupted_run(wrel_run, shapes, tmp_path, monkeypatch, stage, after):
    run = tmp_path / "run"
    monkeypatch.setattr(engine, "loss_function", _crash_in_stage(stage, after))
    with pytest.raises(KeyboardInterrupt):
        engine.train(tiny_config(shapes, run, **WREL), model=tiny_model())
    monkeypatch.undo()
    if stage == 2:
        assert json.loads((run / "stage2-bank" / "last" / "state.json").read_text())["position"] == 1
        assert not (run / "last").exists()
    else:
        assert json.loads((run / "last" / "state.json").read_text())["step"] == 3
    engine.train(tiny_config(shapes, run, resume=str(run), **WREL), model=tiny_model())
    for name in ("stage2-bank/last/model.safetensors", "stage2-bank/last/enriched.safetensors",
                 "last/model.safetensors", "last/ema.safetensors", "best/model.safetensors"):
        once, twice = load_file(str(wrel_run.run / name)), load_file(str(run / name))
        assert once.keys() == twice.keys()
        assert all(torch.equal(once[k], twice[k]) for k in once), name


# ---- the baselines -----------------------------------------------------------------------------


def test_upper_bound_and_naive_runs(shapes, tmp_path, capsys):
    common = ["train", "--data", str(shapes), "--size", str(SIZE), "--model-kwargs", json.dumps(TINY_LTS),
              "--max-steps", "2", "--batch-size", "4", "--val-split", "", "--threads", "1", "--no-progress",
              "--save-frozen"]
    assert cli(common + ["--out", str(tmp_path / "upper")]) == 0
    assert not (tmp_path / "upper" / "data").exists()
    assert cli(common + ["--out", str(tmp_path / "naive"), "--accurate-fraction", "0.5", "--weak-seed", "3"]) == 0
    meta = json.loads((tmp_path / "naive" / "data" / "weak.json").read_text())
    assert (meta["accurate_fraction"], meta["seed"], meta["weak_refs"]) == (0.5, 3, 6)
    for name in ("upper", "naive"):
        assert (tmp_path / name / "last" / "model.safetensors").exists()
        assert json.loads((tmp_path / name / "last" / "state.json").read_text())["step"] == 2
    # resuming reuses the weak split; another fraction in the same folder is refused
    assert cli(["train", "--resume", str(tmp_path / "naive"), "--max-steps", "3", "--no-progress"]) == 0
    assert cli(["train", "--resume", str(tmp_path / "naive"), "--accurate-fraction", "0.2", "--no-progress"]) == 2
    assert "accurate_fraction is 0.2 here but 0.5" in capsys.readouterr().err
    (tmp_path / "weak-only").mkdir()
    shutil.copytree(tmp_path / "naive" / "data", tmp_path / "weak-only" / "data")  # a weak split, no run yet
    assert cli(common + ["--out", str(tmp_path / "weak-only"), "--accurate-fraction", "0.2"]) == 2
    assert "is not the weak split" in capsys.readouterr().err
    assert cli(common + ["--out", str(tmp_path / "w"), "--method", "wrel"]) == 2  # DATA has no weak refs
    assert "needs both kinds" in capsys.readouterr().err


def test_ema_rescale_default_and_choices():
    extras = student_extras({"ref_id": torch.zeros(0, dtype=torch.long)}, WRELConfig(ema_epochs=10.0), CPU)
    assert extras.ema(20, 400, 100) == pytest.approx(1 - 0.03 * 2.5)  # horizon by default
    assert TrainConfig().methods["wrel"].ema_rescale == "horizon"
    with pytest.raises(ConfigError, match="wrel.ema_rescale"):
        TrainConfig.from_dict(dict(data="d", wrel_ema_rescale="steps")).validate()


def test_flip_shows_accurate_sentences_flipped_and_weak_ones_never(shapes, tmp_path):
    """--flip hv: the teacher and the student see accurate sentences in all four views; a weak ref's bank
    prompts were fitted to the unflipped image, so its sentences stay unflipped in stage 3."""
    drawn = []
    real = engine.draw_views

    def draw_views(batch_rows, views, flippable, samples, key):
        out = real(batch_rows, views, flippable, samples, key)
        drawn.append([(samples[r].weak, v) for r, v in zip(batch_rows, out)])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "draw_views", draw_views)
        engine.train(tiny_config(shapes, tmp_path / "run", **{**WREL, "flip": "hv", "max_steps": 12,
                                                              "wrel_teacher_steps": 12, "val_split": ""}),
                     model=tiny_model())
    seen = [pair for batch in drawn for pair in batch]
    assert {v for weak, v in seen if not weak} == {"none", "h", "v", "hv"}
    assert {v for weak, v in seen if weak} == {"none"}
    assert any(weak for weak, _ in seen)


def test_accurate_repeat_oversamples_accurate_sentences_in_stage_3(shapes, tmp_path):
    record = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "loss_function", _recording_losses(record))
        engine.train(tiny_config(shapes, tmp_path / "run", **{**WREL, "wrel_accurate_repeat": 3, "max_steps": 9,
                                                              "val_split": "", "batch_size": 4}),
                     model=tiny_model())
    weak, train_refs = _weak_ref_ids(tmp_path / "run")
    stage3 = [r for batch in record[-1] for r in batch]
    assert len(stage3) == 9 * 4  # one epoch: 6 weak refs x 2 sentences + 6 accurate x 2 x 3 = 48 rows, 12 batches
    n_weak = sum(r in weak for r in stage3)
    n_acc = len(stage3) - n_weak
    # per epoch 12 weak rows against 36 accurate rows: in 36 rows about a quarter weak
    assert n_acc > 2 * n_weak, (n_acc, n_weak)
    with pytest.raises(ConfigError, match="wrel.accurate_repeat"):
        TrainConfig.from_dict(dict(data="x", wrel_accurate_repeat=0)).validate()
