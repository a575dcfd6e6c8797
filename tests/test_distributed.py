"""Runs in 2 CPU processes (gloo, through torch's launcher) match 1 process on the same global batch.

`torchrun` rather than `accelerate launch --cpu`: on a machine without CUDA, Accelerate 1.x's
launcher starts one process unless an MPI launcher is configured, so a test through it would
compare one process with one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerprune.surgery import remove_layers

from common import tiny_model

SCRIPT = Path(__file__).with_name("ddp_heal.py")
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.parametrize("mode", ["straight", "cached"])
def test_two_processes_match_one(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(SCRIPT), str(single), mode], check=True, env=env, timeout=300)
    subprocess.run([*TWO_PROCESSES, str(SCRIPT), str(double), mode], check=True, env=env, timeout=300)
    a, b = torch.load(single), torch.load(double)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    pruned = tiny_model("llama")
    remove_layers(pruned, [3])
    reference = pruned.state_dict()
    assert any(not torch.equal(a[k], reference[k]) for k in a)  # healing did train something


def _launch(argv, env, kill_at=None):
    env = {**env, **({"LAYERPRUNE_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([*TWO_PROCESSES, "-m", "layerprune", *argv], env=env, capture_output=True, text=True,
                          timeout=600)


def test_whole_run_under_accelerate_launch_matches_one_process_and_resumes(tmp_path):
    """`accelerate launch --num_processes 2 --cpu -m layerprune prune`: scoring shared between the
    processes, healing data-parallel, one writer. Same layers and weights as one process; a launch
    killed mid-healing (every process SIGKILLed at its second healing step, after the healing
    checkpoint) resumes to the same result."""
    from safetensors.torch import load_file

    from common import check_output_folder, make_text_file, save_tiny

    tiny, text = save_tiny(tmp_path / "tiny"), make_text_file(tmp_path / "corpus.txt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERPRUNE_KILL_AT": ""}

    def argv(out):
        return ["prune", "--model", str(tiny), "--data", str(text), "--out", str(out), "--device", "cpu",
                "--remove", "2", "--metric", "quality", "--seq-len", "32", "--calib-blocks", "4", "--eval-blocks", "2",
                "--heal-steps", "4", "--heal-batch-size", "2", "--heal-grad-accum", "1", "--heal-checkpoint-every",
                "2", "--final-tasks", "perplexity", "--no-speed", "--quiet"]

    single = subprocess.run([sys.executable, "-m", "layerprune", *argv(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    double = _launch(argv(tmp_path / "two"), env)
    assert double.returncode == 0, double.stderr[-3000:]
    killed = _launch(argv(tmp_path / "killed"), env, kill_at="healing:2")
    assert killed.returncode != 0 and not (tmp_path / "killed" / "history.json").exists()
    assert (tmp_path / "killed" / "heal-checkpoint").is_dir()
    resumed = _launch(argv(tmp_path / "killed"), env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference = json.loads((tmp_path / "one" / "history.json").read_text())
    weights = load_file(str(tmp_path / "one" / "model.safetensors"))
    for out in ("two", "killed"):
        history = check_output_folder(tmp_path / out, depth=4, removed=2)
        assert history["removed_original"] == reference["removed_original"]
        other = load_file(str(tmp_path / out / "model.safetensors"))
        assert other.keys() == weights.keys()
        for key in weights:
            torch.testing.assert_close(other[key], weights[key], rtol=0, atol=1e-5)
    resumed_at = [e["heal"].get("resumed_at_step") for e in json.loads((tmp_path / "killed" / "history.json")
                                                                      .read_text())["iterations"]]
    assert resumed_at == [2, None]
