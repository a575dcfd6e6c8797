"""The closed-form linear patch at a cut (ReplaceMe, arXiv 2505.02819; LinearPatch, 2505.24680).

When current layers j..k are removed (j >= 1), the layer below the cut,
j-1, outputs O = Y + M: Y is the residual stream after its attention (and
everything else that is not its MLP), M its MLP output as it enters the
residual stream. The removed block's output L is approximated by Y + M T,
where T minimises ||M T - (L - Y)||^2 + alpha ||T - I||^2 over training
tokens (never those that score or evaluate). Y is never needed on its own:
L - Y = L - O + M.

The fit needs only Gram matrices, accumulated in float64 over batches, so
memory does not grow with the data: G = M^T M and C = M^T (L - O + M);
T = (G + alpha I)^-1 (C + alpha I). alpha is RIDGE times the mean of G's
diagonal, plus a floor, so a singular Gram (an MLP that outputs zeros) gives
T = I, never NaN weights. `--patch-fit cosine` fits ReplaceMe's other form
instead, the mean cosine distance between M T and L - Y, by Adam from the
identity; it has no closed form, so it keeps the tokens' rows (bounded by
--patch-tokens) and only the cut's patch is fitted so (candidates are scored
with least squares). `--patch-fit normalised` is least squares with each
token's error divided by its target's mean square, sum_t ||m_t T - r_t||^2 /
ms(r_t): a few massive-activation tokens (BOS, attention sinks), whose
targets are hundreds of times the rest, no longer dominate the Gram. It keeps
the closed form (weighted Gram sums), so candidates are scored with it too.

T is folded into weights, so the result is a plain HF model of the same
architecture: every projection that writes M (the MLP's down projection, each
expert's and the shared expert's) is multiplied by T on its output side,
biases too. Where M passes through a norm before the residual add (Gemma2/3,
OLMo2, EXAONE4: `post_feedforward_layernorm`), only a diagonal T folds, into
that norm's scale.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LayerpruneError
from .patch_math import Gram, Samples, solve, solve_cosine
from .processes import process_count
from .shard import editable, is_sharded
from .student import own
from .surgery import find_layers, layer_view, original_indices, text_config
from .tasks.engine import my_share

log = logging.getLogger(__name__)

CLOSED_FORM = ("lstsq", "normalised")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
POST_MLP_NORMS = ("post_feedforward_layernorm",)
# Names of the projections that write the MLP's output, by the last part of the parameter name.
OUTPUT_PROJECTIONS = ("down_proj", "fc2", "dense_4h_to_h", "c_proj", "w2")


@dataclass
class MlpPath:
    """Where one layer's MLP output enters the residual stream. `writer`'s output is M; a patch
    folds into `projections` (parameter, the axis of size hidden) or, where `norm` is set, into
    that norm's scale (diagonal only)."""

    writer: nn.Module
    projections: list[tuple[nn.Parameter, int]] = field(default_factory=list)
    norm: nn.Module | None = None


def _output_axis(param: nn.Parameter, hidden: int, name: str) -> int:
    axes = [a for a in range(param.dim()) if param.shape[a] == hidden]
    if param.dim() == 1:
        return 0
    if len(axes) != 1:
        raise LayerpruneError(f"cannot tell which axis of {name} {tuple(param.shape)} is the hidden size {hidden}",
                              "use --patch none for this model")
    return axes[0]


def mlp_path(layer: nn.Module, hidden: int) -> MlpPath | None:
    """The MLP output path of one decoder layer, or None if this layer has none we know."""
    norm = next((getattr(layer, n) for n in POST_MLP_NORMS if isinstance(getattr(layer, n, None), nn.Module)), None)
    mlp = next((getattr(layer, n) for n in MLP_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
    if mlp is None and isinstance(getattr(layer, "fc2", None), nn.Linear):  # OPT: the MLP sits in the layer
        mlp = layer.fc2
        projections = [(p, _output_axis(p, hidden, f"fc2.{n}")) for n, p in mlp.named_parameters()]
        return MlpPath(mlp, projections, norm)
    if mlp is None:
        return None
    projections = []
    for name, param in mlp.named_parameters():
        parts = name.split(".")
        last = parts[-2] if parts[-1] in ("weight", "bias") else parts[-1].removesuffix("_bias")
        if last in OUTPUT_PROJECTIONS:
            projections.append((param, _output_axis(param, hidden, name)))
    if not projections and norm is None:
        return None
    return MlpPath(norm if norm is not None else mlp, projections, norm)


def paths(model: nn.Module) -> list[MlpPath | None]:
    hidden = text_config(model).hidden_size
    return [mlp_path(layer, hidden) for layer in find_layers(model).layers]


def effective_kind(model: nn.Module, kind: str) -> str:
    """The patch this model takes for `kind`: a post-MLP norm allows only a diagonal one. Refuses,
    in one line, an architecture where neither fold applies."""
    if kind == "none":
        return kind
    found = paths(model)
    if any(p is None for p in found[:-1]):
        config = text_config(model)
        raise LayerpruneError(f"--patch {kind}: {type(model).__name__} ({config.model_type}) has no MLP output "
                              "projection or post-MLP norm that a linear patch can be folded into",
                              "use --patch none for this architecture")
    return "diag" if any(p.norm is not None for p in found[:-1]) else kind


@contextmanager
def capture_mlp_outputs(model: nn.Module, layers) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, `record[k]` is layer k's MLP output M from the latest forward pass."""
    found = paths(model)
    record: dict[int, torch.Tensor] = {}
    def hook(k):
        return lambda module, args, out: record.__setitem__(k, out[0] if isinstance(out, tuple) else out)

    handles = [found[k].writer.register_forward_hook(hook(k)) for k in layers]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _norm_offset(norm: nn.Module, hidden: int) -> float:
    """0 for a norm that scales by its weight, 1 for one that scales by 1 + weight (Gemma)."""
    weight = norm.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
        probe = norm(torch.ones(1, hidden, dtype=weight.dtype, device=weight.device))
        weight.copy_(saved)
    return 0.0 if probe.abs().max().item() == 0 else 1.0


@torch.no_grad()
def fold(model: nn.Module, layer: int, t: torch.Tensor) -> None:
    """Make layer `layer` write M T instead of M, in its own weights."""
    module = find_layers(model).layers[layer]
    own(module)   # it shared the teacher's weights
    with editable(module):   # with --fsdp: this layer alone, gathered
        _fold(paths(model)[layer], text_config(model).hidden_size, t)


def _fold(path: MlpPath, hidden: int, t: torch.Tensor) -> None:
    if path.norm is not None:
        if t.dim() != 1:
            raise ValueError("a post-MLP norm takes only a diagonal patch")
        offset = _norm_offset(path.norm, hidden)
        weight = path.norm.weight
        weight.copy_(((offset + weight.double()) * t.to(weight.device) - offset).to(weight.dtype))
        bias = getattr(path.norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_((bias.double() * t.to(bias.device)).to(bias.dtype))
        return
    matrix = torch.diag(t) if t.dim() == 1 else t
    for param, axis in path.projections:
        moved = param.double().movedim(axis, -1)  # the hidden (output) axis last: rows times T
        param.copy_((moved @ matrix.to(param.device)).movedim(-1, axis).to(param.dtype))


@dataclass(frozen=True)
class PatchFit:
    """How every patch of a run is fitted: on which training `blocks` [N, T], of which `kind`
    (lstsq, diag), in batches of `batch_size`; with `teacher` (the original model), towards the
    teacher's states rather than the current model's (--patch-target teacher)."""

    blocks: torch.Tensor
    kind: str
    batch_size: int = 4
    progress: bool = True
    teacher: nn.Module | None = None
    fit: str = "lstsq"   # normalised (candidates too), or cosine (the cut's patch only; candidates by lstsq)


@torch.no_grad()
def fit(model: nn.Module, runs: list[tuple[int, int]], how: PatchFit) -> dict[tuple[int, int], Gram | Samples]:
    """Gram sums (or, for the cosine fit, the rows themselves) for each run (first, last) of
    current layers to be removed together, from one pass of `model` over the training blocks.
    Runs starting at layer 0 have no layer below to patch and are skipped. With a teacher, L is
    the teacher's state after the original layer that the run's last layer stands for, not the
    current model's: after earlier cuts the two differ, and fitting the teacher's makes the
    patch absorb that difference too (one teacher pass more)."""
    from .activations import capture, run_layers

    blocks, kind, batch_size, teacher = how.blocks, how.kind, how.batch_size, how.teacher
    runs = [(a, b) for a, b in runs if a >= 1]
    hidden = text_config(model).hidden_size
    device = next(model.parameters()).device

    def empty():
        if how.fit == "cosine":
            return Samples(diagonal=kind == "diag")
        size = (hidden,) if kind == "diag" else (hidden, hidden)
        return Gram(torch.zeros(size, dtype=torch.float64, device=device),
                    torch.zeros(size, dtype=torch.float64, device=device), normalised=how.fit == "normalised")

    grams = {run: empty() for run in runs}
    if not runs:
        return grams
    originals = original_indices(model)
    # Gram sums add over processes, each running its share of the blocks; the cosine fit needs
    # the rows themselves, so each process runs them all
    split = how.fit != "cosine" and process_count() > 1
    starts = list(range(0, len(blocks), batch_size))
    work = my_share(starts, model) if split else [(start, True) for start in starts]
    bar = tqdm(work, desc="fitting the patch", unit="batch", disable=not how.progress, leave=False)
    # Only the layers up to the highest removed one run: nothing above it enters a fit.
    top = max(b for _, b in runs)
    for start, counts in bar:
        ids = blocks[start:start + batch_size].to(device)
        view = layer_view(model, range(top + 1)) if not is_sharded(model) else nullcontext()
        with view, capture(model) as states, capture_mlp_outputs(model, {a - 1 for a, _ in runs}) as mlp:
            run_layers(model, ids, torch.ones_like(ids))
        targets = lambda b: states["states"][b + 1]  # noqa: E731
        if teacher is not None:
            with capture(teacher) as taught:
                teacher_ids = ids.to(next(teacher.parameters()).device)
                run_layers(teacher, teacher_ids, torch.ones_like(teacher_ids))
            targets = lambda b: taught["states"][originals[b] + 1].to(device)  # noqa: E731
        for (a, b), gram in grams.items():
            m = mlp[a - 1]
            if counts:
                gram.add(m, targets(b) - states["states"][a] + m)
    if split:
        for gram in grams.values():
            gram.add_over_processes()
    return grams


def contiguous_runs(drop: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 7] -> [(3, 4), (7, 7)]: each run of adjacent layers is one cut."""
    runs: list[list[int]] = []
    for layer in sorted(drop):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return [(a, b) for a, b in runs]


def deviation(t: torch.Tensor) -> float:
    """How far a patch is from doing nothing: max |T - I|."""
    eye = torch.ones_like(t) if t.dim() == 1 else torch.eye(len(t), dtype=t.dtype, device=t.device)
    return float((t - eye).abs().max())


def remove_and_patch(model: nn.Module, drop: list[int], how: PatchFit, fitted: dict[int, torch.Tensor] | None = None
                     ) -> tuple[list[int], dict | None]:
    """Remove current layers `drop` (surgery.remove_layers); with a patch, fit it first (the
    removed layers are needed for that) and fold it into the layer below each cut. `fitted`: the patches
    `candidate_patches` already solved for single-layer cuts of this model on the same blocks; a
    cut among them is not fitted again. Returns the removed layers' original indices and what
    was patched (None without a patch)."""
    from .surgery import remove_layers

    kind = effective_kind(model, how.kind)
    runs = [(a, b) for a, b in contiguous_runs(drop) if a >= 1]
    if kind == "none":
        patches = {}
    elif how.fit in CLOSED_FORM and fitted and all(a == b and a in fitted for a, b in runs):
        patches = {run: (fitted[run[0]], how.fit) for run in runs}
    else:
        sums = fit(model, runs, dataclasses.replace(how, kind=kind))
        patches = {run: solve_cosine(acc) if isinstance(acc, Samples) else (solve(acc), how.fit)
                   for run, acc in sums.items()}
    originals = original_indices(model)
    removed = remove_layers(model, drop)
    folded = []
    for (first, _), (t, method) in patches.items():
        below = first - 1 - sum(1 for d in drop if d < first - 1)
        fold(model, below, t)
        folded.append({"layer_original": originals[first - 1], "tokens": how.blocks.numel(),
                       "deviation": deviation(t), "fit": method})
    return removed, ({"kind": kind, "folded": folded} if kind != "none" else None)


def candidate_patches(model: nn.Module, candidates, how: PatchFit) -> dict[int, torch.Tensor]:
    """T for each candidate "current minus layer i" (i >= 1), all from one pass over the blocks,
    by the run's fit where it has a closed form, else by least squares."""
    how = dataclasses.replace(how, kind=effective_kind(model, how.kind),
                              fit=how.fit if how.fit in CLOSED_FORM else "lstsq")
    grams = fit(model, [(i, i) for i in candidates], how)
    return {first: solve(gram) for (first, _), gram in grams.items()}


def patched_state(state: torch.Tensor, m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """O + M (T - I) = Y + M T: the state leaving the patched layer below a cut."""
    if t.dim() == 1:
        return state + (m.double() * (t - 1)).to(state.dtype)
    eye = torch.eye(len(t), dtype=t.dtype, device=t.device)
    return state + (m.double() @ (t - eye)).to(state.dtype)
