"""An offline chat tokenizer (byte-level, ChatML template) and a tiny random Llama sized for it, for tests."""
from __future__ import annotations

import torch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>"]


def chat_tokenizer(merges: tuple[tuple[str, str], ...] = (("p", "o"), ("po", "s"), ("n", "e"))):
    """A byte-level BPE tokenizer (every text encodes; a few merges so token and character counts differ)
    with ChatML special tokens, eos `<|im_end|>`, pad `<pad>` and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                   chat_template=CHATML)


def tiny_chat_llama(vocab_size: int, seed: int = 0, dtype=torch.float32, init: float = 0.2):
    """A tiny random LlamaForCausalLM (eval mode) with `vocab_size` tokens and room for long prompts; weights
    drawn with std `init` (larger than a real init, so outputs depend visibly on positions and masks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=init)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def save_chat_model(path):
    """The offline chat tokenizer and a tiny chat Llama sized for it, saved as a model dir (seqr.load_model,
    the CLIs' --model); returns the path."""
    tok = chat_tokenizer()
    tiny_chat_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_task_dir(root, rows, tasks, sizes=(("train", 8), ("dev", 5))):
    """The --data layout <root>/<task>/<split>.jsonl, rows(task, split, n) -> JSONL dicts per file; returns root."""
    import json

    for t in tasks:
        (root / t).mkdir(parents=True)
        for split, n in sizes:
            (root / t / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(t, split, n)))
    return root


def saved_model_and_library(tmp_path, names, **adapter_kw):
    """A tiny chat model dir and a calibrated library dir of peft adapters `names` on disk (the adapter
    dirs stay under tmp_path/a); `adapter_kw` goes to make_adapter (a_seed=None: a unique-A library)."""
    from peft_factory import make_adapter
    from seqr import LoraLibrary, NormStats

    tok = chat_tokenizer()
    save_chat_model(tmp_path / "model")
    for i, n in enumerate(names):
        make_adapter(tmp_path / "a" / n, seed=i, base=tiny_chat_llama(len(tok)), **adapter_kw)
    lib = LoraLibrary.from_peft({n: tmp_path / "a" / n for n in names})
    for n in lib.names:
        lib.set_stats(n, {layer: NormStats().update(torch.rand(30) + 1) for layer in lib.layers})
    lib.save(tmp_path / "lib")
    return tmp_path / "model", tmp_path / "lib"
