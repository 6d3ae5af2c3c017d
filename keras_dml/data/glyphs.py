"""A bundled many-class zero-shot benchmark: characters rendered from matplotlib's fonts.

Real metric-learning benchmarks train on about a hundred classes and test on
as many unseen ones (CUB-200: 100 / 100, Cars196: 98 / 98); none can be
downloaded here, and five training digits cannot teach a metric that
transfers. This dataset is Omniglot-like and fully offline: each class is a
character that all 16 faces of the DejaVu Sans, DejaVu Sans Mono, DejaVu
Serif and STIX General families bundled with matplotlib draw (regular, bold,
oblique or italic, bold oblique or bold italic each); each image is one face
of the character under a random affine transform (rotation, scale, shear,
translation), stroke width, blur and pixel noise, rendered grayscale.

Classes: the code points that every face maps, of the Unicode categories
upper- and lower-case and other letters (`Lu`, `Ll`, `Lo`), decimal digits
(`Nd`) and math, currency and other symbols (`Sm`, `Sc`, `So`): Latin with
accents, Greek, Cyrillic, digits, arrows and symbols. Modifier letters and
spacing accents (`Lm`, `Sk`) are left out: at 32 pixels most are a dot or a
dash. Look-alike characters (Latin `A`, Greek `Α` and Cyrillic `А`; `O`, `Ο`,
`О`; `µ`, `μ`, ...) cannot be told apart by any model: characters that at
least half of the faces draw with the same outline are one class, kept as
their lowest code point, and the others are dropped (`glyph_classes` reports
them: with matplotlib 3.11, 635 shared code points give 589 classes, 46
dropped).

The split is by class: a seeded `train_fraction` of the characters for
training, the rest unseen; a `validation_fraction` of the training classes'
images is held out to measure retrieval on seen classes. Rendering takes
about half a minute on one core for the default size and is cached on disk
(`~/.cache/keras_dml/glyphs`, or `cache_dir`, or `$KERAS_DML_CACHE`); the
same arguments give the same images on every machine with the same
matplotlib and Pillow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import unicodedata
from pathlib import Path

import numpy as np

from keras_dml.data.digits import ZeroShotArrays

FACES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
CATEGORIES = ("Lu", "Ll", "Lo", "Nd", "Sm", "Sc", "So")
# Bump when the rendering changes, so that stale caches are not read.
_RENDER_VERSION = 2
# Glyphs are drawn on a canvas this many times the output size, then downsampled.
_SUPERSAMPLE = 2


@dataclasses.dataclass(frozen=True)
class GlyphClasses:
    """The characters that are classes, and what was dropped to get them.

    Attributes:
        code_points: the class characters' code points, sorted.
        shared: how many code points of the selected categories all faces map.
        duplicates: `{kept code point: [dropped code points]}` for groups of
            characters drawn pixel-identically in every face.
    """

    code_points: tuple[int, ...]
    shared: int
    duplicates: dict[int, list[int]]

    @property
    def num_dropped(self) -> int:
        """Number of code points dropped as duplicates of a kept one."""
        return sum(len(v) for v in self.duplicates.values())


def font_dir() -> Path:
    """The folder of matplotlib's bundled TrueType fonts."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _font(face: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_dir() / face), size)


def _check_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"`image_size` must be an integer >= 8, got {image_size!r}.")
    return image_size


@functools.lru_cache(maxsize=64)
def _draw(code_point: int, face: str, canvas: int, stroke: int):
    """The glyph drawn centred on a `canvas`-pixel square (a PIL image; cached)."""
    from PIL import Image, ImageDraw

    font = _font(face, int(round(canvas * 0.62)))
    char = chr(code_point)
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    image = Image.new("L", (canvas, canvas), 0)
    # Centre the ink box on the canvas.
    origin = ((canvas - (right - left)) / 2 - left, (canvas - (bottom - top)) / 2 - top)
    ImageDraw.Draw(image).text(origin, char, fill=255, font=font, stroke_width=stroke,
                               stroke_fill=255)
    return image


def _render(code_point: int, face: str, image_size: int, rng: np.random.Generator | None):
    """One glyph as a float32 `(size, size)` image in [0, 1]; `rng=None`: no augmentation."""
    from PIL import Image, ImageFilter

    canvas = image_size * _SUPERSAMPLE
    stroke = 0 if rng is None else int(rng.integers(0, 2)) * _SUPERSAMPLE // 2
    image = _draw(code_point, face, canvas, stroke)
    blur = 0.0
    if rng is not None:
        angle = np.deg2rad(rng.uniform(-12.0, 12.0))
        scale = rng.uniform(0.8, 1.1)
        shear = rng.uniform(-0.2, 0.2)
        shift = rng.uniform(-0.07, 0.07, size=2) * canvas
        # Output pixel p maps to input pixel A^-1 (p - c - t) + c about the centre c.
        cos, sin = np.cos(angle), np.sin(angle)
        a, b, c, d = scale * cos, scale * (cos * shear - sin), scale * sin, scale * (
            sin * shear + cos)
        det = a * d - b * c
        inverse = np.array([[d, -b], [-c, a]]) / det
        centre = np.array([canvas / 2, canvas / 2])
        offset = centre - inverse @ (centre + shift)
        image = image.transform(
            (canvas, canvas), Image.Transform.AFFINE,
            (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1]),
            resample=Image.Resampling.BILINEAR,
        )
        blur = rng.uniform(0.0, 0.6)
    image = image.resize((image_size, image_size), Image.Resampling.BOX)
    if blur > 0.05:  # at output resolution: a quarter of the pixels to filter
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    if rng is not None:
        pixels += rng.normal(0.0, 0.04, pixels.shape).astype(np.float32)
        np.clip(pixels, 0.0, 1.0, out=pixels)
    return pixels


# Two characters are one class when at least this many of the 16 faces draw them with
# the same outline (the DejaVu families share Latin, Greek and Cyrillic look-alikes).
_SAME_OUTLINE_FACES = 8


@functools.lru_cache(maxsize=1)
def glyph_classes() -> GlyphClasses:
    """The class characters: code points all 16 faces map, look-alikes merged.

    Two characters are look-alikes when at least half of the faces draw them
    with the same outline (after decomposing composite glyphs, to the font
    unit); look-alike groups (closed transitively) keep their lowest code
    point.

    Returns:
        A `GlyphClasses`.

    Example:

    >>> from keras_dml.data.glyphs import glyph_classes
    >>> classes = glyph_classes()
    >>> len(classes.code_points) > 500, ord("A") in classes.code_points
    (True, True)
    >>> 0x0391 in classes.duplicates[ord("A")]  # Greek capital alpha is drawn as A
    True
    """
    from fontTools.pens.recordingPen import DecomposingRecordingPen
    from fontTools.ttLib import TTFont

    fonts = [TTFont(str(font_dir() / face), lazy=True) for face in FACES]
    cmaps = [font.getBestCmap() for font in fonts]
    shared = set.intersection(*(set(cmap) for cmap in cmaps))
    selected = sorted(c for c in shared if unicodedata.category(chr(c)) in CATEGORIES)
    same_faces: dict[tuple[int, int], int] = {}
    for font, cmap in zip(fonts, cmaps, strict=True):
        glyph_set = font.getGlyphSet()
        by_outline: dict[str, list[int]] = {}
        for code_point in selected:
            pen = DecomposingRecordingPen(glyph_set)
            glyph_set[cmap[code_point]].draw(pen)
            outline = repr([
                (op, [None if p is None else tuple(round(v) for v in p) for p in args])
                for op, args in pen.value
            ])
            by_outline.setdefault(outline, []).append(code_point)
        for group in by_outline.values():
            for i, a in enumerate(group):
                for b in group[i + 1:]:
                    same_faces[a, b] = same_faces.get((a, b), 0) + 1
    parent = {c: c for c in selected}

    def root(c):
        while parent[c] != c:
            c = parent[c]
        return c

    for (a, b), count in same_faces.items():
        if count >= _SAME_OUTLINE_FACES:
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for code_point in selected:
        groups.setdefault(root(code_point), []).append(code_point)
    duplicates = {kept: members[1:] for kept, members in groups.items() if len(members) > 1}
    return GlyphClasses(tuple(sorted(groups)), len(selected), duplicates)


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("KERAS_DML_CACHE"):
        return Path(os.environ["KERAS_DML_CACHE"]) / "glyphs"
    return Path.home() / ".cache" / "keras_dml" / "glyphs"


def render_glyphs(
    image_size: int = 32,
    samples_per_face: int = 2,
    seed: int = 0,
    cache_dir=None,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders every class in every face, `samples_per_face` random variants each.

    Args:
        image_size: height and width of the images.
        samples_per_face: augmented images per class and face.
        seed: seed of the augmentations (and of the class subset).
        cache_dir: where the rendered arrays are cached; `None` uses
            `$KERAS_DML_CACHE/glyphs` or `~/.cache/keras_dml/glyphs`. `False`
            disables the cache.
        num_classes: render only this many classes, drawn at random with
            `seed`; `None` renders all of them.

    Returns:
        `(images, code_points, faces)`: float32 `(N, size, size, 1)` images in
        [0, 1], the code point and the face index (into `FACES`) of each.
    """
    image_size = _check_size(image_size)
    if isinstance(samples_per_face, bool) or not isinstance(samples_per_face, int) or (
            samples_per_face < 1):
        raise ValueError(f"`samples_per_face` must be a positive integer, got "
                         f"{samples_per_face!r}.")
    classes = glyph_classes().code_points
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not (
                2 <= num_classes <= len(classes)):
            raise ValueError(f"`num_classes` must be an integer in [2, {len(classes)}], got "
                             f"{num_classes!r}.")
        pick = np.random.default_rng((seed, 3)).choice(len(classes), num_classes,
                                                       replace=False)
        classes = tuple(classes[i] for i in sorted(pick))
    path = None
    if cache_dir is not False:
        subset = "" if num_classes is None else f"-{num_classes}classes"
        path = _cache_dir(cache_dir) / (
            f"glyphs-v{_RENDER_VERSION}-{image_size}px-{samples_per_face}x{subset}-seed{seed}.npz"
        )
        if path.exists():
            try:
                with np.load(path) as cached:
                    return cached["images"], cached["code_points"], cached["faces"]
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache file is rendered again and replaced
    n = len(classes) * len(FACES) * samples_per_face
    images = np.empty((n, image_size, image_size, 1), np.float32)
    code_points = np.empty(n, np.int32)
    faces = np.empty(n, np.int8)
    i = 0
    for code_point in classes:
        for f, face in enumerate(FACES):
            for k in range(samples_per_face):
                rng = np.random.default_rng((seed, code_point, f, k))
                images[i, ..., 0] = _render(code_point, face, image_size, rng)
                code_points[i], faces[i] = code_point, f
                i += 1
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target and rename: a reader never sees half a file.
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp.npz",
                                             delete=False) as tmp:
                np.savez(tmp, images=images, code_points=code_points, faces=faces)
            os.replace(tmp.name, path)
        except OSError:
            pass  # an unwritable cache only costs the next call the rendering
    return images, code_points, faces


def load_glyphs_zero_shot(
    image_size: int = 32,
    samples_per_face: int = 2,
    train_fraction: float = 0.6,
    validation_fraction: float = 0.2,
    seed: int = 0,
    cache_dir=None,
    num_classes: int | None = None,
) -> ZeroShotArrays:
    """Loads the glyphs split by class for zero-shot retrieval.

    Labels are `0 .. num_train_classes - 1` for the training characters and
    `num_train_classes ..` for the unseen ones; `class_names` gives each
    label's character.

    Args:
        image_size: height and width of the images. Defaults to 32.
        samples_per_face: augmented images per class and face (16 faces).
            Defaults to 2, so 32 images per class.
        train_fraction: fraction of the characters used for training, in
            (0, 1). Defaults to 0.6.
        validation_fraction: fraction of the training characters' images
            held out as `x_seen`, in [0, 1). Defaults to 0.2.
        seed: seed of the renderings, of the class split and of the held-out
            draw.
        cache_dir: see `render_glyphs`.
        num_classes: use only this many characters, drawn at random with
            `seed` (quick runs); `None` uses all of them.

    Returns:
        A `ZeroShotArrays` with float32 `(size, size, 1)` images in [0, 1].

    Example:

    >>> from keras_dml.data.glyphs import load_glyphs_zero_shot
    >>> data = load_glyphs_zero_shot(image_size=16, samples_per_face=1, num_classes=50)
    >>> data.x_train.shape[1:], data.num_train_classes
    ((16, 16, 1), 30)
    >>> bool(data.y_unseen.min() >= data.num_train_classes)
    True
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"`train_fraction` must be in (0, 1), got {train_fraction!r}.")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(
            f"`validation_fraction` must be in [0, 1), got {validation_fraction!r}."
        )
    images, code_points, _ = render_glyphs(image_size, samples_per_face, seed, cache_dir,
                                           num_classes)
    classes = np.unique(code_points)
    rng = np.random.default_rng((seed, 1))
    order = classes[rng.permutation(len(classes))]
    num_train = max(1, min(len(classes) - 1, int(round(train_fraction * len(classes)))))
    label_of = {int(c): i for i, c in enumerate(order)}
    labels = np.array([label_of[int(c)] for c in code_points], np.int32)
    seen = np.flatnonzero(labels < num_train)
    held_out = np.random.default_rng((seed, 2)).random(len(seen)) < validation_fraction
    train, val = seen[~held_out], seen[held_out]
    unseen = np.flatnonzero(labels >= num_train)
    return ZeroShotArrays(
        images[train], labels[train], images[val], labels[val], images[unseen],
        labels[unseen], num_train, class_names=tuple(chr(int(c)) for c in order),
    )
