import numpy as np
from PIL import Image

from condense.plots import class_grid, spaced, stacked, tick_label


def test_tick_labels_are_short_at_every_magnitude():
    assert [tick_label(x) for x in (1, 10, 50, 0.5, 35.01, 641.34, 765.12, 2619.05)] == [
        "1", "10", "50", "0.5", "35", "641", "765", "2619",
    ]  # fmt: skip


def test_crowded_tick_labels_are_dropped_but_the_spread_ones_kept():
    # The CIFAR-10 comparison's distillation seconds put CUDD (641 s) and DREAM (765 s) 23 px apart.
    assert spaced([97.0, 464.0, 487.0, 573.0, 642.0], [16.0, 24.0, 24.0, 32.0, 32.0], 8) == [
        True, True, False, True, True,
    ]  # fmt: skip
    # Edges 0..20 and 28..48 are exactly 8 px apart (drawn); 50..70 is 2 px after 48 (dropped).
    assert spaced([10.0, 38.0, 60.0, 100.0], [20.0, 20.0, 20.0, 20.0], 8) == [True, True, False, True]
    # Width, not just distance: two wide labels 40 px apart collide where two narrow ones do not.
    assert spaced([0.0, 40.0], [50.0, 50.0], 8) == [True, False]
    assert spaced([0.0, 40.0], [10.0, 10.0], 8) == [True, True]
    assert spaced([], [], 8) == []


def test_crowded_point_labels_stack_below_each_other_and_the_spread_ones_stay():
    # DATM, PAD and DSA on digits: three labels of 14 px height whose boxes start within 3 px.
    crowded = [(100.0, 50.0, 160.0, 64.0), (101.0, 51.0, 150.0, 65.0), (102.0, 53.0, 170.0, 67.0)]
    assert stacked(crowded, gap=1) == [50.0, 65.0, 80.0]
    # Side by side (no horizontal overlap), or a gap apart already: nothing moves.
    apart = [(0.0, 50.0, 40.0, 64.0), (41.0, 50.0, 80.0, 64.0), (0.0, 65.0, 40.0, 79.0)]
    assert stacked(apart, gap=1) == [50.0, 50.0, 65.0]
    # A box pushed down can land on a lower one, which it then clears too.
    chain = [(0.0, 0.0, 10.0, 10.0), (0.0, 5.0, 10.0, 15.0), (0.0, 12.0, 10.0, 22.0)]
    assert stacked(chain, gap=0) == [0.0, 10.0, 20.0]
    assert stacked([], gap=1) == []


def _tiles(classes: int, ipc: int, channels: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c's images are flat grey at level (c + 1) / (classes + 1)."""
    labels = np.repeat(np.arange(classes), ipc)
    levels = (labels + 1) / (classes + 1)
    return np.broadcast_to(levels[:, None, None, None], (len(labels), channels, side, side)).copy(), labels


def _grey_blocks(picture: Image.Image, level: float, side: int) -> int:
    """How many ``side`` x ``side`` blocks of exactly this grey level the picture holds (scanned on
    the block grid of each row where one starts)."""
    value = int(level * 255 + 0.5)
    grid = np.asarray(picture.convert("L")) == value
    found, y = 0, 0
    while y + side <= grid.shape[0]:
        row = grid[y : y + side].all(axis=0)
        starts = [
            x
            for x in range(grid.shape[1] - side + 1)
            if row[x : x + side].all() and (x == 0 or not row[x - 1])
        ]
        found += sum(1 for _ in starts)
        y += side if starts else 1
    return found


def test_one_image_per_class_is_one_labelled_row_scaled_to_a_readable_size():
    pixels, labels = _tiles(10, 1, 1, 8)  # digits: ten 8 px images
    picture = class_grid(pixels, labels, [str(i) for i in range(10)], "digits / mtt / ipc 1")
    assert picture.width >= 10 * 64 and picture.height < 200
    for c in range(10):  # each 8 px image scaled 8x to 64 px, nearest neighbour (still flat)
        assert _grey_blocks(picture, (c + 1) / 11, 64) == 1
    names = class_grid(pixels, labels, [f"name{i}" for i in range(10)], "digits / mtt / ipc 1")
    assert np.asarray(names).tolist() != np.asarray(picture).tolist()  # the class names are drawn


def test_many_images_per_class_are_one_row_each_capped_and_wide_images_wrap():
    pixels, labels = _tiles(3, 25, 3, 32)
    picture = class_grid(pixels, labels, ["cat", "dog", "ship"], "cifar / dm / ipc 25", per_row=10)
    for c in range(3):  # ten shown per class, the other 15 counted
        assert _grey_blocks(picture, (c + 1) / 4, 64) == 10
    big, big_labels = _tiles(30, 1, 3, 224)  # ImageNet-sized: never shrunk, wrapped 10 a row
    wrapped = class_grid(big, big_labels, [str(i) for i in range(30)], "imagenet / rded / ipc 1")
    assert 10 * 224 <= wrapped.width < 11 * 280 and wrapped.height > 3 * 224
    capped = class_grid(*_tiles(120, 1, 3, 8), [str(i) for i in range(120)], "t", max_classes=100)
    assert _grey_blocks(capped, 101 / 121, 64) == 0 and _grey_blocks(capped, 100 / 121, 64) == 1
