"""The run's records (history entries, the iteration in flight, the history itself), their JSON
form, the checkpoints that hold them, and the decision to start afresh or resume.

Two folders in the output folder, each written atomically (io.write_folder):
- `checkpoint/`, after every iteration: the student's weights (in their pruned
  shape) and `state.json` (the configuration and the iteration records so far);
- `heal-checkpoint/`, every N healing steps of the iteration in flight: the
  `PendingIteration` (its scoring, so scoring is not redone, and the held-out
  evaluation before healing) and, in `heal.pt`, what healing changes: the
  trained parameters, optimizer, scheduler and RNG states, the step and the
  loss rows. The frozen rest comes from `checkpoint/` plus the removal.

Resuming rebuilds the student by replaying the recorded removals on the
original model and loading the saved weights; a healing resumes at its step
with the data order replayed; every iteration is seeded by its number, so the
resumed run ends where an uninterrupted one would, bit for bit on CPU.
`history.json`, written last, alone marks a finished run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .config import PruneConfig
from .errors import LayerpruneError
from .healing import HealLog
from .importance import Selection
from .io import remove_folder, verify_folder, write_folder, write_json
from .options import result_free
from .processes import is_main_process
from .shard import is_sharded, load_shards, save_shards
from .student import own
from .surgery import num_layers, remove_layers

log = logging.getLogger(__name__)

FOLDER, HEAL_FOLDER, HISTORY = "checkpoint", "heal-checkpoint", "history.json"
# The student's weights: student.safetensors, or with --fsdp the shards torch.distributed.checkpoint
# writes (.metadata and one file per process); the manifest lists whichever was written.
FILES = {FOLDER: ("state.json",), HEAL_FOLDER: ("state.json", "heal.pt")}
SHARDED = ".metadata"
# Options that change no removal, weight or score (declared `result=False` in config/): a resumed run
# may set them differently.
NO_RESULT_OPTIONS = result_free(PruneConfig)


@dataclass
class Evaluation:
    """Held-out task scores and quality retained: the mean of score / the teacher's score over
    exactly the tasks named in `averaged_over`."""

    tasks: dict[str, dict[str, float]]
    quality_retained: float
    averaged_over: list[str]
    interval: list[float] | None = None   # 95% bootstrap interval over held-out blocks (tasks/interval.py)

    @classmethod
    def from_json(cls, data: dict) -> "Evaluation":
        return cls(**data)

    def headline(self) -> dict:
        """Held-out KL to the original and perplexity, where measured: what a healing is judged by."""
        picked = {"kl": self.tasks.get("kl", {}).get("kl"),
                  "perplexity": self.tasks.get("perplexity", {}).get("perplexity")}
        return {key: value for key, value in picked.items() if value is not None}


@dataclass
class IterationRecord:
    """One removal step of history.json. `scores` maps ORIGINAL layer index -> importance (None
    where not scored); removals are given in current and original indices."""

    iteration: int
    scores: dict[str, float | None]
    removed_current: list[int]
    removed_original: list[int]
    layers_after: int
    eval: Evaluation
    heal: HealLog | None
    timings: dict[str, float]
    shortlist: list[int] | None = None
    block_start: int | None = None
    patch: dict | None = None

    @property
    def held_out_after(self) -> dict:
        """The held-out figures after this iteration's healing: its evaluation's headline."""
        return self.eval.headline()

    def to_json(self) -> dict:
        heal = {**self.heal.to_json(), "held_out_after": self.held_out_after} if self.heal else None
        data = {**asdict(self), "eval": asdict(self.eval), "heal": heal}
        return {k: v for k, v in data.items() if v is not None or k == "heal"}

    @classmethod
    def from_json(cls, data: dict) -> "IterationRecord":
        heal = HealLog.from_json(data["heal"]) if data.get("heal") else None
        return cls(**{**data, "eval": Evaluation.from_json(data["eval"]), "heal": heal})


@dataclass
class PendingIteration:
    """The iteration in flight, saved with every healing checkpoint: with it a resumed run skips
    the scoring and continues the healing at `step`."""

    iteration: int
    selection: Selection
    score_s: float = 0.0
    held_out_before: dict = field(default_factory=dict)
    step: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "selection": self.selection.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> "PendingIteration":
        return cls(**{**data, "selection": Selection(**data["selection"])})


@dataclass
class History:
    """history.json. `final_eval` averages the same tasks as every iteration's `eval`
    (--eval-tasks); `final_suite` is the wider final report (--eval-tasks + --final-tasks)."""

    config: dict
    model: str
    original_layers: int
    final_layers: int
    removed_original: list[int]
    kept_original: list[int]
    teacher_eval: dict
    iterations: list[IterationRecord]
    final_heal: HealLog | None
    final_eval: Evaluation
    final_suite: Evaluation
    seconds: float
    depth: str = ""   # why this many layers were removed (the user's target, and what it came to)
    status: str = "complete"
    files: dict | None = None   # the result's files beside history.json: name -> {bytes, sha256}
    speed: dict = field(default_factory=dict)   # prefill/decode throughput, original and pruned (speed.py)

    def to_json(self) -> dict:
        return {**asdict(self), "iterations": [r.to_json() for r in self.iterations],
                "final_heal": self.final_heal.to_json() if self.final_heal else None,
                "final_eval": asdict(self.final_eval), "final_suite": asdict(self.final_suite)}

    @classmethod
    def from_json(cls, data: dict) -> "History":
        return cls(**{**data, "iterations": [IterationRecord.from_json(r) for r in data["iterations"]],
                      "final_heal": HealLog.from_json(data["final_heal"]) if data.get("final_heal") else None,
                      "final_eval": Evaluation.from_json(data["final_eval"]),
                      "final_suite": Evaluation.from_json(data["final_suite"])})


def read_history(out: Path) -> History:
    return History.from_json(json.loads((Path(out) / HISTORY).read_text(encoding="utf-8")))


# ---------------------------------------------------------------- writing


def save_checkpoint(out: Path, config: dict, records: list[IterationRecord], student, depth: dict | None = None
                    ) -> None:
    """`depth`: the count of layers the run chose to remove and why (depth.Depth), kept for its
    resume. Every process calls it; with a sharded student (--fsdp) each writes its shard."""
    sharded, main = is_sharded(student), is_main_process()
    if not (sharded or main):
        return

    def write(tmp: Path) -> None:
        if sharded:
            save_shards({"model": student.state_dict()}, tmp)
        else:
            save_model(student, str(tmp / "student.safetensors"))  # handles tied embeddings
        if main:
            write_json(tmp / "state.json", {"config": config, "depth": depth,
                                            "entries": [r.to_json() for r in records]}, indent=None)

    write_folder(out, FOLDER, write, "checkpoint", collective=sharded)
    if main:
        remove_folder(out, HEAL_FOLDER)  # its iteration is now recorded


def save_heal_checkpoint(out: Path, config: dict, depth: dict | None, pending: PendingIteration, state: dict
                         ) -> None:
    """`state`: what `heal.heal` hands its checkpoint callback (tensors and rows); with --fsdp,
    its sharded tensors under "sharded", written by every process (each its shard)."""
    main, shards = is_main_process(), state.get("sharded")
    if not (shards or main):
        return

    def write(tmp: Path) -> None:
        if shards:
            save_shards(shards, tmp)
        if main:
            torch.save({key: value for key, value in state.items() if key != "sharded"}, tmp / "heal.pt")
            write_json(tmp / "state.json", {"config": config, "depth": depth,
                                            "pending": {**pending.to_json(), "step": state["step"]}}, indent=None)

    write_folder(out, HEAL_FOLDER, write, "heal-checkpoint", collective=bool(shards))


def clear(out: Path) -> None:
    for name in (FOLDER, HEAL_FOLDER):
        remove_folder(out, name)


# ---------------------------------------------------------------- reading and the resume decision


def find_checkpoint(out: Path, name: str = FOLDER) -> Path | None:
    """The newest checkpoint: `name/`, or `.name.old/` if a crash came mid-swap; verified against
    its manifest (a damaged or incomplete one is an error, never silently skipped)."""
    for folder in (out / name, out / f".{name}.old"):
        if folder.is_dir():
            verify_folder(folder, FILES[name])
            return folder
    return None


def _damaged(folder: Path, what: str) -> LayerpruneError:
    return LayerpruneError(f"{folder / 'state.json'} is not a layerprune checkpoint state ({what})",
                           "restore the folder, or pass --overwrite to start afresh")


def _read_state(folder: Path, key: str) -> dict:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LayerpruneError(f"the checkpoint in {folder} is unreadable ({err})",
                              "pass --overwrite to start afresh") from err
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or key not in state:
        raise _damaged(folder, f"no config or {key}")
    return state


def _records_of(folder: Path, state: dict) -> list[IterationRecord]:
    try:
        return [IterationRecord.from_json(r) for r in state["entries"]]
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise _damaged(folder, f"an iteration record is malformed: {err}") from err


def _pending_of(folder: Path, state: dict) -> PendingIteration:
    try:
        return PendingIteration.from_json(state["pending"])
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise _damaged(folder, f"the healing in flight is malformed: {err}") from err


def _read_heal_state(folder: Path) -> dict:
    try:
        state = torch.load(folder / "heal.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises several types
        raise LayerpruneError(f"the healing checkpoint in {folder} is unreadable ({err})",
                              "pass --overwrite to start afresh") from err
    if (folder / SHARDED).is_file():   # --fsdp: the tensors are read into the live shards (heal._restore)
        state["sharded_in"] = str(folder)
    return state


def results_part(config: dict, ignore: dict = NO_RESULT_OPTIONS) -> dict:
    """`config` without the options `ignore` names (those that change no result), nested alike."""
    return {k: results_part(v, ignore[k]) if isinstance(ignore.get(k), dict) else v
            for k, v in config.items() if k not in ignore or isinstance(ignore[k], dict)}


@dataclass
class ResumePoint:
    """Where a run starts: the iteration checkpoint and its records (none for a fresh run), and
    the healing in flight with its saved state, if the run stopped while healing."""

    folder: Path | None = None
    records: list[IterationRecord] = field(default_factory=list)
    pending: PendingIteration | None = None
    heal_state: dict | None = None
    depth: dict | None = None   # the count of layers the first start chose to remove, and why


def check_output(out: Path) -> None:
    if (out / HISTORY).exists():
        raise LayerpruneError(f"{out} already holds a finished run", "choose another --out, or pass --overwrite")


def _unfinished(out: Path) -> tuple[Path | None, Path | None, list[dict]]:
    """The iteration and healing checkpoints in `out` (either may be None) and their states."""
    folder = find_checkpoint(out) if out.exists() else None
    heal_folder = find_checkpoint(out, HEAL_FOLDER) if out.exists() else None
    states = [_read_state(f, key) for f, key in ((folder, "entries"), (heal_folder, "pending")) if f is not None]
    return folder, heal_folder, states


def _same_results(states: list[dict], config: dict) -> bool:
    return all(results_part(state["config"]) == results_part(config) for state in states)


def continues(config: dict, out: Path) -> bool:
    """Whether `out` holds an unfinished run that these options continue: a caller that runs many
    configurations (bench/sweep_heal.py) resumes such a run and starts any other afresh."""
    if (out / HISTORY).exists():
        return False
    states = _unfinished(out)[2]
    return bool(states) and _same_results(states, config)


def resume_point(config: dict, out: Path, resume: bool) -> ResumePoint:
    """Decide between a fresh start and a resume of the run in `out`; refuse to mix runs. The
    folder is already claimed (outdir.claim): ours, locked, emptied on --overwrite."""
    check_output(out)
    folder, heal_folder, states = _unfinished(out)
    if not states:
        if resume:
            raise LayerpruneError(f"there is no unfinished run to resume in {out}", "run without --resume")
        return ResumePoint()
    if not _same_results(states, config):
        raise LayerpruneError(f"{out} holds an unfinished run with a different configuration",
                              "rerun with the same options to continue it, or pass --overwrite to start afresh")
    records = _records_of(folder, states[0]) if folder is not None else []
    pending = _pending_of(heal_folder, states[-1]) if heal_folder is not None else None
    depth = states[0].get("depth")
    if pending is None or pending.iteration <= len(records):  # none, or of an iteration already recorded
        return ResumePoint(folder, records, depth=depth)
    return ResumePoint(folder, records, pending, _read_heal_state(heal_folder), depth)


def restore_student(student, folder: Path, records: list[IterationRecord]) -> None:
    """Replay the recorded removals on a copy of the original, then load the saved weights;
    removals the model does not have, weights of another shape or non-finite ones are refused."""
    for record in records:
        depth = num_layers(student)
        if not record.removed_current or any(not 0 <= i < depth for i in record.removed_current):
            raise _damaged(folder, f"iteration {record.iteration} removes layer(s) {record.removed_current} of a "
                                   f"{depth}-layer model")
        remove_layers(student, record.removed_current)
    weights = folder / ("" if is_sharded(student) else "student.safetensors")
    try:
        if is_sharded(student):
            if not (folder / SHARDED).is_file():
                raise OSError("it holds no sharded weights: was the run started without --fsdp?")
            state = {"model": student.state_dict()}
            load_shards(state, folder)   # in place, each process its shard
        else:
            own(student)   # the saved weights are loaded in place
            load_model(student, str(weights), strict=True, device=str(next(student.parameters()).device))
    except (RuntimeError, OSError, ValueError) as err:
        raise LayerpruneError(f"{weights} does not fit the model its state.json describes "
                              f"({str(err).splitlines()[0]})", "pass --overwrite to start afresh") from err
    broken = [name for name, p in student.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise LayerpruneError(f"{weights} holds NaN or inf in {broken[0]} ({len(broken)} tensor(s)): the checkpoint "
                              "itself is broken", "pass --overwrite to start afresh")
    log.info("resumed after iteration %d (removed original layers %s)", len(records),
             [layer for r in records for layer in r.removed_original])
