"""A deterministic procedural generator of captioned multi-domain images (the embedded world).

Objects are (colour, shape) pairs: 10 colours x 12 shapes = 120 classes, named "red_star" (the
method layer shows them as "red star"). Each image also varies in size, position, rotation and
colour shade (nuisance factors, drawn per image). Six visual domains mimic DomainNet's:

    photo      textured, shaded background, shaded object, sensor noise
    painting   brush-stroke background and object, blurred, strong colour drift
    clipart    flat pastel background, flat fill, thick dark outline
    infograph  the object (smaller) among clutter: text bars, small grey icons, a header band
    sketch     the outline in coloured pencil on white, with hatching
    quickdraw  thin jittery strokes through the outline's vertices, on white

`render(class_id, domain, index)` is a pure function: the same (class, domain, index) gives the
same 32x32 image on every machine (numpy's SeedSequence over the integers, PIL drawing).
`caption(...)` gives captions like "a sketch of a red star".

Images can be cached on disk as PNG (`ensure_images`), under `cache_root()` =
`$PEFTBENCH_CACHE/synth/<GENERATOR_VERSION>` (default `~/.cache/peftbench/...`); each file is
written to a temporary name and renamed, so concurrent processes never see a partial file.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from peftbench.errors import UsageError

# Bump whenever an image changes: the cache folder is keyed by it. v2: bolder sketch hatching and
# quickdraw strokes (v1 held-out domains were near chance); the pretraining domains are unchanged.
GENERATOR_VERSION = "v2"
IMAGE_SIZE = 32  # output size (pixels); drawn at 2x and downsampled for anti-aliasing
_S = 2 * IMAGE_SIZE  # drawing canvas

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 55),
    "cyan": (30, 200, 215),
    "blue": (35, 70, 215),
    "purple": (135, 50, 195),
    "pink": (245, 120, 190),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross",
    "diamond", "hexagon", "ring", "arrow", "moon", "pentagon",
)
DOMAINS: tuple[str, ...] = ("photo", "painting", "clipart", "infograph", "sketch", "quickdraw")
DOMAIN_NOUN = {  # what a caption calls an image of each domain
    "photo": "photo",
    "painting": "painting",
    "clipart": "clipart",
    "infograph": "infographic",
    "sketch": "sketch",
    "quickdraw": "doodle",
}
CLASSNAMES: tuple[str, ...] = tuple(f"{c}_{s}" for c in COLOURS for s in SHAPES)  # 120, colour-major


def class_id(name: str) -> int:
    """Index of a class name ("red_star"); unknown names get an error naming the choices."""
    try:
        return CLASSNAMES.index(name)
    except ValueError:
        raise UsageError(
            f"unknown synth class {name!r}; choices: <colour>_<shape> with colour in {', '.join(COLOURS)} "
            f"and shape in {', '.join(SHAPES)}"
        ) from None


def check_domain(domain: str) -> int:
    """Index of a domain name; unknown names get an error naming the choices."""
    if domain not in DOMAINS:
        from peftbench.registry import closest

        hint = closest(domain, DOMAINS)
        did = f" (did you mean {hint!r}?)" if hint else ""
        raise UsageError(f"unknown synth domain {domain!r}{did}; choices: {', '.join(DOMAINS)}")
    return DOMAINS.index(domain)


def caption(class_index: int, domain: str, template: str | None = None) -> str:
    """'a sketch of a red star' (or `template` formatted with the domain noun and class text)."""
    colour, shape = CLASSNAMES[class_index].split("_")
    noun = DOMAIN_NOUN[DOMAINS[check_domain(domain)]]
    article = "an" if noun[0] in "aeiou" else "a"
    if template is None:
        return f"{article} {noun} of a {colour} {shape}"
    return template.format(noun=noun, article=article, name=f"{colour} {shape}")


# ------------------------------------------------------------------------------ geometry
def _regular(n: int, r: float, start: float = -math.pi / 2) -> np.ndarray:
    a = start + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _shape_polys(shape: str) -> list[tuple[np.ndarray, bool]]:
    """Unit-size outlines (radius about 1) as (points (N, 2), is_hole) polygons."""
    if shape == "circle":
        return [(_regular(28, 1.0), False)]
    if shape == "square":
        return [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), False)]
    if shape == "triangle":
        return [(_regular(3, 1.05, -math.pi / 2) + [0, 0.2], False)]
    if shape == "star":
        outer, inner = _regular(5, 1.05), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return [(np.stack([outer, inner], 1).reshape(-1, 2), False)]
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y], 1) / 16.0, False)]
    if shape == "cross":
        a, b = 0.3, 0.95
        pts = [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
               [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        return [(np.array(pts, float), False)]
    if shape == "diamond":
        return [(np.array([[0, -1.05], [0.6, 0], [0, 1.05], [-0.6, 0]]), False)]
    if shape == "hexagon":
        return [(_regular(6, 1.0, 0.0), False)]
    if shape == "ring":
        return [(_regular(28, 1.0), False), (_regular(28, 0.55), True)]
    if shape == "arrow":
        pts = [[-1.0, -0.25], [0.2, -0.25], [0.2, -0.65], [1.0, 0], [0.2, 0.65], [0.2, 0.25], [-1.0, 0.25]]
        return [(np.array(pts, float), False)]
    if shape == "moon":
        # A crescent as one polygon: the outer arc of a circle, back along an offset inner arc.
        t1 = np.linspace(math.pi / 2 - 2.3, math.pi / 2 + 2.3, 20) + math.pi / 2
        outer = np.stack([np.cos(t1), np.sin(t1)], 1)
        t2 = np.linspace(math.pi / 2 + 1.9, math.pi / 2 - 1.9, 16) + math.pi / 2
        inner = np.stack([0.45 + 0.8 * np.cos(t2), 0.8 * np.sin(t2)], 1)
        return [(np.concatenate([outer, inner]), False)]
    if shape == "pentagon":
        return [(_regular(5, 1.0), False)]
    raise UsageError(f"unknown synth shape {shape!r}; choices: {', '.join(SHAPES)}")


_POLYS = {s: _shape_polys(s) for s in SHAPES}


def _place(polys, cx: float, cy: float, r: float, angle: float) -> list[tuple[np.ndarray, bool]]:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return [((p @ rot.T) * r + [cx, cy], hole) for p, hole in polys]


def _flat(p: np.ndarray) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in p]


def _mask(placed, size: int = _S) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    for p, hole in placed:
        if not hole:
            d.polygon(_flat(p), fill=255)
    for p, hole in placed:
        if hole:
            d.polygon(_flat(p), fill=0)
    return m


def _shade(rgb: Sequence[int], rng: np.random.Generator, spread: float) -> tuple[int, int, int]:
    v = np.asarray(rgb, float) + rng.normal(0, spread, 3)
    return tuple(int(x) for x in np.clip(v, 0, 255))


def _noise_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1], (S, S), from a bilinear upsampled cells x cells grid."""
    g = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(g.resize((_S, _S), Image.BILINEAR), np.float32) / 255.0


# ------------------------------------------------------------------------------ domains
def _photo(rng, placed, rgb):
    base = rng.integers(60, 200, 3).astype(np.float32)
    tint = rng.integers(-60, 60, 3).astype(np.float32)
    field = _noise_field(rng, int(rng.integers(3, 7)))
    bg = base[None, None] + field[..., None] * tint[None, None]  # (S, S, 3)
    m = np.asarray(_mask(placed), np.float32)[..., None] / 255.0
    light = 0.75 + 0.5 * _noise_field(rng, 2)[..., None]  # shading over the object
    obj = np.asarray(_shade(rgb, rng, 12), np.float32)[None, None] * light
    img = bg * (1 - m) + obj * m
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _painting(rng, placed, rgb):
    im = Image.new("RGB", (_S, _S), _shade(rng.integers(120, 235, 3), rng, 0))
    d = ImageDraw.Draw(im)
    for _ in range(14):  # background brush strokes
        x, y = rng.integers(0, _S, 2)
        dx, dy = rng.integers(-18, 18, 2)
        d.line([(int(x), int(y)), (int(x + dx), int(y + dy))], fill=_shade(rng.integers(80, 240, 3), rng, 0),
               width=int(rng.integers(4, 9)))
    colour = _shade(rgb, rng, 25)
    m = _mask(placed)
    im.paste(colour, (0, 0), m)
    for _ in range(6):  # strokes of a darker / lighter shade across the object
        x, y = rng.integers(8, _S - 8, 2)
        dx, dy = rng.integers(-10, 10, 2)
        stroke = Image.new("L", (_S, _S), 0)
        ImageDraw.Draw(stroke).line([(int(x), int(y)), (int(x + dx), int(y + dy))], fill=255, width=4)
        stroke = Image.fromarray(np.minimum(np.asarray(stroke), np.asarray(m)))
        im.paste(_shade(colour, rng, 30), (0, 0), stroke)
    return np.asarray(im.filter(ImageFilter.GaussianBlur(1.6)))


def _clipart(rng, placed, rgb):
    bg = tuple(int(v) for v in rng.integers(215, 256, 3))
    im = Image.new("RGB", (_S, _S), bg)
    d = ImageDraw.Draw(im)
    m = _mask(placed)
    outline = m.filter(ImageFilter.MaxFilter(7))
    im.paste((20, 20, 20), (0, 0), outline)
    im.paste(tuple(int(v) for v in rgb), (0, 0), m)
    if rng.random() < 0.5:  # a flat highlight
        x, y = rng.integers(20, 40, 2)
        hl = Image.new("L", (_S, _S), 0)
        ImageDraw.Draw(hl).ellipse([int(x), int(y), int(x) + 6, int(y) + 4], fill=255)
        hl = Image.fromarray(np.minimum(np.asarray(hl), np.asarray(m)))
        im.paste((255, 255, 255), (0, 0), hl)
    del d
    return np.asarray(im)


def _infograph(rng, placed, rgb):
    im = Image.new("RGB", (_S, _S), tuple(int(v) for v in rng.integers(225, 256, 3)))
    d = ImageDraw.Draw(im)
    band = tuple(int(v) for v in rng.integers(60, 200, 3))
    d.rectangle([0, 0, _S, int(rng.integers(6, 11))], fill=band)  # header band
    for _ in range(int(rng.integers(4, 8))):  # "text": short dark bars
        x, y = int(rng.integers(0, _S - 16)), int(rng.integers(12, _S - 3))
        d.line([(x, y), (x + int(rng.integers(6, 18)), y)], fill=(70, 70, 70), width=2)
    for _ in range(int(rng.integers(2, 5))):  # small grey icons of random shapes
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        icon = _place(_POLYS[s], float(rng.uniform(6, _S - 6)), float(rng.uniform(14, _S - 6)), 5.0, 0.0)
        d.polygon(_flat(icon[0][0]), fill=tuple(int(v) for v in rng.integers(120, 190, 1).repeat(3)))
    im.paste(tuple(int(v) for v in _shade(rgb, rng, 10)), (0, 0), _mask(placed))
    return np.asarray(im)


def _sketch(rng, placed, rgb):
    im = Image.new("RGB", (_S, _S), (250, 250, 248))
    m = _mask(placed)
    grown = np.asarray(m.filter(ImageFilter.MaxFilter(5)), np.int16)
    edge = grown - np.asarray(m.filter(ImageFilter.MinFilter(3)), np.int16)  # (S, S) outline band
    pencil = _shade(np.asarray(rgb) * 0.85, rng, 10)
    im.paste(pencil, (0, 0), Image.fromarray(np.clip(edge, 0, 255).astype(np.uint8)))
    hatch = Image.new("L", (_S, _S), 0)
    hd = ImageDraw.Draw(hatch)
    step, off = int(rng.integers(4, 6)), int(rng.integers(0, 5))
    for k in range(-_S, _S, step):  # diagonal hatching inside the object
        hd.line([(k + off, 0), (k + off + _S, _S)], fill=200, width=2)
    hatch = Image.fromarray(np.minimum(np.asarray(hatch), np.asarray(m)))
    im.paste(pencil, (0, 0), hatch)
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 4, (_S, _S, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def _quickdraw(rng, placed, rgb):
    im = Image.new("RGB", (_S, _S), (255, 255, 255))
    d = ImageDraw.Draw(im)
    ink = _shade(np.asarray(rgb) * 0.9, rng, 8)
    for p, _hole in placed:
        # Resample the closed outline, jitter it, and draw it as one or two strokes.
        closed = np.concatenate([p, p[:1]])
        seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
        t = np.concatenate([[0], np.cumsum(seg)])
        n = max(10, int(t[-1] / 3))
        u = np.linspace(0, t[-1], n)
        pts = np.stack([np.interp(u, t, closed[:, 0]), np.interp(u, t, closed[:, 1])], 1)
        pts = pts + rng.normal(0, 0.9, pts.shape)
        cut = int(rng.integers(0, 3))  # a gap where the stroke did not close
        d.line(_flat(pts[: len(pts) - cut]), fill=ink, width=4)
    return np.asarray(im)


_RENDER = {
    "photo": _photo,
    "painting": _painting,
    "clipart": _clipart,
    "infograph": _infograph,
    "sketch": _sketch,
    "quickdraw": _quickdraw,
}


def render_array(class_index: int, domain: str, index: int) -> np.ndarray:
    """The (32, 32, 3) uint8 image of (class, domain, index); a pure function of the three."""
    d = check_domain(domain)
    if not 0 <= class_index < len(CLASSNAMES):
        raise UsageError(f"synth class index {class_index} out of range 0..{len(CLASSNAMES) - 1}")
    rng = np.random.default_rng([7, class_index, d, index])
    colour, shape = CLASSNAMES[class_index].split("_")
    small = domain == "infograph"
    r = float(rng.uniform(0.28, 0.40) if small else rng.uniform(0.30, 0.44)) * _S
    cx = float(rng.uniform(r * 0.9, _S - r * 0.9))
    cy = float(rng.uniform(r * 0.9 + (10 if small else 0), _S - r * 0.9)) if small else float(
        rng.uniform(r * 0.9, _S - r * 0.9))
    angle = float(rng.uniform(-0.45, 0.45))
    placed = _place(_POLYS[shape], cx, cy, r, angle)
    big = _RENDER[domain](rng, placed, COLOURS[colour])
    return np.asarray(Image.fromarray(big).reduce(2))


def render(class_index: int, domain: str, index: int) -> Image.Image:
    """The 32x32 RGB PIL image of (class, domain, index)."""
    return Image.fromarray(render_array(class_index, domain, index))


# ------------------------------------------------------------------------------ disk cache
def cache_root() -> Path:
    """`$PEFTBENCH_CACHE/synth/<version>` or `~/.cache/peftbench/synth/<version>`."""
    base = os.environ.get("PEFTBENCH_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "peftbench"
    return root / "synth" / GENERATOR_VERSION


def rel_path(class_index: int, domain: str, index: int) -> str:
    """Relative path of a cached image: '<domain>/<class>/<index>.png'."""
    return f"{domain}/{CLASSNAMES[class_index]}/{index:06d}.png"


def ensure_images(keys: Iterable[tuple[int, str, int]], root: Path | None = None) -> Path:
    """Render every (class, domain, index) missing under `root` (default cache_root()) as PNG.

    Each file is written under a temporary name in its folder and renamed into place, so
    concurrent processes can share the cache. Returns the root.
    """
    root = Path(root) if root is not None else cache_root()
    made_dirs: set[Path] = set()
    for c, dom, i in keys:
        path = root / rel_path(c, dom, i)
        if path.is_file():
            continue
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as f:
                render(c, dom, i).save(f, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return root


# ------------------------------------------------------------------------------ the world's splits
# Held out of pretraining, so that held-out settings are real: two domains (DomainNet's sketch and
# quickdraw analogues) and 20 classes. A class (colour c, shape s) is held out when
# (s - c) mod 12 is 0 or 6: every colour is held out in exactly two classes, every shape in at most
# two, so each held-out class combines a colour and a shape that pretraining saw in other classes.
HELDOUT_DOMAINS: tuple[str, ...] = ("sketch", "quickdraw")
PRETRAIN_DOMAINS: tuple[str, ...] = tuple(d for d in DOMAINS if d not in HELDOUT_DOMAINS)
HELDOUT_CLASSES: tuple[int, ...] = tuple(
    k for k in range(len(CLASSNAMES)) if (k % len(SHAPES) - k // len(SHAPES)) % len(SHAPES) in (0, 6)
)
PRETRAIN_CLASSES: tuple[int, ...] = tuple(k for k in range(len(CLASSNAMES)) if k not in HELDOUT_CLASSES)
# Image indices: evaluation datasets use indices below PRETRAIN_INDEX_OFFSET, pretraining at or
# above it, so no dataset image was ever seen in pretraining.
PRETRAIN_INDEX_OFFSET = 1_000_000
