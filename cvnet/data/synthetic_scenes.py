"""Procedural landmark scenes: families of textures, landmarks made of planar structures, views.

A *family* is a palette plus a few facade textures (window grids, bricks, colonnades, arches,
stone). A *landmark* is a fixed layout of 2-5 planar structures (blocks, gables, towers, domes)
filled with its family's textures plus an emblem of its own, drawn once on a canonical canvas
(BGR image and mask). Landmarks of one family share textures but not layout: they are the hard
negatives. A *view* warps the canonical landmark into a photo with a random homography (scale
change up to 2x, rotation of a few degrees, perspective, crop), over a sky / ground background
with clutter, then adds occluders, lighting and colour change and noise.

The visible fraction of a view is measured, not assumed: the part of the canonical landmark
mask whose pixels land inside the photo and are not covered by an occluder, over the whole mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

TEXTURE_KINDS = ("windows", "bricks", "columns", "arches", "stone")
SHAPES = ("block", "gable", "tower", "dome")


@dataclass(frozen=True)
class Family:
    """A palette and the facade textures its landmarks share."""

    index: int
    textures: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Landmark:
    """One landmark drawn on its canonical canvas: ``image`` BGR uint8, ``mask`` uint8 0/1."""

    landmark_id: int
    family: int
    image: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class ViewParams:
    """How a landmark is seen in one photo.

    ``zoom``: landmark width relative to the nominal width (0.71..1.41: a 2x range);
    ``shift``: how far the landmark is pushed out of the frame, as a fraction of its size,
    along ``direction`` (radians); ``strength``: perspective strength 0..1; ``occluders``:
    how many occluders are dropped on the landmark.
    """

    zoom: float
    shift: float
    direction: float
    strength: float
    rotation_deg: float
    occluders: int


@dataclass(frozen=True)
class View:
    """A rendered photo and what is known about it."""

    image: np.ndarray
    visible: float
    strength: float
    bbx: tuple[float, float, float, float] | None


def _colour(rng: np.random.Generator, low: int = 30, high: int = 230) -> np.ndarray:
    return rng.integers(low, high, size=3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], HxW float32."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _texture(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One facade texture, HxWx3 uint8 (BGR)."""
    wall, accent = _colour(rng, 90, 235), _colour(rng, 10, 120)
    img = np.empty((h, w, 3), np.float32)
    img[:] = wall
    img += _smooth_noise(rng, h, w, 6)[..., None] * 18.0
    if kind == "windows":
        rows, cols = int(rng.integers(4, 9)), int(rng.integers(4, 11))
        ch, cw = h / rows, w / cols
        fy, fx = rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.6)
        frame = np.clip(wall * 1.25, 0, 255)
        for r in range(rows):
            for c in range(cols):
                y0, x0 = int(r * ch + ch * (1 - fy) / 2), int(c * cw + cw * (1 - fx) / 2)
                y1, x1 = int(y0 + ch * fy), int(x0 + cw * fx)
                cv2.rectangle(img, (x0 - 2, y0 - 2), (x1 + 2, y1 + 2), frame.tolist(), -1)
                cv2.rectangle(img, (x0, y0), (x1, y1), accent.tolist(), -1)
            cv2.line(img, (0, int((r + 1) * ch) - 1), (w, int((r + 1) * ch) - 1),
                     (wall * 0.7).tolist(), 2)
    elif kind == "bricks":
        bh = int(rng.integers(6, 14))
        bw = int(bh * rng.uniform(1.8, 3.2))
        mortar = np.clip(wall * 1.3, 0, 255)
        img[:] = mortar
        for r, y in enumerate(range(0, h, bh)):
            offset = (bw // 2) * (r % 2)
            for x in range(-offset, w, bw):
                shade = accent * 0.4 + wall * 0.6 + rng.uniform(-25, 25)
                cv2.rectangle(img, (x + 1, y + 1), (x + bw - 2, y + bh - 2), shade.tolist(), -1)
    elif kind == "columns":
        period = int(rng.integers(14, 36))
        x = np.arange(w, dtype=np.float32)
        shade = 0.55 + 0.45 * np.abs(np.cos(np.pi * x / period))
        img *= shade[None, :, None]
        band = int(h * rng.uniform(0.05, 0.12))
        img[:band] = accent
        img[h - band:] = accent * 0.8
    elif kind == "arches":
        count = int(rng.integers(3, 8))
        aw = w / count
        for tier in range(int(rng.integers(1, 3))):
            top = int(h * (0.2 + 0.45 * tier))
            for c in range(count):
                cx, rad = int((c + 0.5) * aw), int(aw * 0.32)
                cv2.rectangle(img, (cx - rad, top + rad), (cx + rad, top + int(h * 0.35)),
                              accent.tolist(), -1)
                cv2.circle(img, (cx, top + rad), rad, accent.tolist(), -1)
                cv2.circle(img, (cx, top + rad), rad + 3, (wall * 0.6).tolist(), 2)
    else:  # stone: large blocks with joints
        img += _smooth_noise(rng, h, w, 24)[..., None] * 30.0
        step = int(rng.integers(12, 28))
        for y in range(0, h, step):
            cv2.line(img, (0, y), (w, y), (wall * 0.55).tolist(), 1)
        for x in range(0, w, step * 2):
            cv2.line(img, (x, 0), (x, h), (wall * 0.6).tolist(), 1)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_family(index: int, seed: int, size: int) -> Family:
    """Family ``index``: three or four textures drawn at the canonical size."""
    rng = np.random.default_rng([seed, 1, index])
    h, w = canvas_shape(size)
    kinds = rng.choice(len(TEXTURE_KINDS), size=int(rng.integers(3, 5)), replace=False)
    return Family(index, tuple(_texture(TEXTURE_KINDS[k], rng, h, w) for k in kinds))


def canvas_shape(size: int) -> tuple[int, int]:
    """(height, width) of the canonical landmark canvas for photos of long side ``size``."""
    return size, int(round(size * 1.25))


def _shape_polygon(shape: str, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Outline of one structure whose body spans (x0, y0)-(x1, y1)."""
    w, top = x1 - x0, y0
    if shape == "gable":
        pts = [(x0, y1), (x0, top + w // 3), ((x0 + x1) // 2, top), (x1, top + w // 3), (x1, y1)]
    elif shape == "tower":
        pts = [(x0, y1), (x0, top + w), ((x0 + x1) // 2, top), (x1, top + w), (x1, y1)]
    elif shape == "dome":
        rad = w // 2
        angles = np.linspace(np.pi, 2 * np.pi, 16)
        arc = [(int((x0 + x1) / 2 + rad * np.cos(a)), int(top + rad + rad * 0.8 * np.sin(a)))
               for a in angles]
        pts = [(x0, y1)] + arc + [(x1, y1)]
    else:
        pts = [(x0, y1), (x0, top), (x1, top), (x1, y1)]
    return np.array(pts, np.int32)


def make_landmark(landmark_id: int, family: Family, seed: int, size: int) -> Landmark:
    """Landmark ``landmark_id``: its own layout of its family's textures, plus an emblem."""
    rng = np.random.default_rng([seed, 2, landmark_id])
    h, w = canvas_shape(size)
    image = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    base = int(h * 0.97)
    count = int(rng.integers(2, 6))
    cuts = np.sort(rng.uniform(0.04, 0.96, size=count - 1))
    edges = np.concatenate([[0.02], cuts, [0.98]]) * w
    order = rng.permutation(count)  # drawing order lets structures overlap differently
    for i in order:
        x0, x1 = int(edges[i] - rng.uniform(0, 0.06) * w), int(edges[i + 1] + rng.uniform(0, 0.06) * w)
        x0, x1 = max(x0, 0), min(x1, w - 1)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        top = int(h * rng.uniform(0.08, 0.55))
        if shape == "tower":
            top = int(h * rng.uniform(0.02, 0.2))
        poly = _shape_polygon(shape, x0, top, x1, base)
        part = np.zeros((h, w), np.uint8)
        cv2.fillPoly(part, [poly], 1)
        texture = family.textures[int(rng.integers(len(family.textures)))]
        dy, dx = int(rng.integers(0, h)), int(rng.integers(0, w))
        fill = np.roll(texture, (dy, dx), axis=(0, 1))
        tone = rng.uniform(0.8, 1.15)
        image[part > 0] = np.clip(fill[part > 0] * tone, 0, 255).astype(np.uint8)
        cv2.polylines(image, [poly], True, (40, 40, 40), 2)
        mask |= part
    _draw_emblem(image, mask, rng)
    return Landmark(landmark_id, family.index, image, mask)


def _draw_emblem(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """A rose window / clock and a banner that only this landmark has."""
    ys, xs = np.nonzero(mask)
    pick = int(rng.integers(len(ys)))
    cy, cx = int(ys[pick] * 0.5 + ys.mean() * 0.5), int(xs[pick])
    rad = int(image.shape[0] * rng.uniform(0.05, 0.1))
    for ring in range(3, 0, -1):
        cv2.circle(image, (cx, cy), rad * ring // 3, _colour(rng).tolist(), -1)
    for k in range(int(rng.integers(4, 9))):
        angle = 2 * np.pi * k / 8 + rng.uniform(0, 0.3)
        end = (int(cx + rad * np.cos(angle)), int(cy + rad * np.sin(angle)))
        cv2.line(image, (cx, cy), end, (20, 20, 20), 2)
    bx, by = int(rng.integers(0, image.shape[1] // 2)), int(image.shape[0] * rng.uniform(0.5, 0.8))
    cv2.rectangle(image, (bx, by), (bx + image.shape[1] // 5, by + image.shape[0] // 14),
                  _colour(rng).tolist(), -1)
    image[mask == 0] = 0


def photo_shape(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(height, width) of a photo: mostly landscape 4:3, some portrait, some square."""
    kind = rng.uniform()
    short = int(round(size * 0.75))
    if kind < 0.7:
        return short, size
    if kind < 0.9:
        return size, short
    return size, size


def background(rng: np.random.Generator, h: int, w: int, buildings: int) -> np.ndarray:
    """Sky over ground with a few hazy distant buildings and trees, HxWx3 uint8."""
    sky_top, sky_low, ground = _colour(rng, 120, 255), _colour(rng, 150, 255), _colour(rng, 40, 160)
    horizon = int(h * rng.uniform(0.5, 0.85))
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None, None]
    img = np.empty((h, w, 3), np.float32)
    img[:horizon] = sky_top * (1 - t) + sky_low * t
    img[horizon:] = ground
    img += _smooth_noise(rng, h, w, 8)[..., None] * 15.0
    for _ in range(buildings):
        bw, bh = int(w * rng.uniform(0.1, 0.4)), int(h * rng.uniform(0.2, 0.6))
        x = int(rng.integers(-bw // 2, w))
        kind = TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))]
        tex = _texture(kind, rng, bh, max(bw, 1)).astype(np.float32)
        y0 = max(horizon - bh, 0)
        xs0, xs1 = max(x, 0), min(x + bw, w)
        if xs1 > xs0:
            distant = tex[bh - (horizon - y0):, xs0 - x:xs1 - x]
            img[y0:horizon, xs0:xs1] = distant * 0.6 + sky_low * 0.4  # haze
    _trees(img, rng, int(rng.integers(0, 4)), horizon)
    return np.clip(img, 0, 255).astype(np.uint8)


def _trees(img: np.ndarray, rng: np.random.Generator, count: int, ground_y: int,
           mask: np.ndarray | None = None) -> None:
    h, w = img.shape[:2]
    for _ in range(count):
        cx, rad = int(rng.integers(0, w)), int(h * rng.uniform(0.05, 0.14))
        cy = ground_y - int(rad * rng.uniform(1.0, 2.2))
        green = (rng.uniform(20, 80), rng.uniform(80, 170), rng.uniform(20, 90))
        layers = [(img, (30, 50, 70), green)] + ([(mask, 1, 1)] if mask is not None else [])
        for target, trunk, crown in layers:
            cv2.rectangle(target, (cx - rad // 6, cy), (cx + rad // 6, ground_y), trunk, -1)
            cv2.circle(target, (cx, cy), rad, crown, -1)


def _occluders(img: np.ndarray, occ: np.ndarray, rng: np.random.Generator, count: int,
               region: tuple[int, int, int, int]) -> None:
    """Draw ``count`` occluders (trees, poles, vehicles, people) inside ``region`` x0,y0,x1,y1."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = region
    for _ in range(count):
        kind = int(rng.integers(3))
        cx = int(rng.uniform(max(x0, 0), max(min(x1, w), x0 + 1)))
        if kind == 0:
            _trees(img, rng, 1, int(rng.uniform(max(y1, h // 2), h + 1)), occ)
            continue
        colour = _colour(rng).tolist()
        if kind == 1:  # pole or lamp post
            pw = max(2, int(w * rng.uniform(0.01, 0.03)))
            top = int(rng.uniform(0, h * 0.5))
            pts = ((cx, top), (cx + pw, h))
        else:  # vehicle, kiosk, person group
            bw, bh = int(w * rng.uniform(0.12, 0.35)), int(h * rng.uniform(0.1, 0.3))
            bottom = int(rng.uniform(h * 0.75, h + 1))
            pts = ((cx - bw // 2, bottom - bh), (cx + bw // 2, bottom))
        cv2.rectangle(img, pts[0], pts[1], colour, -1)
        cv2.rectangle(occ, pts[0], pts[1], 1, -1)


def _homography(lm_shape: tuple[int, int], photo: tuple[int, int], p: ViewParams,
                rng: np.random.Generator) -> np.ndarray:
    """Canonical canvas -> photo: scale, shift out of frame, rotation, perspective."""
    lh, lw = lm_shape
    h, w = photo
    width = min(w, h * lw / lh) * 0.8 * p.zoom
    height = width * lh / lw
    cx = w / 2 + p.shift * width * np.cos(p.direction) + rng.uniform(-0.08, 0.08) * w
    cy = h / 2 + p.shift * height * np.sin(p.direction) + rng.uniform(-0.08, 0.08) * h
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]], np.float64)
    # perspective: one side recedes (shorter, nearer the middle), as seen from the side
    side = 1 if rng.uniform() < 0.5 else -1
    squeeze = 0.35 * p.strength
    for k in range(4):
        if np.sign(corners[k, 0]) == side:
            corners[k, 1] *= 1 - squeeze
            corners[k, 0] *= 1 - squeeze * 0.5
    corners += rng.uniform(-0.03, 0.03, size=corners.shape) * (0.3 + p.strength)
    theta = np.deg2rad(p.rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    dst = (corners * [width, height]) @ rot.T + [cx, cy]
    src = np.array([[0, 0], [lw, 0], [lw, lh], [0, lh]], np.float64)
    return cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))


def _light(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lighting and colour change: gamma, channel gains, a shading gradient, sensor noise."""
    h, w = img.shape[:2]
    levels = (np.arange(256, dtype=np.float32) / 255.0) ** rng.uniform(0.8, 1.25)
    gains = rng.uniform(0.88, 1.12, size=3) * rng.uniform(0.7, 1.15)
    lut = np.clip((levels[:, None] * gains + rng.uniform(-0.08, 0.08)) * 255.0, 0, 255)
    x = cv2.LUT(img, lut.astype(np.uint8).reshape(256, 1, 3)).astype(np.float32)
    angle, depth = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6)
    ramp = (1.0 + depth * np.cos(angle) * (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
            + depth * np.sin(angle) * (np.arange(h, dtype=np.float32) / h - 0.5)[:, None])
    x *= ramp[..., None]
    noise = np.frombuffer(rng.bytes(x.size), np.uint8).reshape(x.shape).astype(np.float32)
    x += (noise - 127.5) * np.float32(rng.uniform(1.5, 12.0) / 127.5)  # uniform sensor noise
    out = np.clip(x, 0, 255).astype(np.uint8)
    if rng.uniform() < 0.3:
        out = cv2.GaussianBlur(out, (3, 3), 0)
    return out


def render_view(landmark: Landmark | None, params: ViewParams | None, rng: np.random.Generator,
                size: int) -> View:
    """One photo of ``landmark`` seen with ``params`` (or a scene without landmark if None)."""
    h, w = photo_shape(rng, size)
    img = background(rng, h, w, int(rng.integers(0, 3)))
    occ = np.zeros((h, w), np.uint8)
    if landmark is None or params is None:
        _occluders(img, occ, rng, int(rng.integers(0, 4)), (0, 0, w, h))
        return View(_light(img, rng), 0.0, 0.0, None)
    H = _homography(landmark.mask.shape, (h, w), params, rng)
    warped = cv2.warpPerspective(landmark.image, H, (w, h))
    alpha = cv2.warpPerspective(landmark.mask * np.uint8(255), H, (w, h))
    a = alpha.astype(np.float32)[..., None] / 255.0
    img = (warped * a + img * (1.0 - a)).astype(np.uint8)
    ys, xs = np.nonzero(alpha > 127)
    region = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, w, h)
    _occluders(img, occ, rng, params.occluders, region)
    visible = visible_fraction(landmark.mask, H, occ)
    bbx = tuple(float(v) for v in region) if len(xs) else None
    return View(_light(img, rng), visible, params.strength, bbx)


def visible_fraction(mask: np.ndarray, H: np.ndarray, occluded: np.ndarray) -> float:
    """Fraction of the canonical ``mask`` that lands inside the photo and is not ``occluded``.

    The photo's free area (inside the frame, not occluded) is warped back onto the canonical
    canvas; the visible fraction is the part of the mask it covers.
    """
    free = (occluded == 0).astype(np.uint8)
    back = cv2.warpPerspective(free, H, (mask.shape[1], mask.shape[0]),
                               flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0)
    total = int(mask.sum())
    return float(np.count_nonzero(back & mask)) / total if total else 0.0
