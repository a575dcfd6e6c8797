import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.models import check_context, check_same_vocabulary, load_model, max_positions

from common import tiny_model


def test_a_local_folder_loads_frozen_with_a_pad_token(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), "float32", "cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None
    bf16, _ = load_model(str(tiny_dir), "bfloat16", "cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16


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
