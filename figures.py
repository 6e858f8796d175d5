"""Figures shared by the scripts, each written atomically: image grids, the generation process
(Figs. 4b, 5b), the loss curve (Fig. 3). matplotlib, PIL and torchvision are imported on use.
"""
import torch
import torch.nn.functional as F

from utils import atomic_path


def drawn_text(fig):
    """[(text, extent in pixels)] of every non-empty text the figure draws (titles, axis and tick labels, legends,
    colour bars, annotations), found by drawing it: tick labels outside the view, never drawn, are not counted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text
    seen, draw = [], Text.draw

    def recording(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            seen.append((self.get_text(), self.get_window_extent(renderer)))
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)   # a closed figure: redraw
    Text.draw = recording
    try:
        canvas.draw()
    finally:
        Text.draw = draw
    return seen


def text_overflow(fig):
    """How far (inches: left, bottom, right, top) the figure's drawn text reaches past the canvas; 0 where inside."""
    boxes = [b for _, b in drawn_text(fig)]
    if not boxes:
        return 0.0, 0.0, 0.0, 0.0
    w, h, dpi = fig.bbox.width, fig.bbox.height, fig.dpi
    return (max(0.0, -min(b.x0 for b in boxes)) / dpi, max(0.0, -min(b.y0 for b in boxes)) / dpi,
            max(0.0, max(b.x1 for b in boxes) - w) / dpi, max(0.0, max(b.y1 for b in boxes) - h) / dpi)


def fit_text(fig, pad=0.05, tries=4):
    """tight_layout, then grow the canvas by whatever text still reaches past its edges (tight_layout leaves
    some: equal-aspect axes, legends beside the axes, long colour-bar labels) and move the axes and figure texts by
    the same inches, so that nothing drawn is cut off whatever the data's range."""
    fig.tight_layout()
    for _ in range(tries):
        left, bottom, right, top = (v + pad if v > 0 else 0.0 for v in text_overflow(fig))
        if not left + bottom + right + top:
            return
        w, h = fig.get_size_inches()
        W, H = w + left + right, h + bottom + top

        def moved(x, y):                                   # figure fraction -> the same inches on the new canvas
            return (x * w + left) / W, (y * h + bottom) / H
        for ax in fig.axes:
            p = ax.get_position(original=True)
            (x0, y0), (x1, y1) = moved(p.x0, p.y0), moved(p.x1, p.y1)
            ax.set_position([x0, y0, x1 - x0, y1 - y0], which="both")
        for t in fig.texts:                                # suptitle, fig.text
            t.set_position(moved(*t.get_position()))
        fig.set_size_inches(W, H)


def save_figure(fig, path, dpi=110):
    """Save a matplotlib figure atomically (temporary file, then rename) with all its text inside the canvas
    (fit_text), and close it."""
    import matplotlib.pyplot as plt
    fit_text(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no screen needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_image_grid(path, images, nrow):
    """images (N, C, H, W) in [0, 1] (clamped) -> one PNG grid, written atomically; tiles under
    64 pixels are enlarged (nearest neighbour) so that 28x28 digits can be seen."""
    import torchvision
    from PIL import Image
    images = images.detach().float().clamp(0, 1).cpu()
    scale = max(1, round(64 / images.shape[-1]))
    images = F.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    with atomic_path(path) as tmp:
        Image.fromarray((grid.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()).save(tmp)


def save_process_figure(path, levels, sigmas, title, rows=8, columns=10):
    """The generation process (Figs. 4b, 5b): a row per sample, a column per noise level (at most
    `columns`, evenly spaced, the last always shown)."""
    import torchvision
    plt = pyplot()
    keep = sorted({len(levels) - 1 - round(k * (len(levels) - 1) / (columns - 1)) for k in range(columns)})
    levels, sigmas = [levels[i] for i in keep], [sigmas[i] for i in keep]
    L, n = len(levels), min(rows, len(levels[0]))
    tiles = torch.stack([lv[:n].float().clamp(0, 1).cpu() for lv in levels], 1).flatten(0, 1)   # (n*L, C, H, W)
    grid = torchvision.utils.make_grid(tiles, nrow=L, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
    w = levels[0].shape[-1] + 2
    fig, ax = plt.subplots(figsize=(1.0 * L + 0.6, 1.0 * n + 0.8))
    ax.imshow(grid, cmap="gray" if grid.shape[2] == 1 else None)
    ax.set_xticks([w * (i + 0.5) for i in range(L)], [f"{float(s):.3g}" for s in sigmas], fontsize=8)
    ax.set_yticks([]), ax.set_xlabel(r"end of noise level $\sigma_i$"), ax.set_title(title)
    save_figure(fig, path, dpi=100)


def save_loss_figure(path, rows, ylabel="annealed DSM loss"):
    """The loss against steps, train (per step and smoothed) and test (Fig. 3)."""
    import numpy as np
    plt = pyplot()
    steps, loss = np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
    test = [(r["step"], r["test_loss"]) for r in rows if r["test_loss"] != ""]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, loss, color="0.8", lw=0.5, label="train (per step)")
    w = max(1, min(len(loss) // 20, 500))
    if len(loss) >= w > 1:
        ax.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), color="C0",
                label=f"train (mean of {w})")
    if test:
        ax.plot(*zip(*test), "o-", color="C3", ms=3, lw=1, label="test")
    ax.set_yscale("log" if loss.min() > 0 else "linear"), ax.set_xlabel("step"), ax.set_ylabel(ylabel), ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
