"""Segment offsets of prefix_attention: the checks every backend relies on, and the host copy that makes them free.

prefix_attention packs the suffixes of S prompts per image; cu_q / cu_k [S+1] int32 (the same for every image,
on q's device) say where each one starts. A kernel that trusts a malformed offset reads out of bounds, so
`check_offsets` runs in the op wrapper before any backend:

    metadata (free, also under torch.compile): 1-D, int32, on q's device, the same length S+1 for cu_q and cu_k;
    values: cu[0] == 0, non-decreasing, cu_q[S] == q.shape[1], cu_k[S] == k.shape[1], len_q(s) <= len_k(s),
            max_q / max_k >= the longest segment.

The values live on the device; reading them is a sync. A caller that knows them on the host (the text encoder's
`ClassSuffixes`) passes a `HostSegments` per offset tensor: a summary checked once when built, compared here
with the tensors' shapes in O(1). Without one the offsets are copied to the host (`.cpu()`) and checked; under
torch.compile that copy is left to the custom op's eager body (`check_values_on_device`), so the graph has no
break. A `HostSegments` is trusted to describe its tensor: the device values are not read to confirm it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["HostSegments", "check_offsets", "check_values_on_device"]


class HostSegments(NamedTuple):
    """What the host knows of one offset tensor cu [S+1]: S, cu[S] (the packed rows), and the longest and
    shortest segment. Build it with `of(lengths)` (checks them) or `uniform(S, n)`; the op compares it with
    the tensors it is given, in O(1)."""

    count: int       # S, segments
    total: int       # cu[S], rows of the packed tensor
    longest: int     # max over s of cu[s+1] - cu[s] (0 when S == 0)
    shortest: int    # min over s of cu[s+1] - cu[s] (0 when S == 0)

    @staticmethod
    def of(lengths: Sequence[int]) -> "HostSegments":
        """From the host segment lengths (cu = [0, cumsum(lengths)]). Raises ValueError for a negative one."""
        lengths = tuple(lengths)
        try:
            total, shortest, longest = sum(lengths), min(lengths, default=0), max(lengths, default=0)
        except TypeError:
            raise ValueError(f"segment lengths must be integers, got {lengths[:8]}") from None
        if shortest < 0:
            raise ValueError(f"segment lengths must be >= 0, got {shortest}")
        return HostSegments(len(lengths), total, longest, shortest)

    @staticmethod
    def uniform(count: int, length: int = 1) -> "HostSegments":
        """S segments of the same length (e.g. one EOT query per prompt: cu = arange(S + 1))."""
        return HostSegments(count, count * length, length, length)


def _check_meta(q, k, cu_q, cu_k) -> None:
    """Shape, dtype and device of the offsets: tensor metadata only (no device read)."""
    for name, cu in (("cu_q", cu_q), ("cu_k", cu_k)):
        if not isinstance(cu, torch.Tensor):
            raise ValueError(f"{name} must be a 1-D int32 tensor of S+1 segment offsets, got {type(cu).__name__}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D [S+1] (segment offsets), got shape {list(cu.shape)}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {cu.dtype} (shape {list(cu.shape)})")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"cu_q and cu_k must have the same length S+1 (one entry per segment boundary, the same "
                         f"for every image), got {cu_q.shape[0]} and {cu_k.shape[0]}")


def _as_host(name: str, host) -> HostSegments:
    if isinstance(host, HostSegments):
        return host
    if isinstance(host, (list, tuple)):
        return HostSegments.of(host)
    raise ValueError(f"{name} must be a HostSegments or a list / tuple of segment lengths, got {type(host).__name__}")


def _check_summary(name, host, cu, rows, rows_name, max_arg, max_val, what) -> None:
    if host.count != cu.shape[0] - 1:
        raise ValueError(f"host_{name[3:]} describes {host.count} segments but {name} has {cu.shape[0]} entries "
                         f"(S+1 = {host.count + 1} expected)")
    if host.total != rows:
        raise ValueError(f"{name} must end at {rows_name} = {rows}, got {host.total} (from host_{name[3:]})")
    if max_val < host.longest:
        raise ValueError(f"{max_arg} must be at least the longest {what} segment ({host.longest}), got {max_val}")


def _check_host(q, k, cu_q, cu_k, max_q, max_k, host_q, host_k) -> bool:
    """Values from the host copies: True when everything is decided, False when len_q(s) <= len_k(s) needs the
    device values (two different summaries whose ranges overlap)."""
    hq, hk = _as_host("host_q", host_q), _as_host("host_k", host_k)
    _check_summary("cu_q", hq, cu_q, q.shape[1], "q.shape[1]", "max_q", max_q, "query")
    _check_summary("cu_k", hk, cu_k, k.shape[1], "k.shape[1]", "max_k", max_k, "key")
    if host_q is host_k or (cu_q is cu_k and hq == hk) or hq.longest <= hk.shortest:
        return True
    if not isinstance(host_q, HostSegments) and not isinstance(host_k, HostSegments):
        for s, (lq, lk) in enumerate(zip(host_q, host_k)):    # two sequences of lengths: one by one
            if lq > lk:
                raise ValueError(f"cu_k must give every segment at least as many keys as cu_q gives queries: "
                                 f"segment {s} has {lq} queries and {lk} keys")
        return True
    return False


def _check_values(name, cu, rows, rows_name) -> torch.Tensor:
    """cu [S+1] on the host: starts at 0, non-decreasing, ends at `rows`. Returns the lengths [S] (int64)."""
    if int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {int(cu[0])}")
    lens = cu[1:] - cu[:-1]
    bad = (lens < 0).nonzero()
    if bad.numel():
        s = int(bad[0, 0])
        raise ValueError(f"{name} must be non-decreasing, got {name}[{s}] = {int(cu[s])} > "
                         f"{name}[{s + 1}] = {int(cu[s + 1])}")
    if int(cu[-1]) != rows:
        raise ValueError(f"{name} must end at {rows_name} = {rows}, got {name}[-1] = {int(cu[-1])}")
    return lens


def check_values_on_device(q, k, cu_q, cu_k, max_q: int, max_k: int) -> None:
    """Copy the offsets to the host (a device sync) and check their values. Raises ValueError."""
    cq, ck = cu_q.detach().cpu().long(), cu_k.detach().cpu().long()
    lq = _check_values("cu_q", cq, q.shape[1], "q.shape[1]")
    lk = _check_values("cu_k", ck, k.shape[1], "k.shape[1]")
    more = (lq > lk).nonzero()
    if more.numel():
        s = int(more[0, 0])
        raise ValueError(f"cu_k must give every segment at least as many keys as cu_q gives queries: segment {s} "
                         f"has {int(lq[s])} queries and {int(lk[s])} keys")
    for arg, val, lens, what in (("max_q", max_q, lq, "query"), ("max_k", max_k, lk, "key")):
        longest = int(lens.max()) if lens.numel() else 0
        if val < longest:
            raise ValueError(f"{arg} must be at least the longest {what} segment ({longest}), got {val}")


def check_offsets(q, k, cu_q, cu_k, max_q: int, max_k: int, host_q=None, host_k=None) -> bool:
    """Check cu_q / cu_k against q [B, Tq, H, Dh] and k [B, Tk, H, Dh] (module docstring). Raises ValueError
    naming the argument. host_q / host_k: `HostSegments` or sequences of segment lengths, used when both are
    given. Returns True when the values were checked here, False when they still need a device read (only
    under torch.compile, where this function reads nothing from the device)."""
    _check_meta(q, k, cu_q, cu_k)
    if host_q is not None and host_k is not None and _check_host(q, k, cu_q, cu_k, max_q, max_k, host_q, host_k):
        return True
    if torch.compiler.is_compiling():
        return False
    check_values_on_device(q, k, cu_q, cu_k, max_q, max_k)
    return True
