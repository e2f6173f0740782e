"""Driver-side split virtqueue (vhostctl.vring) against a device model written from the spec.

The :class:`Device` below plays vhost-net's part: it only looks at the shared memory (never at
the driver's Python state), follows virtio 1.2 §2.7 and the checks of
``drivers/vhost/vhost.c`` (``vhost_get_vq_desc``, ``vhost_enable_notify``, ``vhost_notify``),
and reports whether it would interrupt, so kick/interrupt suppression is tested end to end.
"""

from __future__ import annotations

import mmap
import struct
import sys
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostctl._uapi.virtio_ring import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    vring_avail,
    vring_desc,
    vring_need_event,
    vring_size,
    vring_used,
    vring_used_elem,
)
from vhostctl.errors import IntegrityError, ValidationError, VhostctlError
from vhostctl.vring import VRING_NUM_MAX, RingFull, RingLayout, SplitVring

OTHER_ORDER = "big" if sys.byteorder == "little" else "little"


class DeviceError(Exception):
    """The driver broke a rule the kernel enforces (the device would mark the vq broken)."""


class Device:
    """Device side of one split ring, reading and writing only the shared buffer."""

    def __init__(
        self,
        buf: Any,
        layout: RingLayout,
        *,
        event_idx: bool = False,
        byteorder: str = "little",
        base: int = 0,
    ) -> None:
        p = "<" if byteorder == "little" else ">"
        self.mv = memoryview(buf).cast("B")
        self.lay = layout
        self.num = layout.num
        self.event_idx = event_idx
        self.h = struct.Struct(p + "H")
        self.elem = struct.Struct(p + "II")
        self.desc = struct.Struct(p + "QIHH")
        # vhost: last_avail_idx from VHOST_SET_VRING_BASE, last_used_idx read from used->idx.
        self.last_avail = base
        self.used_idx = self.r16(layout.used + 2)

    def r16(self, off: int) -> int:
        return self.h.unpack_from(self.mv, off)[0]

    def w16(self, off: int, v: int) -> None:
        self.h.pack_into(self.mv, off, v & 0xFFFF)

    # -- available side ---------------------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        return self.r16(self.lay.avail + 2)

    def available(self) -> int:
        n = (self.avail_idx - self.last_avail) & 0xFFFF
        if n > self.num:  # vhost_get_vq_desc(): "Guest moved avail index from %u to %u"
            raise DeviceError(f"avail index moved from {self.last_avail} to {self.avail_idx}")
        return n

    def pop(self) -> tuple[int, list[tuple[int, int, int]]]:
        """Take the next available chain: (head, [(addr, len, flags), ...])."""
        if not self.available():
            raise DeviceError("nothing available")
        slot = self.last_avail % self.num
        head = self.r16(self.lay.avail + 4 + 2 * slot)
        if head >= self.num:
            raise DeviceError(f"head {head} out of range")
        chain = []
        i = head
        seen_write = False
        while True:
            if len(chain) >= self.num:
                raise DeviceError("loop detected")
            addr, ln, flags, nxt = self.desc.unpack_from(self.mv, self.lay.desc + 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                raise DeviceError("unexpected indirect descriptor")
            if flags & VRING_DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                raise DeviceError("descriptor has out after in")
            if ln == 0:
                raise DeviceError("zero-length descriptor")
            chain.append((addr, ln, flags))
            if not flags & VRING_DESC_F_NEXT:
                break
            i = nxt
            if i >= self.num:
                raise DeviceError(f"next {i} out of range")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head, chain

    def disable_notify(self) -> None:
        # vhost_disable_notify(): only the flag, and only without EVENT_IDX.
        if not self.event_idx:
            self.w16(self.lay.used, VRING_USED_F_NO_NOTIFY)

    def enable_notify(self) -> bool:
        """Going to sleep: ask for kicks; True if buffers arrived meanwhile (don't sleep)."""
        if self.event_idx:
            self.w16(self.lay.avail_event, self.last_avail)
        else:
            self.w16(self.lay.used, 0)
        return self.avail_idx != self.last_avail

    # -- used side --------------------------------------------------------------------------

    def write_elems(self, elems: list[tuple[int, int]]) -> None:
        for k, (hid, ln) in enumerate(elems):
            slot = (self.used_idx + k) % self.num
            self.elem.pack_into(self.mv, self.lay.used + 4 + 8 * slot, hid, ln)

    def push(self, elems: list[tuple[int, int]]) -> bool:
        """Complete ``elems`` with one used->idx store; return whether to interrupt."""
        self.write_elems(elems)
        old = self.used_idx
        new = (old + len(elems)) & 0xFFFF
        self.used_idx = new
        self.w16(self.lay.used + 2, new)
        # virtio 1.2 §2.7.7.2 / vhost_notify().
        if self.event_idx:
            return vring_need_event(self.r16(self.lay.used_event), new, old)
        return not self.r16(self.lay.avail) & VRING_AVAIL_F_NO_INTERRUPT


def make(
    num: int = 8,
    *,
    event_idx: bool = False,
    byteorder: str = "little",
    base: int = 0,
    vq: int | None = None,
) -> tuple[SplitVring, Device, bytearray]:
    layout = RingLayout.compute(num, event_idx=event_idx)
    buf = bytearray(layout.end)
    vr = SplitVring(buf, layout, event_idx=event_idx, byteorder=byteorder, vq=vq)
    if base:
        vr.reset(base)
    dev = Device(buf, layout, event_idx=event_idx, byteorder=byteorder, base=base)
    return vr, dev, buf


def check_invariants(vr: SplitVring) -> None:
    assert vr.num_free + vr.in_flight == vr.num
    assert 0 <= vr.outstanding <= vr.in_flight


# == uapi mirror ===============================================================================


def test_uapi_struct_sizes() -> None:
    import ctypes

    assert ctypes.sizeof(vring_desc) == 16
    assert ctypes.sizeof(vring_avail) == 4
    assert vring_avail.ring.offset == 4
    assert ctypes.sizeof(vring_used_elem) == 8
    assert ctypes.sizeof(vring_used) == 4
    assert vring_used.ring.offset == 4


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_is_window_membership(event: int, new: int, old: int) -> None:
    # Notify iff event lies in [old, new) modulo 2**16.
    assert vring_need_event(event, new, old) == ((event - old) & 0xFFFF < (new - old) & 0xFFFF)


@settings(max_examples=50)
@given(
    st.integers(0, 15).map(lambda e: 1 << e),
    st.sampled_from([4, 16, 64, 4096, 8192]),
)
def test_layout_matches_legacy_vring_size(num: int, align: int) -> None:
    layout = RingLayout.compute(num, align=align)
    assert layout.size == layout.end == vring_size(num, align)
    assert (layout.desc, layout.avail) == (0, 16 * num)
    assert layout.used % align == 0


# == layout validation =========================================================================


def test_layout_compute_default() -> None:
    lay = RingLayout.compute(256)
    assert (lay.desc, lay.avail, lay.used) == (0, 4096, 8192)
    assert (lay.avail_size, lay.used_size) == (6 + 512, 6 + 2048)
    assert lay.used_event == 4096 + 4 + 512
    assert lay.avail_event == 8192 + 4 + 2048
    compact = RingLayout.compute(256, event_idx=False, align=4)
    assert (compact.avail_size, compact.used_size) == (4 + 512, 4 + 2048)
    assert compact.used == 4096 + 516


def test_layout_base_offset_leaves_prefix_alone() -> None:
    lay = RingLayout.compute(4, base=4096)
    buf = bytearray(b"\xaa" * (lay.end + 16))
    SplitVring(buf, lay)
    assert buf[:4096] == b"\xaa" * 4096
    assert buf[lay.end :] == b"\xaa" * 16
    assert lay.desc == 4096 and lay.size == lay.end - 4096


@pytest.mark.parametrize("num", [0, 3, 6, 32769, 65536, -8, 1.0, True, "8"])
def test_layout_rejects_bad_num(num: Any) -> None:
    with pytest.raises(ValidationError) as ei:
        RingLayout.compute(num)
    assert "queue size" in str(ei.value)


@pytest.mark.parametrize("num", [1, 2, 256, VRING_NUM_MAX])
def test_layout_accepts_power_of_two_num(num: int) -> None:
    assert RingLayout.compute(num).num == num


@pytest.mark.parametrize(
    ("desc", "avail", "used", "what"),
    [
        (8, 4096, 8192, "desc offset 0x8 is not 16-byte aligned"),
        (0, 4097, 8192, "avail offset 0x1001 is not 2-byte aligned"),
        (0, 4096, 8194, "used offset 0x2002 is not 4-byte aligned"),
        (0, 4096 - 2, 8192, "desc and avail areas overlap"),
        (0, 4096, 4096 + 512, "avail and used areas overlap"),
        (-16, 4096, 8192, "desc offset -16 is not a non-negative int"),
    ],
)
def test_layout_rejects_bad_offsets(desc: int, avail: int, used: int, what: str) -> None:
    with pytest.raises(ValidationError) as ei:
        RingLayout(256, desc, avail, used)
    assert what in str(ei.value)
    assert ei.value.errno == 22


@pytest.mark.parametrize("align", [0, 2, 3, 100, 4095])
def test_layout_rejects_bad_align(align: int) -> None:
    with pytest.raises(ValidationError):
        RingLayout.compute(8, align=align)


def test_layout_rejects_bad_base() -> None:
    with pytest.raises(ValidationError, match="16-byte aligned"):
        RingLayout.compute(8, base=8)


def test_vring_rejects_bad_buffers() -> None:
    lay = RingLayout.compute(8)
    with pytest.raises(ValidationError, match="needs"):
        SplitVring(bytearray(lay.end - 1), lay)
    with pytest.raises(ValidationError, match="read-only"):
        SplitVring(bytes(lay.end), lay)
    with pytest.raises(ValidationError, match="not a buffer"):
        SplitVring([0] * lay.end, lay)
    with pytest.raises(ValidationError, match="used_event"):
        SplitVring(bytearray(lay.end), RingLayout.compute(8, event_idx=False), event_idx=True)
    with pytest.raises(ValidationError, match="byteorder"):
        SplitVring(bytearray(lay.end), lay, byteorder="native")


def test_mmap_buffer_and_close() -> None:
    lay = RingLayout.compute(64)
    mm = mmap.mmap(-1, lay.end)
    vr = SplitVring(mm, lay)
    with pytest.raises(BufferError):
        mm.close()  # still exported: the reason close() exists
    dev = Device(mm, lay)
    vr.add_buf(0x1000, 100, "t")
    vr.publish()
    head, _ = dev.pop()
    dev.push([(head, 0)])
    assert vr.harvest() == [("t", 0)]
    dev.mv.release()
    vr.close()
    vr.close()
    mm.close()


# == basic data path ===========================================================================


def test_initial_state_is_zeroed() -> None:
    lay = RingLayout.compute(8)
    buf = bytearray(b"\xff" * lay.end)
    vr = SplitVring(buf, lay, vq=1)
    for off, size in (
        (lay.desc, lay.desc_size),
        (lay.avail, lay.avail_size),
        (lay.used, lay.used_size),
    ):
        assert buf[off : off + size] == bytes(size)
    assert buf[lay.avail + lay.avail_size] == 0xFF  # padding is not ours to touch
    assert (vr.num, vr.num_free, vr.in_flight, vr.outstanding) == (8, 8, 0, 0)
    assert (vr.avail_idx, vr.last_used_idx, vr.pending) == (0, 0, 0)
    assert (vr.desc_offset, vr.avail_offset, vr.used_offset) == (lay.desc, lay.avail, lay.used)
    assert vr.layout is lay and vr.vq == 1 and not vr.event_idx and vr.interrupts_enabled
    assert not vr.has_used() and vr.harvest() == []
    assert not vr.publish()  # nothing to publish, nothing to kick
    assert "num=8" in repr(vr)


def test_add_publish_harvest_single() -> None:
    vr, dev, _ = make()
    head = vr.add([(0x10000, 60)], [], "tx0")
    assert vr.pending == 1 and dev.available() == 0  # not visible before publish
    assert vr.publish() is True
    assert vr.pending == 0 and dev.available() == 1
    h, chain = dev.pop()
    assert h == head and chain == [(0x10000, 60, 0)]
    assert vr.num_free == 7 and not vr.has_used()
    assert dev.push([(h, 0)]) is True
    assert vr.has_used()
    assert vr.harvest() == [("tx0", 0)]
    assert vr.num_free == 8 and vr.last_used_idx == 1 and not vr.has_used()


def test_chain_flags_and_order() -> None:
    vr, dev, _ = make()
    head = vr.add([(0x1000, 12), (0x2000, 100)], [(0x3000, 1500), (0x4000, 500)], "rx")
    assert vr.num_free == 4 and vr.in_flight == 4 and vr.outstanding == 1
    vr.publish()
    h, chain = dev.pop()
    assert h == head
    nw = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
    assert chain == [
        (0x1000, 12, VRING_DESC_F_NEXT),
        (0x2000, 100, VRING_DESC_F_NEXT),
        (0x3000, 1500, nw),
        (0x4000, 500, VRING_DESC_F_WRITE),
    ]
    dev.push([(h, 2000)])  # exactly the writable total is fine
    assert vr.harvest() == [("rx", 2000)]
    assert vr.num_free == 8


def test_write_only_chain_and_add_buf() -> None:
    vr, dev, _ = make()
    vr.add([], [(0x5000, 64)], "a")
    vr.add_buf(0x6000, 128, "b", writable=True)
    vr.add_buf(0x7000, 32, "c")
    vr.publish()
    chains = [dev.pop() for _ in range(3)]
    assert [c for _, c in chains] == [
        [(0x5000, 64, VRING_DESC_F_WRITE)],
        [(0x6000, 128, VRING_DESC_F_WRITE)],
        [(0x7000, 32, 0)],
    ]
    dev.push([(chains[1][0], 128), (chains[0][0], 1), (chains[2][0], 0)])  # out of order
    assert vr.harvest() == [("b", 128), ("a", 1), ("c", 0)]


def test_batch_publish_is_one_index_store() -> None:
    vr, dev, _ = make()
    for i in range(5):
        vr.add_buf(0x1000 * (i + 1), 10, i)
        assert dev.avail_idx == 0
    assert vr.pending == 5 and vr.avail_idx == 5
    assert vr.publish()
    assert dev.avail_idx == 5 and vr.pending == 0


def test_harvest_max_and_batches() -> None:
    vr, dev, _ = make()
    for i in range(6):
        vr.add_buf(0x1000, 10, i, writable=True)
    vr.publish()
    dev.push([(dev.pop()[0], 5) for _ in range(6)])
    assert vr.harvest(max=0) == []
    assert vr.harvest(max=2) == [(0, 5), (1, 5)]
    assert vr.harvest(4) == [(2, 5), (3, 5), (4, 5), (5, 5)]
    assert vr.harvest() == []


# == argument validation and ring full =========================================================


@pytest.mark.parametrize(
    ("out", "in_", "match"),
    [
        ([], [], "empty"),
        ([(0x1000, 0)], [], "zero-length"),
        ([(0x1000, 10)], [(0x2000, 0)], "zero-length"),
        ([(-1, 10)], [], "u64 addr"),
        ([(1 << 64, 10)], [], "u64 addr"),
        ([(0x1000, 1 << 32)], [], "u32 len"),
        ([(0x1000, -5)], [], "u32 len"),
        ([(0x1000,)], [], "u64 addr"),
        ([("x", 10)], [], "u64 addr"),
        ([(0, 0xFFFFFFFF)], [(0, 0xFFFFFFFF)], "exceeds 2\\*\\*32"),
        ([(0x1000, 1)] * 9, [], "exceeds queue size 8"),
    ],
)
def test_add_rejects_bad_chains_without_side_effects(out: Any, in_: Any, match: str) -> None:
    vr, dev, _ = make()
    vr.add_buf(0x1000, 1, "keep")
    before = (vr.num_free, vr.avail_idx, vr.pending, vr.outstanding)
    with pytest.raises(ValidationError, match=match):
        vr.add(out, in_, "bad")
    assert (vr.num_free, vr.avail_idx, vr.pending, vr.outstanding) == before
    # The free list is intact: the remaining 7 descriptors are still allocatable.
    for i in range(7):
        vr.add_buf(0x1000, 1, i)
    vr.publish()
    assert sorted(dev.pop()[0] for _ in range(8)) == list(range(8))


def test_add_buf_rejects_bad_args() -> None:
    vr, _, _ = make()
    with pytest.raises(ValidationError):
        vr.add_buf(0x1000, 0, "x")
    with pytest.raises(ValidationError):
        vr.add_buf(-1, 10, "x")
    assert vr.num_free == 8 and vr.avail_idx == 0


def test_ring_full() -> None:
    vr, dev, _ = make(num=4)
    vr.add([(0x1000, 1), (0x2000, 1)], [(0x3000, 1)], "three")
    with pytest.raises(RingFull) as ei:
        vr.add([(0x1000, 1)], [(0x3000, 1)], "two")
    assert isinstance(ei.value, VhostctlError) and not isinstance(ei.value, ValidationError)
    assert ei.value.errno == 28  # ENOSPC
    assert "needs 2 descriptors, 1 free" in str(ei.value)
    vr.add_buf(0x4000, 1, "one")
    with pytest.raises(RingFull):
        vr.add_buf(0x4000, 1, "none")
    assert vr.num_free == 0 and vr.in_flight == 4 and vr.outstanding == 2
    vr.publish()
    dev.push([(dev.pop()[0], 1), (dev.pop()[0], 0)])
    assert vr.harvest() == [("three", 1), ("one", 0)]
    assert vr.num_free == 4
    # A chain of the whole ring fits once everything is back.
    vr.add([(0x1000, 1)] * 4, [], "all")
    vr.publish()
    assert len(dev.pop()[1]) == 4


# == 16-bit wrap-around ========================================================================


@pytest.mark.parametrize("event_idx", [False, True])
def test_wraparound_past_65535(event_idx: bool) -> None:
    vr, dev, _ = make(num=8, event_idx=event_idx, base=65530)
    assert (vr.avail_idx, vr.last_used_idx, dev.avail_idx, dev.used_idx) == (65530,) * 4
    seen: list[int] = []
    token = 0
    for _ in range(10):
        tokens = []
        for _ in range(3):
            vr.add([(0x1000, 10)], [(0x2000, 20)], token)
            tokens.append(token)
            token += 1
        assert vr.publish()  # the device went back to sleep last round, so it must be kicked
        popped = [dev.pop()[0] for _ in range(3)]
        assert dev.enable_notify() is False  # idle again: flags 0 / avail_event = last_avail
        assert dev.push([(h, 20) for h in popped])  # used_event == last_used: interrupt
        got = vr.harvest()
        assert got == [(t, 20) for t in tokens]
        seen.append(vr.last_used_idx)
        assert vr.avail_idx == vr.last_used_idx == dev.avail_idx == dev.used_idx
        check_invariants(vr)
    assert seen[0] == 65533 and seen[1] == 0 and seen[-1] == (65530 + 30) & 0xFFFF


def test_reset_returns_outstanding_tokens_and_rebases() -> None:
    vr, dev, _ = make(num=8)
    vr.add_buf(0x1000, 10, "a", writable=True)
    vr.add([(0x1000, 10)], [(0x2000, 10)], "b")
    vr.publish()
    dev.pop()
    vr.add_buf(0x1000, 10, "c")  # never published
    assert sorted(vr.reset(1234)) == ["a", "b", "c"]
    assert (vr.num_free, vr.outstanding, vr.pending) == (8, 0, 0)
    assert (vr.avail_idx, vr.last_used_idx) == (1234, 1234)
    dev = Device(dev.mv, vr.layout, base=1234)
    assert dev.avail_idx == 1234 and dev.used_idx == 1234
    vr.add_buf(0x1000, 10, "d")
    assert vr.publish()
    h, _ = dev.pop()
    dev.push([(h, 0)])
    assert vr.harvest() == [("d", 0)]
    with pytest.raises(ValidationError):
        vr.reset(65536)


def test_reset_with_event_idx_requests_first_kick() -> None:
    vr, _, _ = make(num=8, event_idx=True, base=40000)
    vr.add_buf(0x1000, 10, "x")
    assert vr.publish()  # avail_event was reset to base, so the first buffer kicks


# == notification suppression ==================================================================


def test_no_notify_flag_suppresses_kick() -> None:
    vr, dev, _ = make()
    dev.disable_notify()
    vr.add_buf(0x1000, 10, 1)
    assert vr.publish() is False
    assert dev.enable_notify() is True  # the device re-checks and finds the buffer
    dev.pop()
    vr.add_buf(0x1000, 10, 2)
    assert vr.publish() is True


@pytest.mark.parametrize("base", [0, 100, 65530, 65535])
@pytest.mark.parametrize("event_off", [-3, -1, 0, 1, 2, 3, 4, 5, 100])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_event_idx_kick_decision(base: int, event_off: int, batch: int) -> None:
    vr, dev, _ = make(num=8, event_idx=True, base=base)
    avail_event = (base + event_off) & 0xFFFF
    dev.w16(vr.layout.avail_event, avail_event)
    dev.w16(vr.layout.used, VRING_USED_F_NO_NOTIFY)  # must be ignored with EVENT_IDX
    for i in range(batch):
        vr.add_buf(0x1000, 10, i)
    new = (base + batch) & 0xFFFF
    expected = vring_need_event(avail_event, new, base)
    assert expected == (0 <= event_off < batch)
    assert vr.publish() is expected


def test_event_idx_device_sleep_wake_cycle() -> None:
    vr, dev, _ = make(num=8, event_idx=True)
    vr.add_buf(0x1000, 10, 0)
    assert vr.publish()
    dev.pop()
    # Device busy polling (avail_event left behind): further publishes need no kick.
    vr.add_buf(0x1000, 10, 1)
    assert not vr.publish()
    dev.pop()
    assert dev.enable_notify() is False  # nothing new: device sleeps, avail_event = 2
    vr.add_buf(0x1000, 10, 2)
    vr.add_buf(0x1000, 10, 3)
    assert vr.publish()  # crossing avail_event wakes it


def test_no_interrupt_flag() -> None:
    vr, dev, _ = make()
    vr.disable_interrupts()
    assert dev.r16(vr.layout.avail) == VRING_AVAIL_F_NO_INTERRUPT
    assert not vr.interrupts_enabled
    for i in range(3):
        vr.add_buf(0x1000, 10, i)
    vr.publish()
    assert dev.push([(dev.pop()[0], 0)]) is False
    assert vr.enable_interrupts() is True  # a completion is already waiting: re-harvest
    assert dev.r16(vr.layout.avail) == 0
    assert vr.harvest() == [(0, 0)]
    assert vr.enable_interrupts() is False  # safe to sleep now
    assert dev.push([(dev.pop()[0], 0)]) is True


def test_event_idx_interrupt_suppression() -> None:
    vr, dev, _ = make(num=8, event_idx=True, base=65534)
    ue = vr.layout.used_event
    assert dev.r16(ue) == 65534
    for i in range(8):
        vr.add_buf(0x1000, 10, i)
    vr.publish()
    heads = [dev.pop()[0] for _ in range(8)]
    assert dev.push([(heads[0], 0)]) is True  # used_event == last_used: first one signals
    assert dev.push([(heads[1], 0)]) is False  # not harvested yet: no more signals
    assert vr.harvest() == [(0, 0), (1, 0)]
    assert dev.r16(ue) == 0  # harvest re-arms used_event = last_used (wrapped)
    vr.disable_interrupts()
    assert dev.r16(ue) == 0xFFFF and dev.r16(vr.layout.avail) == 0  # flags stay 0 (§2.7.7.1)
    for h in heads[2:5]:
        assert dev.push([(h, 0)]) is False
    assert vr.harvest() == [(2, 0), (3, 0), (4, 0)]
    assert dev.r16(ue) == 2  # parked one behind last_used while disabled
    assert dev.push([(heads[5], 0)]) is False
    assert vr.enable_interrupts() is True  # pending: re-harvest
    assert dev.r16(ue) == 3
    assert vr.harvest() == [(5, 0)]
    assert vr.enable_interrupts() is False
    assert dev.push([(heads[6], 0), (heads[7], 0)]) is True


# == hostile device ============================================================================


def _hostile_setup(vq: int | None = 3) -> tuple[SplitVring, Device, list[int]]:
    vr, dev, _ = make(num=8, vq=vq)
    heads = [
        vr.add([(0x1000, 10)], [(0x2000, 100)], "a"),
        vr.add([(0x1000, 10)], [], "b"),
        vr.add([], [(0x2000, 50)], "c"),
    ]
    vr.publish()
    for _ in heads:
        dev.pop()
    return vr, dev, heads


def _assert_consistent_then_recover(vr: SplitVring, dev: Device, expect_tokens: set[str]) -> None:
    check_invariants(vr)
    snap = (vr.num_free, vr.in_flight, vr.outstanding, vr.last_used_idx)
    with pytest.raises(IntegrityError):  # stays broken: the bad entry is still there
        vr.harvest()
    assert (vr.num_free, vr.in_flight, vr.outstanding, vr.last_used_idx) == snap
    assert set(vr.reset(0)) == expect_tokens
    # The free list is whole again: num single buffers get num distinct heads.
    ids = {vr.add_buf(0x1000, 1, i) for i in range(vr.num)}
    assert ids == set(range(vr.num))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ((8, 0), "id 8 out of range"),
        ((0xFFFFFFFF, 0), "out of range"),
        ((7, 0), "id 7 is not the head of a buffer in flight"),  # free descriptor
        ((1, 0), "id 1 is not the head"),  # second descriptor of chain "a"
        ((0, 101), "len 101 exceeds its 100 writable bytes"),
    ],
)
def test_hostile_used_entry(bad: tuple[int, int], match: str) -> None:
    vr, dev, heads = _hostile_setup()
    assert heads == [0, 2, 3]
    before = (vr.num_free, vr.in_flight, vr.outstanding, vr.last_used_idx)
    dev.push([bad])
    with pytest.raises(IntegrityError, match=match) as ei:
        vr.harvest()
    assert "vq=3" in str(ei.value) and ei.value.errno == 5  # EIO
    assert (vr.num_free, vr.in_flight, vr.outstanding, vr.last_used_idx) == before
    _assert_consistent_then_recover(vr, dev, {"a", "b", "c"})


def test_hostile_len_on_readonly_chain() -> None:
    vr, dev, heads = _hostile_setup()
    dev.push([(heads[1], 1)])  # "b" has no writable bytes
    with pytest.raises(IntegrityError, match="len 1 exceeds its 0 writable"):
        vr.harvest()


def test_hostile_good_prefix_is_returned_first() -> None:
    vr, dev, heads = _hostile_setup()
    dev.push([(heads[2], 50), (heads[0], 5), (8, 0)])
    assert vr.harvest() == [("c", 50), ("a", 5)]  # good prefix delivered, nothing lost
    assert vr.num_free == 7 and vr.outstanding == 1  # only "b" (one descriptor) left
    with pytest.raises(IntegrityError, match="id 8 out of range"):
        vr.harvest()
    _assert_consistent_then_recover(vr, dev, {"b"})


def test_hostile_duplicate_completion_same_batch() -> None:
    vr, dev, heads = _hostile_setup()
    dev.push([(heads[1], 0), (heads[1], 0)])
    assert vr.harvest() == [("b", 0)]
    assert vr.num_free == 5  # freed once, not twice
    with pytest.raises(IntegrityError, match="not the head"):
        vr.harvest()
    _assert_consistent_then_recover(vr, dev, {"a", "c"})


def test_hostile_duplicate_completion_across_harvests() -> None:
    vr, dev, heads = _hostile_setup()
    dev.push([(heads[0], 1)])
    assert vr.harvest() == [("a", 1)]
    dev.push([(heads[0], 1)])
    with pytest.raises(IntegrityError, match="id 0 is not the head"):
        vr.harvest()
    _assert_consistent_then_recover(vr, dev, {"b", "c"})


def test_hostile_used_idx_jump() -> None:
    vr, dev, _ = _hostile_setup(vq=None)
    dev.w16(vr.layout.used + 2, 4)  # 4 completions claimed, 3 buffers in flight
    with pytest.raises(IntegrityError, match="only 3 buffers are in flight") as ei:
        vr.harvest()
    assert str(ei.value).startswith("vring harvest")
    assert vr.num_free == 4 and vr.last_used_idx == 0
    dev.w16(vr.layout.used + 2, 0xFFFF)  # "backwards"
    with pytest.raises(IntegrityError):
        vr.harvest()


# == byte order ================================================================================


@pytest.mark.parametrize("event_idx", [False, True])
def test_foreign_byte_order(event_idx: bool) -> None:
    vr, dev, _ = make(num=8, event_idx=event_idx, byteorder=OTHER_ORDER, base=0x0102)
    vr.add([(0x1122334455667788, 0x01020304)], [(0x10, 0x0A0B)], "x")
    assert vr.publish()
    assert dev.avail_idx == 0x0103
    h, chain = dev.pop()
    assert chain == [
        (0x1122334455667788, 0x01020304, VRING_DESC_F_NEXT),
        (0x10, 0x0A0B, VRING_DESC_F_WRITE),
    ]
    assert dev.push([(h, 0x0A0B)])
    assert vr.harvest() == [("x", 0x0A0B)]
    vr.disable_interrupts()
    if event_idx:
        assert dev.r16(vr.layout.used_event) == 0x0102
    else:
        assert dev.r16(vr.layout.avail) == VRING_AVAIL_F_NO_INTERRUPT


# == properties ================================================================================


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    num=st.sampled_from([1, 2, 4, 8, 16]),
    base=st.one_of(st.sampled_from([0, 65535, 65534, 65530, 65520]), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
    byteorder=st.sampled_from(["little", "big"]),
)
def test_random_interleavings(
    data: st.DataObject, num: int, base: int, event_idx: bool, byteorder: str
) -> None:
    """No token lost or duplicated, descriptors conserved, no lost kick or interrupt."""
    vr, dev, _ = make(num, event_idx=event_idx, byteorder=byteorder, base=base)
    chains: dict[int, tuple[int, int]] = {}  # token -> (descriptors, writable bytes)
    fifo: deque[int] = deque()  # added, not yet popped: the device sees them in this order
    inside: dict[int, tuple[int, int]] = {}  # head -> (token, writable) held by the device
    completed: dict[int, int] = {}  # token -> len the device reported
    harvested: set[int] = set()
    next_token = 0
    device_sleeping = False  # device called enable_notify() and found nothing to do
    driver_sleeping = False  # driver's enable_interrupts() said nothing is pending

    def pop_one() -> None:
        head, chain = dev.pop()
        tok = fifo.popleft()
        wlen = sum(ln for _, ln, f in chain if f & VRING_DESC_F_WRITE)
        assert chains[tok] == (len(chain), wlen)
        assert head not in inside
        inside[head] = (tok, wlen)

    for _ in range(data.draw(st.integers(1, 80), label="steps")):
        op = data.draw(
            st.sampled_from(
                ["add", "add", "add", "publish", "pop", "complete", "harvest", "irq", "sleep"]
            ),
            label="op",
        )
        if op == "add":
            n_out = data.draw(st.integers(0, 3))
            n_in = data.draw(st.integers(0 if n_out else 1, 3))
            outs = [(0x1000 * (k + 1), data.draw(st.integers(1, 2048))) for k in range(n_out)]
            ins = [(0x80000 + k, data.draw(st.integers(1, 2048))) for k in range(n_in)]
            try:
                vr.add(outs, ins, next_token)
            except RingFull:
                assert num >= n_out + n_in > vr.num_free
                continue
            except ValidationError:
                assert n_out + n_in > num
                continue
            chains[next_token] = (n_out + n_in, sum(ln for _, ln in ins))
            fifo.append(next_token)
            next_token += 1
        elif op == "publish":
            fresh = vr.pending
            kicked = vr.publish()
            if device_sleeping and fresh:
                assert kicked, "lost kick: the device sleeps and was not woken"
            if kicked:
                device_sleeping = False
                dev.disable_notify()
        elif op == "pop" and not device_sleeping:
            for _ in range(min(dev.available(), data.draw(st.integers(1, 4)))):
                pop_one()
        elif op == "complete" and inside:
            heads = data.draw(
                st.lists(st.sampled_from(sorted(inside)), min_size=1, max_size=4, unique=True)
            )
            elems = []
            for h in heads:
                tok, wlen = inside.pop(h)
                completed[tok] = data.draw(st.integers(0, wlen))
                elems.append((h, completed[tok]))
            irq = dev.push(elems)
            if driver_sleeping:
                assert irq, "lost interrupt: the driver sleeps and was not woken"
            if irq:
                driver_sleeping = False
        elif op == "harvest":
            for tok, ln in vr.harvest(data.draw(st.one_of(st.none(), st.integers(0, 4)))):
                assert completed.get(tok) == ln
                assert tok not in harvested
                harvested.add(tok)
        elif op == "irq":
            if data.draw(st.booleans()):
                vr.disable_interrupts()
                driver_sleeping = False
            else:
                driver_sleeping = not vr.enable_interrupts()
        elif op == "sleep" and not device_sleeping and not dev.available():
            device_sleeping = not dev.enable_notify()
        check_invariants(vr)
        live = [t for t in chains if t not in harvested]
        assert vr.outstanding == len(live)
        assert vr.in_flight == sum(chains[t][0] for t in live)

    # Drain: everything ever added comes back exactly once.
    vr.publish()
    while dev.available():
        pop_one()
    for h, (tok, _) in list(inside.items()):
        completed[tok] = 0
        dev.push([(h, 0)])
    while vr.has_used():
        for tok, _ in vr.harvest():
            assert tok not in harvested
            harvested.add(tok)
    assert not fifo
    assert harvested == set(chains)
    assert (vr.num_free, vr.outstanding, vr.in_flight) == (num, 0, 0)
