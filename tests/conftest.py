"""Settings and fixtures shared by test modules."""

import os

import pytest
import torch

# Without a GPU, Triton kernels (ours and SGLang's) run on CPU tensors through the interpreter. Triton reads the
# variable when a kernel module is imported, so it is set here, before any test module imports one. On a GPU host
# the compiled kernels run (the -m gpu tests).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random Llama checkpoint with a word-level tokenizer, as the CLI's ``--model`` reads it."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny")
    words = ["[UNK]", "</s>"] + "the grass is green sky blue sun yellow here we go there and back again . : ?".split()
    words += [str(d) for d in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   eos_token_id=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path
