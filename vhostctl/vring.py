"""The driver side of a split virtqueue (virtio 1.2 §2.7) living in memory we own.

vhost-net is the *device*: it reads the descriptor table and available ring from our memory and
writes the used ring back.  This module is everything a guest driver does with those three
areas, and nothing else: no file descriptors, no ioctls.  It works on any writable buffer (an
``mmap.mmap`` for real use, a ``bytearray`` in tests) at byte offsets given by a
:class:`RingLayout`; the caller turns offsets into addresses for ``VHOST_SET_VRING_ADDR``.

Memory ordering
---------------
The device runs concurrently on another CPU, so the order in which our stores become visible
matters (virtio 1.2 §2.7.13.3 and §2.7.14; Linux ``virtio_wmb``/``virtio_rmb``/``virtio_mb`` in
``drivers/virtio/virtio_ring.c``).  Python has no barrier API; this module relies on:

- *Program order of stores* (descriptors and avail ring entries before ``avail->idx``) and of
  loads (``used->idx`` before the used elements it covers).  Each access is a separate C call
  inside CPython, which the C compiler cannot reorder, and x86-64 (TSO) keeps store->store and
  load->load order in hardware.  On weakly ordered CPUs (arm64, ppc64, riscv) this is NOT
  guaranteed; treat the module as x86-only for live rings until a native barrier helper exists.
- *Single-access loads/stores of shared indices*: every shared u16/u32 is accessed through a
  native-format ``memoryview`` cast, which CPython implements as a fixed-size ``memcpy`` that
  compilers turn into one load/store, so neither side can observe a torn index.  (``struct``
  with an explicit byte order may go byte by byte, and does for a foreign byte order; it is
  only used for the descriptor table, which the device reads after ``avail->idx``.)
- *Store->load ordering* before the notification-suppression checks (``publish`` reading
  ``avail_event``/``used->flags`` after storing ``avail->idx``; ``enable_interrupts`` reading
  ``used->idx`` after storing ``used_event``) needs a full barrier even on x86, or both sides can
  decide the other one will act and a wake-up is lost (Linux: ``virtio_mb()`` in
  ``virtqueue_kick_prepare_split``, ``virtqueue_poll`` and the ``virtio_store_mb`` of
  ``used_event``).  :func:`_full_fence` gets one from a lock acquire/release, whose atomics
  are ``lock``-prefixed instructions on x86.

To sleep until completions arrive, call :meth:`SplitVring.enable_interrupts` and sleep only if
it returns False; otherwise harvest again (the kernel's ``virtqueue_enable_cb()`` contract).

Slot mode (:meth:`SplitVring.use_slots`) is the bulk fast path for drivers that own fixed
buffers, as every NIC driver does: descriptor ``i`` is pinned to buffer ``i``, and while the
device completes in order the avail ring never changes either, so posting and harvesting cost
a handful of C-level bulk operations per batch instead of Python work per buffer.

A :class:`SplitVring` is not thread-safe: one thread drives it (like one NAPI context).
"""

from __future__ import annotations

import array
import collections
import errno
import itertools
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._uapi.virtio_ring import (
    VRING_AVAIL_ALIGN_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_ALIGN_SIZE,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ALIGN_SIZE,
    VRING_USED_F_NO_NOTIFY,
    vring_need_event,
)
from .errors import IntegrityError, ValidationError, VhostctlError

__all__ = ["VRING_NUM_MAX", "RingFull", "RingLayout", "SplitVring"]

# Largest queue size: the split ring spec maximum (virtio 1.2 §2.7: "The maximum Queue Size
# value is 32768"), which is also the largest power of two that drivers/vhost/vhost.c accepts
# in VHOST_SET_VRING_NUM: ``if (!s.num || s.num > 0xffff || (s.num & (s.num - 1)))``.
VRING_NUM_MAX = 32768

_DESC_SIZE = 16  # sizeof(struct vring_desc)
_ELEM_SIZE = 8  # sizeof(struct vring_used_elem)


class RingFull(VhostctlError):
    """Not enough free descriptors for this chain *right now*.

    Back-pressure, not a usage error: harvest completions and retry.  Nothing was changed.
    """

    def __init__(self, op: str, detail: str) -> None:
        super().__init__(op, errno.ENOSPC, detail)
        self.detail = detail


def _check_num(num: object) -> int:
    if isinstance(num, bool) or not isinstance(num, int):
        raise ValidationError("vring layout", f"queue size must be an int, not {num!r}")
    if not 1 <= num <= VRING_NUM_MAX or num & (num - 1):
        raise ValidationError(
            "vring layout",
            f"queue size {num} is not a power of two in 1..{VRING_NUM_MAX}",
            hint="vhost.c VHOST_SET_VRING_NUM rejects it with EINVAL",
        )
    return num


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


@dataclass(frozen=True)
class RingLayout:
    """Where the three areas of one split ring sit inside a buffer (byte offsets).

    Sizes follow virtio 1.2 §2.7 (table of alignments and sizes) and match what vhost checks
    in ``vq_access_ok()`` (``vhost_get_{desc,avail,used}_size``): the 2-byte ``used_event``
    and ``avail_event`` trailers are counted only when ``event_idx`` is set.  Validated on
    construction, so a layout that exists is one the kernel will accept.
    """

    num: int
    desc: int
    avail: int
    used: int
    event_idx: bool = True

    def __post_init__(self) -> None:
        _check_num(self.num)
        for name, off, align in (
            ("desc", self.desc, VRING_DESC_ALIGN_SIZE),
            ("avail", self.avail, VRING_AVAIL_ALIGN_SIZE),
            ("used", self.used, VRING_USED_ALIGN_SIZE),
        ):
            if isinstance(off, bool) or not isinstance(off, int) or off < 0:
                raise ValidationError(
                    "vring layout", f"{name} offset {off!r} is not a non-negative int"
                )
            if off % align:
                # vhost.c VHOST_SET_VRING_ADDR returns EINVAL for misaligned avail/used; the
                # 16-byte descriptor table alignment is virtio 1.2 §2.7.
                raise ValidationError(
                    "vring layout",
                    f"{name} offset {off:#x} is not {align}-byte aligned",
                    hint="virtio 1.2 §2.7: desc 16, avail 2, used 4",
                )
        areas = sorted(
            [
                (self.desc, self.desc + self.desc_size, "desc"),
                (self.avail, self.avail + self.avail_size, "avail"),
                (self.used, self.used + self.used_size, "used"),
            ]
        )
        for (_, end, a), (start, _, b) in itertools.pairwise(areas):
            if end > start:
                raise ValidationError("vring layout", f"{a} and {b} areas overlap")

    @classmethod
    def compute(
        cls, num: int, base: int = 0, *, event_idx: bool = True, align: int = 4096
    ) -> RingLayout:
        """The legacy contiguous layout (``vring_init()`` in ``<linux/virtio_ring.h>``).

        desc at ``base``, avail right after it, used at the next ``align`` boundary.  With
        ``event_idx`` and ``base=0``, ``layout.size == vring_size(num, align)``.
        """
        _check_num(num)
        if isinstance(align, bool) or not isinstance(align, int):
            raise ValidationError("vring layout", f"align must be an int, not {align!r}")
        if align < VRING_USED_ALIGN_SIZE or align & (align - 1):
            raise ValidationError(
                "vring layout", f"used ring alignment {align} is not a power of two >= 4"
            )
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise ValidationError("vring layout", f"base {base!r} is not a non-negative int")
        avail = base + _DESC_SIZE * num
        avail_end = avail + 4 + 2 * num + (2 if event_idx else 0)
        return cls(num, base, avail, _align_up(avail_end, align), event_idx)

    @property
    def desc_size(self) -> int:
        return _DESC_SIZE * self.num

    @property
    def avail_size(self) -> int:
        return 4 + 2 * self.num + (2 if self.event_idx else 0)

    @property
    def used_size(self) -> int:
        return 4 + _ELEM_SIZE * self.num + (2 if self.event_idx else 0)

    @property
    def used_event(self) -> int:
        """Offset of ``used_event`` (``avail->ring[num]``), meaningful with EVENT_IDX."""
        return self.avail + 4 + 2 * self.num

    @property
    def avail_event(self) -> int:
        """Offset of ``avail_event`` (after ``used->ring[num]``), meaningful with EVENT_IDX."""
        return self.used + 4 + _ELEM_SIZE * self.num

    @property
    def start(self) -> int:
        return min(self.desc, self.avail, self.used)

    @property
    def end(self) -> int:
        """One past the last byte of the ring: the buffer must be at least this long."""
        return max(
            self.desc + self.desc_size, self.avail + self.avail_size, self.used + self.used_size
        )

    @property
    def size(self) -> int:
        """Bytes from the first area to the end of the last (padding included)."""
        return self.end - self.start


def _bswap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def _bswap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


_max = max  # harvest(max=...) shadows the builtin


def _matches(expect: bytes, used8: memoryview, num: int, start: int, first: int, n: int) -> bool:
    """Do the ``n`` used elements from ring position ``start`` equal ``expect`` from byte
    ``first`` on?  One memcmp per piece (``bytes.startswith`` at an offset copies nothing).
    The elements are loaded after ``used->idx`` (program order; see the module docstring)."""
    end = start + n
    if end <= num:
        return expect.startswith(used8[8 * start:8 * end], first)
    return expect.startswith(used8[8 * start:], first) and expect.startswith(
        used8[:8 * (end - num)], first + 8 * (num - start))


_fence_lock = threading.Lock()


def _full_fence() -> None:
    # A full (store->load) barrier on x86: CPython's Lock is built on atomic read-modify-writes
    # (glibc sem_trywait/sem_post up to 3.12, PyMutex from 3.13), i.e. `lock cmpxchg`/`lock
    # xadd`, and "reads or writes cannot be reordered with locked instructions" (Intel SDM vol.
    # 3A, memory ordering).  Acquire+release is NOT a full barrier on arm64.
    _fence_lock.acquire()
    _fence_lock.release()


# The same two calls for the per-batch hot paths, without a Python frame around them.
_fence_acquire, _fence_release = _fence_lock.acquire, _fence_lock.release


class SplitVring:
    """Driver side of one split virtqueue: add buffers, publish them, harvest completions.

    ``buf`` is any writable C-contiguous buffer; the ring area is zeroed on construction.  The
    vring keeps a ``memoryview`` on it until :meth:`close` (an ``mmap`` cannot be closed while
    exported).  ``event_idx`` must match whether VIRTIO_RING_F_EVENT_IDX was negotiated with
    VHOST_SET_FEATURES.  ``byteorder`` is the ring's byte order: ``"little"`` whenever
    VIRTIO_F_VERSION_1 is negotiated (virtio 1.2 §2.4), the host's for legacy rings.  ``vq``
    only labels error messages.

    Descriptor bookkeeping (free list, per-head token/tail/count/writable length) lives in
    Python lists, never re-read from shared memory, so a misbehaving device cannot corrupt it:
    the same reason Linux keeps ``desc_extra`` shadows.
    """

    def __init__(
        self,
        buf: Any,
        layout: RingLayout,
        *,
        event_idx: bool = False,
        byteorder: str = "little",
        vq: int | None = None,
    ) -> None:
        if not isinstance(layout, RingLayout):
            raise ValidationError("vring", f"layout must be a RingLayout, not {layout!r}")
        if byteorder not in ("little", "big"):
            raise ValidationError("vring", f"byteorder must be 'little' or 'big': {byteorder!r}")
        if event_idx and not layout.event_idx:
            raise ValidationError(
                "vring",
                "event_idx ring on a layout without room for used_event/avail_event",
                hint="RingLayout.compute(num, event_idx=True)",
            )
        try:
            mv = memoryview(buf)
        except TypeError:
            raise ValidationError("vring", f"{type(buf).__name__} is not a buffer") from None
        if mv.readonly:
            mv.release()
            raise ValidationError("vring", "ring buffer is read-only")
        try:
            mv = mv.cast("B")
        except TypeError:
            raise ValidationError("vring", "ring buffer is not C-contiguous") from None
        if layout.end > mv.nbytes:
            n = mv.nbytes
            mv.release()
            raise ValidationError(
                "vring", f"ring needs {layout.end} bytes of buffer, buffer has {n}"
            )

        self._layout = layout
        self._event_idx = bool(event_idx)
        self._byteorder = byteorder
        self._swap = byteorder != sys.byteorder
        self._vq = vq
        self._op = "vring" if vq is None else f"vring(vq={vq})"
        num = layout.num
        self._num = num
        self._mask = num - 1

        # Views.  Native 'H'/'I' casts give single-access loads/stores (module docstring).
        self._mv = mv
        self._avail16 = mv[layout.avail : layout.avail + layout.avail_size].cast("H")
        self._used16 = mv[layout.used : layout.used + layout.used_size].cast("H")
        self._used32 = mv[layout.used + 4 : layout.used + 4 + _ELEM_SIZE * num].cast("I")
        self._used8 = mv[layout.used + 4 : layout.used + 4 + _ELEM_SIZE * num]
        self._used_event_i = 2 + num  # index of used_event in _avail16
        self._avail_event_i = 2 + 4 * num  # index of avail_event in _used16
        self._desc = layout.desc
        self._pack_desc = struct.Struct(("<" if byteorder == "little" else ">") + "QIHH").pack_into
        self.reset(0)

    # -- lifecycle -------------------------------------------------------------------------

    def reset(self, base: int = 0) -> list[Any]:
        """Forget every buffer and restart both indices at ``base``; return dropped tokens.

        Only with the device stopped.  To restart a ring: detach the backend
        (VHOST_NET_SET_BACKEND fd -1), ``harvest()`` what was completed, read
        ``last_avail_idx`` with VHOST_GET_VRING_BASE, ``reset(base)``, VHOST_SET_VRING_BASE
        with the same ``base``, re-attach.  vhost re-reads ``used->idx`` (which this writes to
        ``base``) when the backend is attached (``vhost_vq_init_access()``), so both sides agree.
        The returned tokens are buffers the driver no longer owns in the ring: an RX caller
        re-``add()``s them; a TX caller treats them as not sent.  Also the hook for starting at
        an arbitrary index (e.g. near the 16-bit wrap).
        """
        if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= 0xFFFF:
            raise ValidationError("vring reset", f"base {base!r} is not in 0..65535")
        num = self._num
        lay = self._layout
        if getattr(self, "_slots", None) is not None:
            dropped: list[Any] = self._slots_in_flight()
        else:
            dropped = [m[0] for m in getattr(self, "_meta", ()) if m is not None]
        self._slots: list[int] | None = None
        self._slot_writable = False
        # (length, used elements of an in-order device giving every buffer that length):
        # see _pattern().
        self._expect: tuple[int, bytes] | None = None
        mv = self._mv
        for off, size in (
            (lay.desc, lay.desc_size),
            (lay.avail, lay.avail_size),
            (lay.used, lay.used_size),
        ):
            mv[off : off + size] = bytes(size)
        # Free list 0 -> 1 -> ... -> num-1, chained like the kernel's (``next`` of a free desc).
        self._next = [(i + 1) & self._mask for i in range(num)]
        self._free_head = 0
        self._num_free = num
        # Per head of an in-flight chain: (token, tail id, descriptors, writable bytes);
        # None for free descriptors and non-head members of a chain.
        self._meta: list[tuple[Any, int, int, int] | None] = [None] * num
        self._heads = 0  # chains in flight
        self._added = 0  # heads written to the avail ring since the last publish()
        self._avail_shadow = base
        self._last_used = base
        self._irq_enabled = True
        self._st16(self._avail16, 1, base)
        self._st16(self._used16, 1, base)
        if self._event_idx:
            # "Interrupt me on the first completion" and, standing in for the stopped device,
            # "kick me on the first buffer": a zeroed avail_event would suppress the first
            # kick after a restart at base != 0 and the device would never look.
            self._st16(self._avail16, self._used_event_i, base)
            self._st16(self._used16, self._avail_event_i, base)
        return dropped

    def _slots_in_flight(self) -> list[int]:
        if self._ooo is not None:
            return [i for i, b in enumerate(self._ooo[0]) if b]
        p, base, mask = self._last_used, self._slot_base, self._mask
        return [(p + k - base) & mask for k in range(self._heads)]

    def close(self) -> None:
        """Release the buffer views (so an ``mmap`` can be closed).  Idempotent."""
        for name in ("_desc32", "_iota32", "_zero32", "_used8", "_used32", "_used16",
                     "_avail16", "_mv"):
            view = getattr(self, name, None)
            if view is not None:
                view.release()

    def __enter__(self) -> SplitVring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<SplitVring vq={self._vq} num={self._num} free={self._num_free} "
            f"avail={self._avail_shadow} used={self._last_used}>"
        )

    # -- shared-memory accessors (single native access, swapped if the ring is foreign) ----

    def _ld16(self, view: memoryview, i: int) -> int:
        v = view[i]
        return _bswap16(v) if self._swap else v

    def _st16(self, view: memoryview, i: int, v: int) -> None:
        view[i] = _bswap16(v) if self._swap else v

    # -- producing -------------------------------------------------------------------------

    def add(
        self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]], token: Any
    ) -> int:
        """Queue one chain: device-readable ``out`` buffers, then device-writable ``in_``.

        Buffers are ``(guest_physical_addr, length)``.  The head goes into the avail ring but
        is invisible to the device until :meth:`publish`.  Returns the head id.  Raises
        :class:`ValidationError` for a malformed chain and :class:`RingFull` when there are
        fewer free descriptors than buffers; either way nothing is changed.
        """
        if self._slots is not None:
            raise ValidationError(self._op + " add", "the ring is in slot mode: use post()")
        n_out = len(out)
        total = n_out + len(in_)
        if not total:
            raise ValidationError(self._op + " add", "empty descriptor chain")
        if total > self._num:
            # vhost_get_vq_desc(): "Loop detected" once a chain has more than num descriptors.
            raise ValidationError(
                self._op + " add", f"chain of {total} descriptors exceeds queue size {self._num}"
            )
        if total > self._num_free:
            raise RingFull(
                self._op + " add", f"chain needs {total} descriptors, {self._num_free} free"
            )
        nxt = self._next
        pack = self._pack_desc
        mv = self._mv
        d = self._desc
        head = i = last = self._free_head
        k = 0
        wlen = 0
        tot = 0
        try:
            # Readable before writable: vhost_get_vq_desc() rejects "Descriptor has out after
            # in" (virtio 1.2 §2.7.4.2).  Writes only touch free descriptors, so bailing out
            # half-way leaves nothing the device can see.
            for addr, ln in out:
                if not ln:
                    raise ValidationError(self._op + " add", f"zero-length out buffer {k}")
                k += 1
                pack(
                    mv, d + _DESC_SIZE * i, addr, ln, VRING_DESC_F_NEXT if k < total else 0, nxt[i]
                )
                tot += ln
                last = i
                i = nxt[i]
            for addr, ln in in_:
                if not ln:
                    raise ValidationError(self._op + " add", f"zero-length in buffer {k - n_out}")
                k += 1
                flags = VRING_DESC_F_WRITE | (VRING_DESC_F_NEXT if k < total else 0)
                pack(mv, d + _DESC_SIZE * i, addr, ln, flags, nxt[i])
                wlen += ln
                tot += ln
                last = i
                i = nxt[i]
        except (struct.error, TypeError, ValueError) as e:
            raise ValidationError(
                self._op + " add", f"buffer {k}: need (u64 addr, u32 len > 0): {e}"
            ) from None
        if tot > 1 << 32:
            # virtio 1.2 §2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32
            # bytes in total".
            raise ValidationError(self._op + " add", f"chain of {tot} bytes exceeds 2**32")
        self._free_head = i
        self._num_free -= total
        self._meta[head] = (token, last, total, wlen)
        self._heads += 1
        # virtio 1.2 §2.7.13.2: the head goes in ring[idx % num]; the index is only bumped
        # in publish() so that a batch costs one idx store (and at most one kick).
        shadow = self._avail_shadow
        self._avail16[2 + (shadow & self._mask)] = _bswap16(head) if self._swap else head
        self._avail_shadow = (shadow + 1) & 0xFFFF
        self._added += 1
        return head

    def add_buf(self, addr: int, length: int, token: Any, *, writable: bool = False) -> int:
        """Fast path of :meth:`add` for a one-descriptor chain (the common TX/RX frame)."""
        if self._slots is not None:
            raise ValidationError(self._op + " add", "the ring is in slot mode: use post()")
        if not self._num_free:
            raise RingFull(self._op + " add", "no free descriptor")
        if not length:
            raise ValidationError(self._op + " add", "zero-length buffer")
        head = self._free_head
        nxt = self._next[head]
        try:
            self._pack_desc(
                self._mv,
                self._desc + _DESC_SIZE * head,
                addr,
                length,
                VRING_DESC_F_WRITE if writable else 0,
                nxt,
            )
        except (struct.error, TypeError) as e:
            raise ValidationError(self._op + " add", f"need (u64 addr, u32 len > 0): {e}") from None
        self._free_head = nxt
        self._num_free -= 1
        self._meta[head] = (token, head, 1, length if writable else 0)
        self._heads += 1
        shadow = self._avail_shadow
        self._avail16[2 + (shadow & self._mask)] = _bswap16(head) if self._swap else head
        self._avail_shadow = (shadow + 1) & 0xFFFF
        self._added += 1
        return head

    def publish(self) -> bool:
        """Expose everything added since the last call; return True if the device needs a kick.

        One ``avail->idx`` store covers the whole batch (virtio 1.2 §2.7.13.3).  The kick
        decision is §2.7.10: with EVENT_IDX, ``vring_need_event(avail_event, new, old)``;
        otherwise unless the device set VRING_USED_F_NO_NOTIFY.  False when nothing was added.
        """
        added = self._added
        if not added:
            return False
        new = self._avail_shadow
        self._added = 0
        # Descriptors and ring entries were stored before this (program order, see module
        # docstring); this store is the release that hands them over.  Then a store->load
        # barrier: the device may be concurrently re-enabling notifications
        # (vhost_enable_notify() writes avail_event, smp_mb(), re-reads avail->idx).
        if self._swap:
            self._st16(self._avail16, 1, new)
            _full_fence()
            if self._event_idx:
                return vring_need_event(self._ld16(self._used16, self._avail_event_i), new,
                                        (new - added) & 0xFFFF)
            return not (self._ld16(self._used16, 0) & VRING_USED_F_NO_NOTIFY)
        self._avail16[1] = new
        _fence_acquire()
        _fence_release()
        if self._event_idx:
            # vring_need_event(event, new, old), inlined: new - old == added < 2**16.
            return (new - self._used16[self._avail_event_i] - 1) & 0xFFFF < added
        return not (self._used16[0] & VRING_USED_F_NO_NOTIFY)

    # -- consuming -------------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        """The device's ``used->idx`` as it is in memory now (may be ahead of harvest)."""
        return self._ld16(self._used16, 1)

    def has_used(self) -> bool:
        """Are there completions waiting to be harvested?"""
        return self._ld16(self._used16, 1) != self._last_used

    def _pending(self, last: int, max: int | None) -> int:
        """How many used elements to take now: ``used->idx - last``, capped at ``max``.

        Loads ``used->idx`` once; the elements are read after it (program order, see the
        module docstring).  More completions than buffers in flight is a device bug.
        """
        used_idx = self._used16[1]
        if self._swap:
            used_idx = _bswap16(used_idx)
        n = (used_idx - last) & 0xFFFF
        if n > self._heads:
            raise IntegrityError(
                self._op + " harvest",
                f"used->idx moved from {last} to {used_idx} ({n} completions) "
                f"but only {self._heads} buffers are in flight",
            )
        if max is not None and max < n:
            return max if max > 0 else 0
        return n

    def harvest(self, max: int | None = None) -> list[tuple[Any, int]]:
        """Collect completed buffers as ``(token, bytes_written)``, oldest first.

        Reads ``used->idx`` once and walks at most ``max`` new used elements (virtio 1.2
        §2.7.14).  Every element is checked before it is trusted: ``id < num``, ``id`` is the
        head of a chain in flight, ``len`` within that chain's writable bytes.  The first bad
        element stops the walk; the good ones before it are returned and the bad one raises
        :class:`IntegrityError` on the next call (and every call after, until :meth:`reset`),
        so no completion is lost and the free list never takes a chain twice.
        """
        if self._slots is not None:
            raise ValidationError(self._op + " harvest", "the ring is in slot mode: use "
                                  "harvest_slots()")
        last = self._last_used
        n = self._pending(last, max)
        if not n:
            return []
        # Loaded after used->idx (program order; see module docstring).
        start = last & self._mask
        end = start + n
        u32 = self._used32
        if end <= self._num:
            vals = u32[2 * start : 2 * end].tolist()
        else:
            vals = u32[2 * start :].tolist() + u32[: 2 * (end - self._num)].tolist()
        if self._swap:
            vals = [_bswap32(v) for v in vals]

        num = self._num
        metas = self._meta
        nxt = self._next
        free_head = self._free_head
        num_free = self._num_free
        done: list[tuple[Any, int]] = []
        append = done.append
        bad = ""
        for j in range(0, 2 * n, 2):
            hid = vals[j]
            ln = vals[j + 1]
            # Linux virtqueue_get_buf_ctx_split() BAD_RING checks, plus the length check
            # virtio-net does on receive.
            if hid >= num:
                bad = f"id {hid} out of range (num {num})"
                break
            meta = metas[hid]
            if meta is None:
                bad = f"id {hid} is not the head of a buffer in flight"
                break
            tok, tail, count, wlen = meta
            if ln > wlen:
                bad = f"id {hid} len {ln} exceeds its {wlen} writable bytes"
                break
            metas[hid] = None
            nxt[tail] = free_head
            free_head = hid
            num_free += count
            append((tok, ln))
        if done:
            self._free_head = free_head
            self._num_free = num_free
            self._consumed(len(done))
            return done
        if bad:
            raise IntegrityError(
                self._op + " harvest", f"used ring entry at used idx {last}: {bad}"
            )
        return done

    def _consumed(self, k: int) -> None:
        """Advance past ``k`` harvested used elements and re-arm (or park) ``used_event``."""
        self._heads -= k
        self._last_used = last = (self._last_used + k) & 0xFFFF
        if self._event_idx:
            if self._irq_enabled:
                # Re-arm for the next completion and order the store before the caller's
                # next used->idx load (virtqueue_get_buf_ctx_split: virtio_store_mb), else
                # a completion racing with this store would go unsignalled and unseen.
                self._st16(self._avail16, self._used_event_i, last)
                _full_fence()
            elif self._swap:
                self._st16(self._avail16, self._used_event_i, (last - 1) & 0xFFFF)
            else:
                # Keep it parked just behind us (see disable_interrupts).
                self._avail16[self._used_event_i] = (last - 1) & 0xFFFF

    # -- slot mode: one pinned buffer per descriptor, the bulk fast path --------------------

    def use_slots(self, bufs: Sequence[tuple[int, int]], *, writable: bool = False) -> None:
        """Pin buffer ``i`` (``(guest_physical_addr, length)``) to descriptor ``i`` for good.

        Every chain is then one descriptor whose head id is its *slot* number.  Descriptors
        are written here, once; so is the avail ring: while the device completes buffers in
        the order they were made available (vhost-net does, except around zero-copy TX),
        slot ``i`` always sits at avail position ``base + i`` (mod ``num``), so :meth:`post`
        is one index update and :meth:`harvest_slots` a few bulk compares over the used ring,
        whatever the batch size.  The first completion out of order switches the ring, for
        good, to explicit per-slot bookkeeping: still fully checked, only slower.

        Needs an idle ring.  Afterwards :meth:`add`, :meth:`add_buf` and :meth:`harvest` are
        refused until :meth:`reset`; everything else (publish, interrupt suppression,
        introspection) works as before.
        """
        op = self._op + " slots"
        if self._slots is not None:
            raise ValidationError(op, "the ring is already in slot mode")
        if self._heads or self._added:
            raise ValidationError(op, f"slot mode needs an idle ring; {self._heads} buffers "
                                  "are in flight")
        num = self._num
        if len(bufs) != num:
            raise ValidationError(op, f"{len(bufs)} buffers for {num} descriptors: one each")
        pack, mv, d = self._pack_desc, self._mv, self._desc
        flags = VRING_DESC_F_WRITE if writable else 0
        caps: list[int] = []
        try:
            for i, (addr, ln) in enumerate(bufs):
                if not ln:
                    raise ValidationError(op, f"zero-length buffer {i}")
                pack(mv, d + _DESC_SIZE * i, addr, ln, flags, 0)
                caps.append(ln)
        except (struct.error, TypeError, ValueError) as e:
            raise ValidationError(op, f"buffer {len(caps)}: need (u64 addr, u32 len > 0): "
                                  f"{e}") from None
        base = self._avail_shadow
        mask = self._mask
        ring = array.array("H", [(r - base) & mask for r in range(num)])
        iota32 = array.array("I", range(num))
        if self._swap:
            ring.byteswap()
            iota32.byteswap()
        self._avail16[2:2 + num] = ring
        self._slot_base = base
        self._slot_writable = writable
        # A bound that holds for every slot, so one max() checks a whole batch of lengths.
        self._slot_wmin = min(caps) if writable else 0
        self._iota = list(range(num)) * 2
        self._iota32 = memoryview(iota32 * 2)
        self._expect = None
        self._zeros = [0] * num
        self._zero32 = memoryview(array.array("I", bytes(4 * num)))
        self._desc32 = mv[d:d + _DESC_SIZE * num].cast("I")
        self._ooo: tuple[bytearray, collections.deque[int]] | None = None
        self._slots = caps

    def _slot_mode(self, op: str) -> list[int]:
        if self._slots is None:
            raise ValidationError(self._op + " " + op, "the ring is not in slot mode "
                                  "(use_slots() first)")
        return self._slots

    @property
    def slot_mode(self) -> bool:
        return self._slots is not None

    def next_slots(self, count: int) -> list[int]:
        """The slots the next :meth:`post` of ``count`` would hand over (at most ``num_free``).

        Fill their buffers (and :meth:`set_len` for TX) first, then post.
        """
        self._slot_mode("next_slots")
        count = min(count, self._num_free)
        if count <= 0:
            return []
        if self._ooo is None:
            start = (self._avail_shadow - self._slot_base) & self._mask
            return self._iota[start:start + count]
        return list(itertools.islice(self._ooo[1], count))

    def set_len(self, slot: int, length: int) -> None:
        """How many bytes of a device-readable slot the next post carries (a TX frame)."""
        caps = self._slot_mode("set_len")
        if self._slot_writable:
            raise ValidationError(self._op + " set_len", "device-writable slots keep their "
                                  "full length")
        if not 0 <= slot < self._num or not 0 < length <= caps[slot]:
            raise ValidationError(self._op + " set_len", f"slot {slot} length {length}: need "
                                  f"a slot < {self._num} and 1..{caps[slot % self._num]} bytes")
        self._desc32[4 * slot + 2] = _bswap32(length) if self._swap else length

    def post(self, count: int) -> None:
        """Hand the next ``count`` free slots (see :meth:`next_slots`) to the device.

        Visible at the next :meth:`publish`.  Raises :class:`RingFull` (and changes nothing)
        when fewer slots are free.
        """
        if self._slots is None:
            self._slot_mode("post")
        if count <= 0:
            if count < 0:
                raise ValidationError(self._op + " post", f"count {count} is negative")
            return
        if count > self._num_free:
            raise RingFull(self._op + " post", f"{count} slots asked, {self._num_free} free")
        if self._ooo is None:
            self._avail_shadow = (self._avail_shadow + count) & 0xFFFF
        else:
            busy, free = self._ooo
            a16, mask, swap = self._avail16, self._mask, self._swap
            shadow = self._avail_shadow
            for _ in range(count):
                i = free.popleft()
                busy[i] = 1
                a16[2 + (shadow & mask)] = _bswap16(i) if swap else i
                shadow = (shadow + 1) & 0xFFFF
            self._avail_shadow = shadow
        self._added += count
        self._heads += count
        self._num_free -= count

    def harvest_slots(self, max: int | None = None) -> tuple[list[int], list[int]]:
        """Completed slots and the bytes the device wrote into each: ``(slots, lens)``.

        Same checks as :meth:`harvest` (id in flight, length within the slot's writable
        bytes; the good prefix first, the bad element raises on the next call).  In order,
        they are made over the whole batch at once: ids compared against the avail order and
        the largest length against the smallest slot.  Harvested slots become free in
        completion order, which is the order :meth:`next_slots` hands them out again.
        """
        caps = self._slots
        if caps is None:
            caps = self._slot_mode("harvest_slots")
        last = self._last_used
        n = self._pending(last, max)
        if not n:
            return [], []
        num = self._num
        start = last & self._mask
        end = start + n
        u32 = self._used32
        # Loaded after used->idx (program order; see module docstring).
        pieces = (u32[2 * start:2 * end],) if end <= num else (u32[2 * start:],
                                                               u32[:2 * (end - num)])
        state = self._ooo
        if state is None:
            first = (last - self._slot_base) & self._mask
            if len(pieces) == 1:
                p = pieces[0]
                in_order = p[::2] == self._iota32[first:first + n]
                zero = in_order and not self._slot_writable and p[1::2] == self._zero32[:n]
            else:
                p, p2 = pieces
                k = len(p) // 2
                in_order = (p[::2] == self._iota32[first:first + k]
                            and p2[::2] == self._iota32[first + k:first + n])
                zero = (in_order and not self._slot_writable and p[1::2] == self._zero32[:k]
                        and p2[1::2] == self._zero32[:n - k])
            if in_order:
                ids = self._iota[first:first + n]
                if zero:
                    lens = self._zeros[:n]  # TX: vhost writes nothing, checked in bulk
                else:
                    lens = self._used_lens(pieces)
                    if _max(lens) > self._slot_wmin:
                        self._truncate_at_bad_len(ids, lens, caps, last)
                self._num_free += len(ids)
                self._consumed(len(ids))
                return ids, lens
            state = self._ooo = self._out_of_order_state()
        raw = pieces[0][::2].tolist()
        if len(pieces) > 1:
            raw += pieces[1][::2].tolist()
        if self._swap:
            raw = [_bswap32(v) for v in raw]
        return self._harvest_out_of_order(state, caps, raw, self._used_lens(pieces), last)

    def reclaim(self) -> int:
        """Slot mode: take every completion without listing it; how many slots came free.

        For device-readable slots that go out again as they are (a TX ring of prebuilt frames,
        :meth:`Datapath.resend`), where the caller needs a count, not the slots: see
        :meth:`harvest_uniform`.  Anything else (writable slots, an out of order or bad
        element) goes through :meth:`harvest_slots`, which names the bad one.
        """
        if not self._slot_writable:
            got = self.harvest_uniform()
            if got is not None:
                return got[1]
        return len(self.harvest_slots()[0])

    def harvest_uniform(self, max_len: int | None = None) -> tuple[int, int, int] | None:
        """Slot mode: take every completion at once if all are in order and of one length.

        Returns ``(first slot, count, length)``: the slots are ``first``, ``first + 1``, ...
        (mod ``num``), each with ``length`` bytes written (0 for device-readable slots).
        ``(0, 0, 0)`` when there is nothing new.  None, taking nothing, when the new elements
        are out of order, differ in length, or the length exceeds ``max_len`` or the slots:
        :meth:`harvest_slots` then lists and checks them one by one.  The checks are one
        memcmp of the new used elements against the ``(slot, length)`` pairs an in-order
        device writes, so a batch costs the same whatever its size: the bulk path of RX
        (:meth:`Datapath.rx_burst`) and of TX completions (:meth:`reclaim`).
        """
        if self._slots is None:
            self._slot_mode("harvest_uniform")
        if self._ooo is not None:
            return None
        last = self._last_used
        used_idx = self._used16[1]
        if self._swap:
            used_idx = _bswap16(used_idx)
        n = (used_idx - last) & 0xFFFF
        if not n:
            return 0, 0, 0
        if n > self._heads:
            return None  # harvest_slots() raises
        # Loaded after used->idx (program order; see module docstring).  The first and the
        # last length must agree before a pattern is built for them.
        u32, mask = self._used32, self._mask
        length, end_len = u32[2 * (last & mask) + 1], u32[2 * ((last + n - 1) & mask) + 1]
        if self._swap:
            length, end_len = _bswap32(length), _bswap32(end_len)
        first = (last - self._slot_base) & mask
        if (length != end_len or length > self._slot_wmin
                or (max_len is not None and length > max_len)
                or not _matches(self._pattern(length), self._used8, self._num, last & mask,
                                8 * first, n)):
            return None
        self._num_free += n
        self._consumed(n)
        return first, n, length

    def _pattern(self, length: int) -> bytes:
        """The used elements an in-order device writes when every buffer gets ``length``
        bytes: ``(slot, length)`` pairs in ring byte order, twice over for wrap-around.
        Kept for the last length asked (RX traffic of one frame size builds it once)."""
        if self._expect is not None and self._expect[0] == length:
            return self._expect[1]
        num = self._num
        elems = array.array("I", bytes(16 * num))
        elems[0::2] = array.array("I", range(num)) * 2
        elems[1::2] = array.array("I", [length]) * (2 * num)
        if self._swap:
            elems.byteswap()
        pattern = elems.tobytes()
        self._expect = length, pattern
        return pattern

    def pump(self, batch: int, kick: Callable[[], None], sleep: Callable[[], None]
             ) -> Iterator[int]:
        """Slot mode, device-readable: re-post the loaded slots, one batch cycle per ``next()``.

        A cycle is :meth:`cycle`: take the completions, post every whole ``batch`` that fits
        with one ``avail->idx`` store, call ``kick()`` if the device asked for it (EVENT_IDX),
        ask for a signal once 3/4 of what is in flight is done and call ``sleep()`` unless that
        already happened.  Yields how many slots it posted.  While the device completes in
        order the steps are fused into one loop over local variables: under emulation each
        Python bytecode costs about a microsecond, and the method calls of the separate steps
        cost more than vhost's own work on a batch.  The ring's attributes are brought up to
        date before ``sleep()`` and every yield, so between cycles (and if ``sleep()`` raises)
        every other method sees a consistent ring.  Needs EVENT_IDX and a ring in the host's
        byte order.  ``sleep()`` returns once the device signalled, or raises.
        """
        op = self._op + " pump"
        self._slot_mode("pump")
        if self._slot_writable:
            raise ValidationError(op, "device-writable slots are refilled, not re-posted")
        if not self._event_idx or self._swap:
            raise ValidationError(op, "needs EVENT_IDX and a ring in the host's byte order")
        if not 0 < batch <= self._num:
            raise ValidationError(op, f"batch {batch}: must be 1..{self._num}")
        return self._pump(batch, kick, sleep)

    def cycle(self, batch: int, kick: Callable[[], None], sleep: Callable[[], None]) -> int:
        """One cycle of :meth:`pump` in separate steps; how many slots it posted.

        :meth:`reclaim`, :meth:`post` of every whole ``batch`` that fits, :meth:`publish` (and
        ``kick()`` if asked), :meth:`enable_interrupts_delayed` at 3/4 of what is in flight
        (``sleep()`` unless already done), :meth:`disable_interrupts`.  The definition the fused
        loop follows, and its path once the ring has left in-order mode.
        """
        self.reclaim()
        free = self._num_free
        k = free - free % batch
        self.post(k)
        if self.publish():
            kick()
        if not self.enable_interrupts_delayed():
            sleep()
        self.disable_interrupts()
        return k

    def _pump(self, batch: int, kick: Callable[[], None], sleep: Callable[[], None]
              ) -> Iterator[int]:
        u16, a16, used8 = self._used16, self._avail16, self._used8
        uev, aev, num, mask, base = (self._used_event_i, self._avail_event_i, self._num,
                                     self._mask, self._slot_base)
        expect = self._pattern(0)
        acquire, release = _fence_acquire, _fence_release
        while True:
            last, out = self._last_used, self._heads
            n = (u16[1] - last) & 0xFFFF
            # reclaim(): anything but in-order (slot, 0) completions, or posts left unpublished
            # by a caller between cycles, take the separate steps.
            if self._ooo is not None or self._added or (n and (
                    n > out or not _matches(expect, used8, num, last & mask,
                                            8 * ((last - base) & mask), n))):
                yield self.cycle(batch, kick, sleep)
                continue
            last = (last + n) & 0xFFFF
            out -= n
            free = num - out
            k = free - free % batch  # post()
            avail = self._avail_shadow
            if k:
                avail = (avail + k) & 0xFFFF
                out += k
                a16[1] = avail  # publish(): the release
            want = out * 3 // 4 or 1  # enable_interrupts_delayed()
            a16[uev] = (last + want - 1) & 0xFFFF
            self._last_used, self._heads, self._num_free, self._avail_shadow = (
                last, out, num - out, avail)
            self._irq_enabled = True
            # One store->load barrier for both stores above and both loads below: publish()'s
            # before avail_event, enable_interrupts_delayed()'s before used->idx.
            acquire()
            release()
            if k and (avail - u16[aev] - 1) & 0xFFFF < k:  # vring_need_event(), as in publish()
                kick()
            if (u16[1] - last) & 0xFFFF < want:
                sleep()
            self._irq_enabled = False
            a16[uev] = (last - 1) & 0xFFFF  # disable_interrupts()
            yield k

    def _used_lens(self, pieces: tuple[memoryview, ...]) -> list[int]:
        lens = pieces[0][1::2].tolist()
        if len(pieces) > 1:
            lens += pieces[1][1::2].tolist()
        if self._swap:
            lens = [_bswap32(v) for v in lens]
        return lens

    def _truncate_at_bad_len(self, ids: list[int], lens: list[int], caps: list[int],
                             last: int) -> None:
        """Cut both lists before the first length beyond its slot (raise if that is the first)."""
        wr = self._slot_writable
        for k, (i, ln) in enumerate(zip(ids, lens, strict=True)):
            if ln > (caps[i] if wr else 0):
                if not k:
                    raise IntegrityError(
                        self._op + " harvest", f"used ring entry at used idx {last}: id {i} "
                        f"len {ln} exceeds its {caps[i] if wr else 0} writable bytes")
                del ids[k:], lens[k:]
                return

    def _out_of_order_state(self) -> tuple[bytearray, collections.deque[int]]:
        """From the in-order picture, build the explicit one: which slots are out, which free."""
        base, mask = self._slot_base, self._mask
        busy = bytearray(self._num)
        p = self._last_used
        for _ in range(self._heads):
            busy[(p - base) & mask] = 1
            p += 1
        free = collections.deque((q - base) & mask for q in range(p, p + self._num_free))
        return busy, free

    def _harvest_out_of_order(self, state: tuple[bytearray, collections.deque[int]],
                              caps: list[int], raw: list[int], lens: list[int],
                              last: int) -> tuple[list[int], list[int]]:
        """Per-element walk once the device has completed out of order: each id checked."""
        busy, free = state
        wr, num = self._slot_writable, self._num
        ids: list[int] = []
        bad = ""
        for i, ln in zip(raw, lens, strict=True):
            if i >= num:
                bad = f"id {i} out of range (num {num})"
                break
            if not busy[i]:
                bad = f"id {i} is not the head of a buffer in flight"
                break
            if ln > (caps[i] if wr else 0):
                bad = f"id {i} len {ln} exceeds its {caps[i] if wr else 0} writable bytes"
                break
            busy[i] = 0
            free.append(i)
            ids.append(i)
        if not ids and bad:
            raise IntegrityError(self._op + " harvest", f"used ring entry at used idx {last}: "
                                 f"{bad}")
        del lens[len(ids):]
        self._num_free += len(ids)
        self._consumed(len(ids))
        return ids, lens

    # -- interrupt (used buffer notification) suppression, virtio 1.2 §2.7.7 ----------------

    def disable_interrupts(self) -> None:
        """Ask the device not to signal the call eventfd (a hint; it may still do so).

        Without EVENT_IDX: set VRING_AVAIL_F_NO_INTERRUPT.  With it the device ignores the
        flags (which the driver must leave 0, §2.7.7.1), so park ``used_event`` one behind
        ``last_used_idx``: the device would have to complete 65536 more buffers to reach it.
        """
        self._irq_enabled = False
        i, v = ((self._used_event_i, (self._last_used - 1) & 0xFFFF) if self._event_idx
                else (0, VRING_AVAIL_F_NO_INTERRUPT))
        self._avail16[i] = _bswap16(v) if self._swap else v

    def enable_interrupts(self) -> bool:
        """Ask for a signal on the next completion; True if completions are already waiting.

        A True return means the caller must harvest again instead of sleeping: completions
        that landed before the device saw the re-enable will not be signalled (Linux
        ``virtqueue_enable_cb()`` returning false).
        """
        self._irq_enabled = True
        if self._event_idx:
            self._st16(self._avail16, self._used_event_i, self._last_used)
        else:
            self._st16(self._avail16, 0, 0)
        _full_fence()  # store used_event/flags before loading used->idx (virtqueue_poll)
        return self.has_used()

    def enable_interrupts_delayed(self, after: int | None = None) -> bool:
        """Ask for a signal only once ``after`` more buffers completed; True if they already did.

        Why: a driver waiting for room (TX) or for a burst (RX) needs one wake-up per batch, not
        per buffer (Linux ``virtqueue_enable_cb_delayed()``).  ``after`` defaults to 3/4 of
        the buffers in flight and is clamped to 1..in flight, so the signal can always come.
        Without EVENT_IDX the device cannot count: this is :meth:`enable_interrupts`.
        """
        if not self._event_idx:
            return self.enable_interrupts()
        last = self._last_used
        out = (self._avail_shadow - last) & 0xFFFF
        want = out * 3 // 4 if after is None else after
        if want > out:
            want = out
        if want < 1:
            want = 1
        self._irq_enabled = True
        if self._swap:
            self._st16(self._avail16, self._used_event_i, (last + want - 1) & 0xFFFF)
            _full_fence()
            return ((self._ld16(self._used16, 1) - last) & 0xFFFF) >= want
        self._avail16[self._used_event_i] = (last + want - 1) & 0xFFFF
        _fence_acquire()  # as in enable_interrupts
        _fence_release()
        return ((self._used16[1] - last) & 0xFFFF) >= want

    # -- introspection ---------------------------------------------------------------------

    @property
    def layout(self) -> RingLayout:
        return self._layout

    @property
    def num(self) -> int:
        return self._num

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return self._num_free

    @property
    def in_flight(self) -> int:
        """Descriptors owned by the device or waiting for publish: ``num - num_free``."""
        return self._num - self._num_free

    @property
    def outstanding(self) -> int:
        """Chains (tokens) added and not yet harvested."""
        return self._heads

    @property
    def pending(self) -> int:
        """Heads added since the last :meth:`publish` (not yet visible to the device)."""
        return self._added

    @property
    def avail_idx(self) -> int:
        """Shadow avail index, including heads not yet published."""
        return self._avail_shadow

    @property
    def last_used_idx(self) -> int:
        """Used index up to which completions have been harvested."""
        return self._last_used

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @property
    def interrupts_enabled(self) -> bool:
        return self._irq_enabled

    @property
    def vq(self) -> int | None:
        return self._vq

    @property
    def desc_offset(self) -> int:
        return self._layout.desc

    @property
    def avail_offset(self) -> int:
        return self._layout.avail

    @property
    def used_offset(self) -> int:
        return self._layout.used
