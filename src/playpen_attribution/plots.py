"""matplotlib for the report and the audits: the file-only backend, and PNGs that are the same bytes for the same
numbers (no software/date metadata)."""

from __future__ import annotations

import io
from pathlib import Path

from playpen_attribution.io import atomic_path


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes, closed; metadata pinned so the same scores give the same bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    pyplot().close(fig)
    return buffer.getvalue()


def save_png(fig, path) -> None:
    """The figure written atomically to `path`, closed."""
    png = png_bytes(fig)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png)
