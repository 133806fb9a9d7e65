"""A real, tiny causal LM for rescoring tests and benchmarks: an OPT of a few thousand parameters
with a word-level tokenizer over the given sentences, trained briefly (``steps=0``: randomly
initialised) and saved with ``save_pretrained`` so that it loads through ``from_pretrained``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tiny_opt(out: Path, train: Sequence[str], extra_words: Sequence[str] = (), steps: int = 150,
                   hidden: int = 16, seed: int = 0, batch: int | None = None) -> Path:
    """Train on ``train`` (``batch`` sentences per step, default all) and save to ``out``; the
    vocabulary is the words of ``train`` and ``extra_words``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for s in [*train, *extra_words] for w in s.split()})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    longest = max(len(s.split()) for s in [*train, *extra_words]) + 2
    config = OPTConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1, ffn_dim=2 * hidden,
                       num_attention_heads=2, max_position_embeddings=max(32, longest), word_embed_proj_dim=hidden,
                       pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                       dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    model = OPTForCausalLM(config)
    optim = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    gen = torch.Generator().manual_seed(seed)
    try:
        for _ in range(steps):
            pick = list(train) if batch is None else [train[int(i)] for i in torch.randint(len(train), (batch,), generator=gen)]
            enc = tokenizer(["<s> " + s for s in pick], add_special_tokens=False, padding=True, return_tensors="pt")
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels).loss
            optim.zero_grad()
            loss.backward()
            optim.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
