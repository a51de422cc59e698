"""Tokenizers: byte layout, HF tokenizer.json and SentencePiece files built here, streaming detokenizer."""
import io
import json

import pytest

from unimlm_engine.config.presets import TINY_VOCAB_SIZE
from unimlm_engine.inputs.tokenizer import (ByteTokenizer, HFTokenizer, IncrementalDetokenizer, SentencePieceTokenizer,
                                            detokenize_step, load_tokenizer)
from unimlm_engine.routes import route_tokens, special_tokens

ROUTE_TOKENS, SPECIAL_TOKENS = route_tokens(), special_tokens()

CORPUS = [
    "a chat between a curious user and an artificial intelligence assistant",
    "the assistant gives helpful detailed and polite answers to the questions",
    "please detect the cat in the image and describe the scene",
    "the rocket stands on the launch pad under a blue sky",
    "a cup of coffee on a wooden table next to the window",
    "segment every person and draw a box around the dog",
] * 4

TEXTS = {
    "plain": "the cat sat on the table",
    "image_prefix": "<image>\nplease describe the image",
    "routes": "detect the cat [DET][EMB][EMB2] and [SEG] the dog",
    "adjacent_specials": "[GEN][EDIT]<region><im_patch><im_patch>",
    "eos_in_text": "the answer is here</s>",
}


def _stream(tok, ids, skip_special=True):
    det = IncrementalDetokenizer(tok, skip_special=skip_special)
    deltas = [det.step(ids[:k]) for k in range(1, len(ids) + 1)]
    return deltas, det.flush()


# ---------------------------------------------------------------- byte tokenizer

def test_byte_layout():
    tok = ByteTokenizer()
    assert tok.vocab_size == TINY_VOCAB_SIZE == 285  # 3 + 256 bytes + the 26 official added tokens
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert tok.encode("A") == [3 + 65]
    assert tok.encode("\x00\xff") == [3, 3 + 0xC3, 3 + 0xBF]
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(259, 285))
    assert tok.special_ids["[PAD]"] == 259 and tok.special_ids["<image>"] == 260 and tok.special_ids["[DET]"] == 271
    assert tok.route_ids == {271 + i: r for i, r in enumerate(ROUTE_TOKENS)}
    for tid in range(tok.vocab_size):
        assert tok.token_to_id(tok.id_to_token(tid)) == tid or tid == tok.pad_id


@pytest.mark.parametrize("text", list(TEXTS.values()) + ["héllo 世界 🚀"], ids=list(TEXTS) + ["multibyte"])
def test_byte_roundtrip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids, skip_special=False) == "<s>" + text
    for special in SPECIAL_TOKENS:
        assert text.count(special) == ids.count(tok.special_ids[special])


def test_byte_skip_special_drops_control_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("a[DET]b<image>c</s>", add_bos=True)
    assert tok.decode(ids) == "abc"


def test_byte_bad_ids():
    tok = ByteTokenizer()
    with pytest.raises(IndexError):
        tok.decode([tok.vocab_size])
    with pytest.raises(KeyError):
        tok.token_to_id("[NOPE]")


# ---------------------------------------------------------------- streaming

@pytest.mark.parametrize("text", ["héllo 世界 🚀!", "[DET] ok é", "ascii only"], ids=["multibyte", "route", "ascii"])
def test_stream_byte_never_splits_characters(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == tok.decode(ids)
    deltas, tail = _stream(tok, ids, skip_special=False)
    assert "".join(deltas) + tail == text


def test_stream_unfinished_character_held_then_flushed():
    tok = ByteTokenizer()
    ids = tok.encode("ok🚀")[:-2]
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) == "ok"
    assert tail == "\ufffd"


def test_detokenize_step_is_pure():
    tok = ByteTokenizer()
    ids = tok.encode("hi")
    delta, p, r = detokenize_step(tok, ids[:1], 0, 0)
    assert (delta, p, r) == ("h", 0, 1)
    delta, p, r = detokenize_step(tok, ids, p, r)
    assert (delta, p, r) == ("i", 1, 2)


# ---------------------------------------------------------------- HF tokenizer.json

def _train_bpe(specials, pre="bytelevel"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if pre == "metaspace" else None))
    if pre == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_bytelevel")
    _train_bpe(["<unk>", "<s>", "</s>", *SPECIAL_TOKENS]).save(str(d / "tokenizer.json"))
    return d


@pytest.mark.parametrize("name", list(TEXTS), ids=list(TEXTS))
def test_hf_roundtrip(hf_dir, name):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.directory == hf_dir
    text = TEXTS[name]
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == tok.bos_id == 1 and tok.eos_id == 2
    assert tok.decode(ids, skip_special=False) == "<s>" + text
    for special in SPECIAL_TOKENS:
        assert text.count(special) == ids.count(tok.special_ids[special])
    assert ids.count(tok.eos_id) == text.count("</s>")


def test_hf_stream_multibyte(hf_dir):
    tok = load_tokenizer(hf_dir)
    text = "the cat é 世界 [DET] 🚀"
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids, skip_special=False)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == text


@pytest.mark.parametrize("listing", ["added_tokens_json", "tokenizer_config"], ids=["added_tokens_json", "config"])
def test_hf_specials_from_side_files(tmp_path, listing):
    base = _train_bpe(["<unk>", "<s>", "</s>"], pre="metaspace")
    base.save(str(tmp_path / "tokenizer.json"))
    n = base.get_vocab_size()
    table = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
    if listing == "added_tokens_json":
        (tmp_path / "added_tokens.json").write_text(json.dumps(table))
    else:
        decoder = {str(i): {"content": t, "special": True} for t, i in table.items()}
        cfg = {"added_tokens_decoder": decoder, "bos_token": "<s>", "eos_token": {"content": "</s>"}}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert tok.special_ids == table
    assert tok.vocab_size == n + len(SPECIAL_TOKENS)
    ids = tok.encode("describe <image> then [POSE]")
    assert tok.special_ids["<image>"] in ids and tok.special_ids["[POSE]"] in ids
    assert tok.decode(ids) == tok.decode(tok.encode("describe  then "))


def test_hf_missing_special_names_directory(tmp_path):
    _train_bpe(["<unk>", "<s>", "</s>", "<image>"]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=str(tmp_path)) as err:
        load_tokenizer(tmp_path)
    assert "<im_patch>" in str(err.value)


def test_hf_declared_id_mismatch(tmp_path):
    base = _train_bpe(["<unk>", "<s>", "</s>"])
    base.save(str(tmp_path / "tokenizer.json"))
    table = {t: base.get_vocab_size() + 5 + i for i, t in enumerate(SPECIAL_TOKENS)}
    (tmp_path / "added_tokens.json").write_text(json.dumps(table))
    with pytest.raises(ValueError, match="declared as id"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- SentencePiece

def _train_sp(directory):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=100, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        user_defined_symbols=["\n"], minloglevel=2)
    (directory / "tokenizer.model").write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    _train_sp(d)
    return d


@pytest.mark.parametrize("name", list(TEXTS), ids=list(TEXTS))
def test_sp_roundtrip(sp_dir, name):
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer) and tok.directory == sp_dir
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    text = TEXTS[name]
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == 1
    assert tok.decode(ids, skip_special=False) == "<s>" + text
    for special in SPECIAL_TOKENS:
        assert text.count(special) == ids.count(tok.special_ids[special])
    assert ids.count(tok.eos_id) == text.count("</s>")


def test_sp_special_ids_follow_vocab(sp_dir):
    tok = load_tokenizer(sp_dir)
    n = tok._sp.get_piece_size()
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(n, n + len(SPECIAL_TOKENS)))
    assert tok.vocab_size == n + len(SPECIAL_TOKENS)
    assert tok.id_to_token(tok.special_ids["[EDIT]"]) == "[EDIT]"
    assert tok.token_to_id("[EMB8]") == tok.special_ids["[EMB8]"]


def test_sp_stream_matches_decode(sp_dir):
    tok = load_tokenizer(sp_dir)
    ids = tok.encode("the cat [DET] sat on the table")
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == "the cat  sat on the table"


def test_sp_added_tokens_json(tmp_path):
    _train_sp(tmp_path)
    table = {t: 500 + i for i, t in enumerate(SPECIAL_TOKENS)}
    (tmp_path / "added_tokens.json").write_text(json.dumps(table))
    tok = load_tokenizer(tmp_path)
    assert tok.special_ids == table and tok.vocab_size == 500 + len(SPECIAL_TOKENS)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image>": 500}))
    with pytest.raises(ValueError, match="lacks special tokens"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_hf_null_bos_in_config(tmp_path):
    _train_bpe(["<unk>", "<s>", "</s>", *SPECIAL_TOKENS]).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None and tok.eos_id == 2
    assert tok.encode("hi", add_bos=True) == tok.encode("hi")


def test_hf_side_file_disagrees_with_tokenizer_json(tmp_path):
    tok = _train_bpe(["<unk>", "<s>", "</s>", *SPECIAL_TOKENS])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[DET]": tok.token_to_id("[DET]") + 1}))
    with pytest.raises(ValueError, match="disagree"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("skip_special", [True, False], ids=["skip-special", "keep-special"])
def test_stream_random_ids_equal_decode(hf_dir, sp_dir, skip_special):
    """Random id streams (invalid UTF-8, specials, EOS mid-stream): deltas + flush == decode, per tokenizer."""
    import random

    rng = random.Random(0)
    for tok in (ByteTokenizer(), load_tokenizer(hf_dir), load_tokenizer(sp_dir)):
        for _ in range(30):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 24))]
            deltas, tail = _stream(tok, ids, skip_special=skip_special)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special=skip_special), (type(tok).__name__, ids)
