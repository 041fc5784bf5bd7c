"""Writing files safely and results as tables: `atomic_write_bytes` (a crash leaves the old file or the new one),
`markdown_table(rows)`, `write_table(rows, out_dir, name)` (CSV + markdown, atomically) and `table(rows, headers)`
(aligned plain text, as the command line prints it).

Every file the package writes for a user (checkpoints, labels, configs, tables, reports) goes through here.
"""
from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "markdown_table", "write_table", "table"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that a crash leaves the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)            # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:                                     # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def markdown_table(rows: list[dict]) -> str:
    """A GitHub markdown table of the rows (columns in first-seen order)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float) and not math.isnan(v):
            return f"{v:.1e}" if 0 < abs(v) < 0.01 else f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out_dir, name: str = "results") -> tuple[Path, Path]:
    """Write rows as <out_dir>/<name>.csv and <name>.md (atomically); return both paths."""
    out = Path(out_dir)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / f"{name}.csv", buf.getvalue().encode())
    atomic_write_bytes(out / f"{name}.md", markdown_table(rows).encode())
    return out / f"{name}.csv", out / f"{name}.md"


def table(rows: list[list], headers: list[str], right: set[int] = frozenset()) -> str:
    """An aligned plain-text table (columns padded to their widest cell; indices in `right` right-aligned)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
