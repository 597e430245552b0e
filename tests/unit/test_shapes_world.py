"""The shapes-world renderer obeys its contract (see tests/fixtures/shapes/world.py)."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.shapes import world

SEED = 123
N = 300


@pytest.fixture(scope="module")
def samples() -> list[world.Sample]:
    return list(world.dataset(SEED, N))


@pytest.fixture(scope="module")
def crisp() -> list[tuple[world.Scene, Image.Image]]:
    """Uncompressed renders with anti-aliased edges (for pixel-exact checks)."""
    rng = random.Random(SEED)
    scenes = [world.random_scene(rng) for _ in range(N)]
    return [(scene, world.render(scene, rng, supersample=4)) for scene in scenes]


def pixel(image: Image.Image, point: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = image.getpixel((int(point[0]), int(point[1])))  # type: ignore[misc]
    return r, g, b


def near(a: tuple[int, ...], b: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def test_image_sizes_and_formats(samples: list[world.Sample]) -> None:
    assert {s.ext for s in samples} == {"jpg", "png"}
    for s in samples:
        image = s.decode()
        assert image.mode == "RGB"
        assert image.size == (s.scene.width, s.scene.height)
        assert world.MIN_SIDE <= image.width <= world.MAX_SIDE
        assert world.MIN_SIDE <= image.height <= world.MAX_SIDE
        with Image.open(io.BytesIO(s.data)) as raw:
            assert raw.format == {"jpg": "JPEG", "png": "PNG"}[s.ext]
    assert any(s.scene.width != s.scene.height for s in samples)
    assert max(s.scene.width / s.scene.height for s in samples) > 3
    assert min(s.scene.width / s.scene.height for s in samples) < 1 / 3


def test_background_is_light_near_grey(crisp: list[tuple[world.Scene, Image.Image]]) -> None:
    for scene, image in crisp:
        assert all(world.BACKGROUND_MIN <= c <= world.BACKGROUND_MAX for c in scene.background)
        assert max(scene.background) - min(scene.background) <= 2 * world.BACKGROUND_GREY_SPREAD
        corners = [
            (0, 0),
            (scene.width - 1, 0),
            (0, scene.height - 1),
            (scene.width - 1, scene.height - 1),
        ]
        assert all(pixel(image, c) == scene.background for c in corners)


def test_shape_colours_within_tolerance(crisp: list[tuple[world.Scene, Image.Image]]) -> None:
    for scene, image in crisp:
        for shape in scene.shapes:
            assert near(shape.rgb, world.COLOURS[shape.colour], world.COLOUR_TOLERANCE)
            assert pixel(image, shape.interior_point) == shape.rgb


def test_encoded_colours_survive_compression(samples: list[world.Sample]) -> None:
    for s in samples:
        image = s.decode()
        for shape in s.scene.shapes:
            got = pixel(image, shape.interior_point)
            slack = 0 if s.ext == "png" else 30
            assert near(got, shape.rgb, slack), (s.index, shape, got)


def test_shape_sizes_and_bounds(samples: list[world.Sample]) -> None:
    counts = {1: 0, 2: 0}
    for s in samples:
        scene = s.scene
        counts[len(scene.shapes)] += 1
        short = min(scene.width, scene.height)
        for shape in scene.shapes:
            assert shape.form in world.FORMS
            assert world.MIN_SIZE_FRACTION <= shape.size / short <= world.MAX_SIZE_FRACTION + 1e-9
            left, top, right, bottom = shape.bbox
            assert 0 <= left < right <= scene.width and 0 <= top < bottom <= scene.height
            assert abs(shape.angle) <= world.MAX_SQUARE_ANGLE
            assert shape.angle == 0 or shape.form == "square"
    assert counts[1] > N / 4 and counts[2] > N / 4


def test_two_shapes_do_not_overlap_and_are_ordered(samples: list[world.Sample]) -> None:
    for s in samples:
        if len(s.scene.shapes) == 2:
            left, right = s.scene.shapes
            assert left.bbox[2] + 2 <= right.bbox[0], "a clear horizontal gap separates the shapes"
            assert left.centre[0] < right.centre[0]


def coverage(image: Image.Image, shape: world.Shape) -> float:
    """Fraction of the shape's bounding box painted in its colour."""
    x0, y0, x1, y1 = (round(v) for v in shape.bbox)
    crop = np.asarray(image.crop((x0, y0, x1, y1)), dtype=np.int16)
    inside = (np.abs(crop - np.array(shape.rgb, dtype=np.int16)) <= 40).all(axis=-1)
    return float(inside.mean())


def expected_coverage(shape: world.Shape) -> float:
    if shape.form == "circle":
        return math.pi / 4
    if shape.form == "triangle":
        return 0.5
    rad = math.radians(abs(shape.angle))
    return 1 / (math.cos(rad) + math.sin(rad)) ** 2


def test_forms_are_drawn_as_described(crisp: list[tuple[world.Scene, Image.Image]]) -> None:
    for scene, image in crisp:
        for shape in scene.shapes:
            if shape.size >= 20:
                assert abs(coverage(image, shape) - expected_coverage(shape)) < 0.08, shape
            if shape.form == "triangle":  # pointing up: apex at top centre, base at the bottom
                x0, y0, x1, y1 = shape.bbox
                assert pixel(image, (x0 + 1, y0 + 1)) == scene.background
                assert pixel(image, ((x0 + x1) / 2, y1 - 2)) == shape.rgb


def test_left_shape_is_drawn_on_the_left(crisp: list[tuple[world.Scene, Image.Image]]) -> None:
    for scene, image in crisp:
        if len(scene.shapes) == 2 and scene.shapes[0].colour != scene.shapes[1].colour:
            xs = []
            for shape in scene.shapes:
                hits = [
                    x
                    for x in range(scene.width)
                    if pixel(image, (x, shape.interior_point[1])) == shape.rgb
                ]
                xs.append(sum(hits) / len(hits))
            assert xs[0] < xs[1]


def test_caption_text(samples: list[world.Sample]) -> None:
    for s in samples:
        parts = [f"a {shape.colour} {shape.form}" for shape in s.scene.shapes]
        assert world.caption(s.scene) == " and ".join(parts)
    one = world.Scene(
        10, 10, (255, 255, 255), (world.Shape("circle", "red", (220, 40, 40), (1, 1, 5, 5), 4),)
    )
    assert world.caption(one) == "a red circle"
    two = world.Scene(
        10,
        10,
        (255, 255, 255),
        (*one.shapes, world.Shape("square", "blue", (40, 80, 220), (6, 1, 9, 4), 3)),
    )
    assert world.caption(two) == "a red circle and a blue square"


def test_vqa_pairs(samples: list[world.Sample]) -> None:
    for s in samples:
        shapes = s.scene.shapes
        pairs = dict(world.vqa_pairs(s.scene))
        assert pairs["how many shapes are there?"] == ("one" if len(shapes) == 1 else "two")
        forms = [shape.form for shape in shapes]
        for form in world.FORMS:
            question = f"what color is the {form}?"
            if forms.count(form) == 1:
                assert pairs[question] == shapes[forms.index(form)].colour
            else:
                assert question not in pairs
        if len(shapes) == 2:
            assert pairs["what shape is on the left?"] == shapes[0].form
            assert pairs["what shape is on the right?"] == shapes[1].form
        else:
            assert "what shape is on the left?" not in pairs
        present = {(shape.colour, shape.form) for shape in shapes}
        for colour in world.COLOURS:
            for form in world.FORMS:
                answer = "yes" if (colour, form) in present else "no"
                assert pairs[f"is there a {colour} {form}?"] == answer


def test_negative_captions_change_one_attribute(samples: list[world.Sample]) -> None:
    for s in samples:
        truth = world.caption(s.scene).split()
        negatives = world.negative_captions(s.scene)
        assert len(negatives) == 5 * len(s.scene.shapes) == len(set(negatives))
        for negative in negatives:
            words = negative.split()
            assert len(words) == len(truth)
            assert sum(a != b for a, b in zip(words, truth, strict=True)) == 1


def test_vocab_covers_all_text(samples: list[world.Sample]) -> None:
    texts = world.all_captions() + world.all_questions() + world.all_answers()
    for s in samples[:20]:
        texts += [world.caption(s.scene), *world.negative_captions(s.scene)]
        texts += [t for pair in world.vqa_pairs(s.scene) for t in pair]
    words = {w for t in texts for w in t.replace("?", " ?").split()}
    assert words == set(world.VOCAB)
    assert len(world.all_captions()) == 12 + 144


def test_deterministic() -> None:
    first = [(s.scene, s.data) for s in world.dataset(7, 5)]
    again = [(s.scene, s.data) for s in world.dataset(7, 5)]
    other = [(s.scene, s.data) for s in world.dataset(8, 5)]
    assert first == again
    assert first != other
    assert world.sample(7, 3).data == first[3][1]
    assert [s.index for s in world.dataset(7, 2, start=3)] == [3, 4]


def test_jpeg_quality_range() -> None:
    rng = random.Random(0)
    image = world.render(world.random_scene(rng), rng)
    sizes = {ext: [] for ext in ("jpg", "png")}  # type: dict[str, list[int]]
    for _ in range(40):
        data, ext = world.encode(image, rng)
        sizes[ext].append(len(data))
    assert sizes["jpg"] and sizes["png"]
    low = io.BytesIO()
    image.save(low, format="JPEG", quality=world.JPEG_QUALITY_RANGE[0] - 1)
    high = io.BytesIO()
    image.save(high, format="JPEG", quality=world.JPEG_QUALITY_RANGE[1] + 1)
    assert len(low.getvalue()) <= min(sizes["jpg"]) and max(sizes["jpg"]) <= len(high.getvalue())
