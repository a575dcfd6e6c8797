"""Whether a change to the code changes any result: seven prune configurations and two
comparisons on a tiny random Llama, each reduced to a fingerprint (the saved weights' bytes,
history.json and compare.json without timings, paths and file checksums).

Run it on the tree before a refactor and on the tree after, one thread each (bit-identical
floats need the same reduction order), and compare:

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/old/src python bench/same_result.py --out runs/same-old.json
    OMP_NUM_THREADS=1 python bench/same_result.py --out runs/same-new.json --against runs/same-old.json

Only the public API is used (PruneConfig, prune, CompareConfig, compare), so the same script
runs on both trees. Exit 1 when any fingerprint differs, naming which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import make_text_file, save_tiny  # noqa: E402
from layerprune import CompareConfig, DataConfig, HealConfig, PruneConfig, compare, prune  # noqa: E402

DATA = dict(seq_len=32, calib_blocks=4, patch_blocks=8, eval_blocks=4, val_tokens=64, batch_size=2)
# Unguarded but one: on a random tiny model the guard rolls most healings back, and a rolled-back
# healing would leave nothing of the loop's arithmetic in the weights.
HEAL = dict(steps=4, batch_size=2, grad_accum=1, warmup_steps=1, checkpoint_every=2, guard=False)

# name -> the options of one prune run (on top of the tiny model, the corpus and DATA)
PRUNES = {
    "default": dict(remove=2, heal=HealConfig(**{**HEAL, "guard": True})),
    "reuse-epochs": dict(remove=2, heal=HealConfig(**HEAL, train_data="reuse", epochs=2)),
    "no-cache-final": dict(remove=2, heal=HealConfig(**HEAL, teacher_cache=False, final_steps=2, epochs=2)),
    "bi-one-shot-noheal": dict(remove=2, metric="bi", mode="one-shot", patch="none", heal=HealConfig(method="none")),
    "replaceme-block": dict(remove=2, metric="angular_last", mode="block", heal=HealConfig(**HEAL)),
    "lora": dict(remove=1, heal=HealConfig(**HEAL, trainable="lora", lora_r=4)),
    "all-local-teacher-patch": dict(remove=2, patch_target="teacher",
                                    heal=HealConfig(**HEAL, trainable="all", local_steps=1, mse_layers=(1, 3))),
}
COMPARES = {
    "shortgpt-layerprune": dict(counts=(1, 2), methods=("shortgpt", "layerprune"), healing=("none", "distill"),
                                heal=HealConfig(**HEAL)),
    "replaceme-bi-reuse": dict(counts=(1, 2), methods=("replaceme", "iterative-bi"), healing=("distill",),
                               heal=HealConfig(**HEAL, train_data="reuse"), seeds=(0, 1)),
}
# What a run may differ in without its result differing: timings, where it ran, file checksums.
VOLATILE = {"seconds", "timings", "files", "speed", "out", "seconds_per_count", "created", "versions"}


def _scrub(value, root: str):
    """The record without its volatile fields, the temporary folder's path written as ROOT."""
    if isinstance(value, dict):
        return {k: _scrub(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_scrub(v, root) for v in value]
    if isinstance(value, str):   # and the machine's free RAM and disk, which the cache plan quotes
        return re.sub(r"GiB of [0-9.]+\)", "GiB of BUDGET)", value.replace(root, "ROOT"))
    return value


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _weights(folder: Path) -> str:
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        for name, tensor in sorted(load_file(str(path)).items()):
            digest.update(name.encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprints(root: Path) -> dict[str, dict]:
    model, text = save_tiny(root / "tiny"), make_text_file(root / "corpus.txt")
    common = dict(model=str(model), device="cpu", data=DataConfig(source=str(text), **DATA))
    found, records = {}, {}
    for name, options in PRUNES.items():
        out = root / name
        prune(PruneConfig(**common, out=str(out), final_tasks=("perplexity", "kl"), measure_speed=False, **options),
              progress=False)
        history = json.loads((out / "history.json").read_text())
        records[f"prune {name}"] = _scrub(history, str(root))
        found[f"prune {name}"] = {"weights": _weights(out), "history": _digest(_scrub(history, str(root))),
                                  "removed": history["removed_original"]}
        print(f"prune {name}: {found[f'prune {name}']}", flush=True)
    for name, options in COMPARES.items():
        summary = compare(CompareConfig(**common, out=str(root / name), unseen_data=None, **options), progress=False)
        records[f"compare {name}"] = _scrub(summary, str(root))
        found[f"compare {name}"] = {"summary": _digest(_scrub(summary, str(root)))}
        print(f"compare {name}: {found[f'compare {name}']}", flush=True)
    (root / "records.json").write_text(json.dumps(records, indent=1, sort_keys=True, default=str))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the fingerprints go (JSON)")
    parser.add_argument("--against", type=Path, help="fingerprints of another tree to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="layerprune-same-") as root:
        found = fingerprints(Path(root))
        records = Path(root, "records.json").read_text()
    args.out.with_suffix(".records.json").write_text(records)   # to see what differs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found, indent=1, sort_keys=True))
    if args.against is None:
        return 0
    before = json.loads(args.against.read_text())
    differ = [name for name in sorted(set(before) | set(found)) if before.get(name) != found.get(name)]
    for name in differ:
        print(f"DIFFERS {name}: {before.get(name)} -> {found.get(name)}")
    print(f"{len(found) - len(differ)} of {len(found)} fingerprints identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
