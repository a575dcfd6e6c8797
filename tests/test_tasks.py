import json

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.tasks import (Batch, TaskData, build_tasks, check_task_name, collect_stats, evaluate_tasks,
                              perplexity_summary, quality_retained)
from layerprune.tasks.choice import (choice_batches, choice_stats, choice_summary, questions_task,
                                     read_questions)
from layerprune.tasks.copying import build_copy, lcs_length

from common import TinyTokenizer, tiny_model


def oracle_logits(batch: Batch, rows=None) -> torch.Tensor:
    """Logits that put all mass on each row's true next token (for the chosen rows)."""
    b, t = batch.input_ids.shape
    logits = torch.zeros(b, t, 96)
    for row in range(b) if rows is None else rows:
        logits[row, torch.arange(t - 1), batch.input_ids[row, 1:]] = 30.0
    return logits


def items(n=5, choices=4):
    return [([5, 6, 7 + q], [[10 + q, 11], [20 + q, 21, 22], [30 + q], [40 + q, 41]][:choices], q % choices)
            for q in range(n)]


def test_a_model_preferring_the_right_choice_scores_one():
    total = {"correct": 0.0, "questions": 0.0}
    for batch in choice_batches(items(), pad_id=0):
        n = batch.extra["n_choices"]
        right_rows = [q * n + int(a) for q, a in enumerate(batch.extra["answers"])]
        stats = choice_stats(oracle_logits(batch, right_rows), batch)
        total = {k: total[k] + stats[k] for k in total}
    assert choice_summary(total)["score"] == 1.0 and total["questions"] == 5


def test_a_uniform_model_is_at_chance():
    answers_at_zero = sum(1 for _, _, a in items(8) if a == 0)
    total = 0.0
    for batch in choice_batches(items(8), pad_id=0):
        total += choice_stats(torch.zeros(*batch.input_ids.shape, 96), batch)["correct"]
    assert total == answers_at_zero  # ties go to the first choice


def test_copy_scores_one_for_an_exact_copier():
    ctx = TaskData(TinyTokenizer(), torch.zeros(1, 8, dtype=torch.long), ["abcdefgh " * 20, "ijklmnop " * 20], 4)
    task = build_copy(ctx)
    stats = [task.stats(oracle_logits(b), b) for b in task.batches]
    assert sum(s["correct"] for s in stats) == sum(s["tokens"] for s in stats) > 0


def test_lcs():
    assert lcs_length([1, 2, 3, 4], [1, 3, 4]) == 3
    assert lcs_length([], [1]) == 0
    assert lcs_length([5, 1, 5, 2], [1, 2, 5]) == 2


def test_teacher_against_itself_retains_everything():
    model = tiny_model("llama")
    docs = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(300)) for i in range(4)]
    blocks = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    ctx = TaskData(TinyTokenizer(), blocks, docs, 2)
    tasks = build_tasks(["perplexity", "token_accuracy", "kl", "continuation", "copy", "copy_generate"], ctx)
    scores = evaluate_tasks(model, tasks, model)
    assert scores["kl"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert quality_retained(scores, scores) == pytest.approx(1.0)
    assert 0.0 <= scores["copy_generate"]["score"] <= 1.0


def test_copy_generate_in_batches_scores_as_one_item_at_a_time():
    """The items generate together; each copy is still the model's own greedy one, cut at its end."""
    from layerprune.tasks.copying import _copy_items, _until_end, build_copy_generate

    model = tiny_model("llama")
    docs = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(300)) for i in range(4)]
    ctx = TaskData(TinyTokenizer(), torch.randint(3, 96, (4, 16)), docs, 2, copy_samples=16)

    def one_at_a_time():
        copies = []
        for prompt, paragraph in _copy_items(ctx):
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(paragraph),
                                 do_sample=False, pad_token_id=0)
            copies.append((out[0, len(prompt):].tolist(), paragraph))
        return copies

    model.generation_config.eos_token_id = None
    seen = [set(copy) for copy, _ in one_at_a_time()]
    # an end token some copies meet and others not, so that rows of one batch end at different steps
    model.generation_config.eos_token_id = next(t for t in set.union(*seen) if not all(t in s for s in seen))
    copies = one_at_a_time()
    assert len({len(copy) for copy, _ in copies}) > 1
    expected = sum(lcs_length(copy, paragraph) / len(paragraph) for copy, paragraph in copies) / len(copies)
    assert build_copy_generate(ctx).run(model)["score"] == pytest.approx(expected, abs=1e-9)
    model.generation_config.eos_token_id = [5, 9]   # a batch pads the rows that ended: they are cut there
    assert _until_end([3, 9, 0, 0], model) == [3, 9] and _until_end([3, 4], model) == [3, 4]


def test_mc_file_and_bad_files(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "choices": ["yes", "no"], "answer": "AB"[i % 2]})
                              for i in range(4)))
    questions = read_questions(path)
    assert [q["answer"] for q in questions] == [0, 1, 0, 1]
    task = questions_task("mc", TinyTokenizer(), questions, 10, 0)
    assert sum(len(b.extra["answers"]) for b in task.batches) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 3}\n')
    with pytest.raises(LayerpruneError, match="line 1"):
        read_questions(bad)


def test_task_names_are_checked():
    check_task_name("mc:some.jsonl")
    with pytest.raises(LayerpruneError, match="unknown task"):
        check_task_name("hellaswag")
    with pytest.raises(LayerpruneError, match="generates text"):
        check_task_name("copy_generate", for_importance=True)


def test_perplexity_summary_scale():
    s = perplexity_summary({"nll_sum": 2.0, "tokens": 1.0})
    assert s["perplexity"] == pytest.approx(7.389, rel=1e-3) and s["score"] == pytest.approx(1 / 7.389, rel=1e-3)


def test_lm_eval_task_from_local_files(tmp_path):
    from common import hf_char_tokenizer

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"is {i} even?", "choices": [" yes", " no"], "answer": i % 2})
                              for i in range(6)))
    (tmp_path / "task.yaml").write_text(
        "task: layerprune_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    model = tiny_model("llama")
    ctx = TaskData(hf_char_tokenizer(), torch.zeros(1, 4, dtype=torch.long), [], 4)
    task = build_tasks([f"lm_eval:layerprune_tiny_mc@{tmp_path}"], ctx)[0]
    scores = evaluate_tasks(model, [task], model)[task.name]
    assert 0.0 <= scores["score"] <= 1.0 and scores["acc"] == scores["score"]
    with pytest.raises(LayerpruneError, match="not available here"):
        build_tasks(["lm_eval:no_such_task_anywhere"], ctx)


def test_sliced_logprobs_and_kl_match_the_whole_tensor_formulas(monkeypatch):
    import torch.nn.functional as F

    from layerprune.tasks import stats as logprobs

    monkeypatch.setattr(logprobs, "ELEMENTS_PER_SLICE", 3 * 50)  # 3 positions a slice: uneven tails
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 11, 50) * 3, torch.randn(2, 11, 50) * 3
    ids = torch.randint(0, 50, (2, 11))
    want = F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(logprobs.next_token_logprobs(logits, ids), want, atol=1e-6)
    t, s = F.log_softmax(teacher, -1), F.log_softmax(logits, -1)
    assert torch.allclose(logprobs.token_kl(logits, teacher), (t.exp() * (t - s)).sum(-1), atol=1e-6)


def test_one_collection_loop_serves_several_variants_at_once():
    """Evaluation is the one-variant case of the loop candidate scoring uses."""
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    blocks = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    tasks = build_tasks(["perplexity", "kl"], TaskData(None, blocks, [], 2))
    def variants(batch, rows):
        return iter([("a", model(input_ids=batch.input_ids).logits), ("b", other(input_ids=batch.input_ids).logits)])

    both = collect_stats(model, tasks, model, variants)
    assert both["a"] == collect_stats(model, tasks, model)[None]
    assert both["b"] == collect_stats(other, tasks, model)[None]


def test_no_logits_outlive_their_statistics():
    """Scoring, evaluation and per-block evaluation free a variant's logits before the next
    forward makes its own (a loop variable left bound to them held Gemma-3's 1 GB a batch twice)."""
    import weakref

    from layerprune.importance import ScoringContext, score_layers
    from layerprune.tasks.interval import evaluate_rows

    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    blocks = torch.randint(3, 96, (6, 16), generator=torch.Generator().manual_seed(0))
    tasks = build_tasks(["perplexity", "token_accuracy", "kl"], TaskData(None, blocks, [], 2))
    made, alive = [], []
    student.register_forward_pre_hook(lambda m, a: alive.append(sum(ref() is not None for ref in made)))
    student.register_forward_hook(lambda m, a, out: made.append(weakref.ref(out.logits)))
    reference = evaluate_tasks(teacher, tasks, teacher)
    evaluate_tasks(student, tasks, teacher)
    evaluate_rows(student, tasks, teacher)
    score_layers(student, "quality", ScoringContext(tasks[0].batches, tasks, teacher, reference, progress=False))
    assert len(made) > 10 and alive and not any(alive)


class TestInterval:
    """Per-block statistics and the paired bootstrap over held-out blocks."""

    @staticmethod
    def tasks(blocks=None, batch_size=3):
        if blocks is None:
            blocks = torch.randint(3, 96, (7, 16), generator=torch.Generator().manual_seed(2))
        return build_tasks(["perplexity", "token_accuracy", "kl"], TaskData(None, blocks, [], batch_size))

    def test_per_block_statistics_sum_to_the_batched_evaluation(self):
        from layerprune.tasks import evaluate_tasks
        from layerprune.tasks.interval import evaluate_rows

        teacher, student = tiny_model("llama"), tiny_model("llama", seed=1)
        tasks = self.tasks()
        scores, rows = evaluate_rows(student, tasks, teacher)
        assert {name: len(r) for name, r in rows.items()} == {"perplexity": 7, "token_accuracy": 7, "kl": 7}
        batched = evaluate_tasks(student, tasks, teacher)
        for name in batched:
            for key, value in batched[name].items():
                assert scores[name][key] == pytest.approx(value, rel=1e-6)

    @staticmethod
    def pair():
        """A sharpened teacher (its next tokens are predictable) and a student a little off it."""
        import copy

        teacher = tiny_model("llama")
        with torch.no_grad():
            teacher.get_output_embeddings().weight.mul_(20)
            student = copy.deepcopy(teacher)
            for p in student.model.layers[3].parameters():
                p.add_(0.05 * torch.randn_like(p))
        return teacher, student

    def test_the_interval_holds_the_figure_and_narrows_with_more_blocks(self):
        from layerprune.tasks import quality_retained
        from layerprune.tasks.interval import bootstrap_interval, evaluate_rows

        teacher, student = self.pair()
        widths = []
        for count in (4, 32):
            tasks = self.tasks(torch.randint(3, 96, (count, 16), generator=torch.Generator().manual_seed(3)))
            scores, rows = evaluate_rows(student, tasks, teacher)
            teacher_scores, teacher_rows = evaluate_rows(teacher, tasks, teacher)
            low, high = bootstrap_interval(rows, teacher_rows, tasks)
            assert low <= quality_retained(scores, teacher_scores) <= high
            widths.append(high - low)
            assert bootstrap_interval(teacher_rows, teacher_rows, tasks) == pytest.approx([1.0, 1.0])
        assert widths[1] < widths[0]

    def test_tasks_without_per_block_statistics_get_none(self):
        from layerprune.tasks import Task
        from layerprune.tasks.interval import bootstrap_interval, evaluate_rows

        generating = Task("copy_generate", [], None, None, run=lambda model, teacher: {"score": 1.0})
        assert evaluate_rows(tiny_model("llama"), [generating]) is None
        assert bootstrap_interval({}, {}, self.tasks()) is None


def letters(i: int) -> str:
    return "".join(chr(97 + (i * 7 + j) % 26) for j in range(300))


def test_a_chat_model_is_asked_through_its_template_and_plain_stays_plain():
    """The paragraph's ids sit unchanged between the rendered template's two parts; copy:plain and
    copy_generate:plain keep the plain prompt; a base model (no template) gets the plain prompt."""
    from common import hf_char_tokenizer
    from layerprune.tasks.copying import COPY_TOKENS, _copy_items

    tokenizer = hf_char_tokenizer()
    ctx = TaskData(tokenizer, torch.zeros(1, 8, dtype=torch.long), [letters(i) for i in range(4)], 2)
    plain = _copy_items(ctx, 4, plain=True)
    assert plain[0][0][:8] == tokenizer("Repeat t", add_special_tokens=False)["input_ids"]
    assert _copy_items(ctx, 4) == plain                       # no chat template: the plain prompt
    tokenizer.chat_template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}" \
                              "{% if add_generation_prompt %}<s>[assistant] {% endif %}"
    chat = _copy_items(ctx, 4)
    for (prompt, paragraph), (plain_prompt, same) in zip(chat, plain):
        assert paragraph == same and len(paragraph) == COPY_TOKENS
        head = tokenizer("<s>[user] Repeat the text exactly.\nText: ", add_special_tokens=False)["input_ids"]
        tail = tokenizer("</s><s>[assistant] ", add_special_tokens=False)["input_ids"]
        assert prompt == head + paragraph + tail and 1 in prompt   # "<s>" is the special id, not its characters
    names = [task.name for task in build_tasks(["copy", "copy:plain", "copy_generate", "copy_generate:plain"], ctx)]
    assert names == ["copy", "copy:plain", "copy_generate", "copy_generate:plain"]
    assert build_tasks(["copy:plain"], ctx)[0].batches[0].input_ids[0, :len(plain[0][0])].tolist() == plain[0][0]
    assert build_tasks(["copy"], ctx)[0].batches[0].input_ids[0, :len(chat[0][0])].tolist() == chat[0][0]
    with pytest.raises(LayerpruneError, match="copying prompt"):
        check_task_name("copy_generate:chat")


def test_copy_generate_against_the_original_gives_retention_with_its_paired_interval():
    """The original generates once for every evaluation of the task's life; the pruned model's
    summary carries its retention and a 95% interval around it."""
    import copy

    from layerprune.surgery import remove_layers
    from layerprune.tasks.retention import paired_ratio

    teacher = tiny_model("llama")
    pruned = copy.deepcopy(teacher)
    remove_layers(pruned, [2])
    ctx = TaskData(TinyTokenizer(), torch.zeros(1, 8, dtype=torch.long), [letters(i) for i in range(4)], 2,
                   copy_samples=24)
    task = build_tasks(["copy_generate"], ctx)[0]
    calls = []
    generate = teacher.generate
    teacher.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    original = evaluate_tasks(teacher, [task], teacher)["copy_generate"]
    first = evaluate_tasks(pruned, [task], teacher)["copy_generate"]
    again = evaluate_tasks(pruned, [task], teacher)["copy_generate"]
    assert len(calls) == 1 and first == again and original["samples"] == 24 and "retention" not in original
    assert first["retention"] == pytest.approx(first["score"] / original["score"])
    assert first["retention_low"] <= first["retention"] <= first["retention_high"]
    assert first["retention_high"] - first["retention_low"] > 0
    ratio, interval = paired_ratio([1.0, 0.5, 0.0, 1.0], [1.0, 1.0, 0.5, 1.0])
    assert ratio == pytest.approx(2.5 / 3.5) and interval[0] < ratio < interval[1]
    assert paired_ratio([0.5] * 5, [1.0] * 5)[1] == [0.5, 0.5]   # no spread, no width
