"""The real SmolLM2-135M-Instruct (embedded default) and Gemma-3-270M (embedded:gemma3-270m) on the
Wikipedia sample, small enough for CI. The final suite's generative tasks and the speed benchmark
have their own tests (test_pipeline, test_speed); here the final tasks are the block ones."""

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerprune.cli import main
from layerprune.models import gemma3_gguf_path, gguf_read_once, smollm2_gguf_path

from common import check_output_folder

pytestmark = pytest.mark.slow


def test_prune_smollm2_by_two_layers_with_quality_and_healing(tmp_path):
    out = tmp_path / "smollm2-28"
    code = main(["prune", "--remove", "2", "--metric", "quality", "--out", str(out), "--device", "cpu",
                 "--seq-len", "64", "--calib-blocks", "2", "--patch-blocks", "4", "--eval-blocks", "2",
                 "--val-tokens", "128", "--heal-steps", "2", "--heal-grad-accum", "1",
                 "--final-tasks", "perplexity,token_accuracy,kl", "--no-speed", "--quiet"])
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    assert history["original_layers"] == 30 and history["final_layers"] == 28
    assert len(history["iterations"]) == 2
    assert all(entry["heal"]["steps"] == 2 for entry in history["iterations"])
    assert all(entry["patch"]["kind"] == "lstsq" for entry in history["iterations"])  # the default recipe
    for entry in history["iterations"]:   # every healing guarded, none leaving validation KL worse
        guard = entry["heal"]["guard"]
        assert guard["kl_after"] <= guard["kl_before"] and len(guard["checks"]) >= 1
    check_output_folder(out, depth=28, removed=2)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 28
    assert len(model.config.layerprune_original_layers) == 28
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert generated.shape[1] == ids.shape[1] + 8
    ppl = history["final_eval"]["tasks"]["perplexity"]["perplexity"]
    teacher_ppl = history["teacher_eval"]["perplexity"]["perplexity"]
    assert teacher_ppl < ppl < 3 * teacher_ppl  # two layers cost something, not everything

    # The embedded default is a GGUF, so the run also wrote model.gguf: two blocks fewer, about their
    # share of the file smaller, and transformers reads it as a 28-layer model that generates.
    source, written = smollm2_gguf_path(), out / "model.gguf"
    reader = gguf.GGUFReader(written)
    assert reader.fields["llama.block_count"].contents() == 28
    block_bytes = sum(t.n_bytes for t in gguf.GGUFReader(source).tensors if t.name.startswith("blk.0."))
    assert abs(source.stat().st_size - written.stat().st_size - 2 * block_bytes) < 0.01 * block_bytes
    with gguf_read_once():   # transformers parses the file for its config, then for its tensors: once here
        read = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(read(ids).logits).all()


def test_prune_gemma3_270m_writes_a_folder_and_a_gguf_that_transformers_reads_alike(tmp_path):
    """Gemma-3: sliding and full attention interleaved, a post-feed-forward norm taking the patch,
    a 262K vocabulary, tied embeddings, Q4_K_M. The last layer is the one candidate (--protect-first
    17), so the kept types are the pattern a gemma3 GGUF reader derives and model.gguf can be
    written (other cuts are refused: test_gguf_export)."""
    out = tmp_path / "gemma-17"
    code = main(["prune", "--model", "embedded:gemma3-270m", "--remove", "1", "--protect-first", "17",
                 "--out", str(out), "--device", "cpu", "--seq-len", "64", "--calib-blocks", "2", "--patch-blocks", "4",
                 "--eval-blocks", "2", "--val-tokens", "128", "--heal-steps", "2", "--heal-grad-accum", "1",
                 "--heal-lr", "1.25e-4",   # the default's first retry: at 5e-4 two steps overshoot on Gemma
                 "--final-tasks", "perplexity,kl", "--no-speed", "--quiet"])
    assert code == 0
    history = check_output_folder(out, depth=17, removed=1)
    assert history["removed_original"] == [17]
    assert history["iterations"][0]["patch"]["kind"] == "diag"   # into layer 16's post-feed-forward norm
    folder = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert folder.config.num_hidden_layers == 17 and len(folder.config.layer_types) == 17
    assert folder.config.layer_types.count("full_attention") == 2  # original layers 5 and 11
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = folder.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 6

    # A GGUF reader parses Gemma's 262K-token vocabulary for about 10 s, so the written file is read
    # once, by transformers (its block count is the config's layer count); what was copied bit for
    # bit is the card's account (the byte comparison with the source is test_gguf_export's).
    card = (out / "README.md").read_text()
    assert "Q4_K -> Q8_0" in card and "token_embd.weight" not in card.split("## GGUF")[1]
    assert gemma3_gguf_path().stat().st_size > (out / "model.gguf").stat().st_size
    with gguf_read_once():   # transformers parses the file for its config, then for its tensors: once here
        read = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    assert read.config.num_hidden_layers == 17 and read.config.layer_types == folder.config.layer_types
    with torch.no_grad():
        a, b = read(ids).logits.log_softmax(-1), folder(ids).logits.log_softmax(-1)
    kl = (b.exp() * (b - a)).sum(-1).mean().item()
    assert kl < 0.05, kl   # only the re-quantisation of the changed tensors between them
