"""Recipes (configs/<model>.yaml, refseg/engine/recipe.py): every shipped model has one, it resolves to the
configuration its card recorded, a staged recipe trains its stages in order and resumes, and a malformed
recipe is refused in one line naming the file and the field."""

import argparse
import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import yaml

from refseg.cli import main as cli
from refseg.engine import recipe as recipe_module
from refseg.engine.config import ConfigError, TrainConfig, add_config_arguments, config_from_args, flat_fields
from refseg.hub import WEIGHTS_DIR, available_models

ROOT = Path(__file__).resolve().parents[1]
MACHINE = ("threads", "cache_dir", "out", "resume", "progress", "device", "workers")


def _card(name):
    return json.loads((WEIGHTS_DIR / f"{name}.json").read_text())


def _recorded_configs(name):
    """[(recorded --out, TrainConfig dict)] of the card's `refseg train` commands, parsed by the real CLI parser.

    Machine flags are dropped before resolving (--device cuda does not validate on a CPU build). The last
    command's fields it does not give come from the card's stored training.config (the defaults it ran with)."""
    training = _card(name)["training"]
    commands = [shlex.split(c)[2:] for c in training["commands"] if c.startswith("refseg train ")]
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    names = set(flat_fields())
    out = []
    for i, argv in enumerate(commands):
        ns = parser.parse_args(argv)
        recorded_out = ns.out
        for k in MACHINE:
            if hasattr(ns, k):
                delattr(ns, k)
        base = {}
        if i == len(commands) - 1:
            base = {k: v for k, v in training["config"].items() if k in names and k not in MACHINE}
        out.append((recorded_out, config_from_args(ns, base).to_flat()))
    return out


def test_every_shipped_model_has_a_recipe_named_by_its_card():
    names = available_models()
    assert len(names) == 10
    for name in names:
        assert _card(name)["training"]["recipe"] == f"configs/{name}.yaml"
        assert (ROOT / "configs" / f"{name}.yaml").is_file()
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) == sorted(names)


def test_recipes_are_written_in_the_nested_form():
    """Every shipped recipe names its SynthRef split under `synthref` and gives TrainConfig sections (mappings),
    in each stage too; no flat field names."""
    sections = {"model", "data", "optim", "run", "wrel"}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        assert set(values["synthref"]) == {"domain", "preset", "seed"}, path.name
        stages = values.get("stages", [{k: v for k, v in values.items() if k != "synthref"}])
        assert set(values) - {"synthref"} <= (sections if "stages" not in values else {"stages"}), path.name
        for stage in stages:
            rest = {k: v for k, v in stage.items() if k != "name"}
            assert set(rest) <= sections and all(isinstance(v, dict) for v in rest.values()), (path.name, rest)


@pytest.mark.parametrize("name", available_models())
def test_recipe_resolves_to_the_configuration_the_card_recorded(name):
    recipe = recipe_module.load_recipe(ROOT / "configs" / f"{name}.yaml")
    configs = recipe_module.stage_configs(recipe, "runs/X", "data")
    recorded = _recorded_configs(name)
    assert len(configs) == len(recorded)
    stage_of = {}  # a recorded --out -> the stage folder the recipe trains it in
    for stage, cfg, (recorded_out, expected) in zip(recipe.stages, configs, recorded):
        got = cfg.to_flat()
        init = expected["init_from"]
        for old, new in stage_of.items():
            if init is not None and (init == old or init.startswith(old + "/")):
                expected["init_from"] = new + init[len(old):]
        different = {k: (got[k], expected[k]) for k in got if k not in MACHINE and got[k] != expected[k]}
        assert different == {}, f"{name} stage {stage.name}"
        stage_of[recorded_out] = f"runs/X/{stage.name}"


def _tiny_recipe(data, **second):
    from _engine_fixtures import SIZE, TINY_LTS

    common = dict(model="lts", model_kwargs=TINY_LTS, size=SIZE, batch_size=4, images_per_batch=2, lr=3e-3,
                  warmup_steps=1, val_split="", log_every=1, save_frozen=True, cache_features="off")
    return {"dataset": str(data), "stages": [{"name": "first", **common, "max_steps": 2, "seed": 0},
                                             {"name": "second", **common, "init_from": "first", "max_steps": 1,
                                              "lr": 0.0, "min_lr": 0.0, "seed": 1, **second}]}


def test_two_stage_recipe_trains_in_order_starts_from_the_first_and_resumes(synthref_tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from refseg.engine.checkpoint import load_model

    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(_tiny_recipe(synthref_tiny)))
    run = tmp_path / "run"
    argv = ["train", "--config", str(path), "--out", str(run), "--threads", "1", "--no-progress"]
    assert cli(argv) == 0
    first = load_file(str(run / "first" / "last" / "model.safetensors"))
    second = load_file(str(run / "second" / "last" / "model.safetensors"))
    # lr 0 in the second stage: its weights are the first stage's, so it was initialised from them
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    assert json.loads((run / "second" / "config.json").read_text())["model"]["init_from"] == str(run / "first")
    state = json.loads((run / "recipe.json").read_text())
    assert state["finished"] == ["first", "second"] and state["final"] == "second"
    # the run folder loads as its final stage (refseg eval --checkpoint RUN, refseg.load(RUN))
    assert load_model(run).config == json.loads((run / "second" / "last" / "model.json").read_text())["config"]
    # scripts/ship_model.py ships the final stage and records the recipe file
    spec = importlib.util.spec_from_file_location("ship_model", ROOT / "scripts" / "ship_model.py")
    ship_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship_model)
    assert ship_model.recipe_run(run) == (run / "second", str(path))
    # stage two interrupted: re-running skips the finished first stage and resumes the second
    state["finished"] = ["first"]
    (run / "recipe.json").write_text(json.dumps(state))
    stamp = (run / "first" / "last" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli(["train", "--resume", str(run), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "stage 'first' is finished" in err and "stage 'second'" in err and "(resumed)" in err
    assert (run / "first" / "last" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((run / "recipe.json").read_text())["finished"] == ["first", "second"]
    # the same command again: everything finished, nothing trained
    assert cli(argv) == 0
    assert (run / "first" / "last" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_plain_config_file_still_trains_one_run(synthref_tiny, tmp_path):
    from _engine_fixtures import SIZE, TINY_LTS

    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(dict(model="lts", model_kwargs=TINY_LTS, size=SIZE, data=str(synthref_tiny),
                                        batch_size=4, images_per_batch=2, max_steps=1, val_split="",
                                        cache_features="off", save_frozen=True)))
    assert cli(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--threads", "1",
                "--no-progress"]) == 0
    assert (tmp_path / "run" / "last" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "recipe.json").exists()


BAD = {
    "unknown field": ({"data": {"domain": "natural", "preset": "tiny", "seed": 0},
                       "stages": [{"name": "a", "lrr": 0.1}]}, "stage 'a': unknown TrainConfig field(s): lrr"),
    "unknown stage": ({"data": "d", "stages": [{"name": "a"}, {"name": "b", "init_from": "nosuch"}]},
                      "stage 'b': field 'init_from' 'nosuch' names no stage"),
    "cycle": ({"data": "d", "stages": [{"name": "a", "init_from": "b"}, {"name": "b", "init_from": "a"}]},
              "stage 'a': field 'init_from' names stage 'b', which does not run before it"),
    "self": ({"data": "d", "stages": [{"name": "a", "init_from": "a"}]}, "field 'init_from' names stage 'a'"),
    "empty stages": ({"data": "d", "stages": []}, "field 'stages' must be a non-empty list"),
    "data type": ({"data": 5, "stages": [{"name": "a"}]}, "field 'data' must be a SynthRef split"),
    "data list": ({"data": ["natural"], "stages": [{"name": "a"}]}, "field 'data' must be a SynthRef split"),
    "data keys": ({"data": {"domain": "natural", "preset": "tiny"}, "model": "lts"},
                  "field 'data' must give exactly domain, preset, seed"),
    "duplicate stage": ({"data": "d", "stages": [{"name": "a"}, {"name": "a"}]}, "stage 'a' is listed twice"),
    "wrong value type": ({"data": {"domain": "natural", "preset": "tiny", "seed": 0}, "lr": "3e-4"},
                         "TrainConfig optim.lr (--lr) must be float"),
    "nested wrong type": ({"synthref": {"domain": "natural", "preset": "tiny", "seed": 0},
                           "optim": {"lr": "3e-4"}}, "TrainConfig optim.lr (--lr) must be float"),
    "nested unknown": ({"synthref": {"domain": "natural", "preset": "tiny", "seed": 0},
                        "stages": [{"name": "a", "optim": {"lrr": 0.1}}]}, "unknown TrainConfig field(s): optim.lrr"),
    "synthref keys": ({"synthref": {"domain": "natural", "seed": 0}, "model": {"name": "lts"}},
                      "field 'synthref' must give exactly domain, preset, seed"),
    "synthref folder": ({"synthref": "data/x", "model": {"name": "lts"}}, "field 'synthref' must be a SynthRef split"),
    "dataset type": ({"dataset": {"domain": "natural", "preset": "tiny", "seed": 0}, "stages": [{"name": "a"}]},
                     "field 'dataset' must be a refer-format folder"),
    "two data sets": ({"synthref": {"domain": "natural", "preset": "tiny", "seed": 0}, "dataset": "d",
                       "model": {"name": "lts"}}, "give the data set once"),
    "split twice": ({"synthref": {"domain": "natural", "preset": "tiny", "seed": 0},
                     "data": {"domain": "aerial", "preset": "tiny", "seed": 0}}, "give the data set once"),
    "stage sets data.path": ({"synthref": {"domain": "natural", "preset": "tiny", "seed": 0},
                              "data": {"path": "elsewhere", "flip": "h"}}, "field(s) data.path are set by"),
    "nested init_from type": ({"dataset": "d", "stages": [{"name": "a", "model": {"init_from": 5}}]},
                              "field 'init_from' must be a stage name"),
    "nested init_from later": ({"dataset": "d", "stages": [{"name": "a", "model": {"init_from": "b"}},
                                                          {"name": "b"}]}, "which does not run before it"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_recipe_is_one_line_naming_file_and_field(case, tmp_path, capsys):
    values, message = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    assert cli(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refseg train: error: ") and str(path) in err, err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_finished_stage_with_other_values_is_refused(synthref_tiny, tmp_path, capsys):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(_tiny_recipe(synthref_tiny)))
    run = tmp_path / "run"
    state = {"recipe": str(path), "data": str(synthref_tiny), "final": "second", "finished": ["first"],
             "stages": [{"name": s.name, "values": recipe_module.stage_values(recipe_module.load_recipe(path), s, run)}
                        for s in recipe_module.load_recipe(path).stages]}
    state["stages"][0]["values"]["lr"] = 0.5
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps(state))
    assert cli(["train", "--config", str(path), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "finished stage 'first' was trained with other values of lr" in err and err.count("\n") == 1


def test_synthref_data_block_is_generated_when_missing_and_checked_when_present(tmp_path):
    spec = {"domain": "natural", "preset": "tiny", "seed": 3}
    folder = tmp_path / "natural-tiny-s3"
    (folder).mkdir()
    (folder / "synthref.json").write_text(json.dumps({"domain": "natural", "preset": "tiny", "seed": 0}))
    with pytest.raises(ConfigError, match="holds SynthRef"):
        recipe_module.make_data(spec, folder)
    recipe = recipe_module.parse_recipe({"synthref": spec, "model": {"name": "lts"}}, "r.yaml")
    assert recipe.data_folder(tmp_path) == folder and not recipe.staged


def test_the_nested_data_section_and_the_split_do_not_clash():
    """`synthref` names the split; the TrainConfig section `data` beside it holds data fields; the key `data`
    of recipes written before the nested form still names the split (or, beside `stages`, the folder)."""
    spec = {"domain": "aerial", "preset": "tiny", "seed": 2}
    new = recipe_module.parse_recipe({"synthref": spec, "data": {"flip": "hvt", "accurate_fraction": 0.5},
                                      "optim": {"lr": 1e-4}, "wrel": {"bank_lr": 0.1}}, "new.yaml")
    old = recipe_module.parse_recipe({"data": spec, "flip": "hvt", "accurate_fraction": 0.5, "lr": 1e-4,
                                      "wrel_bank_lr": 0.1}, "old.yaml")
    assert new.data == old.data == spec
    assert new.stages[0].values == old.stages[0].values == {"flip": "hvt", "accurate_fraction": 0.5, "lr": 1e-4,
                                                            "wrel_bank_lr": 0.1}
    assert recipe_module.is_recipe({"synthref": spec}) and recipe_module.is_recipe({"data": spec})
    assert not recipe_module.is_recipe({"data": {"path": "d", "flip": "h"}, "optim": {"lr": 1e-4}})
    assert recipe_module.parse_recipe({"data": "folder", "stages": [{"name": "a"}]}, "r.yaml").data == "folder"
    staged = recipe_module.parse_recipe({"dataset": "folder", "stages": [
        {"name": "a"}, {"name": "b", "model": {"name": "pks", "init_from": "a/last"}}]}, "r.yaml")
    assert (staged.stages[1].init_stage, staged.stages[1].init_checkpoint) == ("a", "last")
    assert staged.stages[1].values == {"model": "pks"}


def test_data_flag_replaces_the_recipe_data_set(tmp_path):
    """`refseg train --config RECIPE --data FOLDER`: every stage trains on FOLDER (no SynthRef split made)."""
    from refseg.engine import train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(ROOT / "configs" / "pks-click-synthref.yaml"), "--out",
                              str(tmp_path / "run"), "--data", str(tmp_path / "mine"), "--max-steps", "7"])
    configs = recipe_module.command_configs(args)
    assert [c.data.path for c in configs] == [str(tmp_path / "mine")] * 3
    assert [c.optim.max_steps for c in configs] == [7, 7, 7] and [c.run.seed for c in configs] == [0, 1, 2]
    assert [c.model.init_from for c in configs] == [None, str(tmp_path / "run" / "scratch"),
                                                    str(tmp_path / "run" / "round1")]
