"""Tokenizers: one small interface over sentencepiece, a character vocabulary and Hugging Face.

Everything downstream (rollout, rewards, datasets, benchmarks) talks to the `Tokenizer` protocol:

- `encode(text, *, add_bos=False, add_eos=False) -> list[int]` gives the content tokens only;
  BOS and EOS are added only when asked for, the same way for every implementation (Hugging
  Face's own `encode` adds its special tokens by default; ours does not).
- `decode(ids) -> str` drops the BOS, EOS and pad ids and renders every other id, user-defined
  special symbols included.
- `vocab_size`, `bos_id` (None when the tokenizer has none), `eos_id`, `pad_id`. A pad id always
  exists: when the underlying tokenizer defines none, `pad_id == eos_id` (pad positions are masked,
  so sharing the id is harmless).
- `id_to_piece(i) -> str` is optional; the three tokenizers here all have it.

Build one from a config with `load_tokenizer(kind, path, **kw)`; the kinds live in `TOKENIZERS`,
filled by `@register_tokenizer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm

from vp2o.data.tasks import DatasetError
from vp2o.files import write_text_atomic
from vp2o.registry import Registry

__all__ = [
    "TOKENIZERS",
    "CharTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerFileError",
    "load_tokenizer",
    "register_tokenizer",
]

PathLike = str | os.PathLike[str]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of vp2o needs from a tokenizer (see the module docstring for the contract)."""

    @property
    def vocab_size(self) -> int:
        """Number of ids; every id produced by `encode` lies in `[0, vocab_size)`."""
        ...

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""
        ...

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (generation stops on it)."""
        ...

    @property
    def pad_id(self) -> int:
        """Padding id; equals `eos_id` when the tokenizer defines no pad token."""
        ...

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS / EOS only when asked for."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, with BOS, EOS and pad ids dropped, and ids outside the vocabulary."""
        ...


def _add_specials(
    ids: list[int], *, bos_id: int | None, eos_id: int, add_bos: bool, add_eos: bool
) -> list[int]:
    if add_bos:
        if bos_id is None:
            raise ValueError("this tokenizer has no BOS token; call encode(..., add_bos=False)")
        ids = [bos_id, *ids]
    if add_eos:
        ids = [*ids, eos_id]
    return ids


def _strip_specials(ids: Sequence[int], drop: set[int]) -> list[int]:
    # int() also accepts numpy / torch integer scalars, so a 1-D tensor can be decoded directly.
    return [int(i) for i in ids if int(i) not in drop]


class TokenizerFileError(DatasetError):
    """A tokenizer file is missing, not a file, or not of the expected kind.

    A ``DatasetError`` (a ``ValueError``), so ``vp2o train`` reports it as a data error with exit
    status 2; the missing-file case is also a ``FileNotFoundError``.
    """


class TokenizerFileNotFound(TokenizerFileError, FileNotFoundError):
    """The tokenizer file does not exist."""


def _require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise TokenizerFileNotFound(
            f"{what} file not found: {str(p)!r} (expected an existing {what} file; "
            "check data.tokenizer / data.tokenizer_path)"
        )
    if not p.is_file():
        raise TokenizerFileError(f"{what} path is not a file: {str(p)!r}")
    return p


# --------------------------------------------------------------------------------------------------
# sentencepiece
# --------------------------------------------------------------------------------------------------

_SPM_MODEL_TYPES = ("bpe", "unigram", "char")
# Options we pass ourselves; a caller cannot smuggle them in through **trainer_options.
_SPM_RESERVED = frozenset({"input", "sentence_iterator", "model_writer", "model_prefix"})


class SentencePieceTokenizer:
    """A sentencepiece model behind the `Tokenizer` interface.

    Build with `SentencePieceTokenizer.train(...)` or `SentencePieceTokenizer.load(path)`.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, *, path: PathLike | None = None):
        """Wrap a loaded processor; `path` is only used in messages and by `path`."""
        self._sp = processor
        self._path = None if path is None else str(path)
        n = processor.get_piece_size()
        if n <= 0:
            raise ValueError(f"sentencepiece model {self._path!r} has no pieces")
        bos, eos, pad = processor.bos_id(), processor.eos_id(), processor.pad_id()
        if eos < 0:
            raise ValueError(
                f"sentencepiece model {self._path!r} has no EOS piece; retrain it with eos_id >= 0"
            )
        self._bos = bos if bos >= 0 else None
        self._eos = eos
        self._pad = pad if pad >= 0 else eos
        self._drop = {i for i in (self._bos, self._eos, self._pad) if i is not None}

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def load(cls, path: PathLike) -> SentencePieceTokenizer:
        """Load a `.model` file; raises naming `path` if missing or not a sentencepiece model."""
        p = _require_file(path, "sentencepiece model")
        data = p.read_bytes()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise TokenizerFileError(f"not a sentencepiece model: {str(p)!r} ({e})") from e
        if processor.get_piece_size() <= 0:
            raise TokenizerFileError(f"not a sentencepiece model: {str(p)!r} (no pieces)")
        return cls(processor, path=p)

    @classmethod
    def train(
        cls,
        corpus: Iterable[str] | PathLike,
        model_prefix: PathLike,
        vocab_size: int,
        *,
        model_type: str = "bpe",
        byte_fallback: bool = False,
        user_defined_symbols: Sequence[str] = (),
        character_coverage: float = 1.0,
        split_digits: bool = False,
        unk_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        pad_id: int = 3,
        num_threads: int = 1,
        **trainer_options: Any,
    ) -> SentencePieceTokenizer:
        """Train a sentencepiece model, write `<model_prefix>.model` / `.vocab`, and load it.

        Args:
            corpus: the training text. A path (str or PathLike) is read as UTF-8, one sentence per
                line; any other iterable yields sentences (strings, passed as they are, newlines
                included).
            model_prefix: output path without extension; missing parent folders are created.
            vocab_size: number of pieces, specials included. bpe and unigram give exactly this many
                (sentencepiece fails, naming the largest possible size, when the corpus is too
                small); char gives at most this many (one piece per character seen, plus specials).
            model_type: "bpe", "unigram" or "char".
            byte_fallback: add the 256 byte pieces `<0x00>`..`<0xFF>` so that no text maps to unk;
                needs vocab_size > 256 + number of specials.
            user_defined_symbols: strings always kept whole as one piece (e.g. "<think>").
            character_coverage: fraction of characters covered by the vocabulary (sentencepiece's
                option; 1.0 keeps every character seen).
            split_digits: split runs of digits into single digits (handy for arithmetic).
            unk_id: id of `<unk>`. The four special ids must be distinct and in [0, vocab_size).
            bos_id: id of `<s>`.
            eos_id: id of `</s>`.
            pad_id: id of `<pad>`.
            num_threads: trainer threads; the default 1 makes training reproducible bit for bit.
            **trainer_options: any other `SentencePieceTrainer` option; they override our defaults,
                which are chosen so that `decode(encode(x)) == x` for text made of characters
                seen in training: no normalisation (`normalization_rule_name="identity"`),
                whitespace kept (`remove_extra_whitespaces=False`), the whole corpus used in order
                (`input_sentence_size=0`, `shuffle_input_sentence=False`), warnings only
                (`minloglevel=1`). sentencepiece's own default `add_dummy_prefix=True` stays: text
                is encoded as if it began with a space, and `decode` removes that space again.

        Returns:
            The trained tokenizer, loaded from `<model_prefix>.model`.
        """
        if model_type not in _SPM_MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {list(_SPM_MODEL_TYPES)}, got {model_type!r}"
            )
        if vocab_size < 5:
            raise ValueError(f"vocab_size must be >= 5 (4 specials and a piece), got {vocab_size}")
        specials = {"unk_id": unk_id, "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}
        for name, value in specials.items():
            if not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value} must lie in [0, vocab_size={vocab_size})")
        if len(set(specials.values())) != len(specials):
            raise ValueError(f"special ids must be distinct, got {specials}")
        reserved = _SPM_RESERVED & trainer_options.keys()
        if reserved:
            raise ValueError(f"trainer options {sorted(reserved)} are set by train(); remove them")

        prefix = Path(model_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        errors: list[BaseException] = []
        count = [0]
        sentences = _sentences(corpus, errors, count)

        options: dict[str, Any] = {
            "normalization_rule_name": "identity",
            "remove_extra_whitespaces": False,
            "input_sentence_size": 0,
            "shuffle_input_sentence": False,
            "minloglevel": 1,
        }
        options.update(trainer_options)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences,
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=byte_fallback,
                user_defined_symbols=list(user_defined_symbols),
                character_coverage=character_coverage,
                split_digits=split_digits,
                num_threads=num_threads,
                **specials,
                **options,
            )
        except RuntimeError as e:
            if errors:  # the corpus iterator failed; surface its own exception, not spm's wrapper
                raise errors[0] from None
            if count[0] == 0:
                raise ValueError(f"sentencepiece corpus {_describe(corpus)} is empty") from e
            raise RuntimeError(f"sentencepiece training for {str(prefix)!r} failed: {e}") from e
        return cls.load(f"{prefix}.model")

    # -- Tokenizer -----------------------------------------------------------------------------

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        """The underlying `SentencePieceProcessor`."""
        return self._sp

    @property
    def path(self) -> str | None:
        """The model file this was loaded from, if any."""
        return self._path

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        """Id of `<s>`, or None if the model has none."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """Id of `</s>`."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """Id of `<pad>`, or `eos_id` if the model has none."""
        return self._pad

    @property
    def unk_id(self) -> int:
        """Id of `<unk>`."""
        return self._sp.unk_id()

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS / EOS only when asked for."""
        ids = list(self._sp.encode(text, out_type=int))
        return _add_specials(
            ids, bos_id=self._bos, eos_id=self._eos, add_bos=add_bos, add_eos=add_eos
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, with BOS, EOS and pad ids dropped.

        Ids outside the vocabulary are dropped too: a model's embedding table is often padded
        beyond the tokenizer (megatron pads to a multiple of 128 x TP), and a sampled padding id
        must decode to nothing rather than abort the rollout.
        """
        n = self.vocab_size
        return self._sp.decode([i for i in _strip_specials(ids, self._drop) if 0 <= i < n])

    def id_to_piece(self, i: int) -> str:
        """The piece string of id `i` (e.g. "▁the", "<0x0A>", "</s>")."""
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(path={self._path!r}, vocab_size={self.vocab_size})"


def _describe(corpus: object) -> str:
    return repr(str(corpus)) if isinstance(corpus, str | os.PathLike) else "(in-memory)"


def _sentences(
    corpus: Iterable[str] | PathLike, errors: list[BaseException], count: list[int]
) -> Iterator[str]:
    """Yield the corpus sentences; record (rather than let spm swallow) any exception."""
    if isinstance(corpus, str | os.PathLike):
        path = _require_file(corpus, "sentencepiece corpus")

        def items() -> Iterator[str]:
            with path.open(encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\r\n")

        source: Iterable[str] = items()
    else:
        source = corpus
    try:
        for i, s in enumerate(source):
            if not isinstance(s, str):
                raise TypeError(f"corpus item {i} is {type(s).__name__}, expected str")
            if s:
                count[0] += 1
                yield s
    except Exception as e:
        errors.append(e)
        raise


# --------------------------------------------------------------------------------------------------
# characters
# --------------------------------------------------------------------------------------------------

_CHAR_FORMAT = "vp2o.CharTokenizer"
_CHAR_SPECIALS = ("<pad>", "<bos>", "<eos>")


class CharTokenizer:
    """One id per character of a fixed alphabet, for toy tasks and benchmarks.

    Ids: 0 `<pad>`, 1 `<bos>`, 2 `<eos>`, then the alphabet in the order given (so the same alphabet
    always gives the same ids). A character outside the alphabet is an error, not an unk id: toy
    tasks should never produce one.
    """

    def __init__(self, alphabet: str | Iterable[str]):
        """Build from the alphabet, e.g. `CharTokenizer("0123456789+-*= ")`."""
        chars = list(alphabet)
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty alphabet")
        seen: set[str] = set()
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"alphabet entries must be single characters, got {c!r}")
            if c in seen:
                raise ValueError(f"alphabet has {c!r} twice")
            seen.add(c)
        self._chars = chars
        offset = len(_CHAR_SPECIALS)
        self._ids = {c: offset + i for i, c in enumerate(chars)}

    @classmethod
    def from_corpus(cls, texts: Iterable[str]) -> CharTokenizer:
        """The alphabet of every character in `texts`, sorted by code point (deterministic)."""
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(sorted(chars))

    @classmethod
    def load(cls, path: PathLike) -> CharTokenizer:
        """Load a tokenizer written by `save`; raises naming `path` if missing or malformed."""
        p = _require_file(path, "char tokenizer")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerFileError(
                f"not a char tokenizer file (bad JSON): {str(p)!r} ({e})"
            ) from e
        if not isinstance(data, dict) or data.get("format") != _CHAR_FORMAT:
            raise TokenizerFileError(
                f"not a char tokenizer file (no format {_CHAR_FORMAT!r}): {str(p)!r}"
            )
        if data.get("version") != 1 or not isinstance(data.get("alphabet"), str):
            raise TokenizerFileError(f"unsupported char tokenizer file {str(p)!r}: {data!r}")
        return cls(data["alphabet"])

    def save(self, path: PathLike) -> None:
        """Write the alphabet as JSON (parent folders are created)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": _CHAR_FORMAT, "version": 1, "alphabet": "".join(self._chars)}
        write_text_atomic(p, json.dumps(data, ensure_ascii=False, indent=1) + "\n")

    @property
    def alphabet(self) -> str:
        """The alphabet, in id order."""
        return "".join(self._chars)

    @property
    def vocab_size(self) -> int:
        """3 specials plus the alphabet."""
        return len(_CHAR_SPECIALS) + len(self._chars)

    @property
    def bos_id(self) -> int:
        """Id of `<bos>` (1)."""
        return 1

    @property
    def eos_id(self) -> int:
        """Id of `<eos>` (2)."""
        return 2

    @property
    def pad_id(self) -> int:
        """Id of `<pad>` (0)."""
        return 0

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """One id per character, with BOS / EOS only when asked for."""
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as e:
            pos = next(i for i, c in enumerate(text) if c not in self._ids)
            raise ValueError(
                f"character {e.args[0]!r} at position {pos} is not in the alphabet "
                f"{self.alphabet!r}"
            ) from None
        return _add_specials(ids, bos_id=1, eos_id=2, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, with BOS, EOS and pad ids dropped, and ids outside the vocabulary too
        (a model's embedding table may be larger than the alphabet, as with sentencepiece)."""
        offset = len(_CHAR_SPECIALS)
        return "".join(self._chars[i - offset] for i in _strip_specials(ids, {0, 1, 2})
                       if offset <= i < self.vocab_size)

    def id_to_piece(self, i: int) -> str:
        """The character of id `i`, or the special's name."""
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"id {i} is out of range [0, {self.vocab_size})")
        offset = len(_CHAR_SPECIALS)
        return _CHAR_SPECIALS[i] if i < offset else self._chars[i - offset]

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r})"


# --------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------


class HFTokenizer:
    """A Hugging Face tokenizer (`AutoTokenizer`) behind the `Tokenizer` interface.

    Needs the `[hf]` extra. Loads from local files only unless `local_files_only=False` is passed:
    `path` is a folder with the tokenizer files, or a hub id already in the local cache.
    """

    def __init__(self, path: PathLike, **from_pretrained_kwargs: Any):
        """Load with `AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)`.

        Keyword arguments go to `from_pretrained`; e.g. `eos_token="<|im_end|>"` overrides a token.
        """
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(
                "HFTokenizer needs the Hugging Face transformers library: pip install 'vp2o[hf]'"
            ) from e
        from_pretrained_kwargs.setdefault("local_files_only", True)
        self._path = str(path)
        try:
            tok = AutoTokenizer.from_pretrained(self._path, **from_pretrained_kwargs)
        except (OSError, ValueError) as e:
            local = from_pretrained_kwargs["local_files_only"]
            if local and not Path(self._path).exists():
                raise TokenizerFileNotFound(
                    f"{self._path}: tokenizer folder does not exist (data.tokenizer=hf loads "
                    "local files only; check data.tokenizer_path)"
                ) from None
            raise OSError(
                f"could not load a Hugging Face tokenizer from {self._path!r}"
                f"{' (local files only)' if local else ''}: {e}"
            ) from e
        if tok.eos_token_id is None:
            raise ValueError(
                f"Hugging Face tokenizer {self._path!r} has no EOS token; "
                "pass eos_token='...' to load_tokenizer('hf', ...)"
            )
        self._tok = tok
        self._bos = tok.bos_token_id
        self._eos = int(tok.eos_token_id)
        self._pad = int(tok.pad_token_id) if tok.pad_token_id is not None else self._eos
        self._drop = {i for i in (self._bos, self._eos, self._pad) if i is not None}

    @property
    def hf(self) -> Any:
        """The underlying `transformers` tokenizer (e.g. for `apply_chat_template`)."""
        return self._tok

    @property
    def path(self) -> str:
        """Where the tokenizer was loaded from."""
        return self._path

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (`len(tokenizer)`, not HF's `vocab_size`)."""
        return len(self._tok)

    @property
    def bos_id(self) -> int | None:
        """BOS id, or None when the tokenizer has none (e.g. Qwen)."""
        return self._bos

    @property
    def eos_id(self) -> int:
        """EOS id."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """Pad id, or `eos_id` when the tokenizer has none."""
        return self._pad

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` without HF's automatic specials; BOS / EOS only when asked for."""
        ids = list(self._tok.encode(text, add_special_tokens=False))
        return _add_specials(
            ids, bos_id=self._bos, eos_id=self._eos, add_bos=add_bos, add_eos=add_eos
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, with BOS, EOS and pad ids dropped and spaces left as they are; ids
        outside the vocabulary are dropped (see `SentencePieceTokenizer.decode`)."""
        n = self.vocab_size
        return self._tok.decode(
            [i for i in _strip_specials(ids, self._drop) if 0 <= i < n],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )

    def id_to_piece(self, i: int) -> str:
        """The token string of id `i`."""
        return self._tok.convert_ids_to_tokens(int(i))

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self._path!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

TokenizerLoader = Callable[..., Tokenizer]
TOKENIZERS: Registry[TokenizerLoader] = Registry("tokenizer kind")


def register_tokenizer(name: str) -> Callable[[TokenizerLoader], TokenizerLoader]:
    """Register `fn(path, **kw) -> Tokenizer` under `name` for `load_tokenizer`."""
    return TOKENIZERS.register(name)


def load_tokenizer(kind: str, path: PathLike | None = None, **kw: Any) -> Tokenizer:
    """Build the tokenizer of kind `kind` (a key of `TOKENIZERS`) from `path` and options `kw`.

    Kinds: "sentencepiece" (path to a `.model`), "hf" (folder or cached hub id; `kw` go to
    `from_pretrained`), "char" (path to a JSON file written by `CharTokenizer.save`, or no path and
    `alphabet="..."`).
    """
    return TOKENIZERS.get(kind)(path, **kw)


@register_tokenizer("sentencepiece")
def _load_sentencepiece(path: PathLike | None) -> SentencePieceTokenizer:
    if path is None:
        raise ValueError("tokenizer kind 'sentencepiece' needs the path of a .model file")
    return SentencePieceTokenizer.load(path)


@register_tokenizer("char")
def _load_char(path: PathLike | None, *, alphabet: str | None = None) -> CharTokenizer:
    if (path is None) == (alphabet is None):
        raise ValueError(
            "tokenizer kind 'char' needs exactly one of a path (JSON from CharTokenizer.save) "
            "or alphabet='...'"
        )
    return CharTokenizer(alphabet) if alphabet is not None else CharTokenizer.load(path)


@register_tokenizer("hf")
def _load_hf(path: PathLike | None, **kw: Any) -> HFTokenizer:
    if path is None:
        raise ValueError("tokenizer kind 'hf' needs a path (tokenizer folder or cached hub id)")
    return HFTokenizer(path, **kw)
