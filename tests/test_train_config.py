"""The nested training config: sections, flags, flat files of earlier versions, messages naming the field.

A config file is nested (model, data, optim, run, and each training method's
own section); every field is also a flag named by its flat name, which
overrides the file; flat files (earlier run folders' config.json, model cards)
still read, and `--resume` of a run folder saved in the flat form continues
it exactly.
"""

import argparse
import json

import pytest
import torch
from _engine_fixtures import TINY_LTS, one_thread, tiny_config, tiny_model  # noqa: F401
from safetensors.torch import load_file

from refseg.cli import main as cli
from refseg.engine import checkpoint as ckpt
from refseg.engine.config import ConfigError, TrainConfig, add_config_arguments, config_from_args, flat_fields
from refseg.engine.train import train

NESTED_YAML = """
model: {name: lts, kwargs: {text_depth: 2}}
data: {path: data/x, supervision: full, flip: hv}
optim: {batch_size: 16, max_steps: 300, lr: 1.0e-4, loss_kwargs: {w_locate: 0.5}}
run: {seed: 3, val_every: 100}
wrel: {bank_lr: 0.1, accurate_repeat: 3}
"""


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_a_nested_file_sets_each_section_and_flags_override_it(tmp_path):
    (tmp_path / "c.yaml").write_text(NESTED_YAML)
    cfg = parse(["--config", str(tmp_path / "c.yaml"), "--lr", "2e-4", "--wrel-bank-lr", "0.05",
                 "--model-kwargs", '{"text_depth": 1}', "--no-progress"])
    assert (cfg.model.name, cfg.model.kwargs, cfg.data.path, cfg.data.flip) == ("lts", {"text_depth": 1}, "data/x", "hv")
    assert (cfg.optim.batch_size, cfg.optim.max_steps, cfg.optim.lr, cfg.optim.loss_kwargs) == \
        (16, 300, 2e-4, {"w_locate": 0.5})
    assert (cfg.run.seed, cfg.run.val_every, cfg.run.progress) == (3, 100, False)
    assert (cfg.methods["wrel"].bank_lr, cfg.methods["wrel"].accurate_repeat) == (0.05, 3)


def test_the_flat_form_and_the_nested_form_give_the_same_config(tmp_path):
    flat = {"data": "d", "lr": 1e-4, "batch_size": 8, "model_kwargs": {"dim": 64}, "wrel_bank_lr": 0.1, "seed": 2}
    nested = {"data": {"path": "d"}, "optim": {"lr": 1e-4, "batch_size": 8}, "model": {"kwargs": {"dim": 64}},
              "wrel": {"bank_lr": 0.1}, "run": {"seed": 2}}
    assert TrainConfig.from_dict(flat) == TrainConfig.from_dict(nested)
    cfg = TrainConfig.from_dict(flat)
    assert TrainConfig.from_dict(cfg.to_flat()) == cfg == TrainConfig.from_dict(cfg.to_dict())
    assert set(cfg.to_dict()) == {"model", "data", "optim", "run", "wrel"}
    assert len(flat_fields()) == 50  # every flag of the flat config but the three removed ones


def test_removed_fields_of_earlier_flat_files_read_at_their_one_value(tmp_path, capsys):
    old = {"data": "d", "train_split": "train", "weight_decay": 0.01, "grad_clip": 1.0}
    assert TrainConfig.from_dict(old) == TrainConfig.from_dict({"data": "d"})
    (tmp_path / "cfg.json").write_text(json.dumps({**old, "grad_clip": 0.5}))
    assert cli(["train", "--config", str(tmp_path / "cfg.json")]) == 2
    assert "field grad_clip no longer exists (it is always 1.0), got 0.5" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"optim": {"lrate": 1}}, "unknown TrainConfig field(s): optim.lrate"),
    ({"wrel": {"bank_lr": "x"}}, "TrainConfig wrel.bank_lr (--wrel-bank-lr) must be float, got 'x'"),
    ({"run": {"seed": 1.5}}, "TrainConfig run.seed (--seed) must be int, got 1.5"),
    ({"data": {"path": "d", "size": 0}}, "data.size (--size) must be positive, got 0"),
    ({"data": "d", "wrel_bank_iters": 0}, "wrel.bank_iters must be positive, got 0"),
    ({"data": "d", "model_kwargs": {"depth": 10**6}}, "model.kwargs (--model-kwargs): "),
    ({"data": "d", "model": "unet"}, "model.name (--model) must be one of"),
])
def test_a_bad_value_is_named_by_section_field_and_flag(tmp_path, capsys, values, message):
    (tmp_path / "cfg.json").write_text(json.dumps(values))
    assert cli(["train", "--config", str(tmp_path / "cfg.json"), "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("refseg train: error: ") and message in lines[0], lines


def _flatten_checkpoint_config(folder):
    """Rewrite a checkpoint's state.json config in the flat form (as runs made before the sections saved it)."""
    path = folder / "state.json"
    state = json.loads(path.read_text())
    state["config"] = TrainConfig.from_dict(state["config"]).to_flat()
    path.write_text(json.dumps(state))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"size": path.stat().st_size, "sha256": ckpt.sha256_of(path)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_resume_of_a_run_saved_in_the_flat_form_continues_exactly(synthref_tiny, tmp_path):
    common = dict(max_steps=4, save_every=2, val_split="", cache_dir=str(tmp_path / "cache"))
    train(tiny_config(synthref_tiny, tmp_path / "once", **common), model=tiny_model())
    run = tmp_path / "twice"
    train(tiny_config(synthref_tiny, run, **{**common, "max_steps": 2}), model=tiny_model())
    # the run as an earlier version left it: a flat config.json and flat configs in its checkpoints
    saved = TrainConfig.load(run / "config.json").to_flat()
    (run / "config.json").write_text(json.dumps({**saved, "max_steps": 4}))
    for folder in (run / "last", run / ".last.prev"):
        if folder.exists():
            _flatten_checkpoint_config(folder)
    assert "optim" not in json.loads((run / "config.json").read_text())
    assert cli(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 4
    once, twice = load_file(str(tmp_path / "once" / "last" / "model.safetensors")), \
        load_file(str(run / "last" / "model.safetensors"))
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    assert json.loads((run / "config.json").read_text())["optim"]["max_steps"] == 4  # saved nested now


def test_resume_of_a_flat_run_refuses_a_change_of_the_data_order(synthref_tiny, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(synthref_tiny, run, max_steps=2, val_split="", cache_dir=str(tmp_path / "cache")),
          model=tiny_model())
    _flatten_checkpoint_config(run / "last")
    (run / "config.json").write_text(json.dumps(TrainConfig.load(run / "config.json").to_flat()))
    assert cli(["train", "--resume", str(run), "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "optim.batch_size is 2 here but 4" in err and "drop --batch-size" in err, err
