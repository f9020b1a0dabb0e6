"""Crash safety of `refseg train`: SIGKILL a run at random moments, resume it each time, check it ends
exactly where an uninterrupted run ends.

    python stress/kill_train.py                       # 12 kills, tiny LTS, SynthRef tiny (generated)
    python stress/kill_train.py --kills 20 --seed 3 --work /tmp/kt --keep

1. Data: `refseg make-data --preset tiny` (or --data DIR).
2. Reference: the same `refseg train` command run once without a kill, with
   every checkpoint it writes copied aside (this script wraps
   checkpoint.save_checkpoint in that child), so the state at every saved
   step is known.
3. Killed run: start `refseg train`, SIGKILL its process group, then
   `refseg train --resume RUN`, again and again until --kills kills have
   landed; the last attempt runs to the end. Every fourth kill falls at a
   random moment of start-up, the others after the attempt has trained a
   random number (1-6) of steps plus a random fraction of a step, so they
   hit steps and checkpoint writes alike. After every kill:
     - each checkpoint folder under its final name (last/, best/) and each
       one set aside by an interrupted save is complete and every file
       matches its SHA-256 in the manifest (no truncated file);
     - the checkpoint `--resume` will pick (find_checkpoint) is the newest
       complete one, and its weights, optimizer moments, step, epoch,
       data-order position and RNG state are bitwise those the reference
       had at that step;
     - the next attempt reports resuming from exactly that step.
4. At the end: the final weights, optimizer state and step equal the
   reference's bitwise.
5. Damaged last/ (--damage): copies of the finished run with last/ damaged
   each way of DAMAGE (a file deleted, a file truncated, state.json not
   JSON, the manifest deleted, last/ deleted, state.json lacking a field).
   With the previous checkpoint (.last.prev) there, `--resume` must say it
   falls back to it and end bitwise where the reference ended; with no other
   whole checkpoint it must refuse in one line naming the damaged file and
   leave every file of the run as it was (never a silent restart at step 0).
6. Concurrent runs (--concurrent N rounds): three copies of the run's
   command on one new folder started at once, then two `--resume`s of it at
   once: each time exactly one runs, the others are refused in one line
   naming its pid, and the folder ends bitwise where the reference ended.

Prints the kills survived and where they landed, and the outcome of each
attack; exits 1 on any failure.
Runs the tiny LTS of the tests (random encoders, 64 px) with one thread.
`--fork` forks the attempts from this process instead of starting a new
interpreter each time (faster; what tests/test_crash_safety.py does).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import killing  # noqa: E402  (stress/killing.py; this checkout's refseg comes first too)

# the tiny LTS of tests/_engine_fixtures.py: random ConvNeXt + BERT encoders, a small head
TINY_LTS = {"visual": {"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
            "text": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64},
            "max_length": 12, "dim": 32, "depth": 1, "heads": 2, "decoder_widths": [16, 8, 8]}
STATE_KEYS = ("step", "epoch", "position", "total_steps", "scheduler", "rng", "optimizer", "best")
DAMAGE = ("file deleted", "file truncated", "state.json not JSON", "manifest deleted", "last/ deleted",
          "state field missing")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)|no complete checkpoint in \S+ yet: starting at step (0)")


def train_args(data: Path, run: Path, cache: Path, steps: int, save_every: int, seed: int) -> list:
    return ["train", "--data", data, "--out", run, "--model", "lts", "--model-kwargs", json.dumps(TINY_LTS),
            "--size", "64", "--batch-size", "4", "--images-per-batch", "2", "--max-steps", steps,
            "--save-every", save_every, "--val-every", max(2, steps // 3), "--val-max-samples", "12",
            "--warmup-steps", "2", "--lr", "3e-3", "--threads", "1", "--log-every", "1", "--seed", seed,
            "--cache-dir", cache]


# ---- the reference run -----------------------------------------------------------------------------


def record_checkpoints(folder: Path, argv: list) -> int:
    """Run `refseg <argv>` in this process, copying every checkpoint written to folder/<name>-<step>."""
    from refseg.engine import checkpoint

    save = checkpoint.save_checkpoint

    def save_and_copy(final, model, optimizer=None, state=None, **kwargs):
        path = save(final, model, optimizer, state, **kwargs)
        shutil.copytree(path, folder / f"{Path(final).name}-{state['step']}")
        return path

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.save_checkpoint = save_and_copy
    try:
        return killing.cli_main(argv)
    finally:
        checkpoint.save_checkpoint = save


# ---- checks -----------------------------------------------------------------------------------------


def same_checkpoint(a: Path, b: Path) -> list:
    """What differs between two checkpoint folders: tensors (bitwise) and the state that training resumes."""
    from safetensors.torch import load_file

    problems = []
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        if ta.keys() != tb.keys():
            problems.append(f"{name}: different tensor names")
            continue
        problems += [f"{name}: {k} differs" for k in ta if not (ta[k] == tb[k]).all() or ta[k].dtype != tb[k].dtype]
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    problems += [f"state.json: '{k}' differs" for k in STATE_KEYS if sa.get(k) != sb.get(k)]
    return problems


def inspect_run(run: Path) -> dict:
    """After a kill: every checkpoint-named folder is whole, and find_checkpoint picks the newest.

    Returns {"found": path or None, "step": int or None, "mid_save": bool, "checked": n folders verified}.
    Raises AssertionError on a truncated or corrupt file in a folder that claims to be complete.
    """
    from refseg.engine.checkpoint import find_checkpoint, is_complete, verify_manifest

    checked, complete_steps = 0, []
    for name in ("last", "best"):
        final = run / name
        if final.exists():  # a folder under its final name was renamed there whole
            assert is_complete(final), f"{final} exists but is not complete"
        for folder in [final] + sorted(run.glob(f".{name}.old-*")) + [run / f".{name}.prev"]:
            if is_complete(folder):
                verify_manifest(folder)  # raises CheckpointError on a truncated / corrupt file
                checked += 1
                if name == "last":
                    complete_steps.append(json.loads((folder / "state.json").read_text())["step"])
    mid_save = any(run.glob(".last.tmp-*")) or any(run.glob(".last.old-*")) or any(run.glob(".best.tmp-*")) \
        or any(run.glob(".best.old-*"))
    found = find_checkpoint(run, "last")
    step = json.loads((found / "state.json").read_text())["step"] if found else None
    if complete_steps:
        assert step == max(complete_steps), f"resume would use step {step}, newest complete is {max(complete_steps)}"
    return {"found": found, "step": step, "mid_save": mid_save, "checked": checked}


def step_rows(run: Path) -> list:
    """(time, step) of every train/loss row of log.csv, in file order."""
    try:
        lines = (run / "log.csv").read_text(errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        parts = line.split(",")
        if len(parts) == 5 and parts[3] == "train/loss":
            rows.append((float(parts[0]), int(parts[1])))
    return rows


def wait_for_rows(child, run: Path, n: int, timeout: float) -> bool:
    """Wait until log.csv holds more than n step rows (this attempt has trained a step) or the child ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.running():
        if len(step_rows(run)) > n:
            return True
        time.sleep(0.02)
    return False


# ---- the experiment ----------------------------------------------------------------------------------


def run(kills: int = 12, steps: int = 100, save_every: int = 3, seed: int = 0, work: Path = None,
        data: Path = None, fork: bool = False, verbose: bool = True, damage=(), concurrent: int = 0) -> dict:
    """Run the experiment; returns the figures. Raises AssertionError / RuntimeError on a failure.

    fork: fork the attempts from this process instead of starting `refseg` anew (the in-suite test).
    damage: the ways of DAMAGE to attack a resume with (steps 5); concurrent: rounds of step 6.
    Kill times: every fourth kill at a random moment of start-up (before the first step); the
    others once the attempt has logged a random number (1-6) of steps, a random fraction of a step
    later (the step time measured on this attempt's last two steps), so they fall on steps and on
    checkpoint writes alike, and the run advances a few steps per attempt, whatever the CPU speed.
    """
    rng = random.Random(seed)
    work = Path(work or tempfile.mkdtemp(prefix="kill-train-"))
    work.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    t_start = time.monotonic()
    if data is None:
        data = work / "data"
        if not data.exists():
            make = ["make-data", "--preset", "tiny", "--seed", "0", "--out", data, "--workers", "1"]
            killing.run_to_end(killing.Child(work / "make-data.log", argv=killing.refseg(make), target=killing.cli_main,
                                             args=(make,), fork=fork))

    # reference: one uninterrupted run, every checkpoint copied aside
    ref_run, snapshots = work / "reference", work / "reference-checkpoints"
    for folder in (ref_run, snapshots):
        shutil.rmtree(folder, ignore_errors=True)
    argv = [str(a) for a in train_args(data, ref_run, work / "cache-reference", steps, save_every, seed)]
    ref = killing.Child(work / "reference.log", argv=[sys.executable, __file__, "--record", snapshots, *argv],
                        target=record_checkpoints, args=(snapshots, argv), fork=fork)
    t_ref = killing.run_to_end(ref)
    rows = step_rows(ref_run)
    t_startup = rows[0][0] - ref.started
    say(f"reference run: {steps} steps in {t_ref:.1f} s (start-up {t_startup:.1f} s, "
        f"{len(list(snapshots.iterdir()))} checkpoints recorded)")

    # the killed run
    run_dir = work / "killed"
    shutil.rmtree(run_dir, ignore_errors=True)
    first = train_args(data, run_dir, work / "cache-killed", steps, save_every, seed)
    landed = {"in start-up": 0, "during a checkpoint write": 0, "between checkpoint writes": 0}
    attempts, killed, verified, expected_resume, history = 0, 0, 0, None, []
    while True:
        argv = first if not (run_dir / "config.json").exists() else ["train", "--resume", run_dir]
        argv = [str(a) for a in argv]
        n_rows = len(step_rows(run_dir))
        child = killing.Child(work / f"attempt-{attempts:02d}.log", argv=killing.refseg(argv),
                              target=killing.cli_main, args=(argv,), fork=fork)
        attempts += 1
        was_killed = False
        if killed < kills:
            if killed % 4 == 3:  # every fourth kill: in start-up (the shortest start-up seen so far)
                time.sleep(rng.uniform(0.1, t_startup))
            elif wait_for_rows(child, run_dir, n_rows + rng.randint(0, 5), timeout=killing.TIMEOUT):
                times = [t for t, _ in step_rows(run_dir)[n_rows:]]
                step_time = times[-1] - times[-2] if len(times) >= 2 else 0.5
                time.sleep(rng.uniform(0.0, max(step_time, 0.01)))
            was_killed = child.kill()
        if not was_killed:
            rc = child.wait(killing.TIMEOUT)
            if rc != 0:
                raise RuntimeError(f"attempt {attempts} exited {rc}:\n{child.tail()}")
        text = child.log.read_text(errors="replace")
        m = RESUMED.search(text)
        if expected_resume is not None and m is not None:
            resumed_at = int(m.group(1) or m.group(2))
            assert resumed_at == expected_resume, \
                f"attempt {attempts} resumed at step {resumed_at}, the newest checkpoint is step {expected_resume}"
        if not was_killed:
            break
        rows_now = step_rows(run_dir)[n_rows:]
        if rows_now:
            t_startup = min(t_startup, rows_now[0][0] - child.started)
        killed += 1
        state = inspect_run(run_dir)
        verified += state["checked"]
        done = len(step_rows(run_dir)) - n_rows
        # no step logged: start-up (a staging folder seen then is the previous kill's, not yet cleaned up)
        where = ("in start-up" if done == 0 else
                 "during a checkpoint write" if state["mid_save"] else "between checkpoint writes")
        landed[where] += 1
        if state["found"] is not None:
            snapshot = snapshots / f"last-{state['step']}"
            assert snapshot.exists(), f"the reference never saved step {state['step']}"
            problems = same_checkpoint(state["found"], snapshot)
            assert not problems, f"kill {killed}: checkpoint at step {state['step']} differs: {problems[:5]}"
        expected_resume = state["step"] or 0
        history.append(expected_resume)
        say(f"kill {killed:2d} ({where}; {done} steps this attempt): resume point step {expected_resume}, "
            "checkpoint identical to the reference's")

    final = same_checkpoint(run_dir / "last", ref_run / "last")
    assert not final, f"the final checkpoint differs from the uninterrupted run's: {final[:5]}"
    step = json.loads((run_dir / "last" / "state.json").read_text())["step"]
    assert step == steps, f"finished at step {step}, not {steps}"
    leftovers = sorted(p.name for p in run_dir.glob(".*") if p.name not in (".lock", ".last.prev"))
    assert not leftovers, f"temporary folders left after the run finished: {leftovers}"
    assert killed == kills, f"only {killed} of {kills} kills landed before the run finished (raise --steps)"
    figures = {"kills": killed, "attempts": attempts, "landed": landed, "checkpoints_verified": verified,
               "resume_steps": history, "final_step": step}
    say(f"kills survived: {killed}/{kills} ({', '.join(f'{v} {k}' for k, v in landed.items())}); "
        f"{attempts} attempts; {verified} checkpoint folders SHA-256-verified after the kills; "
        f"final step {step}: weights, optimizer state and RNG equal the uninterrupted run's bitwise")
    if damage:
        figures["damaged"] = attack_damaged_last(run_dir, ref_run, work, damage, fork, say)
    if concurrent:
        figures["concurrent"] = attack_concurrent_runs(first, ref_run, work, concurrent, fork, say)
    figures["seconds"] = round(time.monotonic() - t_start, 1)
    say(f"all checks passed in {figures['seconds']} s")
    return figures


# ---- attacks on a finished run ---------------------------------------------------------------------


def files_of(run: Path) -> dict:
    """{relative path: bytes} of a run folder, its lock file (the holder's pid) left out."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def damage_last(last: Path, how: str) -> str:
    """Damage a checkpoint folder; returns the name a refusal must mention."""
    from refseg.engine.checkpoint import sha256_of

    if how == "file deleted":
        (last / "optimizer.safetensors").unlink()
        return "optimizer.safetensors"
    if how == "file truncated":
        f = last / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return "model.safetensors"
    if how == "state.json not JSON":
        (last / "state.json").write_text('{"step": 1, "epo')
        return "state.json"
    if how == "manifest deleted":
        (last / "manifest.json").unlink()
        return "manifest.json"
    if how == "last/ deleted":
        shutil.rmtree(last)
        return "last"
    # a field missing from a state.json whose manifest entry was rewritten to match (not a truncated file)
    state = json.loads((last / "state.json").read_text())
    del state["position"]
    (last / "state.json").write_text(json.dumps(state))
    manifest = json.loads((last / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"size": (last / "state.json").stat().st_size,
                                       "sha256": sha256_of(last / "state.json")}
    (last / "manifest.json").write_text(json.dumps(manifest))
    return "position"


def attack_damaged_last(run_dir: Path, ref_run: Path, work: Path, kinds, fork: bool, say) -> dict:
    """Step 5 of the module docstring; returns {"fallbacks": n, "refusals": n}."""
    out = {"fallbacks": 0, "refusals": 0}
    for how in kinds:
        for variant in ("with .last.prev", "no other checkpoint"):
            if variant == "no other checkpoint" and how == "last/ deleted":
                continue  # no checkpoint at all: the run starts over, as one killed before its first
            copy = work / f"damaged-{how.replace(' ', '-').replace('/', '')}-{variant.split()[0]}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(run_dir, copy)
            shutil.rmtree(copy / "best")  # the step-N best/ would be a whole checkpoint too
            if variant == "no other checkpoint":
                shutil.rmtree(copy / ".last.prev")
            named = damage_last(copy / "last", how)
            before = files_of(copy)
            argv = ["train", "--resume", str(copy)]
            child = killing.Child(copy.with_suffix(".log"), argv=killing.refseg(argv), target=killing.cli_main,
                                  args=(argv,), fork=fork)
            rc = child.wait(killing.TIMEOUT)
            text = child.log.read_text(errors="replace")
            if variant == "with .last.prev":
                assert rc == 0, f"{how}: --resume exited {rc}:\n{child.tail()}"
                assert named in text and f"resuming from {copy / '.last.prev'}" in text, f"{how}: {child.tail()}"
                problems = same_checkpoint(copy / "last", ref_run / "last")
                assert not problems, f"{how}: the resumed run ends elsewhere than the reference: {problems[:5]}"
                out["fallbacks"] += 1
            else:
                lines = [line for line in text.splitlines() if line.strip()]
                assert rc == 2 and len(lines) == 1 and named in lines[0], f"{how}: exited {rc}:\n{child.tail()}"
                assert files_of(copy) == before, f"{how}: the refused resume changed the run"
                out["refusals"] += 1
            shutil.rmtree(copy)
    say(f"damaged last/ ({len(kinds)} ways): {out['fallbacks']} resumes fell back to .last.prev and ended "
        f"bitwise where the reference ended; {out['refusals']} refused in one line naming the file, nothing changed")
    return out


def attack_concurrent_runs(first: list, ref_run: Path, work: Path, rounds: int, fork: bool, say) -> dict:
    """Step 6 of the module docstring; returns {"rounds": n, "refused": n}."""
    refused = 0

    def race(run: Path, argv: list, n: int, name: str) -> None:
        """n copies of `refseg <argv>` started at once: exactly one runs, the others are refused naming it."""
        nonlocal refused
        children = [killing.Child(work / f"{name}-{j}.log", argv=killing.refseg(argv), target=killing.cli_main,
                                  args=(argv,), fork=fork) for j in range(n)]
        codes = [child.wait(killing.TIMEOUT) for child in children]
        winners = [child for child, rc in zip(children, codes) if rc == 0]
        assert len(winners) == 1, f"{name}: exit codes {codes}, expected one 0:\n{children[0].tail()}"
        for child, rc in zip(children, codes):
            if rc == 0:
                continue
            lines = [line for line in child.log.read_text(errors="replace").splitlines() if line.strip()]
            assert rc == 2 and len(lines) == 1 and f"pid {winners[0].pid}" in lines[0] and str(run) in lines[0], \
                f"{name}: a second process on the run exited {rc}:\n{child.tail()}"
            refused += 1
        problems = same_checkpoint(run / "last", ref_run / "last")
        assert not problems, f"{name}: the run ends elsewhere than the reference: {problems[:5]}"

    for i in range(rounds):
        run = work / f"concurrent-{i}"
        shutil.rmtree(run, ignore_errors=True)
        argv = [str(a) for a in first]
        argv[argv.index("--out") + 1] = str(run)
        race(run, argv, 3, f"concurrent-{i}-new")  # three new runs into one folder
        race(run, ["train", "--resume", str(run)], 2, f"concurrent-{i}-resume")  # two resumes of it
        shutil.rmtree(run)
    say(f"concurrent runs ({rounds} rounds of 3 new runs, then 2 resumes, on one folder): {refused} processes "
        "refused in one line naming the holder's pid; every run ended bitwise where the reference ended")
    return {"rounds": rounds, "refused": refused}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--record":
        return record_checkpoints(Path(sys.argv[2]), sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs to land before the run may finish")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps of the run")
    p.add_argument("--save-every", type=int, default=3, help="checkpoint every this many steps")
    p.add_argument("--fork", action="store_true",
                   help="fork the attempts from this process (fast) instead of starting `refseg train` anew")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times and of training")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--data", type=Path, default=None, help="a refer-format data set (default: SynthRef tiny)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--damage", choices=("all", "none"), default="all",
                   help="attack --resume with last/ damaged each way (step 5)")
    p.add_argument("--concurrent", type=int, default=1, help="rounds of concurrent runs on one folder (step 6)")
    args = p.parse_args()
    return killing.run_in_workdir(args.work, "kill-train-", args.keep, lambda work: run(
        args.kills, args.steps, args.save_every, args.seed, work, args.data, fork=args.fork,
        damage=DAMAGE if args.damage == "all" else (), concurrent=args.concurrent))


if __name__ == "__main__":
    sys.exit(main())
