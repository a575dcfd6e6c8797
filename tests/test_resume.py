"""Kill a run with SIGKILL at several moments, run the same command again: it must end exactly
where an uninterrupted run ends (same removed layers, same final weights on CPU)."""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file

from layerprune import DataConfig, HealConfig, PruneConfig, prune
from layerprune.errors import LayerpruneError

from common import check_output_folder, run_cli


def command(tiny_dir, text_file, out):
    return [sys.executable, "-m", "layerprune", "prune", "--model", str(tiny_dir), "--data", str(text_file),
            "--out", str(out), "--device", "cpu", "--remove", "3", "--seq-len", "32", "--calib-blocks", "2",
            "--patch-blocks", "8", "--eval-blocks", "2", "--heal-steps", "3", "--heal-grad-accum", "1",
            "--heal-final-steps", "2", "--heal-checkpoint-every", "2", "--final-tasks", "perplexity", "--no-speed",
            "--quiet"]


def run(argv, kill_at=None, nan_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for variable, value in (("LAYERPRUNE_KILL_AT", kill_at), ("LAYERPRUNE_NAN_AT", nan_at)):
        env.pop(variable, None)
        if value:
            env[variable] = value
    assert argv[:3] == [sys.executable, "-m", "layerprune"], argv
    return run_cli(argv[3:], env)


def run_together(*jobs):
    """Several independent runs at once, as many as there are cores (each is one single-threaded
    process); jobs: (argv, kill_at) pairs, results in their order."""
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: run(*job), jobs))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from common import make_text_file, save_tiny

    root = tmp_path_factory.mktemp("inputs")
    return save_tiny(root / "tiny"), make_text_file(root / "corpus.txt")


# Scoring rounds pass 6 + 5 + 4 candidates (one batch each); each of the 3 healings runs 3 steps, the
# final healing 2; healing checkpoints come after steps 2 and 3 (2 and 2 for the final one). The guard
# finds the third healing worse than its cut and retries it twice (healing steps 7-9, 10-12, 13-15),
# so the final healing's steps are 16 and 17. Each kill names the healing the resumed run must
# continue mid-way, (iteration or "final", step within its attempt), or None.
KILLS = [
    ("scoring:3", None),
    ("healing:2", (1, 2)),            # right after the first healing checkpoint
    ("heal-checkpoint:1", None),      # while writing it: iteration 1 starts over
    ("healing:3", (1, 3)),            # healing done, killed before its evaluation: nothing retrains
    ("checkpoint:1", (1, 3)),         # while writing the iteration checkpoint
    ("scoring:9", None),
    ("healing:5", (2, 2)),
    ("checkpoint:3", (3, 3)),
    ("healing:15", (3, 3)),           # the last retry done: the guard's rollback is taken again
    ("healing:11", (3, 2)),           # in the guard's first retry of the third healing
    ("healing:17", ("final", 2)),
    ("final:2", ("final", 2)),        # while moving the finished files into place
]


def resumed_healings(history: dict) -> dict:
    found = {e["iteration"]: e["heal"]["resumed_at_step"] for e in history["iterations"]
             if "resumed_at_step" in (e["heal"] or {})}
    if "resumed_at_step" in (history["final_heal"] or {}):
        found["final"] = history["final_heal"]["resumed_at_step"]
    return found


def _kill_then_resume(kill_at):
    def scenario(tiny_dir, text_file, out):
        killed = run(command(tiny_dir, text_file, out), kill_at)
        finished = (out / "history.json").exists()
        return {"killed": killed, "finished": finished, "resumed": run(command(tiny_dir, text_file, out))}
    return scenario


def _other_configuration(tiny_dir, text_file, out):
    killed = run(command(tiny_dir, text_file, out), "healing:5")   # after the first checkpoint
    other = command(tiny_dir, text_file, out)
    other[other.index("--heal-steps") + 1] = "4"
    return {"killed": killed, "refused": run(other), "overwritten": run(other + ["--overwrite"])}


def _corrupt_checkpoint(tiny_dir, text_file, out):
    killed = run(command(tiny_dir, text_file, out), "healing:2")
    (out / "heal-checkpoint" / "heal.pt").write_bytes(b"not a checkpoint")
    return {"killed": killed, "refused": run(command(tiny_dir, text_file, out))}


def _nan_while_healing(tiny_dir, text_file, out):
    failed = run(command(tiny_dir, text_file, out), nan_at="healing:6")  # iteration 2, step 3
    finished = (out / "history.json").exists()
    state = json.loads((out / "heal-checkpoint" / "state.json").read_text())
    return {"failed": failed, "finished": finished, "state": state, "resumed": run(command(tiny_dir, text_file, out))}


def _options_changed_on_resume(tiny_dir, text_file, out):
    killed = run(command(tiny_dir, text_file, out), "healing:2")
    other = command(tiny_dir, text_file, out)
    other[other.index("--heal-checkpoint-every") + 1] = "1"
    other.remove("--no-speed")
    other += ["--eval-before-heal", "--heal-log-every", "3"]   # --heal-log-every was refused before 2026-12-07
    return {"killed": killed, "resumed": run(other)}


def _uninterrupted(tiny_dir, text_file, out):
    return {"finished": run(command(tiny_dir, text_file, out))}


# the uninterrupted reference first: it shares the pool with the scenarios, whose runs need it only
# when their tests compare results
SCENARIOS = {"reference": _uninterrupted, **{kill_at: _kill_then_resume(kill_at) for kill_at, _ in KILLS},
             "other-configuration": _other_configuration, "corrupt-checkpoint": _corrupt_checkpoint,
             "nan": _nan_while_healing, "options-changed": _options_changed_on_resume}


@pytest.fixture(scope="module")
def scenarios(inputs, tmp_path_factory):
    """Every interrupted run of this file and what follows it, as many at once as there are cores:
    each run is one single-threaded process, so one at a time left a core idle for the suite's
    longest stretch. name -> (folder, the runs' results, or the exception the scenario raised)."""
    tiny_dir, text_file = inputs

    def play(name):
        out = tmp_path_factory.mktemp(name.replace(":", "-")) / "out"
        try:
            return out, SCENARIOS[name](tiny_dir, text_file, out)
        except Exception as err:   # raised again in its own test, not in every test of the file
            return out, err

    with ThreadPoolExecutor(max_workers=min(len(SCENARIOS), os.cpu_count() or 1)) as pool:
        return dict(zip(SCENARIOS, pool.map(play, SCENARIOS)))


def played(scenarios, name):
    out, results = scenarios[name]
    if isinstance(results, Exception):
        raise results
    return out, results


@pytest.fixture(scope="module")
def reference(scenarios):
    """The uninterrupted run's folder."""
    out, runs = played(scenarios, "reference")
    assert runs["finished"].returncode == 0, runs["finished"].stderr[-2000:]
    return out


@pytest.mark.parametrize("kill_at,resumes", KILLS)
def test_killed_run_resumes_to_the_same_result(reference, scenarios, kill_at, resumes):
    ref_out = reference
    out, runs = played(scenarios, kill_at)
    killed, resumed = runs["killed"], runs["resumed"]
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not runs["finished"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = json.loads((ref_out / "history.json").read_text())
    got = json.loads((out / "history.json").read_text())
    assert got["removed_original"] == ref["removed_original"]
    assert [e["heal"]["guard"] for e in got["iterations"]] == [e["heal"]["guard"] for e in ref["iterations"]]
    assert ref["iterations"][2]["heal"]["guard"]["retries"] == 2   # the retries are exercised
    assert resumed_healings(got) == (dict([resumes]) if resumes else {})
    assert (out / "logs" / "heal.csv").read_text() == (ref_out / "logs" / "heal.csv").read_text()
    a, b = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    check_output_folder(out, depth=3, removed=3)


def test_different_configuration_is_refused_and_overwrite_starts_afresh(scenarios):
    _, runs = played(scenarios, "other-configuration")
    assert runs["killed"].returncode == -9
    assert runs["refused"].returncode == 2 and "different configuration" in runs["refused"].stderr
    assert runs["overwritten"].returncode == 0


def test_resume_without_a_run_is_refused(tiny_dir, text_file, tmp_path):
    config = PruneConfig(out=str(tmp_path / "o"), model=str(tiny_dir), remove=1, metric="bi", device="cpu",
                         data=DataConfig(source=str(text_file), seq_len=32, calib_blocks=2, patch_blocks=2,
                                         eval_blocks=2), heal=HealConfig(method="none"))
    with pytest.raises(LayerpruneError, match="no unfinished run"):
        prune(config, progress=False, resume=True)


def test_corrupt_healing_checkpoint_is_refused_with_a_fix(scenarios):
    _, runs = played(scenarios, "corrupt-checkpoint")
    refused = runs["refused"]
    assert runs["killed"].returncode == -9
    assert refused.returncode == 2 and "heal.pt has changed since it was written" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_nan_while_healing_stops_keeps_the_last_good_checkpoint_and_resumes(reference, scenarios):
    ref_out = reference
    out, runs = played(scenarios, "nan")
    failed, resumed, state = runs["failed"], runs["resumed"], runs["state"]
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "non-finite healing loss (nan) at iteration 2 step 3" in failed.stderr
    assert "Traceback" not in failed.stderr and not runs["finished"]
    assert (state["pending"]["iteration"], state["pending"]["step"]) == (2, 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed_healings(json.loads((out / "history.json").read_text())) == {2: 2}
    a, b = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_options_that_change_no_result_may_differ_on_resume(reference, scenarios):
    ref_out = reference
    out, runs = played(scenarios, "options-changed")
    assert runs["killed"].returncode == -9
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed_healings(json.loads((out / "history.json").read_text())) == {1: 2}
    a, b = load_file(str(ref_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
