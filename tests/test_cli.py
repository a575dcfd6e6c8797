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
    return ["prune", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--device", "cpu",
            "--seq-len", "32", "--calib-blocks", "2", "--train-blocks", "2", "--eval-blocks", "2", "--heal", "none",
            "--quiet"]


@pytest.fixture
def seq2seq_dir(tmp_path):
    path = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(path)
    hf_char_tokenizer().save_pretrained(path)
    return path


def bad_cases(tiny_dir, text_file, tmp_path, seq2seq_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("one\n\ntwo\n\nthree")
    return {
        "missing model": (["--model", str(tmp_path / "nope")], "does not exist"),
        "not a causal LM": (["--model", str(seq2seq_dir)], "not a causal language model"),
        "target not below depth": (["--target-layers", "6"], "not below the model's 6 layers"),
        "target below 1": (["--target-layers", "0"], "at least 1"),
        "empty data": (["--data", str(empty), "--remove", "1"], "holds no text"),
        "too-short data": (["--data", str(short), "--remove", "1"], "block(s) of 32"),
        "unknown metric": (["--metric", "magic", "--remove", "1"], "unknown metric"),
    }


@pytest.mark.parametrize("case", ["missing model", "not a causal LM", "target not below depth", "target below 1",
                                  "empty data", "too-short data", "unknown metric"])
def test_bad_input_gives_one_line_and_no_output(capsys, tiny_dir, text_file, tmp_path, seq2seq_dir, case):
    extra, expected = bad_cases(tiny_dir, text_file, tmp_path, seq2seq_dir)[case]
    out = tmp_path / "out"
    argv = common(tiny_dir, text_file, out)
    if not any(flag in extra for flag in ("--target-layers", "--remove")):
        extra = extra + ["--remove", "1"]
    code, lines = run(capsys, *argv, *extra)
    assert code == 2
    assert len(lines) == 1 and expected in lines[0] and ";" in lines[0], lines
    assert not out.exists()


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
