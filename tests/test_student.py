"""The student shares the teacher's weights until it changes them (student.py): nothing a run does
to the student reaches the teacher, and the student ends as a deep copy of the teacher would."""

import copy
import dataclasses
import time

import pytest
import torch

from common import QUICK, tiny_model
from layerprune.depth import Depth
from layerprune.run import PruneRun
from layerprune.student import own, shares_teacher, student_of
from layerprune.surgery import find_layers


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class TestStudentOf:
    def test_it_shares_every_weight_and_an_owned_module_changes_alone(self):
        teacher = tiny_model()
        before = weights(teacher)
        student = student_of(teacher)
        for mine, theirs in zip(student.parameters(), teacher.parameters()):
            assert mine is not theirs and mine.data_ptr() == theirs.data_ptr()
        layer = find_layers(student).layers[1]
        own(layer)
        with torch.no_grad():
            layer.mlp.down_proj.weight.add_(1.0)
        assert not shares_teacher(layer) and shares_teacher(find_layers(student).layers[2])
        assert_same(weights(teacher), before)

    def test_tied_embeddings_stay_tied_when_owned(self):
        teacher = tiny_model("gemma3")
        student = student_of(teacher)
        own(student.get_output_embeddings())
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
        assert not shares_teacher(student.get_input_embeddings())
        assert student.get_input_embeddings().weight.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()

    def test_the_flags_are_the_students_own(self):
        teacher = tiny_model()
        student = student_of(teacher)
        find_layers(student).layers[0].requires_grad_(True)
        assert not any(p.requires_grad for p in teacher.parameters())


def run_all(config, inputs, student=None) -> PruneRun:
    run = PruneRun(config, inputs, Depth(2, "--remove 2"), progress=False, student=student).setup()
    for iteration in run.remaining():
        run.step(iteration)
    run.finish(time.perf_counter())
    run.close()
    return run


@pytest.mark.parametrize("healing", [{}, {"trainable": "lora"}, {"trainable": "last"}, {"trainable": "all"}],
                         ids=["neighbours", "lora", "last", "all"])
def test_a_whole_run_leaves_the_teacher_bit_for_bit_and_ends_as_a_deep_copy_would(inputs_for, healing):
    """Patched cuts (the fold), guarded healing (its restores of the best state), a final healing,
    and each kind of trainable: the teacher is unchanged, and the student equals the one a run
    with a deep copy of the teacher ends with."""
    config, inputs = inputs_for(metric="nll", heal=dataclasses.replace(QUICK, **healing))
    before = weights(inputs.teacher)
    shared = run_all(config, inputs)
    assert_same(weights(inputs.teacher), before)
    copied = run_all(config, inputs, copy.deepcopy(inputs.teacher))
    assert_same(weights(shared.student), weights(copied.student))
    if healing == {}:   # what nothing changed is still the teacher's: the embedding, the layers far from the cuts
        assert shares_teacher(shared.student.get_input_embeddings())
