"""--train-data teacher: healing on text the original writes from prompts of the training text."""

import json
import sys

import pytest
import torch

from layerprune import HealConfig, PruneConfig
from layerprune.data import StreamPosition, TrainStream
from layerprune.errors import LayerpruneError
from layerprune.models import load_model
from layerprune.healing.teacher_text import INSTRUCTION, check_disk, generate, prompt_ids, prompt_length

from common import check_output_folder
from test_resume import run, run_together


@pytest.fixture
def teacher_and_stream(tiny_dir, text_file):
    teacher, tokenizer = load_model(str(tiny_dir), "float32", "cpu")
    return teacher, TrainStream(str(text_file), "text", tokenizer, 32)


def all_blocks(text):
    return torch.stack(list(text.blocks()))


def test_the_teacher_continues_the_training_prompts_and_an_interrupted_text_resumes_to_the_same(
        teacher_and_stream, tmp_path):
    teacher, stream = teacher_and_stream

    def write(count, folder, seed=3):   # 4 prompts a part, so that the text takes several parts
        return generate(teacher, stream, count, tmp_path / folder, seed=seed, skip=range(2, 4), progress=False,
                        batch_size=4)

    whole = write(40, "whole")
    blocks = all_blocks(whole)
    assert whole.count == len(blocks) >= 40 and blocks.shape[1] == 32
    assert 0 <= blocks.min() and blocks.max() < teacher.config.vocab_size
    first, *_ = (block for block, _ in stream.blocks())
    prompt = prompt_length(32)
    assert prompt == 8   # a quarter of a short block
    assert torch.equal(blocks[0, :prompt], first[:prompt])   # no chat template: the prompt as it is
    assert not torch.equal(blocks[0, prompt:], first[prompt:])   # the rest is the teacher's
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["blocks"] == whole.count and summary["prompts"] > 0

    started = write(5, "resumed")
    assert 5 <= started.count < whole.count   # stopped after the part that reached 5 blocks
    resumed = write(40, "resumed")
    assert torch.equal(all_blocks(resumed), blocks)
    assert torch.equal(torch.stack(list(resumed.span(StreamPosition(3), 4).read())), blocks[3:7])
    assert resumed.advance(StreamPosition(3), 4) == StreamPosition(7)
    other = write(40, "other", seed=4)
    assert not torch.equal(all_blocks(other)[:10], blocks[:10])   # the seed draws another text
    with pytest.raises(LayerpruneError, match="of another run"):
        write(60, "whole", seed=4)


def test_mixed_text_alternates_the_teachers_blocks_and_the_streams(teacher_and_stream, tmp_path):
    """--train-data mix: even offsets are the original's blocks in order, odd ones the stream's; a
    span from any position reads the same blocks as the whole."""
    from layerprune.healing.teacher_text import MixedText

    teacher, stream = teacher_and_stream
    generated = generate(teacher, stream, 6, tmp_path / "mix", seed=3, progress=False, batch_size=4)
    mixed = MixedText(generated, stream)
    whole = torch.stack(list(mixed.span(StreamPosition(), 12).read()))
    theirs = torch.stack([block for block, _ in zip((b for b, _ in stream.blocks()), range(6))])
    assert torch.equal(whole[0::2], all_blocks(generated)[:6]) and torch.equal(whole[1::2], theirs)
    assert torch.equal(torch.stack(list(mixed.span(StreamPosition(5), 4).read())), whole[5:9])
    assert mixed.advance(StreamPosition(5), 4) == StreamPosition(9)
    with pytest.raises(LayerpruneError, match="teacher's text holds"):
        mixed.span(StreamPosition(), 2 * generated.count + 2)


def test_a_chat_model_is_asked_to_continue_the_text(teacher_and_stream):
    _, stream = teacher_and_stream
    tokenizer = stream.tokenizer
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<s>{% endif %}")
    block = next(stream.blocks())[0]
    ids = prompt_ids(tokenizer, block)
    def squeezed(text):   # the tiny tokenizer decodes character by character, spaced
        return "".join(text.split())

    text = squeezed(tokenizer.decode(ids))
    assert text.startswith("<s>" + squeezed(INSTRUCTION)) and text.endswith("</s><s>")   # the template's turns
    assert squeezed(tokenizer.decode(block[:8], skip_special_tokens=True)) in text


def test_text_over_the_disk_budget_is_refused_in_one_line(tmp_path):
    with pytest.raises(LayerpruneError, match="more than the disk budget") as err:
        check_disk(10_000, 256, tmp_path / "new", budget_gib=0.001)
    assert "--cache-disk" in str(err.value) and "\n" not in str(err.value)
    check_disk(100, 256, tmp_path / "new", budget_gib=0.01)


@pytest.mark.parametrize("mode", ["teacher", "mix"])
def test_teacher_text_with_fsdp_is_refused(mode):
    with pytest.raises(LayerpruneError, match="--fsdp shards"):
        PruneConfig(out="o", remove=1, fsdp=True, heal=HealConfig(train_data=mode)).validate()


def test_a_mixed_run_heals_on_both_texts(tiny_dir, text_file, tmp_path):
    """A run with --train-data mix writes half the original's text a teacher run writes, and its
    healings read consecutive spans of the mixed text."""
    out = tmp_path / "mixed"
    argv = command(tiny_dir, text_file, out)
    argv[argv.index("teacher")] = "mix"
    done = run(argv)
    assert done.returncode == 0, done.stderr[-2000:]
    history = check_output_folder(out, depth=4, removed=2)
    texts = [record["heal"]["text"] for record in history["iterations"]]
    assert [(t["start"][0], t["end"][0]) for t in texts] == [(0, 6), (6, 12)]
    assert json.loads((out / "teacher_text" / "summary.json").read_text())["blocks"] >= 6
    assert "every other block written by the original" in (out / "README.md").read_text()


def command(tiny_dir, text_file, out, *extra):
    return [sys.executable, "-m", "layerprune", "prune", "--model", str(tiny_dir), "--data", str(text_file),
            "--out", str(out), "--device", "cpu", "--remove", "2", "--seq-len", "32", "--calib-blocks", "2",
            "--patch-blocks", "8", "--eval-blocks", "2", "--heal-steps", "3", "--heal-grad-accum", "1",
            "--final-tasks", "perplexity", "--no-speed", "--quiet", "--train-data", "teacher", *extra]


def test_a_run_heals_on_the_teachers_text_and_resumes_after_a_kill_while_writing_it(tiny_dir, text_file, tmp_path):
    whole, killed_out = tmp_path / "whole", tmp_path / "killed"
    done, killed = run_together((command(tiny_dir, text_file, whole), None),
                                (command(tiny_dir, text_file, killed_out), "teacher-text:1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("no chat template, so the original continues the training text's first tokens") == 1
    history = check_output_folder(whole, depth=4, removed=2)
    texts = [record["heal"]["text"] for record in history["iterations"]]
    assert [(t["start"][0], t["end"][0]) for t in texts] == [(0, 6), (6, 12)]   # 3 steps of 2 blocks each
    assert "the original wrote itself" in (whole / "README.md").read_text()
    assert json.loads((whole / "teacher_text" / "summary.json").read_text())["blocks"] >= 12

    assert killed.returncode == -9 and not (killed_out / "history.json").exists()
    resumed = run(command(tiny_dir, text_file, killed_out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    from safetensors.torch import load_file
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(killed_out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)   # the resumed text is the uninterrupted one


def test_teacher_text_over_the_disk_budget_stops_before_any_work(tiny_dir, text_file, tmp_path, capsys):
    from layerprune.cli import main

    out = tmp_path / "full"
    assert main(command(tiny_dir, text_file, out, "--cache-disk", "0.000001")[3:]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "disk budget" in errors[0]
    assert not (out / "teacher_text").exists()
