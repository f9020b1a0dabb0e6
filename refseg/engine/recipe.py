"""Recipes: how a model is trained, as a file (configs/<model>.yaml).

A recipe is a YAML (or JSON) file: the data set, then the TrainConfig
sections (refseg/engine/config.py) of one run:

    synthref: {domain: natural, preset: full, seed: 1}   # a SynthRef split (or dataset: <refer-format folder>)
    model: {name: lts, kwargs: {text_depth: 2}}
    optim: {max_steps: 4500, loss_kwargs: {w_locate: 0.5}}
    run: {seed: 0}

Several chained runs: `stages`, a list of named sets of TrainConfig sections,
trained in order; a stage starts from an earlier stage's weights with
`model.init_from: <stage>` (its best/, else last/) or `<stage>/last`:

    synthref: {domain: natural, preset: full, seed: 1}
    stages:
      - name: scratch
        model: {name: pks}
        optim: {max_steps: 4500}
      - name: round1
        model: {name: pks, init_from: scratch}
        optim: {lr: 1.0e-4}

A stage's fields may also be given by their flat names (the flags': `lr`,
`init_from`, `wrel_bank_lr`), as in TrainConfig files. Recipes written with
the SynthRef split (or the folder, with `stages`) under the key `data` are
still read.

`refseg train --config RECIPE --out RUN` generates a SynthRef split that is
missing (`refseg make-data` into --data-root/<domain>-<preset>-s<seed>),
trains each stage into RUN/<stage>/ (an ordinary run folder: locked, resumable,
refused when it holds another run) and keeps RUN/recipe.json (the resolved
stages, the finished ones, the final one). `refseg eval --checkpoint RUN`,
`refseg.load(RUN)` and scripts/ship_model.py follow it to the final stage.
Re-running the command, or `refseg train --resume RUN`, skips the finished
stages and resumes the unfinished one. Flags given on the command line
override the value of every stage (machine settings: --threads, --cache-dir,
--device ...); `--data FOLDER` trains on that refer-format folder instead of
the recipe's data set.

A file with neither `stages` nor a `synthref` / `dataset` key is a plain
TrainConfig file (`refseg train --config`, one run into --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from refseg.engine.checkpoint import RECIPE_RUN_FILE, STAGE_NAME
from refseg.engine.config import (ConfigError, TrainConfig, flat_fields, from_file_values, given_flags, nest,
                                  read_config_file, write_text_atomic)

RUN_FILE = RECIPE_RUN_FILE  # RUN/recipe.json: the state of a recipe's run folder (checkpoint.final_stage reads it)
DATA_KEYS = ("domain", "preset", "seed")  # a SynthRef split
SPLIT_KEY = "synthref"  # recipe key of a SynthRef split {domain, preset, seed}
FOLDER_KEY = "dataset"  # recipe key of a refer-format folder
LEGACY_KEY = "data"  # the key of either in recipes written before the nested TrainConfig
SET_BY_RUN = (("data", "path"), ("run", "out"), ("run", "resume"), ("run", "overwrite"))  # set for each stage
MACHINE_FIELDS = ("threads", "cache_dir", "out", "resume", "progress", "device", "workers")  # not a recipe's
RESERVED_STAGE_NAMES = ("best", "last", "data", "tb", RUN_FILE)


@dataclass
class Stage:
    name: str
    values: Dict[str, Any]  # the stage's TrainConfig fields by their flat names (the flags'), init_from excluded
    init_from: Optional[str] = None  # an external source (shipped model name, checkpoint, run folder)
    init_stage: Optional[str] = None  # or an earlier stage of the recipe ...
    init_checkpoint: Optional[str] = None  # ... and which of its checkpoints: best, last (None = best, else last)


@dataclass
class Recipe:
    path: str  # the file
    data: Union[str, Dict[str, Any]]  # a refer-format folder, or a SynthRef split {domain, preset, seed}
    stages: List[Stage]
    staged: bool  # the file lists `stages` (a single-run recipe has one stage named "train")

    def data_folder(self, data_root: Union[str, Path]) -> Path:
        """The folder trained on: the path given, or DATA_ROOT/<domain>-<preset>-s<seed>."""
        if isinstance(self.data, str):
            return Path(self.data)
        return Path(data_root) / f"{self.data['domain']}-{self.data['preset']}-s{self.data['seed']}"


def _legacy_source(values: Dict[str, Any]) -> bool:
    """True when the top-level `data` key names the recipe's data set (the form before nested configs):
    a SynthRef split (a mapping with `domain`), or anything beside `stages`."""
    data = values.get(LEGACY_KEY)
    return LEGACY_KEY in values and ("stages" in values or (isinstance(data, dict) and "domain" in data))


def is_recipe(values: Dict[str, Any]) -> bool:
    """True when a config file's mapping is a recipe (stages, or a synthref / dataset key), not a plain
    TrainConfig."""
    return "stages" in values or SPLIT_KEY in values or FOLDER_KEY in values or _legacy_source(values)


def load_recipe(path: Union[str, Path]) -> Recipe:
    """Read and check a recipe file; ConfigError names the file and the field."""
    return parse_recipe(read_config_file(path), str(path))


def parse_recipe(values: Dict[str, Any], path: str) -> Recipe:
    """Check a recipe's mapping (see the module docstring); ConfigError names `path` and the field."""
    source_keys = [k for k in (SPLIT_KEY, FOLDER_KEY) if k in values] + ([LEGACY_KEY] * _legacy_source(values))
    if len(source_keys) != 1:
        given = f"got {', '.join(source_keys)}" if source_keys else "got none"
        raise ConfigError(f"{path}: give the data set once: field '{SPLIT_KEY}' (a SynthRef split "
                          f"{{domain, preset, seed}}) or '{FOLDER_KEY}' (a refer-format folder), {given}")
    key = source_keys[0]
    data = _parse_data(values[key], path, key)
    if "stages" not in values:
        rest = {k: v for k, v in values.items() if k != key}
        stages = [_parse_stage({"name": "train", **rest}, path, f"{path}", [])]
        return Recipe(path, data, stages, staged=False)
    extra = sorted(str(k) for k in values if k not in (key, "stages"))
    if extra:
        raise ConfigError(f"{path}: field(s) {', '.join(extra)} beside 'stages': "
                          "give TrainConfig fields inside each stage")
    listed = values["stages"]
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"{path}: field 'stages' must be a non-empty list of stages (mappings with a 'name'), "
                          f"got {listed!r}")
    stages: List[Stage] = []
    for i, item in enumerate(listed):
        where = f"{path}: stages[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: a stage is a mapping of TrainConfig fields with a 'name', got {item!r}")
        stages.append(_parse_stage(item, path, where, [s.name for s in stages], [s.get("name") for s in listed
                                                                                    if isinstance(s, dict)]))
    return Recipe(path, data, stages, staged=True)


def _parse_data(data, path: str, key: str) -> Union[str, Dict[str, Any]]:
    """The data set of a recipe: a SynthRef split (`synthref`), a folder (`dataset`), or either (`data`)."""
    if key != SPLIT_KEY and isinstance(data, str) and data:
        return data
    if key != FOLDER_KEY and isinstance(data, dict):
        keys = set(map(str, data))
        if keys != set(DATA_KEYS):
            raise ConfigError(f"{path}: field '{key}' must give exactly {', '.join(DATA_KEYS)} (a SynthRef split), "
                              f"got {', '.join(sorted(keys)) or 'none'}")
        from refseg.data.synthref.vocab import DOMAINS, PRESETS

        if data["domain"] not in DOMAINS:
            raise ConfigError(f"{path}: field '{key}.domain' must be one of {', '.join(DOMAINS)}, "
                              f"got {data['domain']!r}")
        if data["preset"] not in PRESETS:
            raise ConfigError(f"{path}: field '{key}.preset' must be one of {', '.join(sorted(PRESETS))}, "
                              f"got {data['preset']!r}")
        if not isinstance(data["seed"], int) or isinstance(data["seed"], bool) or data["seed"] < 0:
            raise ConfigError(f"{path}: field '{key}.seed' must be an integer >= 0, got {data['seed']!r}")
        return {k: data[k] for k in DATA_KEYS}
    wanted = {SPLIT_KEY: "a SynthRef split {domain, preset, seed}", FOLDER_KEY: "a refer-format folder (a string)",
              LEGACY_KEY: "a SynthRef split {domain, preset, seed} or a refer-format folder (a string)"}[key]
    raise ConfigError(f"{path}: field '{key}' must be {wanted}, got {data!r}")


def _parse_stage(item: Dict[str, Any], path: str, where: str, earlier: List[str],
                 all_names: Optional[List[Any]] = None) -> Stage:
    name = item.get("name")
    if not isinstance(name, str) or not STAGE_NAME.match(name) or name in RESERVED_STAGE_NAMES:
        raise ConfigError(f"{where}: field 'name' must be a folder name (letters, digits, _ . -; not "
                          f"{', '.join(RESERVED_STAGE_NAMES)}), got {name!r}")
    if name in earlier:
        raise ConfigError(f"{where}: field 'name': stage {name!r} is listed twice")
    where = f"{path}: stage {name!r}" if all_names is not None else where
    fields = {k: v for k, v in item.items() if k != "name"}
    try:
        nested = nest(fields)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    set_by_run = [f"{s}.{n}" for s, n in SET_BY_RUN if n in nested.get(s, {})]
    if set_by_run:
        raise ConfigError(f"{where}: field(s) {', '.join(set_by_run)} are set by the recipe's {SPLIT_KEY} / "
                          f"{FOLDER_KEY} and `refseg train --out / --resume / --overwrite`, not by a stage")
    init = nested.get("model", {}).pop("init_from", None)
    from_file_values(TrainConfig, nested, where)  # wrong types
    flat_of = {v: k for k, v in flat_fields().items()}
    stage = Stage(name, {flat_of[(s, n)]: v for s, values in nested.items() for n, v in values.items()})
    if init is None:
        return stage
    if not isinstance(init, str) or not init:
        raise ConfigError(f"{where}: field 'init_from' must be a stage name, a shipped model or a path, got {init!r}")
    head, _, tail = init.partition("/")
    names = [n for n in (all_names or []) if isinstance(n, str)]
    if head in names:
        if head not in earlier:
            raise ConfigError(f"{where}: field 'init_from' names stage {head!r}, which does not run before it "
                              f"(stages run in the order listed: {', '.join(names)})")
        if tail not in ("", "best", "last"):
            raise ConfigError(f"{where}: field 'init_from' {init!r}: after a stage name only /best or /last")
        stage.init_stage, stage.init_checkpoint = head, tail or None
        return stage
    from refseg.hub import available_models

    if init not in available_models() and not Path(init).exists():
        known = f"stages: {', '.join(names)}; " if names else ""
        raise ConfigError(f"{where}: field 'init_from' {init!r} names no stage of this recipe ({known}"
                          "nor a shipped model, nor an existing checkpoint or run folder)")
    stage.init_from = init
    return stage


# ---- resolving stages into TrainConfigs ---------------------------------------------------


def stage_values(recipe: Recipe, stage: Stage, run: Union[str, Path], data_root: Union[str, Path] = "data",
                 overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The TrainConfig mapping of one stage trained into RUN/<stage>: the stage's fields, the data folder,
    init_from resolved to the earlier stage's folder, then `overrides` (flags given on the command line)."""
    values = dict(stage.values)
    init = stage.init_from
    if stage.init_stage is not None:
        init = str(Path(run) / stage.init_stage / (stage.init_checkpoint or ""))
    values.update(data=str(recipe.data_folder(data_root)), init_from=init, out=str(Path(run) / stage.name))
    values.update(overrides or {})
    return values


def resolve(values: Dict[str, Any], where: str) -> TrainConfig:
    """TrainConfig of a stage mapping, checked; ConfigError names `where`."""
    config = from_file_values(TrainConfig, values, where)
    try:
        return config.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def stage_configs(recipe: Recipe, run: Union[str, Path], data_root: Union[str, Path] = "data",
                  overrides: Optional[Dict[str, Any]] = None) -> List[TrainConfig]:
    """The resolved TrainConfig of every stage, in order (see stage_values)."""
    return [resolve(stage_values(recipe, s, run, data_root, overrides), f"{recipe.path}: stage {s.name!r}")
            for s in recipe.stages]


# ---- the run folder -------------------------------------------------------------------------


def is_recipe_run(args: argparse.Namespace) -> bool:
    """True when `refseg train` was given a recipe file, or --resume of a recipe's run folder."""
    if getattr(args, "config", None):
        return is_recipe(read_config_file(args.config))
    resume = getattr(args, "resume", None)
    return bool(resume) and (Path(resume) / RUN_FILE).is_file()


def _machine_free(values: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in values.items() if k not in MACHINE_FIELDS}


def main(args: argparse.Namespace) -> int:
    """`refseg train` with a recipe: exit status 0, or 2 with one line naming the file and field."""
    from refseg.data.refer import ReferFormatError
    from refseg.engine.train import TrainError

    try:
        train_recipe(args)
    except (TrainError, ConfigError, FileNotFoundError, ReferFormatError) as e:
        print(f"refseg train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def _run_folder(args: argparse.Namespace):
    """(RUN, the other config flags given, --resume, --overwrite) of a recipe's `refseg train` namespace."""
    from refseg.engine.train import TrainError

    given = given_flags(args)  # flat names (the flags')
    resume, out, overwrite = given.pop("resume", None), given.pop("out", None), given.pop("overwrite", False)
    if resume and overwrite:
        raise TrainError("--overwrite starts a new run and --resume continues one: give only one of them")
    if resume and out and Path(resume).resolve() != Path(out).resolve():
        raise TrainError(f"--resume {resume} and --out {out} name different folders")
    return Path(resume or out or f"runs/{Path(args.config).stem}"), given, resume, overwrite


def planned_stages(args: argparse.Namespace, run: Path, given: Dict[str, Any],
                   state: Optional[Dict[str, Any]] = None):
    """(the mapping of every stage, by flat names; the data set: a SynthRef split to make, or a folder) that
    `refseg train` trains into RUN: the recipe's stages (--config), or those RUN/recipe.json records (--resume),
    with the flags `given` on top. `--data FOLDER` replaces the recipe's data set."""
    if args.config:
        recipe = load_recipe(args.config)
        data_root = getattr(args, "data_root", None) or "data"
        values = [stage_values(recipe, s, run, data_root, given) for s in recipe.stages]
        data = given["data"] if "data" in given else recipe.data
    else:
        values = [{**s["values"], **given} for s in state["stages"]]
        data = given["data"] if "data" in given else state["data"]
    return values, data


def command_configs(args: argparse.Namespace) -> List[TrainConfig]:
    """The resolved TrainConfig of every stage that `refseg train --config RECIPE ...` (parsed into `args`)
    would train, in order, without training anything (a new run: RUN/recipe.json is not read)."""
    run, given, _, _ = _run_folder(args)
    values, _ = planned_stages(args, run, given)
    return [resolve(v, f"{args.config}: stage {Path(v['out']).name!r}") for v in values]


def train_recipe(args: argparse.Namespace) -> Path:
    """Train every unfinished stage of a recipe run; returns the final stage's folder."""
    from refseg.engine.checkpoint import resume_candidates
    from refseg.engine.train import TrainError, train

    if getattr(args, "nproc", 1) > 1:
        raise TrainError("--nproc: a recipe trains its stages with one process (run a stage's config.json "
                         "with --nproc instead)")
    run, given, resume, overwrite = _run_folder(args)
    state_file = run / RUN_FILE
    state = _read_state(state_file) if state_file.is_file() else None
    if resume and state is None:
        raise TrainError(f"--resume {resume}: no {RUN_FILE} in that folder")
    if state is None and run.is_dir() and any(run.iterdir()):
        raise TrainError(f"--out {run} already holds something that is not a recipe's run: choose another --out")
    values, data = planned_stages(args, run, given, state)
    for v, name in zip(values, [Path(v["out"]).name for v in values]):
        resolve(v, f"{args.config or state_file}: stage {name!r}")  # every stage checked before any trains
    names_now = [Path(v["out"]).name for v in values]
    finished = [] if state is None or overwrite else list(state.get("finished", []))
    if state is not None and not overwrite:
        before = {s["name"]: s["values"] for s in state["stages"]}
        for name, v in zip(names_now, values):
            if name in finished and _machine_free(before.get(name, {})) != _machine_free(v):
                changed = sorted(k for k in set(v) | set(before.get(name, {}))
                                 if k not in MACHINE_FIELDS and v.get(k) != before.get(name, {}).get(k))
                raise TrainError(f"{run}: finished stage {name!r} was trained with other values of "
                                 f"{', '.join(changed)}: train into another --out, or start over with --overwrite")
    if isinstance(data, dict):
        make_data(data, Path(values[0]["data"]), workers=given.get("threads") or os.cpu_count() or 1)
    run.mkdir(parents=True, exist_ok=True)
    new_state = {"recipe": str(args.config or state["recipe"]), "data": data,
                 "stages": [{"name": n, "values": v} for n, v in zip(names_now, values)],
                 "final": names_now[-1], "finished": [n for n in finished if n in names_now]}
    _write_state(state_file, new_state)
    for name, v in zip(names_now, values):
        if name in new_state["finished"]:
            print(f"refseg train: stage {name!r} is finished ({run / name}); skipped", file=sys.stderr)
            continue
        folder = run / name
        held = folder.is_dir() and any(p.name != ".lock" for p in folder.iterdir())
        can_resume = held and not overwrite and any(resume_candidates(folder))
        cfg_values = {**v, "resume": str(folder) if can_resume else None,
                      "overwrite": bool(held and not can_resume)}
        print(f"refseg train: stage {name!r} -> {folder}" + (" (resumed)" if can_resume else ""), file=sys.stderr)
        train(resolve(cfg_values, f"{new_state['recipe']}: stage {name!r}"))
        new_state["finished"].append(name)
        _write_state(state_file, new_state)
    return run / names_now[-1]


def make_data(spec: Dict[str, Any], folder: Path, workers: int = 1) -> None:
    """Generate the SynthRef split `spec` into `folder` unless it is there; a folder holding another split
    is refused (ConfigError)."""
    meta_file = folder / "synthref.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except ValueError:
            meta = {}
        found = {k: meta.get(k) for k in DATA_KEYS}
        if found != spec:
            raise ConfigError(f"{folder} holds SynthRef {found}, the recipe needs {spec}: "
                              "give another --data-root")
        return
    if folder.exists():
        raise ConfigError(f"{folder} exists but holds no SynthRef split (no synthref.json): "
                          "remove it or give another --data-root")
    from refseg.data.synthref.generate import generate

    print(f"refseg train: generating SynthRef {spec['domain']} {spec['preset']} seed {spec['seed']} into {folder}",
          file=sys.stderr)
    generate(folder, spec["domain"], spec["preset"], spec["seed"], workers=max(1, workers))


def _read_state(path: Path) -> Dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(state["stages"], list) and all(isinstance(s["values"], dict) for s in state["stages"])
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"{path}: not a recipe run's state (expected 'stages' with their 'values')")
    return state


def _write_state(path: Path, state: Dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(state, indent=2) + "\n")
