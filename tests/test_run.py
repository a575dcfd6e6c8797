"""PruneRun's lifecycle: setup -> step per iteration -> finish -> close, and what it owns."""

import time

from layerprune.data import StreamPosition
from layerprune.healing import healer as healer_module, loop as heal_module
from layerprune.config import HealConfig
from layerprune.depth import Depth
from layerprune.run import PruneRun
from layerprune.surgery import num_layers


class TestPruneRun:
    def test_each_step_removes_and_records_and_finish_gives_the_history(self, inputs_for):
        config, inputs = inputs_for()
        run = PruneRun(config, inputs, Depth(2, "--remove 2"), progress=False).setup()
        assert list(run.remaining()) == [1, 2] and run.student is not inputs.teacher
        first = run.step(1)
        assert first.layers_after == 5 and run.records == [first] and list(run.remaining()) == [2]
        run.step(2)
        history = run.finish(time.perf_counter())
        assert history.final_layers == num_layers(run.student) == 4 and history.final_heal is not None
        assert history.removed_original == [layer for r in run.records for layer in r.removed_original]
        assert num_layers(inputs.teacher) == 6   # the teacher is never touched
        assert run.records[0].heal.text.start == StreamPosition()   # reused text: every healing from the start
        run.close()
        assert run.resources.targets.shared is None

    def test_one_shot_removes_every_layer_in_one_step(self, inputs_for):
        config, inputs = inputs_for(mode="one-shot", heal=HealConfig(method="none"))
        run = PruneRun(config, inputs, Depth(2, "--remove 2"), progress=False).setup()
        assert list(run.remaining()) == [1]
        assert len(run.step(1).removed_original) == 2 and run.resources.accelerator is None

    def test_one_accelerator_heals_every_removal_of_a_run(self, inputs_for, monkeypatch):
        made = []
        real = heal_module.accelerator_for

        def counted(*args):
            made.append(1)
            return real(*args)

        monkeypatch.setattr(healer_module, "accelerator_for", counted)
        monkeypatch.setattr(heal_module, "accelerator_for", counted)
        config, inputs = inputs_for()
        run = PruneRun(config, inputs, Depth(2, "--remove 2"), progress=False).setup()
        for iteration in run.remaining():
            run.step(iteration)
        run.finish(time.perf_counter())
        assert made == [1] and all(r.heal.steps == 2 for r in run.records)
