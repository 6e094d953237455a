"""The demo model's world: one coloured shape on a coloured background, and its caption.

Two styles: ``base`` (a filled shape on a flat background) and ``custom`` (the same scene drawn
as an outlined shape on a striped background — the "custom fine-tune" of the demo's Lightning
scenario). Images are drawn with 4x supersampling (anti-aliased edges) from a seeded generator,
so a dataset is reproducible from its seed. Tests use :func:`measure` to check that a render
shows what its caption says.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# sRGB 0-255; few, well-separated colours (a smaller world trains in CPU hours)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square")
STYLES = ("base", "custom")
SIZE = 64


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float = SIZE / 2
    cy: float = SIZE / 2
    r: float = SIZE * 0.28

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_captions() -> list[str]:
    return [Scene(s, c, b).caption for s in SHAPES for c in COLOURS for b in COLOURS if b != c]


def random_scene(rng: np.random.Generator) -> Scene:
    shape = SHAPES[rng.integers(len(SHAPES))]
    names = list(COLOURS)
    c = names[rng.integers(len(names))]
    b = names[rng.integers(len(names) - 1)]
    b = b if names.index(b) < names.index(c) else names[names.index(b) + 1]
    r = SIZE * rng.uniform(0.2, 0.32)
    jitter = SIZE * 0.12
    return Scene(shape, c, b, SIZE / 2 + rng.uniform(-jitter, jitter),
                 SIZE / 2 + rng.uniform(-jitter, jitter), r)


def _mask(scene: Scene, n: int, ss: int) -> np.ndarray:
    """Coverage of the filled shape per pixel, n x n, from ss x ss samples per pixel."""
    g = (np.arange(n * ss) + 0.5) / ss
    y, x = np.meshgrid(g, g, indexing="ij")
    if scene.shape == "circle":
        m = (x - scene.cx) ** 2 + (y - scene.cy) ** 2 <= scene.r ** 2
    else:
        m = (np.abs(x - scene.cx) <= scene.r) & (np.abs(y - scene.cy) <= scene.r)
    return m.reshape(n, ss, n, ss).mean(axis=(1, 3))


def render(scene: Scene, style: str = "base", ss: int = 4) -> np.ndarray:
    """The scene as uint8 RGB, SIZE x SIZE x 3."""
    n = SIZE
    fg = np.array(COLOURS[scene.colour], dtype=np.float64)
    bg = np.array(COLOURS[scene.background], dtype=np.float64)
    back = np.broadcast_to(bg, (n, n, 3)).copy()
    if style == "custom":
        # diagonal stripes: the background colour and a darker shade of it, 8 px period
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        dark = ((i + j) // 4) % 2 == 1
        back[dark] = bg * 0.6
        outer = _mask(scene, n, ss)
        inner = _mask(Scene(scene.shape, scene.colour, scene.background, scene.cx, scene.cy,
                            max(scene.r - 3.0, 0.0)), n, ss)
        cover = np.clip(outer - inner, 0.0, 1.0)
    elif style == "base":
        cover = _mask(scene, n, ss)
    else:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    img = back * (1 - cover[..., None]) + fg * cover[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def batch(rng: np.random.Generator, n: int, style: str = "base"
          ) -> tuple[np.ndarray, list[str]]:
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([render(s, style) for s in scenes]), [s.caption for s in scenes]


def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda k: float(((np.array(COLOURS[k]) - rgb) ** 2).sum()))


def measure(img: np.ndarray) -> dict:
    """What a render shows: the background colour (median of the border pixels), the shape's
    colour (median of the pixels farthest from the background), and how much of the shape's
    bounding box it fills (a circle fills ~0.79, a square ~1.0)."""
    img = np.asarray(img, dtype=np.float64)
    n = img.shape[0]
    border = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3),
                             img[:, :3].reshape(-1, 3), img[:, -3:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    fgmask = dist > max(60.0, 0.5 * float(dist.max()))
    if fgmask.sum() < 0.02 * n * n:
        return {"background": nearest_colour(bg), "colour": None, "fill": 0.0, "area": 0.0}
    fg = np.median(img[fgmask], axis=0)
    ys, xs = np.nonzero(fgmask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return {"background": nearest_colour(bg), "colour": nearest_colour(fg),
            "fill": float(fgmask.sum() / box), "area": float(fgmask.sum() / (n * n))}
