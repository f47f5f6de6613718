"""The scatter plot of ``fastntk evaluate --plot``."""

from __future__ import annotations

import zlib

__all__ = ["scatter_png", "write_png_scatter"]


def scatter_png(path: str, x, y, *, xlabel: str = "", ylabel: str = "") -> None:
    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(x, y, s=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    except ImportError:
        pass
    write_png_scatter(path, x, y)


def write_png_scatter(path: str, x, y, width: int = 480, height: int = 360) -> None:
    """Scatter of (x, y) as an RGB PNG with axes (no text), using only zlib and struct."""
    import struct

    import numpy as np

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    m = 40  # margin
    img[height - m, m:width - m + 1] = 0  # x axis
    img[m:height - m + 1, m] = 0  # y axis
    for t in range(5):  # ticks
        cx = m + t * (width - 2 * m) // 4
        cy = height - m - t * (height - 2 * m) // 4
        img[height - m:height - m + 5, cx] = 0
        img[cy, m - 5:m] = 0

    def scale(v, lo, hi, n):
        if hi <= lo:
            return np.full(v.shape, n // 2)
        return ((v - lo) / (hi - lo) * (n - 1)).round().astype(int)

    if len(x):
        px = m + scale(x, x.min(), x.max(), width - 2 * m)
        py = height - m - scale(y, y.min(), y.max(), height - 2 * m)
        for a, b in zip(px, py, strict=True):
            img[max(b - 2, 0):b + 3, max(a - 2, 0):a + 3] = (31, 119, 180)
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)
