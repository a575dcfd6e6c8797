"""Bad input: one line naming the problem and the fix, exit code 2, no output folder. The
catalogue is the one table CATALOGUE; the count in docs/cli.md is checked against it."""

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import T5Config, T5ForConditionalGeneration

from layerprune.cli import main

from common import hf_char_tokenizer, tiny_from_table

CLI_PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("layerprune")]


def common(tiny_dir, text_file, out):
    """Later flags override earlier ones (argparse keeps the last), so cases can replace any of these."""
    return ["prune", "--model", str(tiny_dir), "--data", str(text_file), "--out", str(out), "--device", "cpu",
            "--seq-len", "32", "--calib-blocks", "2", "--patch-blocks", "2", "--eval-blocks", "2", "--heal", "none",
            "--final-tasks", "perplexity", "--no-speed", "--quiet"]


class Paths:
    """What the cases point at, made on demand in the test's temporary folder."""

    def __init__(self, tmp_path, tiny_dir, text_file, models):
        self.tmp, self.tiny, self.text, self.models = tmp_path, tiny_dir, text_file, models

    def file(self, name, data):
        path = self.tmp / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return str(path)

    def folder(self, name):
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return str(path)

    def user_folder(self):
        path = Path(self.folder("mine"))
        (path / "notes.md").write_text("my notes")
        return str(path)

    def small_embedding(self):
        from transformers import AutoModelForCausalLM

        path = self.tmp / "small-embedding"
        shutil.copytree(self.tiny, path)
        model = AutoModelForCausalLM.from_pretrained(path)
        model.resize_token_embeddings(model.get_input_embeddings().num_embeddings - 8)
        model.save_pretrained(path)
        return str(path)

    def corrupt_weights(self):
        path = self.tmp / "corrupt-weights"
        shutil.copytree(self.tiny, path)
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
        return str(path)


# case -> (extra arguments, given the paths; text the one error line must hold)
CATALOGUE = {
    "missing model": (lambda p: ["--model", str(p.tmp / "nope")], "does not exist"),
    "folder without config": (lambda p: ["--model", p.folder("a-folder")], "no config.json"),
    "corrupt config": (lambda p: ["--model", str(Path(p.file("config.json", "{not json")).parent)],
                       "cannot read a model config"),
    "corrupt weights": (lambda p: ["--model", p.corrupt_weights()], "cannot load the weights"),
    "not a causal LM": (lambda p: ["--model", str(p.models["t5"])], "not a causal language model"),
    "unsupported architecture": (lambda p: ["--model", str(p.models["jamba"])], "cannot prune this architecture"),
    "bad dtype": (lambda p: ["--dtype", "float64"], "unknown dtype"),
    "bad device": (lambda p: ["--device", "tpu"], "unknown device"),
    "target not below depth": (lambda p: ["--target-layers", "6"], "not below the model's 6 layers"),
    "target below 1": (lambda p: ["--target-layers", "0"], "at least 1"),
    "remove everything": (lambda p: ["--remove", "6"], "would leave no layer"),
    "both depth options": (lambda p: ["--remove", "1", "--target-layers", "4"], "exactly one of"),
    "unknown patch fit": (lambda p: ["--patch-fit", "magic"], "unknown patch fit"),
    "params target above the model": (lambda p: ["--target-params", "10G"], "is not below the model's"),
    "params target out of reach": (lambda p: ["--target-params", "1k"], "below what the model keeps"),
    "params target unreadable": (lambda p: ["--target-params", "lots"], "is not a parameter count"),
    "speedup target not above 1": (lambda p: ["--target-speedup", "1"], "must be above 1"),
    "speedup target out of reach": (lambda p: ["--target-speedup", "9", "--speedup-estimate"], "at most 5 may go"),
    "protection makes target impossible": (lambda p: ["--protect-first", "3", "--protect-last", "3"], "unprotected"),
    "blocks longer than the context": (lambda p: ["--seq-len", "512"], "longer than the model's context"),
    "empty data": (lambda p: ["--data", p.file("empty.txt", "")], "holds no text"),
    "unreachable dataset id": (lambda p: ["--data", "nobody-here/no-such-dataset"], "cannot reach dataset"),
    "corrupt shard mid-stream": (lambda p: ["--data", p.file("bad.jsonl.gz", gzip.compress(
        ("".join('{"text": "row %d of text"}\n' % i for i in range(20000))).encode())[:300])], "is corrupt after"),
    "healing budget beyond the data": (lambda p: ["--heal", "distill", "--heal-tokens", "100000000"],
                                       "training split holds"),
    "validation budget beyond the data": (lambda p: ["--heal", "distill", "--heal-steps", "1", "--val-tokens",
                                                     "100000000"], "to guard healing"),
    "negative guard retries": (lambda p: ["--heal-guard-retries", "-1"], "guard_retries must be >= 0"),
    "cache budget too small for one block": (lambda p: ["--cache-disk", "1e-9"], "cannot hold"),
    "both healing budgets": (lambda p: ["--heal-tokens", "1000", "--heal-steps", "2"], "give the healing budget once"),
    "too-short data": (lambda p: ["--data", p.file("short.txt", "one\n\ntwo\n\nthree")], "block(s) of 32"),
    "binary data": (lambda p: ["--data", p.file("binary.txt", b"\x00\x01\x02" * 100)], "looks binary"),
    "non-UTF-8 data": (lambda p: ["--data", p.file("latin.txt", "caf\xe9 ".encode("latin-1") * 100)],
                       "not valid UTF-8"),
    "jsonl without the field": (lambda p: ["--data", p.file("d.jsonl", '{"body": "x"}\n')], "no string field"),
    "data folder": (lambda p: ["--data", p.folder("a-folder")], "holds no .txt"),
    "missing data file": (lambda p: ["--data", str(p.tmp / "none.txt")], "does not exist"),
    "unknown data type": (lambda p: ["--data", p.file("d.csv", "a,b\n")], "unsupported data file type"),
    "unknown metric": (lambda p: ["--metric", "magic"], "unknown metric"),
    "unknown task": (lambda p: ["--tasks", "hellaswag"], "unknown task"),
    "generative importance task": (lambda p: ["--tasks", "copy_generate"], "generates text"),
    "unknown mode": (lambda p: ["--mode", "random"], "unknown mode"),
    "zero seq len": (lambda p: ["--seq-len", "0"], "seq_len must be at least 1"),
    "not a number": (lambda p: ["--heal-steps", "many"], "steps must be int"),
    "negative lr": (lambda p: ["--heal-lr", "-1"], "lr must be > 0"),
    "negative checkpoint interval": (lambda p: ["--heal-checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
    "all loss weights zero": (lambda p: ["--w-kl", "0", "--w-mse", "0", "--w-final", "0"], "not all zero"),
    "local steps beyond the healing": (lambda p: ["--heal", "distill", "--heal-steps", "2", "--heal-local-steps",
                                                  "3"], "--heal-local-steps up to 2"),
    "local steps without the MSE term": (lambda p: ["--heal", "distill", "--heal-local-steps", "1", "--w-mse", "0"],
                                         "--w-mse 0 switches off"),
    "local steps with the top layers trained": (lambda p: ["--heal", "distill", "--heal-local-steps", "1",
                                                           "--trainable", "last"], "--trainable neighbours"),
    "unknown trainable set": (lambda p: ["--trainable", "everything"], "unknown trainable set"),
    "--fsdp in one process": (lambda p: ["--fsdp"], "accelerate launch --num_processes N"),
    "unknown patch": (lambda p: ["--patch", "cubic"], "unknown patch"),
    "unknown patch target": (lambda p: ["--patch-target", "student"], "unknown patch target"),
    "unknown gguf type": (lambda p: ["--gguf-type", "q2_k"], "unknown --gguf-type"),
    "missing mc file": (lambda p: ["--final-tasks", "mc:" + str(p.tmp / "q.jsonl")], "does not exist"),
    "no output folder": (lambda p: ["--out", ""], "no output folder given"),
    "out is a file": (lambda p: ["--out", p.file("file-out", "x")], "is a file"),
    "out under a file": (lambda p: ["--out", str(Path(p.file("file-parent", "x")) / "out")], "Not a directory"),
    "out is the model folder": (lambda p: ["--out", str(p.tiny)], "holds the model being pruned"),
    "out holds the user's files": (lambda p: ["--out", p.user_folder()], "holds no layerprune run"),
    "mse layer beyond the depth": (lambda p: ["--heal", "distill", "--mse-layers", "2,99"], "--mse-layers 99"),
    "float16 healing on the CPU": (lambda p: ["--heal", "distill", "--dtype", "float16"],
                                   "cannot be healed on the CPU"),
    "tokenizer beyond the embedding": (lambda p: ["--model", p.small_embedding()], "embedding only"),
    "lm-eval task not available offline": (lambda p: ["--final-tasks", "lm_eval:no_such_task"], "not available here"),
    "resume with nothing": (lambda p: ["--resume"], "no unfinished run"),
    "missing config file": (lambda p: ["--config", str(p.tmp / "none.yaml")], "cannot read config file"),
    "config file not a mapping": (lambda p: ["--config", p.file("list.yaml", "- a\n- b\n")], "does not hold a mapping"),
    "unknown config key": (lambda p: ["--config", p.file("typo.yaml", "heal:\n  stepz: 3\n")], "unknown config key"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(root / "t5")
    tiny_from_table("jamba").save_pretrained(root / "jamba")
    for name in ("t5", "jamba"):
        hf_char_tokenizer().save_pretrained(root / name)
    return {"t5": root / "t5", "jamba": root / "jamba"}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_gives_one_line_and_no_output(capsys, tiny_dir, text_file, tmp_path, models, case):
    make, expected = CATALOGUE[case]
    extra = make(Paths(tmp_path, tiny_dir, text_file, models))
    out = tmp_path / "out"
    if not any(flag in extra for flag in ("--target-layers", "--remove", "--target-params", "--target-speedup")):
        extra = extra + ["--remove", "1"]
    code, lines = run(capsys, *common(tiny_dir, text_file, out), *extra)
    assert code == 2
    assert len(lines) == 1 and expected in lines[0] and ";" in lines[0], lines
    assert "Traceback" not in capsys.readouterr().err
    assert not (out / "history.json").exists() and not (out / "model.safetensors").exists()


def test_the_cli_page_states_the_catalogue_size():
    counts = re.findall(r"(\d+) cases in\s+`tests/test_cli.py`", CLI_PAGE.read_text(encoding="utf-8"))
    assert counts == [str(len(CATALOGUE))]


def test_full_disk_while_saving_is_one_line_and_resumable(capsys, monkeypatch, tiny_dir, text_file, tmp_path):
    import errno

    from layerprune import output

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "save_model", no_space)
    out = tmp_path / "out"
    code, lines = run(capsys, *common(tiny_dir, text_file, out), "--remove", "1", "--metric", "bi")
    assert code == 2 and "No space left on device" in lines[0] and "resumes" in lines[0]
    assert not (out / "history.json").exists() and (out / "checkpoint").exists()
    monkeypatch.undo()
    assert main(common(tiny_dir, text_file, out) + ["--remove", "1", "--metric", "bi"]) == 0
    assert (out / "history.json").exists()


def test_the_saved_config_yaml_repeats_the_run(tiny_dir, text_file, tmp_path):
    first = tmp_path / "first"
    argv = common(tiny_dir, text_file, first) + ["--remove", "2", "--heal", "distill", "--heal-steps", "2",
                                                 "--heal-grad-accum", "1", "--patch-blocks", "4"]
    assert main(argv) == 0
    again = tmp_path / "again"
    assert main(["prune", "--config", str(first / "config.yaml"), "--out", str(again), "--quiet"]) == 0
    a, b = (json.loads((d / "history.json").read_text()) for d in (first, again))
    assert a["removed_original"] == b["removed_original"] and a["final_suite"] == b["final_suite"]
    assert {**a["config"], "out": ""} == {**b["config"], "out": ""}
    wa, wb = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_a_yaml_data_source_written_as_the_flag_is_honoured(tmp_path):
    from layerprune.cli import build_parser, config_from_args

    path = tmp_path / "run.yaml"
    path.write_text("data: embedded:news\nremove: 1\n")
    args = build_parser().parse_args(["prune", "--config", str(path), "--seq-len", "64", "--out", "o"])
    config = config_from_args(args.config_class, args)
    assert config.data.source == "embedded:news" and config.data.seq_len == 64


def test_prune_and_score_commands(capsys, tiny_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(common(tiny_dir, text_file, out) + ["--remove", "1", "--metric", "bi"]) == 0
    assert (out / "history.json").exists() and (out / "model.safetensors").exists()
    assert main(["score", "--model", str(tiny_dir), "--data", str(text_file), "--metric", "bi", "--seq-len", "32",
                 "--calib-blocks", "2", "--patch-blocks", "2", "--eval-blocks", "2", "--quiet", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["layer", "current", "bi"] and len(table) == 7


def test_eval_command_prints_a_table_and_writes_json(capsys, tiny_dir, text_file, tmp_path):
    target = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tiny_dir), "--teacher", str(tiny_dir), "--data", str(text_file),
                 "--tasks", "perplexity,kl,continuation", "--seq-len", "32", "--calib-blocks", "2",
                 "--patch-blocks", "2", "--eval-blocks", "2", "--json", str(target), "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "quality retained: 1.0000 (mean over perplexity, kl, continuation)" in printed
    result = json.loads(target.read_text())
    assert result["quality_retained"] == pytest.approx(1.0) and set(result["tasks"]) == {"perplexity", "kl",
                                                                                         "continuation"}


def test_kl_without_teacher_is_refused(capsys, tiny_dir, text_file):
    code, lines = run(capsys, "eval", "--model", str(tiny_dir), "--data", str(text_file), "--tasks", "kl")
    assert code == 2 and "--teacher" in lines[0]
