"""The shapes model's tokenizer: a byte-level BPE trained on the world's text with the `tokenizers` library,
<unk> <s> </s> first (LLaMA's ids 0, 1, 2), then the learned vocabulary, then the official added tokens
(`routes.required_special_tokens()`, [PAD] ... [EMB8]) in the official order, all special.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..inputs.processor import VICUNA_SYSTEM
from ..routes import required_special_tokens
from .tasks import corpus_lines

BASE_VOCAB = 640  # learned tokens (<unk> <s> </s> included), before the official added tokens


def train_tokenizer(directory: str | Path, vocab_size: int = BASE_VOCAB, num_embs: int = 4) -> Path:
    """Train the BPE on the world's text and write tokenizer.json + tokenizer_config.json into `directory`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = required_special_tokens()
    strip = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
    text = [strip.sub(" ", line) for line in corpus_lines(num_embs)]
    text += [VICUNA_SYSTEM + " USER: ASSISTANT:"] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "pad_token": "[PAD]", "model_max_length": 2048}, indent=1))
    return out
