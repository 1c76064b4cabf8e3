"""Pictures of samples: image grids (PIL) and scatter plots (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from cafm_core.checks import CAFMInputError


def image_grid(images: torch.Tensor, *, columns: int = 10, scale: int = 4, padding: int = 1) -> Image.Image:
    """Tile ``[N, C, H, W]`` images in ``[-1, 1]`` into one picture, each pixel ``scale`` times."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise CAFMInputError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    cell_h, cell_w = h * scale + padding, w * scale + padding
    canvas = np.full((rows * cell_h + padding, columns * cell_w + padding, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        tile = pixels[i].repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[padding + r * cell_h : padding + r * cell_h + h * scale, padding + col * cell_w : padding + col * cell_w + w * scale] = tile
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def labelled_grids(grids: Sequence[tuple[str, Image.Image]]) -> Image.Image:
    """Stack grids vertically with a caption above each."""
    caption_height = 14
    width = max(g.width for _, g in grids)
    height = sum(g.height + caption_height for _, g in grids)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for caption, grid in grids:
        draw.text((2, y + 1), caption, fill="black")
        canvas.paste(grid.convert("RGB"), (0, y + caption_height))
        y += grid.height + caption_height
    return canvas


def scatter_panels(panels: Sequence[tuple[str, torch.Tensor]], destination, *, limit: float = 3.0) -> None:
    """Side-by-side scatter plots of 2-D (or 1-D, as histograms) point sets, saved as PNG to
    ``destination`` (a path or a binary file object)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels):
        points = points.detach().cpu().numpy()
        if points.shape[1] == 1:
            ax.hist(points[:, 0], bins=120, range=(-limit * 1.5, limit * 1.5), color="tab:blue")
        else:
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
            ax.set_xlim(-limit, limit)
            ax.set_ylim(-limit, limit)
            ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(destination, dpi=110, format="png")
    plt.close(fig)


def line_panels(
    panels: Sequence[tuple[str, dict[str, tuple[Sequence[float], Sequence[float]]]]],
    destination,
    *,
    xlabel: str = "step",
    references: Sequence[dict[str, float]] | None = None,
) -> None:
    """Side-by-side line plots (one panel per ``(title, {label: (xs, ys[, linestyle])})``), saved as PNG to
    ``destination``. ``references[i]`` draws horizontal lines ``{label: y}`` on panel ``i``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise CAFMInputError("line_panels needs at least one panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
    for index, (ax, (title, lines)) in enumerate(zip(axes[0], panels)):
        for label, (xs, ys, *style) in lines.items():
            ax.plot(list(xs), list(ys), label=label, linewidth=1.2, linestyle=style[0] if style else "-")
        for label, y in ((references or [{}] * len(panels))[index] or {}).items():
            ax.axhline(y, color="black", linewidth=0.8, linestyle=":", label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(destination, dpi=110, format="png")
    plt.close(fig)


def training_curves(curves: dict[str, Sequence[dict]], metric: str, destination, *, reference: float | None = None) -> None:
    """Post-training diagnostics of one or more runs (``name -> rows``, each row with a
    ``step``), as three panels: ``<metric>_ema`` (solid) and ``<metric>_model`` (dashed)
    with ``reference`` (e.g. the FM generator's value) as a dotted line; the discriminator's
    logits on real and fake samples; the D and G gradient norms."""
    panels: list[dict[str, tuple[list, list, str]]] = [{}, {}, {}]
    series = [
        (0, f"{metric}_ema", "EMA", "-"), (0, f"{metric}_model", "raw", "--"),
        (1, "logit_real", "real", "-"), (1, "logit_fake", "fake", "--"),
        (2, "d_grad_norm", "D", "-"), (2, "g_grad_norm", "G", "--"),
    ]
    for name, rows in curves.items():
        for panel, key, label, style in series:
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                panels[panel][f"{name} {label}".strip()] = ([p[0] for p in points], [p[1] for p in points], style)
    line_panels(
        [(f"{metric} on a fixed sample (EMA solid, raw dashed)", panels[0]),
         ("discriminator logits: real solid, fake dashed", panels[1]), ("gradient norms: D solid, G dashed", panels[2])],
        destination,
        references=[{"FM": reference} if reference is not None else {}, {}, {}],
    )
