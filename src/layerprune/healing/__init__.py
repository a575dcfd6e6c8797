"""Healing: distil the pruned student towards the ORIGINAL teacher after each removal.

Lifecycle, top to bottom:

    resources = build_resources(config, corpus, count, teacher, text_in, out, progress)
        # once per run, or once per comparison for every variant: the teacher-target cache, the
        # Accelerator, the guard's KL task on its validation blocks (the original's moments on them
        # kept), and the text healings read (the training stream, or the original's own text)
    healer = Healer(config, teacher, resources, recorded=[...])   # one per run: its HealConfig,
        # where its stream stands, the learning rate the guard carries (a resumed run: from its records)
    log = healer.heal(student, Removal(iteration, dropped, ...))   # after each removal -> HealLog
    resources.close()   # the target cache deleted once the run (or the comparison) is done

Inside one `heal`: `job.plan` turns the removal into a `HealJob` (cuts, trained layers, the MSE
term's pairs), `targets` says what is cached and opens it, `step` picks the loss of one
micro-batch once (cached targets, a frozen prefix, or the straightforward teacher + student
pass), `loop.heal` trains through Accelerate under the `guard` (validation KL, the best state
kept, lower-lr retries), and `losses` is the pure tensor math under all of them. Which text a
healing reads is `text`'s, and `teacher_text` writes the original's own.
"""

from .guard import GuardLog
from .healer import Healer, Removal, Resources, build_resources, cache_folder, text_folder
from .job import HealJob, HealLog, TextSpan, check_mse_layers, plan
from .loop import accelerator_for, heal
from .text import check_teacher_text_disk, healing_text

__all__ = ["GuardLog", "HealJob", "HealLog", "Healer", "Removal", "Resources", "TextSpan", "accelerator_for",
           "build_resources", "cache_folder", "check_mse_layers", "check_teacher_text_disk", "heal", "healing_text",
           "plan", "text_folder"]
