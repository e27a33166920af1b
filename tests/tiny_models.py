"""Tiny random-weight HF models shared by the harness tests (transformers imported on use)."""

import torch


def tiny_llama(hidden_size: int = 64, seed: int = 0):
    """A 2-layer Llama, GQA 4:2; a large init spreads the logits, so greedy choices are not near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=200, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3():
    """A 4-layer Gemma 3: sliding-window (16 tokens) and full-attention layers alternating, one KV head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=1024, initializer_range=0.2)
    return Gemma3ForCausalLM(cfg).eval()


class CharTokenizer:
    """A tokenizer of single characters (id = ``ord(c)``, BOS 1, EOS 2) with the methods the quality runner's
    ``Tokens`` calls, for the tiny models above (``vocab_size`` as theirs)."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, vocab_size: int = 200):
        self.vocab_size = vocab_size

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})

    def __len__(self):
        return self.vocab_size

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 2)

    def convert_ids_to_tokens(self, ids):
        return [chr(i) for i in ids]

    def convert_tokens_to_string(self, pieces):
        return "".join(pieces)
