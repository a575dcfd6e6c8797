"""Bad input: one line naming the problem and the fix, exit code 2, no output folder."""

import json

import pytest
from transformers import T5Config, T5ForConditionalGeneration

from layerprune.cli import main

from conftest import hf_char_tokenizer


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("layerprune")]


def common(tiny_dir, text_file, out):
    """Later flags override earlier ones (argparse keeps the last), so cases can replace any of these."""
    return ["prune", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--device", "cpu",
            "--seq-len", "32", "--calib-blocks", "2", "--train-blocks", "2", "--eval-blocks", "2", "--heal", "none",
            "--final-tasks", "perplexity", "--no-speed", "--quiet"]


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(path)
    hf_char_tokenizer().save_pretrained(path)
    return path


def bad_cases(tiny_dir, text_file, tmp_path, seq2seq_dir):
    files = {}

    def write(name, data):
        path = tmp_path / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        files[name] = path
        return str(path)

    corrupt_config = tmp_path / "corrupt-config"
    corrupt_config.mkdir()
    (corrupt_config / "config.json").write_text("{not json")
    corrupt_weights = tmp_path / "corrupt-weights"
    import shutil

    shutil.copytree(tiny_dir, corrupt_weights)
    (corrupt_weights / "model.safetensors").write_bytes(b"\x00" * 64)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    return {
        "missing model": (["--model", str(tmp_path / "nope")], "does not exist"),
        "folder without config": (["--model", str(folder)], "no config.json"),
        "corrupt config": (["--model", str(corrupt_config)], "cannot read a model config"),
        "corrupt weights": (["--model", str(corrupt_weights)], "cannot load the weights"),
        "not a causal LM": (["--model", str(seq2seq_dir)], "not a causal language model"),
        "bad dtype": (["--dtype", "float64"], "unknown dtype"),
        "bad device": (["--device", "tpu"], "unknown device"),
        "target not below depth": (["--target-layers", "6"], "not below the model's 6 layers"),
        "target below 1": (["--target-layers", "0"], "at least 1"),
        "remove everything": (["--remove", "6"], "would leave no layer"),
        "protection makes target impossible": (["--protect-first", "3", "--protect-last", "3"], "unprotected"),
        "empty data": (["--data", write("empty.txt", "")], "holds no text"),
        "too-short data": (["--data", write("short.txt", "one\n\ntwo\n\nthree")], "block(s) of 32"),
        "binary data": (["--data", write("binary.txt", b"\x00\x01\x02" * 100)], "looks binary"),
        "non-UTF-8 data": (["--data", write("latin.txt", "caf\xe9 ".encode("latin-1") * 100)], "not valid UTF-8"),
        "jsonl without the field": (["--data", write("d.jsonl", '{"body": "x"}\n')], "no string field"),
        "data folder": (["--data", str(folder)], "is a folder"),
        "missing data file": (["--data", str(tmp_path / "none.txt")], "does not exist"),
        "unknown data type": (["--data", write("d.csv", "a,b\n")], "unsupported data file type"),
        "unknown metric": (["--metric", "magic"], "unknown metric"),
        "unknown task": (["--tasks", "hellaswag"], "unknown task"),
        "generative importance task": (["--tasks", "copy_generate"], "generates text"),
        "unknown mode": (["--mode", "random"], "unknown mode"),
        "zero seq len": (["--seq-len", "0"], "seq_len must be at least 1"),
        "negative lr": (["--heal-lr", "-1"], "lr must be > 0"),
        "negative checkpoint interval": (["--heal-checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
        "all loss weights zero": (["--w-kl", "0", "--w-mse", "0", "--w-final", "0"], "not all zero"),
        "unknown trainable set": (["--trainable", "everything"], "unknown trainable set"),
        "missing mc file": (["--final-tasks", "mc:" + str(tmp_path / "q.jsonl")], "does not exist"),
        "out is a file": (["--out", write("file-out", "x")], "is a file"),
        "lm-eval task not available offline": (["--final-tasks", "lm_eval:no_such_task"], "not available here"),
        "resume with nothing": (["--resume"], "no unfinished run"),
    }


CASES = ["missing model", "folder without config", "corrupt config", "corrupt weights", "not a causal LM",
         "bad dtype", "bad device", "target not below depth", "target below 1", "remove everything",
         "protection makes target impossible", "empty data", "too-short data", "binary data", "non-UTF-8 data",
         "jsonl without the field", "data folder", "missing data file", "unknown data type", "unknown metric",
         "unknown task", "generative importance task", "unknown mode", "zero seq len", "negative lr",
         "all loss weights zero", "unknown trainable set", "missing mc file", "out is a file",
         "lm-eval task not available offline",
         "resume with nothing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_no_output(capsys, tiny_dir, text_file, tmp_path, seq2seq_dir, case):
    extra, expected = bad_cases(tiny_dir, text_file, tmp_path, seq2seq_dir)[case]
    out = tmp_path / "out"
    argv = common(tiny_dir, text_file, out)
    if not any(flag in extra for flag in ("--target-layers", "--remove")):
        extra = extra + ["--remove", "1"]
    code, lines = run(capsys, *argv, *extra)
    assert code == 2
    assert len(lines) == 1 and expected in lines[0] and ";" in lines[0], lines
    assert "Traceback" not in capsys.readouterr().err
    assert not (out / "history.json").exists() and not (out / "model.safetensors").exists()


def test_full_disk_while_saving_is_one_line_and_resumable(capsys, monkeypatch, tiny_dir, text_file, tmp_path):
    import errno

    from layerprune import pipeline

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "save_model", no_space)
    out = tmp_path / "out"
    code, lines = run(capsys, *common(tiny_dir, text_file, out), "--remove", "1", "--metric", "bi")
    assert code == 2 and "No space left on device" in lines[0] and "resumes" in lines[0]
    assert not (out / "history.json").exists() and (out / "checkpoint").exists()
    monkeypatch.undo()
    assert main(common(tiny_dir, text_file, out) + ["--remove", "1", "--metric", "bi"]) == 0
    assert (out / "history.json").exists()


def test_prune_and_score_commands(capsys, tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(common(tiny_dir, text_file, out) + ["--remove", "1", "--metric", "bi"]) == 0
    assert (out / "history.json").exists() and (out / "model.safetensors").exists()
    assert main(["score", "--model", str(tiny_dir), "--data", str(text_file), "--metric", "bi", "--seq-len", "32",
                 "--calib-blocks", "2", "--train-blocks", "2", "--eval-blocks", "2", "--quiet", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["layer", "current", "bi"] and len(table) == 7


def test_eval_command_prints_a_table_and_writes_json(capsys, tiny_dir, text_file, tmp_path):
    target = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tiny_dir), "--teacher", str(tiny_dir), "--data", str(text_file),
                 "--tasks", "perplexity,kl,continuation", "--seq-len", "32", "--calib-blocks", "2",
                 "--train-blocks", "2", "--eval-blocks", "2", "--json", str(target), "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "quality retained: 1.0000" in printed
    result = json.loads(target.read_text())
    assert result["quality_retained"] == pytest.approx(1.0) and set(result["tasks"]) == {"perplexity", "kl",
                                                                                         "continuation"}


def test_kl_without_teacher_is_refused(capsys, tiny_dir, text_file):
    code, lines = run(capsys, "eval", "--model", str(tiny_dir), "--data", str(text_file), "--tasks", "kl")
    assert code == 2 and "--teacher" in lines[0]


def test_compare_writes_table_and_plot(capsys, tiny_dir, text_file, tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--remove", "1,2",
                 "--seq-len", "32", "--calib-blocks", "2", "--train-blocks", "4", "--eval-blocks", "2",
                 "--heal-steps", "1", "--heal-grad-accum", "1", "--quiet", "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "compare.json").read_text())
    assert len(summary["results"]) == 10
    for result in summary["results"].values():
        assert set(result["quality_retained"]) == {"1", "2"}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "compare.md").read_text()
    assert "| layerprune + healing |" in table and "| shortgpt + no healing |" in table
