"""Guest memory we own: memfd-backed regions at guest-physical addresses (GPAs).

vhost-net reads and writes frames through the memory table (GPA -> our virtual address,
VHOST_SET_MEM_TABLE), so buffers in descriptors are GPAs while ring addresses handed to
VHOST_SET_VRING_ADDR are our own virtual addresses (drivers/vhost/vhost.c, vhost_vring_set_addr
and translate_desc).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import _fd
from ._uapi import vhost as V
from .errors import ValidationError

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 * 1024 * 1024
MAX_MEM_REGIONS_PARAM = Path("/sys/module/vhost/parameters/max_mem_regions")
DEFAULT_MAX_MEM_REGIONS = 64  # drivers/vhost/vhost.c: max_mem_regions default


def max_mem_regions(param: Path = MAX_MEM_REGIONS_PARAM) -> int:
    """The vhost module's region limit (E2BIG above it), or its default when unreadable."""
    try:
        return int(param.read_text())
    except (OSError, ValueError):
        return DEFAULT_MAX_MEM_REGIONS


@dataclass
class Region:
    """One contiguous, page-aligned region of guest memory."""

    gpa: int
    size: int
    mm: mmap.mmap = field(repr=False)
    hva: int
    hugetlb: bool = False

    @property
    def end(self) -> int:
        return self.gpa + self.size


def _map_memfd(size: int, hugetlb: bool) -> tuple[mmap.mmap, int]:
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
    fd = _fd.call("memfd_create", os.memfd_create, "vhostctl-guest", flags)
    try:
        _fd.call("ftruncate(memfd)", os.ftruncate, fd, size)
        mm = _fd.call("mmap(memfd)", mmap.mmap, fd, size, mmap.MAP_SHARED,
                      mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        _fd.close(fd)  # the mapping keeps the memory alive
    # The address of the mapping; the temporary ctypes view is dropped at once so the mmap
    # can still be closed (an exported buffer would pin it).
    anchor = ctypes.c_char.from_buffer(mm)
    hva = ctypes.addressof(anchor)
    del anchor
    return mm, hva


class GuestMemory:
    """A set of regions plus a bump allocator over them; closes all mappings on exit."""

    def __init__(self, *, limit: int | None = None) -> None:
        self.regions: list[Region] = []
        self._limit = limit if limit is not None else max_mem_regions()
        self._next_gpa = 0
        self._cursor: tuple[int, int] = (0, 0)  # (region index, offset) of the allocator

    def add_region(self, size: int, gpa: int | None = None, *, hugetlb: bool = False) -> Region:
        """Map a new region; checks what vhost would reject, or silently accept but misuse."""
        align = HUGE_PAGE if hugetlb else PAGE
        if size <= 0:
            raise ValidationError("guest memory", f"region size {size}: must be positive")
        size = -(-size // align) * align
        gpa = self._next_gpa if gpa is None else gpa
        if gpa < 0 or gpa % align:
            raise ValidationError("guest memory", f"region GPA {gpa:#x} is not {align}-aligned")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValidationError(
                    "guest memory", f"region [{gpa:#x}, {gpa + size:#x}) overlaps "
                    f"[{r.gpa:#x}, {r.end:#x})")
        if len(self.regions) + 1 > self._limit:
            raise ValidationError(
                "guest memory", f"{len(self.regions) + 1} regions exceed vhost's "
                f"max_mem_regions={self._limit}",
                hint=f"raise {MAX_MEM_REGIONS_PARAM} or use fewer, larger regions")
        mm, hva = _map_memfd(size, hugetlb)
        region = Region(gpa, size, mm, hva, hugetlb)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        self._next_gpa = max(self._next_gpa, region.end)
        return region

    def region_of(self, gpa: int, length: int = 1) -> Region:
        """The region holding [gpa, gpa+length) entirely, or a ValidationError."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r
        raise ValidationError("guest memory",
                              f"[{gpa:#x}, {gpa + length:#x}) is not inside guest memory")

    def hva(self, gpa: int, length: int = 1) -> int:
        """Our virtual address for a GPA (what vhost's memory table maps it to)."""
        r = self.region_of(gpa, length)
        return r.hva + (gpa - r.gpa)

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of guest memory; release it before :meth:`close`."""
        r = self.region_of(gpa, length)
        off = gpa - r.gpa
        return memoryview(r.mm)[off:off + length]

    def alloc(self, size: int, align: int = 64) -> int:
        """Carve ``size`` bytes (``align``-aligned GPA) out of the regions, first fit in order."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValidationError("guest memory", f"alloc({size}, align={align})")
        idx, off = self._cursor
        while idx < len(self.regions):
            r = self.regions[idx]
            start = -(-(r.gpa + off) // align) * align
            if start + size <= r.end:
                self._cursor = (idx, start + size - r.gpa)
                return start
            idx, off = idx + 1, 0
        raise ValidationError("guest memory",
                              f"out of guest memory allocating {size} bytes",
                              hint="add a larger region")

    def table(self) -> ctypes.Structure:
        """The variable-length ``struct vhost_memory`` for VHOST_SET_MEM_TABLE."""
        table = V.vhost_memory_with(len(self.regions))
        table.nregions = len(self.regions)
        for i, r in enumerate(self.regions):
            table.regions[i].guest_phys_addr = r.gpa
            table.regions[i].memory_size = r.size
            table.regions[i].userspace_addr = r.hva
        return table

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        """Unmap every region (idempotent).  Raises BufferError if a view is still held."""
        while self.regions:
            self.regions[-1].mm.close()
            self.regions.pop()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
