"""Tokenizers: UTF-8 bytes when no tokenizer is given, or the one a checkpoint directory ships.

``load_tokenizer(path)`` looks in a checkpoint directory (and its parent, where Meta's downloads keep
``tokenizer.model``) for ``tokenizer.json`` (HuggingFace ``tokenizers``) or ``tokenizer.model``
(``sentencepiece``); without a path it returns :class:`ByteTokenizer`. The special token ids of a HuggingFace
checkpoint come from its ``config.json`` / ``generation_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    """What generation needs from a tokenizer."""

    bos_id: int | None
    eos_ids: frozenset[int]
    vocab_size: int

    def encode(self, text: str, bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token ``i < 256`` is the byte ``i``; 256 is BOS and 257 EOS. Any model with ``vocab_size >= 258`` can use it.

    Ids the model may produce beyond 257 (a larger vocabulary with random weights) decode to nothing.
    """

    BOS = 256
    EOS = 257
    vocab_size = 258

    def __init__(self) -> None:
        self.bos_id: int | None = self.BOS
        self.eos_ids = frozenset({self.EOS})

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.BOS] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _special_ids(directory: Path) -> tuple[int | None, frozenset[int]]:
    """BOS and EOS ids from ``generation_config.json`` (preferred, as transformers does) or ``config.json``."""
    bos, eos = None, None
    for name in ("config.json", "generation_config.json"):
        path = directory / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            bos = cfg.get("bos_token_id", bos)
            eos = cfg.get("eos_token_id", eos)
    if eos is None:
        eos_ids: frozenset[int] = frozenset()
    else:
        eos_ids = frozenset(eos) if isinstance(eos, list) else frozenset({eos})
    return bos, eos_ids


class HFTokenizer:
    """A ``tokenizer.json`` read by the ``tokenizers`` package (no special tokens added: BOS is ours to add)."""

    def __init__(self, path: Path, bos_id: int | None, eos_ids: frozenset[int]) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))
        self.bos_id, self.eos_ids = bos_id, eos_ids
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class SentencePieceTokenizer:
    """A ``tokenizer.model`` (Llama 1/2) read by ``sentencepiece``; BOS/EOS are the model's own."""

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        bos = self._sp.bos_id()
        self.bos_id = bos if bos >= 0 else None
        self.eos_ids = frozenset({self._sp.eos_id()}) if self._sp.eos_id() >= 0 else frozenset()
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos and self.bos_id is not None else []) + self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer of a checkpoint directory (or a tokenizer file), or :class:`ByteTokenizer` for None.

    Raises:
        FileNotFoundError: ``path`` holds no ``tokenizer.json`` / ``tokenizer.model``.
        ImportError: the package that reads the file found is not installed (the message names it).
    """
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if path.is_file():
        candidates = [path]
        directory = path.parent
    else:
        directory = path
        candidates = [d / name for d in (path, path.parent) for name in ("tokenizer.json", "tokenizer.model")]
    for file in candidates:
        if not file.is_file():
            continue
        if file.suffix == ".json":
            try:
                return HFTokenizer(file, *_special_ids(directory))
            except ImportError as e:
                raise ImportError(f"{file} needs the `tokenizers` package: pip install tokenizers") from e
        try:
            return SentencePieceTokenizer(file)
        except ImportError as e:
            raise ImportError(f"{file} needs the `sentencepiece` package: pip install sentencepiece") from e
    raise FileNotFoundError(
        f"no tokenizer.json or tokenizer.model in {path} (or its parent); pass --tokenizer, or leave it out to "
        "use the byte-level tokenizer"
    )
