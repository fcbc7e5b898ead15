"""Tokenizers on `tokenizers`: CLIP's BPE, giving the ids of transformers' CLIPTokenizer (without ftfy), and T5's
SentencePiece (Unigram) from a tokenizer.json, giving those of T5TokenizerFast."""

from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table: the character standing for each byte 0..255, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def byte_values() -> list[int]:
    """The byte each character of byte_alphabet() stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def clean_text(text: str) -> str:
    """CLIPTokenizer's text clean-up without ftfy: drop control chars, space out CJK, NFC, lowercase, collapse spaces."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or (ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")):
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif any(lo <= cp <= hi for lo, hi in CJK_RANGES):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = unicodedata.normalize("NFC", "".join(out)).split()
    return " ".join(w.lower() for w in words)


class PaddedTokenizer:
    """Rows of ids of max_length: prefix, a prompt's tokens, suffix, padding; a longer prompt is cut with a warning."""

    max_length: int
    pad_id: int
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    def tokens(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """int64 ids (len(prompts), max_length)."""
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int64)
        room = self.max_length - len(self.prefix) - len(self.suffix)
        for i, text in enumerate(prompts):
            ids = self.tokens(text)
            if len(ids) > room:
                dropped = self.decode(ids[room:])
                warnings.warn(f"prompt is {len(ids)} tokens, the text encoder takes {room}: dropped {len(ids) - room} "
                              f"tokens ({dropped[:60]!r}{'...' if len(dropped) > 60 else ''})", stacklevel=2)
                ids = ids[:room]
            row = [*self.prefix, *ids, *self.suffix]
            out[i, :len(row)] = row
        return out


def tokenizer_config(folder: Path) -> dict:
    """special_tokens_map.json and tokenizer_config.json of a tokenizer folder, the second's keys winning."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            config.update(json.loads((folder / name).read_text(encoding="utf-8")))
    return config


def max_length_of(config: dict, default: int) -> int:
    limit = config.get("model_max_length")
    return limit if isinstance(limit, int) and limit < 10_000 else default


class ClipTokenizer(PaddedTokenizer):
    """BOS, tokens, EOS, padded to max_length with the pad token that the package's tokenizer config names."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77, pad_token: str = EOS):
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"tokenizer vocabulary lacks {token!r}; the tokenizer folder is not a CLIP tokenizer")
        bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                         unk_token=EOS, fuse_unk=False)
        self._tok = Tokenizer(bpe)
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        self._tok.add_special_tokens(sorted({BOS, EOS, pad_token}))  # transformers never splits these, "!" included
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        self.prefix, self.suffix = (self.bos_id,), (self.eos_id,)
        self.pad_token = pad_token
        self._bytes = dict(zip(byte_alphabet(), byte_values()))

    def decode(self, ids: list[int]) -> str:
        text = "".join(self._tok.id_to_token(i) or "" for i in ids)
        raw = bytes(self._bytes.get(ch, 32) for ch in text.replace("</w>", " "))
        return raw.decode("utf-8", errors="replace").strip()

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int | None = None) -> ClipTokenizer:
        """Read vocab.json + merges.txt, or tokenizer.json, and the pad token and max length from the configs."""
        folder = Path(folder)
        config = tokenizer_config(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:49152 - 256 - 2 + 1]
            merges = [tuple(line.split()) for line in lines]
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            raise FileNotFoundError(f"{folder} has neither vocab.json + merges.txt nor tokenizer.json")
        return cls(vocab, merges, max_length or max_length_of(config, 77), _token_text(config.get("pad_token")) or EOS)

    def tokens(self, text: str) -> list[int]:
        """BPE ids of text, without BOS/EOS or padding."""
        return self._tok.encode(clean_text(text), add_special_tokens=False).ids


class T5Tokenizer(PaddedTokenizer):
    """T5's SentencePiece (Unigram) tokenizer from a tokenizer.json: pieces, EOS (</s>), padding to max_length (SD3 and
    FLUX read 256 or 512 tokens), as T5TokenizerFast(padding="max_length", truncation=True) gives them."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str = "<pad>", eos_token: str = "</s>") -> None:
        self._tok = tokenizer
        self.max_length = max_length
        ids = [tokenizer.token_to_id(t) for t in (pad_token, eos_token)]
        if None in ids:
            raise ValueError(f"tokenizer vocabulary lacks {pad_token!r} or {eos_token!r}; the folder is not a T5 tokenizer")
        self.pad_id, self.eos_id = ids
        self.suffix = (self.eos_id,)

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int | None = None) -> T5Tokenizer:
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json (a T5 tokenizer is read from that file)")
        config = tokenizer_config(folder)
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), max_length or max_length_of(config, 512),
                   _token_text(config.get("pad_token")) or "<pad>", _token_text(config.get("eos_token")) or "</s>")

    def tokens(self, text: str) -> list[int]:
        """Piece ids of text (the tokenizer's own normalization), without EOS or padding."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)
