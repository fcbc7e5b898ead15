"""The bundled model's data and its reader: the evaluation can only be trusted if it reads the renders right."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffrt.models.shapes_data import COLOURS, POSITIONS, SHAPES, SIZES, Scene, held_out_triples, read_image, read_position, render


@pytest.mark.slow
def test_reader_reads_every_render_right():
    rng = np.random.default_rng(0)
    for shape, colour, background, size, position in itertools.product(SHAPES, COLOURS, COLOURS, SIZES, POSITIONS):
        if colour != background:
            reading = read_image(render(Scene(shape, colour, background, size, position), rng))
            assert (reading.shape, reading.colour, reading.background) == (shape, colour, background), reading


def test_held_out_set_is_fixed_and_covers_every_shape():
    held = held_out_triples()
    assert len(held) == 28 and held == held_out_triples()
    assert {shape for shape, _, _ in held} == set(SHAPES)


def test_position_is_read_back_from_renders():
    """What the bundled ControlNet's steering is scored with: every render's position read back, jitter and all."""
    rng = np.random.default_rng(0)
    scenes = [Scene(shape, "red", "blue", size, where) for shape in SHAPES for size in SIZES for where in POSITIONS]
    assert all(read_position(render(s, rng)) == s.position for s in scenes)
    assert read_position(np.zeros((64, 64, 3), np.uint8)) is None
