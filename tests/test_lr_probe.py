"""The lr probe: the first healing starts at a learning rate that fits the model, chosen on
validation text in a few steps a rung, so the guard's retries are not where it is found."""

import copy
import json

import torch

from layerprune.config import HealConfig
from layerprune.healing.guard import RETRY_LR_FACTOR, Guard
from layerprune.healing.job import plan
from layerprune.healing.loop import heal
from layerprune.healing.lr_probe import PROBE_STEPS, ProbeLog, choose, probe_lr
from layerprune.surgery import remove_layers

from safetensors.torch import load_file

from common import make_text_file, save_tiny, teacher_with_massive_channels
from test_guard import BUDGET, TRAIN, VALIDATION, held_out_kl, plain_teacher
from test_resume import command, run, run_together


def cut(teacher, drop):
    student = copy.deepcopy(teacher)
    remove_layers(student, [drop])
    return student


def probed(teacher, config, drop):
    """The cut, the probe's record, and whether the probe left the cut exactly as it was."""
    student = cut(teacher, drop)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    job = plan(student, config, config.steps, 1, 0, [drop])
    guard = Guard(teacher, VALIDATION, 4, config.guard_retries)
    probe = probe_lr(student, teacher, TRAIN, job, None, guard, None)
    untouched = all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    return student, job, probe, untouched


def test_the_rung_with_the_lowest_kl_below_the_cut_is_chosen():
    tried = [{"lr": 4.0, "kl": float("inf")}, {"lr": 1.0, "kl": 0.5}, {"lr": 0.25, "kl": 0.6}]
    assert choose(0.8, tried) == 1.0
    assert choose(0.4, tried) == 0.25            # nothing healed: the lowest lr tried, the guard decides
    assert choose(0.8, [{"lr": 1.0, "kl": 0.5}, {"lr": 0.25, "kl": 0.5}]) == 1.0   # a tie: the faster


def test_planted_massive_activations_heal_on_the_first_attempt_at_the_probed_lr():
    """At lr 5e-4 this model's healing overshoots and the guard has to retry (test_guard.py); the
    probe finds a lower rung in 8 steps a rung, and the healing at that rung succeeds first time."""
    teacher = teacher_with_massive_channels()
    config = HealConfig(**BUDGET)
    student, job, probe, untouched = probed(teacher, config, drop=4)
    assert untouched                                            # the probe put the cut back, bit for bit
    assert probe.tried[0]["lr"] == config.lr and probe.steps == PROBE_STEPS
    assert probe.chosen < config.lr and probe.chosen in {r["lr"] for r in probe.tried}
    before = held_out_kl(student, teacher)
    job = plan(student, config, config.steps, 1, 0, [4], lr=probe.chosen)
    log = heal(student, teacher, TRAIN, job, progress=False, guard=Guard(teacher, VALIDATION, 4, 2))
    assert log.guard.retries == 0 and log.guard.outcome in ("healed", "rolled back")
    assert log.guard.lr_won == probe.chosen
    assert held_out_kl(student, teacher) < 0.8 * before       # on blocks neither the probe nor the guard saw


def test_an_lr_that_fits_is_kept_after_two_rungs():
    teacher = plain_teacher()
    config = HealConfig(**BUDGET, lr=7e-4)
    _, _, probe, untouched = probed(teacher, config, drop=2)
    assert untouched and probe.chosen == 7e-4
    assert [r["lr"] for r in probe.tried] == [7e-4, 7e-4 * RETRY_LR_FACTOR]   # stopped once a rung did worse
    assert probe.tried[0]["kl"] < probe.tried[1]["kl"] < probe.kl_before


def test_the_probe_record_round_trips():
    probe = ProbeLog(8, 0.5, [{"lr": 5e-4, "kl": 0.4}, {"lr": 1.25e-4, "kl": 0.45}], 5e-4, 3.0)
    assert ProbeLog(**probe.to_json()) == probe
    assert "healing starts at 0.0005" in probe.sentence()


def probing(tiny_dir, text_file, out):
    """test_resume's command, two removals, the probe on, its log lines shown."""
    argv = [*command(tiny_dir, text_file, out), "--heal-lr-probe"]
    argv.remove("--quiet")
    argv[argv.index("--remove") + 1] = "2"
    return argv


def test_a_run_probes_once_and_a_resumed_run_reads_the_probe_from_its_checkpoint(tmp_path):
    """prune --heal-lr-probe: the first healing's record holds the probe and starts at its choice;
    later healings carry the guard's lr without probing; killed inside the first healing after
    its first checkpoint, the run resumes without probing again and ends as the one never killed."""
    tiny_dir, text_file = save_tiny(tmp_path / "tiny"), make_text_file(tmp_path / "corpus.txt")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    again = probing(tiny_dir, text_file, killed)
    whole, interrupted = run_together((probing(tiny_dir, text_file, straight), None), (again, "heal-checkpoint:2"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert whole.stderr.count("lr probe (") == 1
    history = json.loads((straight / "history.json").read_text())
    first, later = [entry["heal"] for entry in history["iterations"]]
    assert first["lr_probe"]["chosen"] == first["guard"]["checks"][0]["lr"]
    assert "lr_probe" not in later and later["guard"]["checks"][0]["lr"] == first["guard"]["lr_won"]
    assert "- iteration 1: lr probe (8 steps a rung" in (straight / "report.md").read_text()
    assert interrupted.returncode != 0
    resumed = run(again)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "lr probe (" not in resumed.stderr and "healing resumed at step 2" in resumed.stderr
    ours = json.loads((killed / "history.json").read_text())["iterations"][0]["heal"]
    timeless = [{k: v for k, v in probe.items() if k != "seconds"} for probe in (ours["lr_probe"], first["lr_probe"])]
    assert timeless[0] == timeless[1] and ours["resumed_at_step"] == 2
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
