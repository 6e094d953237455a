"""The demo model's world: scenes drawn as their captions say, and measure() reads them back
(what the demo's render checks will rely on)."""
from __future__ import annotations

import numpy as np

from convkit.tiny import world


def test_captions_cover_the_world():
    caps = world.all_captions()
    assert len(caps) == len(set(caps)) == len(world.SHAPES) * 5 * 4
    assert "a red circle on a blue background" in caps


def test_measure_reads_back_every_random_scene():
    rng = np.random.default_rng(0)
    for _ in range(100):
        s = world.random_scene(rng)
        assert s.colour != s.background
        img = world.render(s)
        assert img.shape == (world.SIZE, world.SIZE, 3) and img.dtype == np.uint8
        m = world.measure(img)
        assert (m["colour"], m["background"]) == (s.colour, s.background), (s, m)
        assert (m["fill"] > 0.9) == (s.shape == "square"), (s, m)


def test_styles_differ_and_batches_are_reproducible():
    a, ca = world.batch(np.random.default_rng(5), 4, "base")
    b, cb = world.batch(np.random.default_rng(5), 4, "custom")
    c, _ = world.batch(np.random.default_rng(5), 4, "base")
    assert ca == cb and np.array_equal(a, c) and not np.array_equal(a, b)
    flat = world.render(world.Scene("circle", "red", "blue"))
    m = world.measure(flat)
    assert (m["colour"], m["background"]) == ("red", "blue") and 0.7 < m["fill"] < 0.85
    blank = np.full((world.SIZE, world.SIZE, 3), 128, np.uint8)
    assert world.measure(blank)["colour"] is None
