"""The real SmolLM2-135M-Instruct (embedded default) on the Wikipedia sample, small enough for CI."""

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerprune.cli import main
from layerprune.models import smollm2_gguf_path

from common import check_output_folder

pytestmark = pytest.mark.slow


def test_prune_smollm2_by_two_layers_with_quality_and_healing(tmp_path):
    out = tmp_path / "smollm2-28"
    code = main(["prune", "--remove", "2", "--metric", "quality", "--out", str(out), "--device", "cpu",
                 "--seq-len", "64", "--calib-blocks", "2", "--patch-blocks", "4", "--eval-blocks", "2",
                 "--heal-steps", "2", "--heal-grad-accum", "1", "--quiet"])
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
    read = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(read(ids).logits).all()
