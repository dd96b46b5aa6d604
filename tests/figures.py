"""What a picture shows, read back from the figure that was written: the data of its lines and
bars and its words, beside the file (whose size in pixels must be the figure's).

    saved = record_saved_figures(monkeypatch)   # then run the code that draws
    fig = saved[-1]; lines(fig.axes[0]); bars(fig.axes[0]); words(fig)
"""

import matplotlib
import matplotlib.figure
import matplotlib.image
import numpy as np
from matplotlib.patches import Rectangle


def record_saved_figures(monkeypatch):
    """Every figure saved from now on (until monkeypatch undoes it), in order, with its file's
    size in pixels as savefig wrote it."""
    saved, original = [], matplotlib.figure.Figure.savefig

    def savefig(fig, fname, *args, dpi=None, **kwargs):
        original(fig, fname, *args, dpi=dpi, **kwargs)
        dpi = dpi if isinstance(dpi, (int, float)) else matplotlib.rcParams["savefig.dpi"]
        dpi = fig.dpi if dpi == "figure" else dpi
        fig.pixels = tuple(int(round(v)) for v in fig.get_size_inches()[::-1] * dpi)
        saved.append(fig)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return saved


def png_pixels(path):
    """(height, width) of the PNG at `path`."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return matplotlib.image.imread(path).shape[:2]


def lines(ax):
    """{label: (x, y)} of the axes' lines (unlabelled ones under '_childN', as matplotlib names
    them), as float arrays."""
    return {line.get_label(): (np.asarray(line.get_xdata(), float),
                               np.asarray(line.get_ydata(), float)) for line in ax.get_lines()}


def bars(ax):
    """Heights of the axes' bars, left to right (stacked bars: each segment)."""
    return [p.get_height() for p in ax.patches if isinstance(p, Rectangle)]


def words(fig):
    """Every text the figure shows: titles, axis labels, legend entries, texts and annotations."""
    found = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        found += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        found += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        found += [t.get_text() for t in legend.get_texts()] if legend else []
    for legend in fig.legends:
        found += [t.get_text() for t in legend.get_texts()]
    return "\n".join(t for t in found if t)
