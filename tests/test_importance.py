import math

import pytest
import torch

from layerprune.importance import (METRICS, ScoringContext, angular_distance, block_influence, candidate_stats,
                                   score_layers, select_layers)
from layerprune.surgery import find_layers
from layerprune.tasks import TaskData, build_tasks, evaluate_tasks

from common import tiny_model

IDENTITY_LAYER = 3


def make_identity(model, index):
    """Zero the output projections of one block: it then adds nothing to the residual stream."""
    for name, module in find_layers(model).layers[index].named_modules():
        if name.rsplit(".", 1)[-1] in ("o_proj", "down_proj"):
            module.weight.data.zero_()


def _context(model, blocks, tasks=("perplexity", "token_accuracy")):
    data = TaskData(None, blocks, [], batch_size=2)
    task_objs = build_tasks(tasks, data)
    return ScoringContext(data.block_batches, task_objs, model, evaluate_tasks(model, task_objs, model),
                          progress=False)


@pytest.fixture
def blocks():
    return torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def test_pure_distances():
    h = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5)
    assert block_influence(h, h, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert block_influence(h, -h, mask).item() == pytest.approx(2.0, abs=1e-6)
    assert angular_distance(h, -h, mask, last_only=True).item() == pytest.approx(1.0, abs=1e-3)
    a, b = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    a[..., 0], b[..., 1] = 1, 1
    assert angular_distance(a, b, torch.ones(1, 1), last_only=False).item() == pytest.approx(0.5, abs=1e-6)


def test_padding_does_not_count_in_block_influence():
    h_in, h_out = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    mask = torch.tensor([[0, 0, 1, 1]])
    garbage_in = h_in.clone()
    garbage_in[:, :2] = 100.0
    assert block_influence(garbage_in, h_out, mask) == pytest.approx(block_influence(h_in, h_out, mask).item())


def own_samples(model, count=16, length=64):
    """Text the model itself generates: on it the model's NLL is minimal in expectation, so removing
    a layer that does something raises NLL, while an identity layer changes nothing."""
    torch.manual_seed(0)
    start = torch.randint(3, 96, (count, 1))
    with torch.no_grad():
        return model.generate(start, max_new_tokens=length - 1, do_sample=True, top_k=0, pad_token_id=0)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3", "qwen2", "phi3"])
@pytest.mark.parametrize("metric", [m for m in METRICS if m != "reverse"])   # reverse looks at no model
def test_identity_layer_scores_least_important(arch_name, metric):
    model = tiny_model(arch_name)
    with torch.no_grad():  # a random model predicts nearly uniformly; sharpen it so layers matter
        model.get_output_embeddings().weight.mul_(20)
    make_identity(model, IDENTITY_LAYER)
    scores = score_layers(model, metric, _context(model, own_samples(model)))
    assert len(scores) == 6
    assert min(range(6), key=lambda i: scores[i]) == IDENTITY_LAYER
    if metric in ("nll", "quality"):
        assert abs(scores[IDENTITY_LAYER]) < 1e-5


def test_prefix_reuse_gives_the_same_scores(arch, blocks):
    model = tiny_model(arch)
    ctx = _context(model, blocks)
    fast = candidate_stats(model, ctx.tasks, range(6), reuse_prefix=True, progress=False)[1]
    slow = candidate_stats(model, ctx.tasks, range(6), reuse_prefix=False, progress=False)[1]
    for i in range(6):
        for task in fast[i]:
            for key in fast[i][task]:
                assert math.isclose(fast[i][task][key], slow[i][task][key], rel_tol=1e-5, abs_tol=1e-5)


def test_candidates_restrict_the_search(blocks):
    model = tiny_model("llama")
    ctx = _context(model, blocks)
    ctx.candidates = [2, 4]
    scores = score_layers(model, "quality", ctx)
    assert [i for i, s in enumerate(scores) if s == s] == [2, 4]


class TestSelection:
    def test_reverse_order_takes_the_layers_before_the_last(self, blocks):
        model = tiny_model("llama")
        ctx = _context(model, blocks)
        assert select_layers(model, "reverse", "one-shot", 2, ctx).drop == [3, 4]
        assert select_layers(model, "reverse", "iterative", 2, ctx).drop == [4]

    def test_iterative_takes_the_lowest_and_one_shot_the_count_lowest(self, blocks):
        model = tiny_model("llama")
        ctx = _context(model, blocks)
        ctx.candidates = list(range(1, 6))
        scores = score_layers(model, "bi", ctx)
        ranked = sorted(range(1, 6), key=lambda i: scores[i])
        assert select_layers(model, "bi", "iterative", 3, ctx).drop == ranked[:1]
        assert select_layers(model, "bi", "one-shot", 3, ctx).drop == sorted(ranked[:3])

    def test_block_mode_takes_a_contiguous_run_of_candidates(self, blocks):
        model = tiny_model("llama")
        ctx = _context(model, blocks)
        ctx.candidates = [0, 1, 2, 3]
        selection = select_layers(model, "angular_last", "block", 2, ctx)
        assert selection.drop == [selection.block_start, selection.block_start + 1]
        assert set(selection.drop) <= {0, 1, 2, 3}

    def test_a_shortlist_narrows_the_expensive_metric(self, blocks):
        model = tiny_model("llama")
        ctx = _context(model, blocks)
        ctx.candidates = list(range(6))
        bi = score_layers(model, "bi", ctx)
        selection = select_layers(model, "quality", "iterative", 1, ctx, shortlist=2)
        assert selection.shortlist == sorted(sorted(range(6), key=lambda i: bi[i])[:2])
        assert [i for i, s in enumerate(selection.scores) if s == s] == selection.shortlist
        assert selection.drop[0] in selection.shortlist


class TestAngularAgainstTheReference:
    """Gromov et al.'s block distance as PruneMe computes it (the public reference): the
    arccos / pi of the cosine between the last real token's hidden states `n` layers apart,
    from `output_hidden_states`, without the embedding output, averaged over samples."""

    @staticmethod
    def reference(model, batches, n, ends):
        """The reference on every prefix that ends at one of `ends`, each a sample of its own."""
        per_batch = []
        for batch in batches:
            samples = []
            for end in ends:
                with torch.no_grad():
                    hidden = model(input_ids=batch.input_ids[:, :end + 1], output_hidden_states=True).hidden_states[1:]
                last = [h[:, -1] for h in hidden]
                samples.append([torch.arccos(torch.nn.functional.cosine_similarity(last[i], last[i + n], dim=-1)
                                             .clamp(-1, 1)) / math.pi for i in range(len(last) - n)])
            per_batch.append([float(torch.cat([sample[i] for sample in samples]).mean())
                              for i in range(len(samples[0]))])
        return [sum(column) / len(column) for column in zip(*per_batch)]

    @pytest.mark.parametrize("n", [1, 2])
    def test_ours_is_the_reference_on_every_prefix_end_shifted_by_one_start(self, n):
        """Causal attention: our state at position t is the reference's last-token state of the
        prefix ending at t, so one 128-token block gives three samples (t = 127, 95, 63).
        Reference block i compares the states entering layers i+1 and i+1+n: our start i+1. The
        last hidden state transformers returns is the last layer's output before the final norm,
        as ours is; only our start 0 (removing layer 0) has no reference."""
        from layerprune.importance import last_token_positions, state_distances

        model = tiny_model("llama")
        blocks = torch.randint(3, 96, (4, 128), generator=torch.Generator().manual_seed(4))
        batches = TaskData(None, blocks, [], batch_size=2).block_batches
        _, ends = last_token_positions(torch.ones(1, 128))
        assert ends.tolist() == [127, 95, 63]
        reference = self.reference(model, batches, n, ends.tolist())
        ours = state_distances(model, batches, lambda a, b, m: angular_distance(a, b, m, last_only=True), span=n)
        assert len(ours) == len(reference) + 1
        assert ours[1:] == pytest.approx(reference, rel=1e-4)


class TestScreen:
    """--screen K: every candidate on the first quarter of the calibration batches, the K least
    important of those on all of them."""

    def _scores(self, model, ctx, part):
        current, per = candidate_stats(model, ctx.tasks, range(6), progress=False, part=part)

        def value(stats):
            return evaluate_quality(ctx, stats)

        return {i: value(current) - value(per[i]) for i in range(6)}

    def test_survivors_get_their_full_scores_and_the_rest_their_first_stage_ones(self):
        model = tiny_model("llama")
        blocks = torch.randint(3, 96, (8, 16), generator=torch.Generator().manual_seed(1))
        ctx = _context(model, blocks)   # 4 batches of 2: the first stage is batch 0
        full, first = self._scores(model, ctx, None), self._scores(model, ctx, slice(0, 1))
        ctx.screen = 2
        screened = score_layers(model, "quality", ctx)
        survivors = sorted(range(6), key=first.__getitem__)[:2]
        for i in range(6):
            expected = full[i] if i in survivors else first[i]
            assert screened[i] == pytest.approx(expected, abs=1e-9)
        assert full != first   # the two stages do differ on this text

    def test_the_identity_layer_survives_the_screen(self):
        model = tiny_model("llama")
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20)
        make_identity(model, IDENTITY_LAYER)
        ctx = _context(model, own_samples(model))
        ctx.screen = 1
        assert select_layers(model, "quality", "iterative", 1, ctx).drop == [IDENTITY_LAYER]


def evaluate_quality(ctx, stats):
    from layerprune.tasks import quality_retained

    return quality_retained({t.name: t.summary(stats[t.name]) for t in ctx.tasks}, ctx.teacher_scores)
