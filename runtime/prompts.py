"""Prompts as AUTOMATIC1111 reads them: attention weights ((word), (word:1.3), [word], escapes), BREAK, and prompts
of any length in chunks of 75 tokens, each encoded on its own and the embeddings concatenated."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import UserError

CHUNK = 75  # tokens a chunk holds between its BOS and EOS
COMMA_BACKTRACK = 20  # A1111's default: a chunk that fills within this many tokens of a comma breaks after the comma
UP, DOWN = 1.1, 1 / 1.1
ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_MARK = -1.0  # the weight that marks a BREAK in a parsed prompt


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt; a BREAK is ("BREAK", -1). An unclosed bracket weights the rest."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token in ("(", "["):
            (round_open if token == "(" else square_open).append(len(runs))
        elif weight is not None and round_open:
            weigh(round_open.pop(), number(weight, token))
        elif token == ")" and round_open:
            weigh(round_open.pop(), UP)
        elif token == "]" and square_open:
            weigh(square_open.pop(), DOWN)
        else:
            for i, part in enumerate(BREAK.split(token)):
                if i:
                    runs.append(["BREAK", BREAK_MARK])
                runs.append([part, 1.0])
    for start in round_open:
        weigh(start, UP)
    for start in square_open:
        weigh(start, DOWN)
    return merged(runs)


def number(text: str, token: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"prompt weight {text!r} in {token.strip()!r} is not a number; write (word:1.2)") from None


def merged(runs: list[list]) -> list[tuple[str, float]]:
    """Neighbouring runs of one weight joined, as A1111 joins them; an empty prompt is one empty run."""
    out: list[list] = []
    for text, weight in runs:
        if out and out[-1][1] == weight and weight != BREAK_MARK:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(t, w) for t, w in out] or [("", 1.0)]


@dataclass
class Chunks:
    """A prompt's token ids and weights, (chunks, 77) each: BOS, 75 tokens (padded), EOS."""

    ids: np.ndarray
    weights: np.ndarray


def chunked(tokenizer, text: str) -> Chunks:
    """The prompt in chunks of 75 tokens as A1111 cuts them (at BREAK, or after a comma within 20 tokens of a full
    chunk's end); padded with the tokenizer's pad token after the EOS, so a plain prompt is diffusers' ids."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    comma = -1
    comma_id = next(iter(tokenizer.tokens(",")), None)
    for text_run, weight in parse_attention(text):
        if weight == BREAK_MARK:
            chunks.append((tokens, weights))
            tokens, weights, comma = [], [], -1
            continue
        for token in tokenizer.tokens(text_run):
            if token == comma_id:
                comma = len(tokens)
            elif len(tokens) == CHUNK and comma != -1 and len(tokens) - comma <= COMMA_BACKTRACK:
                chunks.append((tokens[:comma + 1], weights[:comma + 1]))
                tokens, weights, comma = tokens[comma + 1:], weights[comma + 1:], -1
            if len(tokens) == CHUNK:
                chunks.append((tokens, weights))
                tokens, weights, comma = [], [], -1
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        chunks.append((tokens, weights))
    return Chunks(*(np.stack(a) for a in zip(*(framed(tokenizer, t, w) for t, w in chunks))))


def plain(tokenizer, text: str) -> Chunks:
    """The prompt as diffusers reads it: the text as it is (no weights, no BREAK) in one chunk, cut at the text
    encoder's length with a warning."""
    ids = tokenizer([text])
    return Chunks(ids, np.ones(ids.shape, np.float32))


def framed(tokenizer, tokens: list[int], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """One chunk as the text encoder takes it: BOS, tokens, EOS, pad tokens; weight 1 outside the prompt's tokens."""
    ids = np.full(CHUNK + 2, tokenizer.pad_id, np.int64)
    ids[:len(tokens) + 2] = [tokenizer.bos_id, *tokens, tokenizer.eos_id]
    w = np.ones(CHUNK + 2, np.float32)
    w[1:len(tokens) + 1] = weights
    return ids, w


def emphasized(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis: each chunk's embedding times its tokens' weights, rescaled to its former mean
    (untouched where every weight is 1)."""
    if np.all(weights == 1):
        return z
    before = z.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    z = z * weights[:, :, None].astype(np.float64)
    with np.errstate(all="ignore"):
        out = (z * (before / z.mean(axis=(1, 2), keepdims=True))).astype(np.float32)
    if not np.isfinite(out).all():
        raise UserError(f"the prompt's weights (up to {np.abs(weights).max():g}) are too large to apply; keep them "
                        "within a few units, e.g. (word:1.5)")
    return out
