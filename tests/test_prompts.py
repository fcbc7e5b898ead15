"""Prompts as AUTOMATIC1111 reads them, against references built from transformers' CLIP and diffusers."""

from __future__ import annotations

import numpy as np
import pytest

from diffrt.runtime.prompts import CHUNK, chunked, parse_attention

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from conftest import reference_pipeline  # noqa: E402

# The examples of A1111's prompt_parser.parse_prompt_attention docstring, input and output as published there
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, runs", A1111_EXAMPLES)
def test_attention_syntax_as_a1111_parses_it(text, runs):
    assert parse_attention(text) == runs


def test_weights_that_are_not_numbers_or_too_large_are_refused(ours):
    from diffrt.runtime.errors import UserError

    for prompt in ("a (cat:1.2.3)", "(x:.)"):
        with pytest.raises(UserError, match="is not a number"):
            ours.embed([prompt])
    with pytest.raises(UserError, match="too large to apply"):
        ours.embed(["a (cat:99999999999999999999999999999999999999999)"])
    assert np.isfinite(ours.embed(["a (cat:1e400) x"])).all()  # not a weight A1111's syntax reads: plain text


def test_break_escapes_and_odd_brackets():
    assert parse_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_attention("BREAKFAST (x:-0.5) [[y]]") == [("BREAKFAST ", 1.0), ("x", -0.5), (" ", 1.0), ("y", 1 / 1.1 / 1.1)]
    assert parse_attention(r"a \\ b ]) (c:1.2") == [("a \\ b ]) ", 1.0), ("c:1.2", 1.1)]
    assert parse_attention("") == [("", 1.0)]


@pytest.fixture(scope="module")
def clip(tiny_checkpoint):
    """transformers' tokenizer and text encoder of the tiny checkpoint: the reference side."""
    tok = transformers.CLIPTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    model = transformers.CLIPTextModel.from_pretrained(tiny_checkpoint / "text_encoder").eval()
    return tok, model


def reference_chunks(tok, text: str) -> list[list[tuple[int, float]]]:
    """A1111's chunking spelled out over transformers' token ids: (id, weight) lists of at most 75, a new one at
    BREAK, and a full one cut after its last comma when that comma is within 20 tokens of the end."""
    comma = tok.convert_tokens_to_ids(",</w>")
    chunks, current = [], []
    for run, weight in parse_attention(text):
        if weight == -1.0:
            chunks, current = chunks + [current], []
            continue
        for token in tok(run, add_special_tokens=False).input_ids:
            commas = [i for i, (t, _) in enumerate(current) if t == comma]
            if len(current) == CHUNK and token != comma and commas and CHUNK - commas[-1] <= 20:
                chunks, current = chunks + [current[:commas[-1] + 1]], current[commas[-1] + 1:]
            if len(current) == CHUNK:
                chunks, current = chunks + [current], []
            current.append((token, weight))
    return chunks + [current] if current or not chunks else chunks


def reference_embedding(clip, text: str, chunks: int | None = None, skip: int = 1) -> np.ndarray:
    """Each chunk through transformers' CLIPTextModel (hidden state -skip through the final layer norm), weighted and
    brought back to its mean, padded with the empty prompt's chunks to `chunks`, concatenated."""
    tok, model = clip
    parts = reference_chunks(tok, text)
    parts += [[]] * ((chunks or len(parts)) - len(parts))
    out = []
    for part in parts:
        ids = [tok.bos_token_id, *[t for t, _ in part], tok.eos_token_id]
        ids += [tok.pad_token_id] * (CHUNK + 2 - len(ids))
        weights = torch.tensor([1.0, *[w for _, w in part]] + [1.0] * (CHUNK + 1 - len(part)))
        with torch.no_grad():
            result = model(torch.tensor([ids]), output_hidden_states=True)
            z = result.last_hidden_state if skip == 1 else model.text_model.final_layer_norm(result.hidden_states[-skip])
        mean = z.mean()
        z = z * weights[None, :, None]
        out.append(z * (mean / z.mean()))
    return torch.cat(out, dim=1)[0].numpy()


PROMPTS = [
    "a (red:1.4) house under the [night] sky",
    "((a castle)), [[fog]], (sunset:0.6), \\(not weighted\\)",
    ", ".join(["a tall house"] * 30),  # long, with commas: cut after a comma near each chunk's end
    " ".join(["a small boat"] * 40),  # long without commas: cut at 75
    "a cat BREAK a dog on a (red:1.2) mat BREAK",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_weighted_and_long_prompts_match_the_reference(prompt, ours, clip):
    mine = ours.embed([prompt])[0]
    ref = reference_embedding(clip, prompt)
    assert mine.shape == ref.shape and mine.shape[0] % (CHUNK + 2) == 0
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4)


def test_plain_prompt_is_todays_embedding_and_diffusers(ours, tiny_checkpoint):
    """A prompt without weights that fits in 75 tokens: the text encoder's output on the tokenizer's ids, untouched,
    and diffusers' encode_prompt."""
    prompt = "a beautiful painting of a red house under the night sky"
    mine = ours.embed([prompt, ""])
    direct = ours.text_encoder.run({"input_ids": ours.tokenizer([prompt, ""])})["last_hidden_state"]
    assert np.array_equal(mine, direct)
    assert chunked(ours.tokenizer, prompt).ids.tolist() == ours.tokenizer([prompt]).tolist()
    pipe = reference_pipeline("StableDiffusionPipeline", tiny_checkpoint)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    np.testing.assert_allclose(mine[0], theirs[0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", [2, 3])
def test_clip_skip_matches_diffusers(ours, tiny_checkpoint, clip, skip):
    """A1111's Clip skip N is diffusers' clip_skip N - 1 (both: hidden state -N through the final layer norm)."""
    pipe = reference_pipeline("StableDiffusionPipeline", tiny_checkpoint)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt("a red house", "cpu", 1, False, clip_skip=skip - 1)
    mine = ours.embed(["a red house"], clip_skip=skip)
    np.testing.assert_allclose(mine[0], theirs[0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.embed(["(a red:1.3) house"], clip_skip=skip)[0],
                               reference_embedding(clip, "(a red:1.3) house", skip=skip), rtol=1e-4, atol=1e-4)


def test_weighted_long_prompt_image_equals_diffusers_with_those_embeddings(ours, tiny_checkpoint, clip):
    """The whole pipeline: a weighted prompt of two chunks and a one-chunk negative (filled with the empty prompt's
    chunk, as A1111 fills it) give diffusers' image when diffusers is handed the reference embeddings."""
    prompt, negative = ", ".join(["a (tall:1.3) house"] * 25), "[blurry], dark"
    pipe = reference_pipeline("StableDiffusionPipeline", tiny_checkpoint)
    positive = reference_embedding(clip, prompt)
    neg = reference_embedding(clip, negative, chunks=positive.shape[0] // (CHUNK + 2))
    latents = np.random.default_rng(1).standard_normal((1, 4, 16, 16), dtype=np.float32)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=torch.from_numpy(positive)[None], negative_prompt_embeds=torch.from_numpy(neg)[None],
                      num_inference_steps=4, guidance_scale=7.5, width=32, height=32, latents=torch.from_numpy(latents),
                      output_type="np").images
    mine = ours(prompt, negative_prompt=negative, steps=4, guidance_scale=7.5, width=32, height=32, latents=latents,
                scheduler="pndm")
    assert np.abs(mine.array - theirs).max() <= 1e-3


def test_prompts_of_other_lengths_do_not_share_a_batch(ours):
    """In one call every row's embedding has the longest row's length (the shorter filled with the empty prompt's
    chunk), which changes a short prompt's image; so the server's batcher keys jobs by their chunk count."""
    from diffrt.serve.batcher import Job

    short, long = "a red house", " ".join(["a small boat"] * 40)
    count = ours.chunk_count([short, long])
    assert ours.chunk_count([short]) == 1 and count > 1
    both, alone = ours.embed([short, long]), ours.embed([short])
    assert both.shape[1] == count * alone.shape[1] and np.array_equal(both[0, :alone.shape[1]], alone[0])
    settings = {"steps": 2, "scheduler": None, "width": None, "height": None}
    assert Job([short], [""], [1], settings, chunks=1).key() != Job([long], [""], [2], settings, chunks=2).key()
    assert Job([short], [""], [1], settings).key() == Job(["a dog"], [""], [2], settings).key()
