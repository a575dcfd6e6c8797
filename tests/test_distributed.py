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
# Accelerate's own launcher: on a machine without CUDA, --multi_gpu is what starts 2 processes (through
# torchrun); layerprune makes their group a CPU one
ACCELERATE_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "0"]


MODES = ["straight", "cached", "local"]


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    """Every mode healed in one process and in two (one launch each, side by side: the one-thread
    single process does not leave a core idle); the two runs' `out` prefixes."""
    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    single, double = root / "one", root / "two"
    alone = subprocess.Popen([sys.executable, str(SCRIPT), str(single), ",".join(MODES)], env=env)
    try:
        subprocess.run([*TWO_PROCESSES, str(SCRIPT), str(double), ",".join(MODES)], check=True, env=env, timeout=300)
        assert alone.wait(timeout=300) == 0
    finally:
        alone.kill()   # a no-op once it has finished; otherwise no process outlives a failed test
    return single, double


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_match_one(healed, mode):
    single, double = (Path(f"{prefix}.{mode}.pt") for prefix in healed)
    a, b = torch.load(single), torch.load(double)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    pruned = tiny_model("llama")
    remove_layers(pruned, [3])
    reference = pruned.state_dict()
    assert any(not torch.equal(a[k], reference[k]) for k in a)  # healing did train something


def _launch(argv, env, kill_at=None, launcher=TWO_PROCESSES):
    env = {**env, **({"LAYERPRUNE_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([*launcher, "-m", "layerprune", *argv], env=env, capture_output=True, text=True,
                          timeout=600)


def _fsdp_argv(out, trainable):
    return ["prune", "--model", str(out.parent / "tiny"), "--data", str(out.parent / "corpus.txt"), "--out", str(out),
            "--device", "cpu", "--remove", "2", "--metric", "quality", "--seq-len", "32", "--calib-blocks", "5",
            "--eval-blocks", "3", "--heal-steps", "4", "--heal-batch-size", "2", "--heal-grad-accum", "2",
            "--heal-checkpoint-every", "2", "--trainable", trainable, "--final-tasks", "perplexity", "--no-speed",
            "--quiet"]


@pytest.mark.parametrize("trainable, arch", [("all", "llama"), ("neighbours", "gemma3"), ("lora", "llama")])
def test_fsdp_run_matches_one_process_and_resumes(tmp_path, trainable, arch):
    """`--fsdp` in 2 processes (and, for `all`, 2 data-parallel processes without it, the scoring
    shared between them): the student and the teacher sharded per layer (each process holds
    half of every layer), the patch folded into a gathered layer, checkpoints through
    torch.distributed.checkpoint. Same removed layers as one unsharded process, final weights within
    1e-4, one complete folder that reloads with nothing missing; calibration and held-out blocks
    that do not split evenly (5 and 3 over 2 processes) keep the processes in step. With `all`,
    a launch SIGKILLed mid-healing resumes from its sharded healing checkpoint to the same result, and
    one SIGKILLed while swapping in its first iteration checkpoint (every shard written) leaves no
    folder that looks complete and resumes to it too. `neighbours` runs under `accelerate launch` on
    a Gemma-3 (tied embeddings saved once, the diagonal patch folded into a gathered post-MLP norm,
    sliding-window layer types that follow the cut);
    `lora`'s adapters (plain tensors beside the shards) are synchronised by DDP and merged one
    gathered layer at a time."""
    from common import check_output_folder, load_weights, make_text_file, save_tiny

    save_tiny(tmp_path / "tiny", arch)
    make_text_file(tmp_path / "corpus.txt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERPRUNE_KILL_AT": ""}
    # the one-process reference (one thread) runs beside the first launch rather than before it
    single = subprocess.Popen([sys.executable, "-m", "layerprune", *_fsdp_argv(tmp_path / "one", trainable)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    logged = [arg for arg in _fsdp_argv(tmp_path / "two", trainable) if arg != "--quiet"]
    try:
        sharded = _launch([*logged, "--fsdp"], env,
                          launcher=ACCELERATE_TWO if trainable == "neighbours" else TWO_PROCESSES)
        single_err = single.communicate(timeout=600)[1]
    finally:
        single.kill()   # a no-op once it has finished; otherwise no process outlives a failed test
    assert single.returncode == 0, single_err[-2000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "2 processes, models sharded (FSDP2)" in sharded.stderr
    outs = ["two"]
    if trainable == "all":   # and data parallel, without --fsdp: the same result
        parallel = _launch(_fsdp_argv(tmp_path / "ddp", trainable), env)
        assert parallel.returncode == 0, parallel.stderr[-3000:]
        outs.append("ddp")
    for site in ("healing:2", "checkpoint:1") if trainable == "all" else ():
        out = tmp_path / f"killed-{site.split(':')[0]}"
        killed = _launch([*_fsdp_argv(out, trainable), "--fsdp"], env, kill_at=site)
        assert killed.returncode != 0 and not (out / "history.json").exists()
        left = out / ("heal-checkpoint" if site.startswith("healing") else ".checkpoint.tmp")
        assert (left / ".metadata").is_file()   # sharded: one file per process and DCP's metadata
        assert len(list(left.glob("*.distcp"))) == 2
        resumed = _launch([*_fsdp_argv(out, trainable), "--fsdp"], env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        outs.append(out.name)
    reference = json.loads((tmp_path / "one" / "history.json").read_text())
    weights = load_weights(tmp_path / "one")
    for out in outs:
        history = check_output_folder(tmp_path / out, depth=4, removed=2)
        assert history["removed_original"] == reference["removed_original"]
        assert history["iterations"][0]["patch"]["folded"]   # the patch was on
        if out != "ddp":   # sharded: written one layer at a time
            assert "model.safetensors.index.json" in history["files"]
        if arch == "gemma3":
            assert history["iterations"][0]["patch"]["kind"] == "diag" and "lm_head.weight" not in weights
            layer_types = json.loads((tmp_path / out / "config.json").read_text())["layer_types"]
            assert layer_types == json.loads((tmp_path / "one" / "config.json").read_text())["layer_types"]
        other = load_weights(tmp_path / out)
        assert other.keys() == weights.keys()
        for key in weights:
            torch.testing.assert_close(other[key], weights[key], rtol=0, atol=1e-4)
    assert any(not torch.equal(weights[k], v) for k, v in load_weights(tmp_path / "tiny").items() if k in weights)


def test_fsdp_refuses_a_model_it_cannot_wrap():
    """A model whose decoder layers cannot be found for wrapping: one line naming it."""
    from layerprune.errors import LayerpruneError
    from layerprune.shard import shard

    with pytest.raises(LayerpruneError, match="--fsdp wraps each decoder layer, but cannot find the decoder layers "
                                              "of Sequential"):
        shard(torch.nn.Sequential(torch.nn.Linear(2, 2)))
