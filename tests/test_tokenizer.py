"""diffrt's tokenizer (tokenizers only) against transformers.CLIPTokenizer on varied prompts."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from diffrt.runtime.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")


def varied_prompts() -> list[str]:
    rng = np.random.default_rng(3)
    words = ["a", "photo", "of", "the", "Red", "CAT", "house", "sky", "painting", "night", "beautiful", "city"]
    pieces = ["!", "?", "...", ",", "(", ")", "[", "]", "{", "}", "'s", "'t", "don't", "we'll", "#1", "@", "&", "*", ":-)",
              "12", "3.14", "2026", "1,000,000", "0x1F", "½", "π", "é", "Ünïcödé", "café", "naïve", "straße", "Ǆ",
              "日本語", "中文字", "한국어", "русский", "ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย",
              "🎉", "🔥🔥", "👩‍👩‍👧", "🇫🇷", "♥", "→", "∞", "\u200b", "\u00a0", "\t", "\n", "  ", "<|endoftext|>", "ﬁ", "Å"]
    prompts = ["", " ", "a", "A", "hello world", "   leading and trailing   ", "MiXeD CaSe WoRdS", "multiple     spaces",
               "tabs\tand\nnewlines", " ".join(["word"] * 100), "x" * 500, "photo " * 40, "a, b; c: d! e? f.",
               "emoji only 🎉🎉🎉", "numbers 1 22 333 4444 55555", "ALL CAPS PROMPT", "<|startoftext|>hi<|endoftext|>"]
    while len(prompts) < 220:
        n = int(rng.integers(1, 16))
        parts = [str(rng.choice(words if rng.random() < 0.6 else pieces)) for _ in range(n)]
        joiner = str(rng.choice([" ", "", "  ", ", "]))
        prompts.append(joiner.join(parts))
    return prompts


@pytest.fixture(scope="module")
def tokenizer_folder(tiny_checkpoint):
    return tiny_checkpoint / "tokenizer"


def reference_ids(ref, prompt: str) -> list[int]:
    return ref(prompt, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids


def test_ids_equal_transformers(tokenizer_folder):
    ours = ClipTokenizer.from_folder(tokenizer_folder)
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
    prompts = varied_prompts()
    assert len(prompts) >= 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(prompts)
    for prompt, row in zip(prompts, got):
        assert row.tolist() == reference_ids(ref, prompt), repr(prompt)


def test_sd2_pads_with_exclamation_mark(tokenizer_folder, tmp_path):
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tokenizer_folder / name).read_bytes())
    config = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    config["pad_token"] = "!"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    special = json.loads((tokenizer_folder / "special_tokens_map.json").read_text())
    special["pad_token"] = "!"
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    ours = ClipTokenizer.from_folder(tmp_path)
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert ref.pad_token == "!" and ours.pad_token == "!"
    for prompt in varied_prompts()[:60]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ours([prompt])[0].tolist() == reference_ids(ref, prompt), repr(prompt)
    assert ours(["a cat"])[0, -1] == ours.pad_id == json.loads((tmp_path / "vocab.json").read_text())["!"]


def test_tokenizer_json_gives_the_same_ids(tokenizer_folder, tmp_path):
    vocab = json.loads((tokenizer_folder / "vocab.json").read_text())
    merges = (tokenizer_folder / "merges.txt").read_text().strip().split("\n")[1:]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": merges}}))
    (tmp_path / "tokenizer_config.json").write_bytes((tokenizer_folder / "tokenizer_config.json").read_bytes())
    a, b = ClipTokenizer.from_folder(tokenizer_folder), ClipTokenizer.from_folder(tmp_path)
    prompts = varied_prompts()[:50]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(a(prompts), b(prompts))


def test_long_prompt_warns_how_much_was_dropped(tokenizer_folder):
    ours = ClipTokenizer.from_folder(tokenizer_folder)
    with pytest.warns(UserWarning, match=r"dropped \d+ tokens"):
        ids = ours(["photo " * 100])
    assert ids.shape == (1, 77) and ids[0, -1] == ours.eos_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(["a short prompt"])


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A T5 tokenizer learnt here: a `tokenizers` Unigram model with T5's normalizer and Metaspace pieces, saved by
    transformers as T5TokenizerFast (tokenizer.json and its configs)."""
    from conftest import make_t5_tokenizer

    folder = tmp_path_factory.mktemp("t5") / "tokenizer_3"
    make_t5_tokenizer(folder, max_length=64)
    return folder


def test_t5_ids_equal_t5_tokenizer_fast(t5_folder):
    """Pieces, </s>, padding and truncation at the encoder's length, on the varied prompts (long ones cut with a
    warning naming what was dropped)."""
    from diffrt.runtime.tokenizer import T5Tokenizer

    theirs = transformers.T5TokenizerFast.from_pretrained(t5_folder)
    ours = T5Tokenizer.from_folder(t5_folder)
    assert ours.max_length == 64
    prompts = varied_prompts()
    expected = theirs(prompts, padding="max_length", max_length=64, truncation=True).input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours(prompts)
    assert got.tolist() == expected
    assert any("the text encoder takes 63: dropped" in str(w.message) for w in caught)
    assert T5Tokenizer.from_folder(t5_folder, max_length=16)(["a photo of a cat"]).shape == (1, 16)
