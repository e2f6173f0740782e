"""Guest memory: regions, GPA translation and the vhost_memory table (no kernel needed)."""

from __future__ import annotations

import ctypes

import pytest

from vhostctl.errors import ValidationError
from vhostctl.memory import PAGE, GuestMemory, max_mem_regions


def test_regions_are_page_aligned_and_translate():
    with GuestMemory() as mem:
        a = mem.add_region(100)
        b = mem.add_region(3 * PAGE)
        assert (a.gpa, a.size) == (0, PAGE)
        assert (b.gpa, b.size) == (PAGE, 3 * PAGE)
        assert mem.hva(PAGE + 5) == b.hva + 5
        v = mem.view(PAGE + 8, 4)
        v[:] = b"abcd"
        assert ctypes.string_at(b.hva + 8, 4) == b"abcd"  # the view is the mapping itself
        v.release()
        table = mem.table()
        assert table.nregions == 2
        assert [(table.regions[i].guest_phys_addr, table.regions[i].memory_size,
                 table.regions[i].userspace_addr) for i in range(2)] == \
            [(0, PAGE, a.hva), (PAGE, 3 * PAGE, b.hva)]


@pytest.mark.parametrize("size", [0, -4096])
def test_rejects_empty_regions(size):
    with GuestMemory() as mem, pytest.raises(ValidationError, match="positive"):
        mem.add_region(size)


def test_rejects_overlap_and_misalignment():
    with GuestMemory() as mem:
        mem.add_region(4 * PAGE, gpa=0x100000)
        with pytest.raises(ValidationError, match="overlaps"):
            mem.add_region(PAGE, gpa=0x100000 + 3 * PAGE)
        with pytest.raises(ValidationError, match="aligned"):
            mem.add_region(PAGE, gpa=0x123)
        mem.add_region(PAGE, gpa=0x100000 + 4 * PAGE)  # adjacent is fine


def test_region_limit_comes_from_the_module_parameter(tmp_path):
    param = tmp_path / "max_mem_regions"
    param.write_text("3\n")
    assert max_mem_regions(param) == 3
    assert max_mem_regions(tmp_path / "absent") == 64
    with GuestMemory(limit=1) as mem:
        mem.add_region(PAGE)
        with pytest.raises(ValidationError, match="max_mem_regions=1"):
            mem.add_region(PAGE)


def test_translation_outside_memory_is_refused():
    with GuestMemory() as mem:
        mem.add_region(PAGE)
        with pytest.raises(ValidationError, match="not inside"):
            mem.hva(PAGE - 2, 4)
        with pytest.raises(ValidationError, match="not inside"):
            mem.view(10 * PAGE, 1)


def test_alloc_is_aligned_first_fit_and_bounded():
    with GuestMemory() as mem:
        mem.add_region(PAGE)
        mem.add_region(PAGE)
        a = mem.alloc(100)
        b = mem.alloc(100, align=256)
        assert a == 0 and b == 256
        c = mem.alloc(PAGE)  # does not fit the rest of region 0: next region
        assert c == PAGE
        with pytest.raises(ValidationError, match="out of guest memory"):
            mem.alloc(1)
        with pytest.raises(ValidationError):
            mem.alloc(8, align=3)


def test_close_is_idempotent():
    mem = GuestMemory()
    mem.add_region(PAGE)
    mem.close()
    mem.close()
    assert mem.regions == []
