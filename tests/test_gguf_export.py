"""GGUF out: a tiny Llama written as GGUF with gguf's writer in the test, pruned by one layer with
healing, exported, and read back by transformers and by gguf's reader."""

import copy
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

from layerprune import ExportConfig, export_gguf
from layerprune import gguf_export, gguf_layout
from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.models import load_model

from common import CONFIGS, SMALL, check_output_folder, make_text_file

Q = gguf.GGMLQuantizationType
# Byte-level BPE over all 256 bytes plus two merges: enough for transformers' and llama.cpp's gpt2 tokenizer.
TOKENS = ["<unk>", "<s>", "</s>"] + [bytes_to_unicode()[b] for b in range(256)] + ["he", "ll"]
PER_LAYER = "llama.test_per_layer"  # a per-layer array the export must cut like the blocks
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gemma3": gguf.MODEL_ARCH.GEMMA3}


def source_type(name: str):
    """A mix of what real files hold: Q8_0 and Q4_1 matrices, F32 norms and biases."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return Q.F32
    return Q.Q4_1 if "ffn_" in name else Q.Q8_0


def write_tiny_gguf(path, model, arch="llama"):
    """`model` as a GGUF of `arch`, each tensor quantised to `source_type`, via the same HF-to-GGUF
    layout the export uses (which transformers must read back as `model`: test_source_reads_back)."""
    config, layers = model.config, model.config.num_hidden_layers
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny llama")
    writer.add_block_count(layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope.get("rope_theta") or rope["full_attention"]["rope_theta"])
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
    writer.add_vocab_size(len(TOKENS))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_key_value(PER_LAYER.replace("llama", arch), list(range(layers)), gguf.GGUFValueType.ARRAY,
                         gguf.GGUFValueType.INT32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(ARCHS[arch], layers)
    heads = {"head_count": config.num_attention_heads, "head_count_kv": config.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied head has no tensor of its own, as in Gemma's files
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        rows = gguf_layout.LAYOUTS[arch].to_gguf(name, tensor.numpy(), lambda _, key: heads[key])
        writer.add_tensor(name, gguf.quants.quantize(rows, source_type(name)), raw_dtype=source_type(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def round_trip(model, qtype_of):
    """`model` with every weight quantised and dequantised as `qtype_of(hf_name)` says (None: kept).
    Quantisation blocks run along rows, so the q/k row permutation does not change the result."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.state_dict().items():
            qtype = qtype_of(name)
            if qtype is not None:
                value = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(np.array(value)).reshape(param.shape))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def gguf_name_of(hf_name, layers, arch="llama"):
    base, suffix = hf_name.rsplit(".", 1)
    return f"{gguf.get_tensor_name_map(ARCHS[arch], layers).get_name(base)}.{suffix}"


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny("llama")


@pytest.fixture
def source(tmp_path, tiny_llama):
    return write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama)


IDS = torch.tensor([[5, 40, 77, 120, 200, 33, 9, 250]])


def tiny(arch):
    torch.manual_seed(0)
    if arch == "gemma3":  # the period every gemma3 GGUF reader assumes (6), on 7 layers: S S S S S F S
        config = Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 7}, head_dim=8, sliding_window=8)
    else:
        config = CONFIGS[arch]()
    if arch == "qwen3":
        config.head_dim = 128  # transformers reads no head_dim from a qwen3 GGUF: 128, every Qwen3's
    model = AutoModelForCausalLM.from_config(config).eval()
    model.resize_token_embeddings(len(TOKENS))
    return model


@pytest.mark.parametrize("arch", list(gguf_layout.LAYOUTS))
def test_source_reads_back_as_the_model(tmp_path, arch):
    """The HF-to-GGUF layout of every architecture the export handles (for llama, the rotary
    permutation of q and k) is the inverse of transformers' reading."""
    model = tiny(arch)
    source = write_tiny_gguf(tmp_path / f"{arch}.gguf", model, arch)
    read = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    assert type(read) is type(model)
    layers = model.config.num_hidden_layers
    expected = round_trip(model, lambda name: source_type(gguf_name_of(name, layers, arch)))
    torch.testing.assert_close(logits(read, IDS), logits(expected, IDS), rtol=0, atol=1e-5)


def prune_args(source, text, out, *extra):
    return ["prune", "--model", str(source), "--data", str(text), "--out", str(out), "--device", "cpu",
            "--seq-len", "32", "--calib-blocks", "2", "--patch-blocks", "8", "--eval-blocks", "2", "--remove", "1",
            "--metric", "bi", "--heal-steps", "3", "--heal-batch-size", "2", "--final-tasks", "perplexity",
            "--no-speed", "--quiet", *extra]


@pytest.mark.parametrize("dtype,gguf_type", [("float32", "source"), ("bfloat16", "source"), ("float32", "q8_0")])
def test_prune_writes_a_gguf_one_block_shorter_with_the_folder_logits(tmp_path, source, dtype, gguf_type):
    """In bfloat16 the saved weights are the source's rounded: unchanged ones must still be found
    unchanged, and copied bit for bit. With --gguf-type q8_0 the changed matrices are Q8_0."""
    out = tmp_path / "out"
    args = prune_args(source, make_text_file(tmp_path / "c.txt"), out, "--dtype", dtype, "--gguf-type", gguf_type)
    assert main(args) == 0
    history = check_output_folder(out, depth=5, removed=1)
    kept = history["kept_original"]
    src, new = gguf.GGUFReader(source), gguf.GGUFReader(out / "model.gguf")
    assert new.fields["llama.block_count"].contents() == 5
    assert new.fields[PER_LAYER].contents() == kept
    assert "layerprune" in new.fields["general.name"].contents()
    assert new.fields["tokenizer.ggml.tokens"].contents() == TOKENS
    assert not any(t.name.startswith("blk.5.") for t in new.tensors)

    # Unchanged tensors are the source's bytes under the new block index; changed ones are re-quantised.
    by_name = {t.name: t for t in src.tensors}
    card = (out / "README.md").read_text()
    changed = []
    for tensor in new.tensors:
        parts = tensor.name.split(".")
        origin = f"blk.{kept[int(parts[1])]}.{'.'.join(parts[2:])}" if parts[0] == "blk" else tensor.name
        before = by_name[origin]
        if tensor.tensor_type != before.tensor_type or not np.array_equal(tensor.data, before.data):
            changed.append(tensor.name)
            assert tensor.name in card
            vector = len(tensor.shape) == 1
            assert tensor.tensor_type == (before.tensor_type if gguf_type == "source" or vector else Q.Q8_0)
    trained = {layer for record in history["iterations"] for layer in record["heal"]["trained_layers_current"]}
    assert changed and {int(name.split(".")[1]) for name in changed} <= trained
    assert len(changed) < len(new.tensors) // 2

    if dtype == "bfloat16":
        return  # the folder holds the source's weights rounded to bfloat16, the GGUF the exact ones
    # transformers reads it as the HF folder, up to the quantisation of exactly the changed tensors.
    folder = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    read = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    assert read.config.num_hidden_layers == 5
    types = {t.name: t.tensor_type for t in new.tensors}
    expected = round_trip(folder, lambda name: types[gguf_name_of(name, 5)]
                          if gguf_name_of(name, 5) in changed else None)
    torch.testing.assert_close(logits(read, IDS), logits(expected, IDS), rtol=0, atol=1e-4)
    quantisation = (logits(expected, IDS) - logits(folder, IDS)).abs().max()
    assert 0 < (logits(read, IDS) - logits(folder, IDS)).abs().max() <= quantisation + 1e-4


def test_export_gguf_after_the_run_matches_and_no_gguf_writes_none(tmp_path, source):
    out = tmp_path / "out"
    assert main(prune_args(source, make_text_file(tmp_path / "c.txt"), out, "--no-gguf")) == 0
    assert not (out / "model.gguf").exists() and "## GGUF" not in (out / "README.md").read_text()
    summary = export_gguf(out, progress=False)
    assert (out / "model.gguf").is_file() and summary.blocks == 5 and summary.source_blocks == 6
    assert summary.written_bytes < summary.source_bytes
    assert "## GGUF" in (out / "README.md").read_text()
    # Again, into another file: the same bytes, and the card keeps one GGUF section.
    assert main(["export-gguf", str(out), "--output", str(tmp_path / "again.gguf"), "--quiet"]) == 0
    assert (tmp_path / "again.gguf").read_bytes() == (out / "model.gguf").read_bytes()
    export_gguf(out, progress=False)
    assert (out / "README.md").read_text().count("## GGUF") == 1
    check_output_folder(out, depth=5, removed=1)   # history.json lists the new model.gguf and card


def test_a_full_disk_while_writing_the_gguf_is_one_line_and_resumes(capsys, monkeypatch, tmp_path, source):
    from layerprune import faults

    out = tmp_path / "out"
    monkeypatch.setattr(faults, "_COUNTS", {})
    monkeypatch.setenv("LAYERPRUNE_FULL_AT", "model.gguf:1")
    one_line_error(capsys, prune_args(source, make_text_file(tmp_path / "c.txt"), out), "No space left on device")
    assert not (out / "history.json").exists() and not (out / "model.gguf").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".staging"]
    monkeypatch.delenv("LAYERPRUNE_FULL_AT")
    assert main(prune_args(source, make_text_file(tmp_path / "c.txt"), out)) == 0
    assert (out / "model.gguf").is_file()


def test_written_type_follows_the_source_or_the_option_and_falls_back():
    assert gguf_export._written_type(Q.Q4_1, (64, 32)) == Q.Q4_1
    assert gguf_export._written_type(Q.Q6_K, (64, 256)) == Q.Q8_0  # gguf cannot quantise K-quants
    assert gguf_export._written_type(Q.Q6_K, (64, 48)) == Q.F16  # rows not whole Q8_0 blocks
    assert gguf_export._written_type(Q.F32, (48,)) == Q.F32
    assert gguf_export._written_type(Q.Q4_1, (64, 32), "f16") == Q.F16
    assert gguf_export._written_type(Q.Q4_1, (64, 32), "q8_0") == Q.Q8_0
    assert gguf_export._written_type(Q.F32, (64,), "q8_0") == Q.F32  # vectors stay float for llama.cpp
    assert gguf_export._written_type(Q.Q8_0, (64,)) == Q.F32


def one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("layerprune")]
    assert len(lines) == 1 and expected in lines[0] and ";" in lines[0], lines


def test_unsupported_architecture_still_writes_the_folder_then_fails(caplog, capsys, monkeypatch, tmp_path, source):
    monkeypatch.setattr(gguf_export, "LAYOUTS", {"qwen2": gguf_layout.SAME})
    out = tmp_path / "out"
    one_line_error(capsys, prune_args(source, make_text_file(tmp_path / "c.txt"), out),
                   "does not handle the architecture 'llama'")
    assert "model.gguf will not be written: GGUF export does not handle the architecture 'llama'" in caplog.text
    check_output_folder(out, depth=5, removed=1)
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*.tmp"))
    with pytest.raises(LayerpruneError, match="--no-gguf"):
        export_gguf(out, progress=False)


def test_tensor_types_it_cannot_read_are_named(capsys, monkeypatch, tmp_path, source):
    out = tmp_path / "out"
    assert main(prune_args(source, make_text_file(tmp_path / "c.txt"), out, "--no-gguf")) == 0
    unreadable = {Q.Q4_1}
    monkeypatch.setattr(gguf_export, "_handles", lambda qtype, quantise: qtype not in unreadable)
    one_line_error(capsys, ["export-gguf", str(out)], "cannot read the tensor types Q4_1")
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*.tmp"))


def test_export_errors_are_one_line(capsys, tmp_path, tiny_dir, text_file):
    one_line_error(capsys, ["export-gguf", str(tmp_path)], "no finished layerprune run")
    out = tmp_path / "hf-run"
    assert main(prune_args(tiny_dir, text_file, out, "--heal", "none")) == 0
    assert not (out / "model.gguf").exists()
    one_line_error(capsys, ["export-gguf", str(out)], "is not a GGUF file")
    one_line_error(capsys, ["export-gguf", str(out), "--source", str(tmp_path / "none.gguf")], "does not exist")
    assert not list(out.glob("*.gguf"))


def test_a_source_of_another_depth_is_refused(tmp_path, source, tiny_llama):
    out = tmp_path / "out"
    assert main(prune_args(source, make_text_file(tmp_path / "c.txt"), out, "--no-gguf")) == 0
    shorter = copy.deepcopy(tiny_llama)
    shorter.model.layers = shorter.model.layers[:3]
    shorter.config.num_hidden_layers = 3
    other = write_tiny_gguf(tmp_path / "other.gguf", shorter)
    with pytest.raises(LayerpruneError, match="blocks|shape|no tensor"):
        export_gguf(out, ExportConfig(source=str(other)), progress=False)
    assert not (out / "model.gguf").exists()
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "complete"


@pytest.fixture(scope="module")
def tiny_gemma():
    return tiny("gemma3")


def test_gemma3_cut_that_keeps_the_attention_pattern_is_written_and_reads_back(tmp_path, tiny_gemma):
    """Layer 6 of S S S S S F S removed: the kept types are what every reader derives for 6 layers.
    The patch folds a diagonal into layer 5's post-feed-forward norm: a changed norm, written as
    the file's scale (1 + w); the norms nothing changed stay the source's bytes."""
    source = write_tiny_gguf(tmp_path / "gemma.gguf", tiny_gemma, "gemma3")
    out = tmp_path / "out"
    assert main(prune_args(source, make_text_file(tmp_path / "c.txt"), out, "--protect-first", "6")) == 0
    history = check_output_folder(out, depth=6, removed=1)
    assert history["removed_original"] == [6]
    src, new = gguf.GGUFReader(source), gguf.GGUFReader(out / "model.gguf")
    assert new.fields["gemma3.block_count"].contents() == 6
    by_name = {t.name: t for t in src.tensors}
    changed = [t.name for t in new.tensors if not np.array_equal(t.data, by_name[t.name].data)]
    assert "blk.5.post_ffw_norm.weight" in changed
    assert "output_norm.weight" not in changed and "blk.0.attn_norm.weight" not in changed
    assert "output.weight" not in {t.name for t in new.tensors}  # tied, as in the source

    folder = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    read = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    assert folder.config.layer_types == read.config.layer_types == gguf_export.positional_types(6)
    types = {t.name: t.tensor_type for t in new.tensors}
    expected = round_trip(folder, lambda name: types[gguf_name_of(name, 6, "gemma3")]
                          if gguf_name_of(name, 6, "gemma3") in changed else None)
    torch.testing.assert_close(logits(read, IDS), logits(expected, IDS), rtol=0, atol=1e-4)


def test_gemma3_cut_that_breaks_the_attention_pattern_is_refused_in_one_line(capsys, tmp_path, tiny_gemma):
    """Layer 5 (the full-attention one) removed: a reader would give the new layer 5 full
    attention, so no gemma3 file can hold the model; the HF folder is complete."""
    source = write_tiny_gguf(tmp_path / "gemma.gguf", tiny_gemma, "gemma3")
    out = tmp_path / "out"
    one_line_error(capsys, prune_args(source, make_text_file(tmp_path / "c.txt"), out, "--protect-first", "5",
                                      "--protect-last", "1"), "cannot hold this cut")
    history = check_output_folder(out, depth=6, removed=1)
    assert history["removed_original"] == [5] and not list(out.glob("*.gguf"))
    with pytest.raises(LayerpruneError, match=r"full attention where \(i \+ 1\) % 6 == 0, but the kept layers "
                                              r"have it at \[\]"):
        export_gguf(out, progress=False)


def test_a_gguf_file_loads_parsing_it_once_and_as_transformers_reads_it(tmp_path, monkeypatch, source):
    """transformers parses a GGUF file once for the config, once for the weights and again for
    the tokenizer; load_model reads it once (models.gguf_read_once), with the same weights, and
    leaves gguf's own functions as they were."""
    parses = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *args, **kw: parses.append(args) or reader(*args, **kw))
    model, _ = load_model(str(source), device="cpu")
    assert len(parses) == 1
    expected = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    assert len(parses) == 3   # put back: transformers alone parses it twice for the model (config, weights)
    torch.testing.assert_close(logits(model, IDS), logits(expected, IDS), rtol=0, atol=0)
