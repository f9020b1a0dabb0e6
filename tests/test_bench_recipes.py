"""`refseg bench` trains from the recipe files the model cards name: each row names its model's recipe,
the small preset's command resolves to exactly the recipe's configuration, the tiny preset changes only
the fields it names, and a weak row's annotation cost is that of the split its recipe makes."""

import json
from pathlib import Path

import pytest

from refseg.bench import run as bench
from refseg.engine import recipe as recipe_module
from refseg.hub import WEIGHTS_DIR, available_models

ROOT = Path(__file__).resolve().parents[1]
MACHINE = set(recipe_module.MACHINE_FIELDS)


def test_every_row_with_a_shipped_model_names_the_recipe_its_card_names():
    shipped = [e for e in bench.ENTRIES if e.shipped in available_models()]
    assert {e.shipped for e in shipped} == set(available_models())  # every shipped model is a row
    for entry in shipped:
        card = json.loads((WEIGHTS_DIR / f"{entry.shipped}.json").read_text())
        assert entry.recipe == card["training"]["recipe"], entry.name
        assert entry.recipe_file() == ROOT / entry.recipe and entry.recipe_file().is_file()


def _configs(entry, preset, tmp_path, own=None):
    argv = bench.train_argv(entry, bench.PRESETS[preset], 0, tmp_path / "run", tmp_path / "data", own)
    recipe = recipe_module.load_recipe(entry.recipe_file())
    return bench.command_configs(argv), recipe_module.stage_configs(recipe, tmp_path / "run", tmp_path / "data")


def _differences(got, expected):
    a, b = got.to_flat(), expected.to_flat()
    return {k: (a[k], b[k]) for k in a if k not in MACHINE and a[k] != b[k]}


@pytest.mark.parametrize("row", [e.name for e in bench.ENTRIES])
def test_small_preset_command_resolves_to_the_recipe(row, tmp_path):
    """What the bench would train for a row in the small preset: every stage, every field, as the recipe."""
    entry = next(e for e in bench.ENTRIES if e.name == row)
    got, expected = _configs(entry, "small", tmp_path)
    assert len(got) == len(expected) >= 1
    for stage, g, e in zip(recipe_module.load_recipe(entry.recipe_file()).stages, got, expected):
        assert _differences(g, e) == {}, (row, stage.name)


@pytest.mark.parametrize("row", ["lts", "pks-click", "sag", "lts-aerial", "wrel-aerial-p0.1"])
def test_tiny_preset_changes_only_the_fields_it_names(row, tmp_path):
    """The tiny preset's schedule, head and split are explicit overrides: every other field is the recipe's."""
    entry = next(e for e in bench.ENTRIES if e.name == row)
    own = tmp_path / "data" / "own-split"
    got, expected = _configs(entry, "tiny", tmp_path, own)
    named = set(bench.recipe_overrides(entry, bench.PRESETS["tiny"], 0)) | {"data"}
    for g, e in zip(got, expected):
        changed = _differences(g, e)
        assert set(changed) <= named, (row, sorted(set(changed) - named))
        assert g.data.path == str(own) and g.optim.max_steps == 40 and g.data.size == 160
    if row == "wrel-aerial-p0.1":  # the recipe's weakening stands: one source of truth
        assert (got[-1].data.accurate_fraction, got[-1].data.weak_seed) == (0.1, 0)


def test_weak_row_pays_for_the_split_its_recipe_makes(synthref_tiny, tmp_path):
    """The bench's labels split is data.weak.ensure_weak of the training folder at the recipe's
    accurate_fraction and weak_seed: the split `refseg train --accurate-fraction` makes in RUN/data."""
    from refseg.data import load_refer
    from refseg.engine.train import weak_data_dir

    entry = next(e for e in bench.ENTRIES if e.name == "lts-aerial-naive-p0.5")
    argv = bench.train_argv(entry, bench.PRESETS["tiny"], 0, tmp_path / "run", tmp_path / "data", synthref_tiny)
    cfg = bench.command_configs(argv)[-1]
    labels, note = bench.labels_folder(cfg, Path(synthref_tiny), tmp_path / "unused", tmp_path)
    assert note is None and labels == tmp_path / f"{Path(synthref_tiny).name}-p0.5-w0"
    made_by_train = weak_data_dir(cfg, tmp_path / "run-of-train")
    weak = {r["ref_id"]: r.get("weak", False) for r in load_refer(labels).refs_by_id.values()}
    assert weak == {r["ref_id"]: r.get("weak", False) for r in load_refer(made_by_train).refs_by_id.values()}
    assert any(weak.values()) and not all(weak.values())
