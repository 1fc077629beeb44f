"""Pictures of a comparison, drawn with Pillow (a dependency already; matplotlib is not): line and
scatter charts with axes, ticks and a legend, and synthetic images side by side, one row per method
and one column per class, scaled up so that 8-pixel digits can be seen."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 900, 560
MARGIN = {"left": 70, "right": 230, "top": 50, "bottom": 60}
COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0), (0, 128, 128),
    (128, 128, 0), (75, 0, 130), (210, 105, 30), (0, 100, 0), (199, 21, 133), (70, 130, 180),
    (240, 180, 0), (0, 0, 0),
]  # fmt: skip
"""One colour per method for up to 20 (no grey: the reference lines are grey)."""
GREY = (120, 120, 120)
TICK_LABEL_PADDING = 8
"""Blank pixels kept between two x tick labels."""

Point = tuple[float, float]


def _font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About ``count`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.floor(lo / step) * step
    return [
        first + i * step for i in range(int((hi - first) / step) + 2) if first + i * step <= hi + step / 2
    ]


def tick_label(x: float) -> str:
    """A data value as a short axis label: 1, 10, 0.5, 641 (not 641.34), 2619 (not 2619.05)."""
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"


def spaced(centres: list[float], widths: list[float], padding: float) -> list[bool]:
    """Which labels, centred at these ascending positions, are drawn: the first, then each whose left
    edge is ``padding`` pixels right of the last drawn one's right edge (data-valued ticks such as
    distillation seconds can crowd)."""
    drawn, right = [], -math.inf
    for centre, width in zip(centres, widths, strict=True):
        drawn.append(centre - width / 2 >= right + padding)
        if drawn[-1]:
            right = centre + width / 2
    return drawn


def stacked(boxes: list[tuple[float, float, float, float]], gap: float) -> list[float]:
    """New tops for text boxes (left, top, right, bottom) so that none overlap: in order of their tops,
    each box moves down below every placed box it would touch (within ``gap``). Methods with similar
    time and accuracy put their points, and so their labels, on top of each other."""
    tops = [0.0] * len(boxes)
    placed: list[tuple[float, float, float, float]] = []
    for i in sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0])):
        left, top, right, bottom = boxes[i]
        height, moved = bottom - top, True
        while moved:
            moved = False
            for other_left, other_top, other_right, other_bottom in placed:
                across = left < other_right and other_left < right
                if across and top < other_bottom + gap and other_top < top + height + gap:
                    top, moved = other_bottom + gap, True
        placed.append((left, top, right, top + height))
        tops[i] = top
    return tops


class _Axes:
    """Maps data to pixels (optionally log-scaled x) and draws the frame, ticks and labels."""

    def __init__(self, points: list[Point], title: str, xlabel: str, ylabel: str, log_x: bool):
        self.image = Image.new("RGB", (WIDTH, HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.log_x = log_x
        xs = [self._x(x) for x, _ in points] or [0.0, 1.0]
        ys = [y for _, y in points] or [0.0, 100.0]
        pad_x = (max(xs) - min(xs)) * 0.05 or 0.5
        self.x_range = (min(xs) - pad_x, max(xs) + pad_x)
        self.y_ticks = _nice_ticks(min(ys), max(ys))
        self.y_range = (min(self.y_ticks[0], min(ys)), max(self.y_ticks[-1], max(ys)))
        self.box = (MARGIN["left"], MARGIN["top"], WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"])
        self._frame(points, title, xlabel, ylabel)

    def _x(self, x: float) -> float:
        return math.log10(x) if self.log_x else x

    def to_pixel(self, point: Point) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        px = left + (self._x(point[0]) - x0) / (x1 - x0) * (right - left)
        py = bottom - (point[1] - y0) / ((y1 - y0) or 1) * (bottom - top)
        return px, py

    def _frame(self, points: list[Point], title: str, xlabel: str, ylabel: str) -> None:
        left, top, right, bottom = self.box
        draw, font = self.draw, _font()
        for y in self.y_ticks:
            if self.y_range[0] <= y <= self.y_range[1]:
                _, py = self.to_pixel((10 ** self.x_range[0] if self.log_x else self.x_range[0], y))
                draw.line([(left, py), (right, py)], fill=(230, 230, 230))
                draw.text((left - 8, py), f"{y:g}", fill="black", font=font, anchor="rm")
        ticks = sorted({x for x, _ in points})
        pixels = [self.to_pixel((x, self.y_range[0]))[0] for x in ticks]
        labels = [tick_label(x) for x in ticks]
        widths = [draw.textlength(label, font=font) for label in labels]
        for px, label, drawn in zip(pixels, labels, spaced(pixels, widths, TICK_LABEL_PADDING), strict=True):
            draw.line([(px, bottom), (px, bottom + 5)], fill="black")
            if drawn:
                draw.text((px, bottom + 8), label, fill="black", font=font, anchor="mt")
        draw.rectangle(self.box, outline="black")  # over the grid lines' ends
        draw.text(((left + right) / 2, 15), title, fill="black", font=_font(16), anchor="mt")
        draw.text(((left + right) / 2, HEIGHT - 22), xlabel, fill="black", font=font, anchor="mt")
        label = Image.new("RGBA", (bottom - top, 20), (255, 255, 255, 0))
        ImageDraw.Draw(label).text(((bottom - top) / 2, 10), ylabel, fill="black", font=font, anchor="mm")
        rotated = label.rotate(90, expand=True)
        self.image.paste(rotated, (8, top), rotated)

    def legend(self, entries: list[tuple[str, tuple[int, int, int], bool]]) -> None:
        """Name, colour and dashed per entry, beside the plot."""
        x, y = WIDTH - MARGIN["right"] + 15, MARGIN["top"]
        for name, colour, dashed in entries:
            self._segment([(x, y + 7), (x + 24, y + 7)], colour, dashed)
            self.draw.text((x + 30, y), name, fill="black", font=_font(13))
            y += 20

    def _segment(self, pixels: list[tuple[float, float]], colour: tuple[int, int, int], dashed: bool) -> None:
        if not dashed:
            self.draw.line(pixels, fill=colour, width=3)
            return
        for (x0, y0), (x1, y1) in zip(pixels, pixels[1:], strict=False):
            length = math.hypot(x1 - x0, y1 - y0)
            for start in np.arange(0, length, 12):
                end = min(start + 7, length)
                self.draw.line(
                    [(x0 + (x1 - x0) * start / length, y0 + (y1 - y0) * start / length),
                     (x0 + (x1 - x0) * end / length, y0 + (y1 - y0) * end / length)],
                    fill=colour, width=2,
                )  # fmt: skip

    def series(self, points: list[Point], colour: tuple[int, int, int], dashed: bool = False) -> None:
        pixels = [self.to_pixel(p) for p in sorted(points)]
        if len(pixels) > 1:
            self._segment(pixels, colour, dashed)
        for px, py in pixels:
            self.draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=GREY if dashed else colour)


def line_chart(
    lines: dict[str, list[Point]],
    dashed: dict[str, list[Point]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
) -> Image.Image:
    """Solid lines (one colour each) and dashed reference lines (grey shades), with a legend."""
    every = [p for group in (*lines.values(), *dashed.values()) for p in group]
    axes = _Axes(every, title, xlabel, ylabel, log_x)
    legend = []
    for i, (name, points) in enumerate(lines.items()):
        colour = COLOURS[i % len(COLOURS)]
        axes.series(points, colour)
        legend.append((name, colour, False))
    for i, (name, points) in enumerate(dashed.items()):
        shade = (90 + 40 * (i % 4),) * 3
        axes.series(points, shade, dashed=True)  # type: ignore[arg-type]
        legend.append((name, shade, True))  # type: ignore[arg-type]
    axes.legend(legend)
    return axes.image


def scatter_chart(
    points: dict[str, Point], title: str, xlabel: str, ylabel: str, log_x: bool = False
) -> Image.Image:
    """One labelled point per entry."""
    axes, font = _Axes(list(points.values()), title, xlabel, ylabel, log_x), _font(12)
    pixels = [axes.to_pixel(point) for point in points.values()]
    labelled = zip(points, pixels, strict=True)
    boxes = [axes.draw.textbbox((px + 7, py - 7), name, font=font) for name, (px, py) in labelled]
    tops = stacked([tuple(map(float, box)) for box in boxes], gap=1)
    for i, (name, (px, py), box, top) in enumerate(zip(points, pixels, boxes, tops, strict=True)):
        colour = COLOURS[i % len(COLOURS)]
        axes.draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
        axes.draw.text((px + 7, py - 7 + top - box[1]), name, fill=colour, font=font)
    return axes.image


def image_rows(
    sets: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], title: str, side: int = 48
) -> Image.Image:
    """One row per method (``sets[method] = (pixels (n, C, H, W) in [0, 1], labels)``), one column per
    class holding that class's first image, scaled up by an integer factor to about ``side`` pixels."""
    label_width, header, pad = 110, 50, 4
    first = next(iter(sets.values()))[0]
    scale = max(1, round(side / first.shape[2]))
    tile_h, tile_w = first.shape[2] * scale, first.shape[3] * scale
    column = max(tile_w, 40) + pad
    width = label_width + column * len(classes) + pad
    height = header + (tile_h + pad) * len(sets) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill="black", font=_font(14))
    for c, name in enumerate(classes):
        draw.text(
            (label_width + c * column + column / 2, header - 6),
            str(name)[:8],
            fill="black",
            font=_font(12),
            anchor="mb",
        )
    for r, (method, (pixels, labels)) in enumerate(sets.items()):
        top = header + r * (tile_h + pad)
        draw.text((pad, top + tile_h / 2), method, fill="black", font=_font(13), anchor="lm")
        for c in range(len(classes)):
            found = np.nonzero(labels == c)[0]
            if len(found) == 0:
                continue
            tile = np.clip(pixels[found[0]], 0, 1).transpose(1, 2, 0)
            tile = np.repeat(np.repeat(tile, scale, 0), scale, 1)
            if tile.shape[2] == 1:
                tile = np.repeat(tile, 3, 2)
            image = Image.fromarray((tile * 255 + 0.5).astype(np.uint8))
            canvas.paste(image, (int(label_width + c * column + (column - tile_w) / 2), top))
    return canvas


def class_grid(
    pixels: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    title: str,
    side: int = 64,
    per_row: int = 10,
    max_classes: int = 100,
) -> Image.Image:
    """A distilled set as people look at it: ``pixels`` (n, C, H, W) in [0, 1] (already mapped back
    from normalised or whitened inputs), each image scaled by a whole factor to at least ``side``
    pixels (nearest neighbour: an 8 px digit stays crisp), never shrunk.

    One image per class: ``per_row`` classes a row, each name above its image. More: one row per
    class, its name on the left, its first ``per_row`` images and how many more it has. At most
    ``max_classes`` classes; the title says how many more there are."""
    _, channels, height, width = pixels.shape
    scale = max(1, -(-side // max(height, width)))
    tile_h, tile_w = height * scale, width * scale
    pad, header, caption = 4, 32, 16
    present = [c for c in range(len(classes)) if np.any(labels == c)]
    shown = present[:max_classes]
    members = {c: np.nonzero(labels == c)[0] for c in shown}
    single = all(len(found) == 1 for found in members.values())
    more = f" (first {len(shown)} of {len(present)} classes)" if len(present) > len(shown) else ""

    if single:
        column = max(tile_w + 12, 56)
        rows = -(-len(shown) // per_row)
        size = (max(pad + column * min(len(shown), per_row), 320), header + rows * (caption + tile_h + pad))
    else:
        column = tile_w + pad
        label_width = 12 + 7 * max(len(str(classes[c])[:16]) for c in shown)
        counted = 56 if any(len(found) > per_row for found in members.values()) else 0
        longest = min(max(len(found) for found in members.values()), per_row)
        size = (max(label_width + column * longest + counted, 320), header + len(shown) * (tile_h + pad))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), f"{title}{more}", fill="black", font=_font(14))

    def paste(index: int, x: float, y: float) -> None:
        tile = np.clip(pixels[index], 0, 1).transpose(1, 2, 0)
        tile = np.repeat(np.repeat(tile, scale, 0), scale, 1)
        if channels == 1:
            tile = np.repeat(tile, 3, 2)
        canvas.paste(Image.fromarray((tile[..., :3] * 255 + 0.5).astype(np.uint8)), (int(x), int(y)))

    for i, c in enumerate(shown):
        name = str(classes[c])
        if single:
            row, col = divmod(i, per_row)
            x, top = pad + col * column, header + row * (caption + tile_h + pad)
            draw.text(
                (x + column / 2, top + caption - 3), name[:10], fill="black", font=_font(12), anchor="mb"
            )
            paste(int(members[c][0]), x + (column - tile_w) / 2, top + caption)
            continue
        top = header + i * (tile_h + pad)
        draw.text((pad, top + tile_h / 2), name[:16], fill="black", font=_font(12), anchor="lm")
        for j, index in enumerate(members[c][:per_row]):
            paste(int(index), label_width + j * column, top)
        if len(members[c]) > per_row:
            x = label_width + per_row * column + 4
            draw.text(
                (x, top + tile_h / 2),
                f"+{len(members[c]) - per_row}",
                fill="black",
                font=_font(12),
                anchor="lm",
            )
    return canvas
