"""Healing in 2 CPU processes (gloo, through `accelerate launch`) matches 1 process on the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerprune.surgery import remove_layers

from common import tiny_model

SCRIPT = Path(__file__).with_name("ddp_heal.py")


@pytest.mark.parametrize("mode", ["straight", "cached"])
def test_two_processes_match_one(tmp_path, mode):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert launcher, "accelerate's launcher is part of the accelerate package"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(SCRIPT), str(single), mode], check=True, env=env, timeout=300)
    subprocess.run([launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                    "no", "--dynamo_backend", "no", str(SCRIPT), str(double), mode], check=True, env=env, timeout=300)
    a, b = torch.load(single), torch.load(double)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    pruned = tiny_model("llama")
    remove_layers(pruned, [3])
    reference = pruned.state_dict()
    assert any(not torch.equal(a[k], reference[k]) for k in a)  # healing did train something
