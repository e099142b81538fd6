"""Tokenizers: sentencepiece training/loading, the char vocabulary, the Hugging Face wrapper."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from vp2o.data.tokenizer import (
    TOKENIZERS,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    register_tokenizer,
)

WORDS = ["alpha", "beta", "gamma", "delta", "plus", "minus", "equals", "answer", "the", "is", "of"]


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + f" {rng.randint(0, 999)}"
        for _ in range(n)
    ]


SAMPLE = "the answer is gamma plus 42"


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    prefix = tmp_path_factory.mktemp("spm") / "sub" / "tok"
    return SentencePieceTokenizer.train(make_corpus(), prefix, vocab_size=80)


def pieces(tok) -> list[str]:
    return [tok.id_to_piece(i) for i in range(tok.vocab_size)]


# -- sentencepiece ---------------------------------------------------------------------------------


def test_spm_trained_round_trip_and_specials(spm_tok: SentencePieceTokenizer) -> None:
    tok = spm_tok
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 80
    ids = tok.encode(SAMPLE)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == SAMPLE
    specials = [tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id]
    assert specials == [0, 1, 2, 3]
    assert len(set(specials)) == 4
    assert tok.id_to_piece(tok.pad_id) == "<pad>"
    with_specials = tok.encode(SAMPLE, add_bos=True, add_eos=True)
    assert with_specials == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode([*with_specials, tok.pad_id, tok.pad_id]) == SAMPLE
    # whitespace survives (identity normalisation, no whitespace squeezing)
    assert tok.decode(tok.encode("  the  answer ")) == "  the  answer "


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char"])
def test_spm_model_types_and_file_corpus(tmp_path: Path, model_type: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_corpus(200, seed=1)) + "\n", encoding="utf-8")
    vocab = 60 if model_type != "char" else 200
    tok = SentencePieceTokenizer.train(
        corpus,
        tmp_path / "m",
        vocab_size=vocab,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
    )
    if model_type == "char":  # one piece per distinct character, plus the 4 specials
        assert tok.vocab_size == len(set(corpus.read_text().replace("\n", ""))) + 4
    else:
        assert tok.vocab_size == vocab
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_spm_load_equals_trained(spm_tok: SentencePieceTokenizer) -> None:
    loaded = load_tokenizer("sentencepiece", spm_tok.path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert pieces(loaded) == pieces(spm_tok)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
        spm_tok.bos_id,
        spm_tok.eos_id,
        spm_tok.pad_id,
    )
    for line in make_corpus(20, seed=5):
        assert loaded.encode(line) == spm_tok.encode(line)


def test_spm_training_is_deterministic(tmp_path: Path, spm_tok: SentencePieceTokenizer) -> None:
    again = SentencePieceTokenizer.train(iter(make_corpus()), tmp_path / "again", vocab_size=80)
    assert pieces(again) == pieces(spm_tok)
    assert Path(f"{tmp_path / 'again'}.vocab").exists()


def test_spm_byte_fallback_and_user_symbols(tmp_path: Path) -> None:
    tok = SentencePieceTokenizer.train(
        make_corpus(),
        tmp_path / "bf",
        vocab_size=300,
        byte_fallback=True,
        user_defined_symbols=["<think>", "</think>"],
    )
    assert tok.vocab_size == 300
    text = "<think>gamma é ∑ 7</think>\n"  # é, ∑ and \n never occur in the corpus
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert [tok.id_to_piece(i) for i in ids].count("<think>") == 1  # kept whole, one piece


def test_spm_train_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type"):
        SentencePieceTokenizer.train(["a b"], tmp_path / "x", 20, model_type="word")
    with pytest.raises(ValueError, match="distinct"):
        SentencePieceTokenizer.train(["a b"], tmp_path / "x", 20, bos_id=0)
    with pytest.raises(ValueError, match="pad_id=25"):
        SentencePieceTokenizer.train(["a b"], tmp_path / "x", 20, pad_id=25)
    with pytest.raises(ValueError, match="empty"):
        SentencePieceTokenizer.train(["", ""], tmp_path / "x", 20)
    with pytest.raises(TypeError, match="corpus item 1"):
        SentencePieceTokenizer.train(["a b", 3], tmp_path / "x", 20)
    with pytest.raises(RuntimeError, match="Vocabulary size too high"):
        SentencePieceTokenizer.train(["hello world"] * 5, tmp_path / "x", 500)
    missing = tmp_path / "no_corpus.txt"
    with pytest.raises(FileNotFoundError, match="no_corpus.txt"):
        SentencePieceTokenizer.train(missing, tmp_path / "x", 20)


def test_spm_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        SentencePieceTokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer("sentencepiece", str(missing))
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="not a sentencepiece model.*bogus.model"):
        SentencePieceTokenizer.load(bogus)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        SentencePieceTokenizer.load(empty)
    with pytest.raises(ValueError, match="not a file"):
        SentencePieceTokenizer.load(tmp_path)


# -- char ------------------------------------------------------------------------------------------


def test_char_round_trip_and_ids() -> None:
    tok = CharTokenizer("0123456789+-*= ")
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 18
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("12+30=42", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1] == 3 + 1
    assert tok.decode([*ids, 0, 0]) == "12+30=42"
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3)] == ["<pad>", "<bos>", "<eos>", "0"]
    with pytest.raises(ValueError, match=r"'x' at position 2"):
        tok.encode("12x")
    # Ids past the alphabet (a model's larger embedding table) decode to nothing, as with
    # sentencepiece: a sampled padding id must not abort a rollout.
    assert tok.decode([99, *tok.encode("7"), tok.vocab_size, -1]) == "7"
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_piece(99)
    with pytest.raises(ValueError, match="twice"):
        CharTokenizer("aba")
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer("")


def test_char_from_corpus_is_deterministic() -> None:
    a = CharTokenizer.from_corpus(["b a", "c"])
    b = CharTokenizer.from_corpus(["c", "a b"])
    assert a.alphabet == b.alphabet == " abc"


def test_char_save_load(tmp_path: Path) -> None:
    tok = CharTokenizer('0123456789+-*= é∑\n"\\')
    path = tmp_path / "dir" / "char.json"
    tok.save(path)
    loaded = load_tokenizer("char", path)
    assert isinstance(loaded, CharTokenizer)
    assert loaded.alphabet == tok.alphabet
    text = '3é∑\n"\\ = 1'
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert load_tokenizer("char", alphabet="ab").alphabet == "ab"
    with pytest.raises(ValueError, match="exactly one"):
        load_tokenizer("char", None)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CharTokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        CharTokenizer.load(bad)
    other = tmp_path / "other.json"
    other.write_text('{"alphabet": "ab"}', encoding="utf-8")
    with pytest.raises(ValueError, match="other.json"):
        CharTokenizer.load(other)


# -- Hugging Face ----------------------------------------------------------------------------------


def build_hf_tokenizer(out: Path, *, with_pad: bool = True) -> Path:
    """A tiny byte-level BPE tokenizer trained locally (no download), saved with save_pretrained."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    specials = ["<pad>", "<s>", "</s>"] if with_pad else ["<s>", "</s>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(), trainer=trainer)
    kw = {"pad_token": "<pad>"} if with_pad else {}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **kw
    )
    fast.save_pretrained(str(out))
    return out


def test_hf_round_trip(tmp_path: Path) -> None:
    path = build_hf_tokenizer(tmp_path / "hf")
    tok = load_tokenizer("hf", path)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(tok.hf) >= 256
    specials = [tok.pad_id, tok.bos_id, tok.eos_id]
    assert len(set(specials)) == 3 and all(0 <= i < tok.vocab_size for i in specials)
    text = "the answer is  gamma é 42\n"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    full = tok.encode(text, add_bos=True, add_eos=True)
    assert full == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode([*full, tok.pad_id]) == text
    assert tok.id_to_piece(tok.eos_id) == "</s>"


def test_hf_pad_falls_back_to_eos(tmp_path: Path) -> None:
    tok = HFTokenizer(build_hf_tokenizer(tmp_path / "hf", with_pad=False))
    assert tok.pad_id == tok.eos_id


def test_hf_missing_path_is_named(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(OSError, match="no_such_tokenizer"):
        HFTokenizer(missing)


def test_hf_without_transformers_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'vp2o\[hf\]'"):
        load_tokenizer("hf", tmp_path)


def test_transformers_is_imported_lazily() -> None:
    code = "import sys, vp2o.data.tokenizer; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- registry --------------------------------------------------------------------------------------


def test_registry() -> None:
    assert {"sentencepiece", "char", "hf"} <= set(TOKENIZERS)
    unknown = r"^unknown tokenizer kind 'bogus'; choose one of: char, hf, sentencepiece$"
    with pytest.raises(ValueError, match=unknown):
        load_tokenizer("bogus", None)
    with pytest.raises(ValueError, match="already registered"):
        register_tokenizer("char")(lambda path: CharTokenizer("a"))
    with pytest.raises(ValueError, match="needs"):
        load_tokenizer("sentencepiece", None)
    with pytest.raises(ValueError, match="needs"):
        load_tokenizer("hf", None)


def test_sentencepiece_decode_drops_ids_beyond_the_vocabulary(tmp_path):
    from vp2o.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer.train(
        ["12+34=46", "7-3=4"] * 20, tmp_path / "m", 32, model_type="char"
    )
    ids = tok.encode("12+3")
    assert tok.decode([*ids, tok.vocab_size, tok.vocab_size + 7]) == "12+3"
