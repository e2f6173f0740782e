"""Slot mode of the split virtqueue (pinned buffers, bulk post/harvest) against the device model.

The :class:`Device` of test_vring reads only shared memory, so what it pops is what vhost-net
would see; every test checks the descriptors and avail entries through it, not through the
driver's own state.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_vring import OTHER_ORDER, Device, check_invariants, make
from vhostctl._uapi.virtio_ring import VRING_DESC_F_WRITE
from vhostctl.errors import IntegrityError, ValidationError
from vhostctl.vring import RingFull, SplitVring

BUF = 0x10000
SZ = 256


def slots(vr: SplitVring, *, writable: bool = False, size: int = SZ) -> list[tuple[int, int]]:
    bufs = [(BUF + i * size, size) for i in range(vr.num)]
    vr.use_slots(bufs, writable=writable)
    return bufs


def pop_all(dev: Device) -> list[int]:
    out = []
    while dev.available():
        out.append(dev.pop()[0])
    return out


def in_flight(num: int, count: int, *, writable: bool = False,
              event_idx: bool = False) -> tuple[SplitVring, Device]:
    """A ring in slot mode with ``count`` slots posted, published and popped by the device."""
    vr, dev, _ = make(num=num, event_idx=event_idx)
    slots(vr, writable=writable)
    vr.post(count)
    vr.publish()
    pop_all(dev)
    return vr, dev


def random_step(vr: SplitVring, dev: Device, out: list[int], kind: int, k: int, flip: bool, *,
                writable: bool) -> list[int] | None:
    """One step of a model test: post ``k`` slots and let the device pop them (``kind`` < 4),
    or complete up to ``k`` popped ones, reversed if ``flip`` (< 8); the completed slots, [] or
    None when it is the caller's turn to harvest.  ``out``: popped, not completed."""
    if kind < 4:
        ids = vr.next_slots(k)
        vr.post(len(ids))
        vr.publish()
        assert [dev.pop()[0] for _ in ids] == ids  # what the device sees: the free slots
        out += ids
        return []
    if kind < 8 and out:
        take = out[:k]
        if flip:
            take.reverse()
        for h in take:
            out.remove(h)
        dev.push([(h, h + 1 if writable else 0) for h in take])
        return take
    return None


def test_descriptors_written_once_and_post_is_an_index_update() -> None:
    vr, dev, _ = make(num=8)
    bufs = slots(vr, writable=True)
    assert vr.slot_mode and vr.num_free == 8
    assert vr.next_slots(3) == [0, 1, 2]
    vr.post(3)
    assert vr.pending == 3 and vr.num_free == 5 and dev.available() == 0
    assert vr.publish() is True
    for i in range(3):
        head, chain = dev.pop()
        assert head == i and chain == [(bufs[i][0], SZ, VRING_DESC_F_WRITE)]
    assert vr.next_slots(100) == [3, 4, 5, 6, 7]
    check_invariants(vr)


def test_harvest_in_order_returns_slots_and_lengths_then_reuses_them() -> None:
    vr, dev, _ = make(num=4)
    slots(vr, writable=True)
    vr.post(4)
    vr.publish()
    heads = pop_all(dev)
    dev.push([(heads[0], 60), (heads[1], 256)])
    assert vr.harvest_slots() == ([0, 1], [60, 256])
    assert vr.num_free == 2 and vr.outstanding == 2
    assert vr.next_slots(4) == [0, 1]  # freed in completion order, handed out again
    vr.post(2)
    vr.publish()
    assert pop_all(dev) == [0, 1]
    dev.push([(2, 1), (3, 2), (0, 3)])
    assert vr.harvest_slots(max=2) == ([2, 3], [1, 2])
    assert vr.harvest_slots() == ([0], [3])
    assert vr.harvest_slots() == ([], [])
    check_invariants(vr)


@pytest.mark.parametrize("event_idx", [False, True])
def test_many_laps_across_the_16_bit_wrap(event_idx: bool) -> None:
    vr, dev, _ = make(num=8, event_idx=event_idx, base=65530)
    slots(vr)
    expect = 0
    for lap in range(40):
        k = 1 + lap % 8
        ids = vr.next_slots(k)
        for s in ids:
            vr.set_len(s, 60 + s)
        vr.post(len(ids))
        vr.publish()
        popped = [dev.pop() for _ in ids]
        assert [h for h, _ in popped] == ids
        assert [c[0][1] for _, c in popped] == [60 + s for s in ids]
        dev.push([(h, 0) for h, _ in popped])
        got, lens = vr.harvest_slots()
        assert got == [(expect + j) % 8 for j in range(len(ids))] and lens == [0] * len(ids)
        expect = (expect + len(ids)) % 8
    assert vr.num_free == 8
    check_invariants(vr)


def test_set_len_validation() -> None:
    vr, _, _ = make(num=4)
    slots(vr)
    for slot, ln in ((4, 10), (-1, 10), (0, 0), (0, SZ + 1)):
        with pytest.raises(ValidationError):
            vr.set_len(slot, ln)
    rx, _, _ = make(num=4)
    slots(rx, writable=True)
    with pytest.raises(ValidationError, match="writable"):
        rx.set_len(0, 10)


def test_post_more_than_free_changes_nothing() -> None:
    vr, _, _ = make(num=4)
    slots(vr)
    vr.post(3)
    with pytest.raises(RingFull):
        vr.post(2)
    assert vr.num_free == 1 and vr.pending == 3
    with pytest.raises(ValidationError):
        vr.post(-1)
    vr.post(0)
    assert vr.pending == 3


def test_slot_mode_refuses_generic_calls_and_busy_rings() -> None:
    vr, _, _ = make(num=4)
    with pytest.raises(ValidationError, match="not in slot mode"):
        vr.post(1)
    with pytest.raises(ValidationError, match="not in slot mode"):
        vr.harvest_slots()
    vr.add_buf(0x1000, 10, "x")
    with pytest.raises(ValidationError, match="idle ring"):
        slots(vr)
    vr2, _, _ = make(num=4)
    with pytest.raises(ValidationError, match="one each"):
        vr2.use_slots([(0x1000, 10)] * 3)
    with pytest.raises(ValidationError, match="zero-length"):
        vr2.use_slots([(0x1000, 10)] * 3 + [(0x2000, 0)])
    with pytest.raises(ValidationError, match="u64 addr"):
        vr2.use_slots([(-1, 10)] * 4)
    slots(vr2)
    for call in (lambda: vr2.add_buf(1, 1, 1), lambda: vr2.add([(1, 1)], [], 1), vr2.harvest,
                 lambda: slots(vr2)):
        with pytest.raises(ValidationError, match="slot mode"):
            call()


def test_reset_leaves_slot_mode_and_returns_slots_in_flight() -> None:
    vr, dev = in_flight(8, 5)
    dev.push([(0, 0), (1, 0)])
    assert vr.harvest_slots()[0] == [0, 1]
    assert sorted(vr.reset(0)) == [2, 3, 4]
    assert not vr.slot_mode
    vr.add_buf(0x1000, 10, "generic again")


def test_out_of_order_completion_switches_to_explicit_bookkeeping() -> None:
    vr, dev, _ = make(num=8, event_idx=True)
    slots(vr)
    vr.post(6)
    vr.publish()
    assert pop_all(dev) == [0, 1, 2, 3, 4, 5]
    dev.push([(2, 0), (0, 0)])  # zero-copy TX can complete like this
    assert vr.harvest_slots() == ([2, 0], [0, 0])
    # Free slots: the never-posted 6, 7 first, then 2, 0 in completion order.
    assert vr.next_slots(8) == [6, 7, 2, 0]
    vr.post(4)
    vr.publish()
    assert pop_all(dev) == [6, 7, 2, 0]  # explicit avail entries now
    dev.push([(1, 0), (7, 0), (3, 0)])
    assert vr.harvest_slots() == ([1, 7, 3], [0, 0, 0])
    check_invariants(vr)
    assert sorted(vr.reset(0)) == [0, 2, 4, 5, 6]


@pytest.mark.parametrize(
    ("elem", "match"),
    [
        ((8, 0), "id 8 out of range"),
        ((6, 0), "id 6 is not the head of a buffer in flight"),
        ((1, 1), "len 1 exceeds its 0 writable bytes"),
    ],
)
def test_hostile_elements_out_of_order(elem: tuple[int, int], match: str) -> None:
    vr, dev = in_flight(8, 4)
    dev.push([(3, 0), elem])
    assert vr.harvest_slots() == ([3], [0])  # the good prefix first
    snap = (vr.num_free, vr.outstanding, vr.last_used_idx)
    for _ in range(2):  # stays broken: the bad entry is still there
        with pytest.raises(IntegrityError, match=match):
            vr.harvest_slots()
    assert (vr.num_free, vr.outstanding, vr.last_used_idx) == snap


def test_hostile_duplicate_and_length_in_order() -> None:
    vr, dev = in_flight(8, 8, writable=True)
    dev.push([(0, 10), (1, SZ + 1)])
    assert vr.harvest_slots() == ([0], [10])
    with pytest.raises(IntegrityError, match="len 257 exceeds its 256"):
        vr.harvest_slots()
    vr2, dev2 = in_flight(8, 2)
    dev2.push([(0, 0), (0, 0)])
    assert vr2.harvest_slots() == ([0], [0])
    with pytest.raises(IntegrityError, match="not the head"):
        vr2.harvest_slots()


@pytest.mark.parametrize("take", ["harvest_slots", "reclaim"])
def test_used_idx_jump_is_refused(take: str) -> None:
    vr, dev, _ = make(num=8, event_idx=True)
    slots(vr)
    vr.post(2)
    vr.publish()
    dev.w16(vr.layout.used + 2, 5)
    with pytest.raises(IntegrityError, match="only 2 buffers are in flight"):
        getattr(vr, take)()
    assert (vr.num_free, vr.last_used_idx) == (6, 0)


def test_foreign_byte_order() -> None:
    vr, dev, _ = make(num=4, byteorder=OTHER_ORDER, event_idx=True)
    bufs = slots(vr, writable=True)
    vr.post(4)
    vr.publish()
    popped = [dev.pop() for _ in range(4)]
    assert [(h, c[0][0]) for h, c in popped] == [(i, bufs[i][0]) for i in range(4)]
    dev.push([(0, 70), (1, 80)])
    assert vr.harvest_slots() == ([0, 1], [70, 80])
    dev.push([(3, 90)])
    assert vr.harvest_slots() == ([3], [90])  # out of order, swapped
    tx, tdev, _ = make(num=4, byteorder=OTHER_ORDER)
    slots(tx)
    tx.set_len(0, 99)
    tx.post(1)
    tx.publish()
    assert tdev.pop()[1] == [(BUF, 99, 0)]


def test_delayed_interrupts_wake_after_a_batch() -> None:
    vr, dev, _ = make(num=8, event_idx=True)
    slots(vr)
    vr.post(8)
    vr.publish()
    heads = pop_all(dev)
    vr.disable_interrupts()
    assert vr.enable_interrupts_delayed() is False  # 3/4 of 8 in flight: wake after 6
    assert dev.r16(vr.layout.used_event) == 5
    assert [dev.push([(h, 0)]) for h in heads[:6]] == [False] * 5 + [True]
    vr.disable_interrupts()
    vr.harvest_slots()
    assert vr.enable_interrupts_delayed(after=1) is False
    assert dev.push([(heads[6], 0)]) is True
    assert vr.enable_interrupts_delayed(after=5) is False  # clamped to the 2 in flight
    assert dev.r16(vr.layout.used_event) == 7
    assert dev.push([(heads[7], 0)]) is True
    assert vr.enable_interrupts_delayed(after=2) is True  # both already completed
    assert vr.harvest_slots()[0] == [6, 7]
    assert vr.enable_interrupts_delayed() is False  # nothing in flight: the next one signals
    assert dev.r16(vr.layout.used_event) == 8


def test_delayed_interrupts_without_event_idx_is_enable() -> None:
    vr, dev, _ = make(num=4)
    slots(vr)
    vr.disable_interrupts()
    assert vr.enable_interrupts_delayed() is False
    vr.post(1)
    vr.publish()
    pop_all(dev)
    assert dev.push([(0, 0)]) is True


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 9), st.integers(1, 8), st.booleans()),
                    max_size=60),
       event_idx=st.booleans(), base=st.sampled_from([0, 3, 65531]))
def test_random_interleavings_match_a_model(ops: list[tuple[int, int, bool]], event_idx: bool,
                                            base: int) -> None:
    """Post, pop and complete (in order or shuffled); harvested slots are exactly the completed."""
    vr, dev, _ = make(num=8, event_idx=event_idx, base=base)
    slots(vr, writable=True)
    out: list[int] = []  # popped by the device, not completed
    completed: list[int] = []
    for kind, k, flip in ops:
        took = random_step(vr, dev, out, kind, k, flip, writable=True)
        if took is not None:
            completed += took
        else:
            got, lens = vr.harvest_slots()
            assert got == completed[:len(got)] and lens == [h + 1 for h in got]
            del completed[:len(got)]
        check_invariants(vr)
        assert vr.outstanding == len(out) + len(completed)
    got, _ = vr.harvest_slots()
    assert got == completed


# -- reclaim() and pump(): the TX fast path of prebuilt frames ------------------------------------

@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 9), st.integers(1, 8), st.booleans()),
                    max_size=60),
       base=st.sampled_from([0, 5, 65531]))
def test_reclaim_matches_a_model_in_and_out_of_order(ops: list[tuple[int, int, bool]],
                                                     base: int) -> None:
    """Post, pop and complete TX slots (in order or shuffled); reclaim counts every completion."""
    vr, dev, _ = make(num=8, event_idx=True, base=base)
    slots(vr)
    out: list[int] = []
    done = 0
    for kind, k, flip in ops:
        took = random_step(vr, dev, out, kind, k, flip, writable=False)
        if took is not None:
            done += len(took)
        else:
            assert vr.reclaim() == done
            done = 0
        check_invariants(vr)
        assert vr.outstanding == len(out) + done
    assert vr.reclaim() == done and vr.num_free == 8 - len(out)


def test_reclaim_counts_in_order_completions_for_many_laps_across_the_wrap() -> None:
    vr, dev, _ = make(num=8, event_idx=True, base=65530)
    slots(vr)
    vr.post(8)
    vr.publish()
    for _ in range(40):
        heads = pop_all(dev)
        assert heads == list(range(8))  # slot i sits at avail position base + i, every lap
        dev.push([(h, 0) for h in heads[:5]])
        assert vr.reclaim() == 5
        dev.push([(h, 0) for h in heads[5:]])
        assert vr.reclaim() == len(heads) - 5
        assert vr.reclaim() == 0
        vr.post(vr.num_free)
        vr.publish()
        check_invariants(vr)
    assert vr.last_used_idx == (65530 + 8 * 40) & 0xFFFF


def test_reclaim_hands_out_of_order_and_bad_elements_to_harvest_slots() -> None:
    vr, dev = in_flight(8, 6, event_idx=True)
    dev.push([(2, 0), (0, 0)])  # zero-copy TX order
    assert vr.reclaim() == 2
    assert vr.next_slots(8) == [6, 7, 2, 0]  # switched to explicit bookkeeping
    dev.push([(1, 5)])  # vhost never writes into a TX buffer
    with pytest.raises(IntegrityError, match="len 5 exceeds its 0 writable bytes"):
        vr.reclaim()


def test_reclaim_in_order_with_a_bad_length_takes_the_good_prefix() -> None:
    vr, dev = in_flight(8, 4)
    dev.push([(0, 0), (1, 0), (2, 9)])
    assert vr.reclaim() == 2
    with pytest.raises(IntegrityError, match="len 9"):
        vr.reclaim()


def test_reclaim_of_writable_slots_counts_like_harvest_slots() -> None:
    vr, dev = in_flight(4, 4, writable=True)
    dev.push([(0, 60), (1, 70)])
    assert vr.reclaim() == 2 and vr.num_free == 2


class _Kernel:
    """vhost-net's side for pump(): takes what was kicked or is available, completes a share."""

    def __init__(self, dev: Device, done: int) -> None:
        self.dev, self.done = dev, done
        self.kicks = self.signals = 0
        self.popped: list[int] = []
        self.queue: list[int] = []

    def kick(self) -> None:
        self.kicks += 1

    def sleep(self) -> None:
        new = pop_all(self.dev)
        self.popped += new
        self.queue += new
        batch, self.queue = self.queue[:self.done], self.queue[self.done:]
        self.signals += self.dev.push([(h, 0) for h in batch])


def test_pump_reposts_whole_batches_kicks_when_asked_and_sleeps_until_three_quarters() -> None:
    vr, dev, _ = make(num=8, event_idx=True)
    slots(vr)
    k = _Kernel(dev, 6)
    pump = vr.pump(2, k.kick, k.sleep)
    assert next(pump) == 8  # everything, with one kick: the device never ran
    assert k.kicks == 1 and k.signals == 1  # woken exactly when 6 of 8 were done
    assert dev.r16(vr.layout.used_event) == 0xFFFF  # parked again, one behind last_used (0)
    assert next(pump) == 6  # the six done, re-posted in one go, no kick (vhost is busy)
    assert k.kicks == 1
    for _ in range(50):
        assert next(pump) % 2 == 0
        check_invariants(vr)
    assert k.popped == [i % 8 for i in range(len(k.popped))]  # the slots, in order, forever
    assert vr.pending == 0 and vr.outstanding == vr.in_flight
    pump.close()
    vr.reclaim()  # the ring is consistent for the other methods after the pump
    check_invariants(vr)


def test_pump_kicks_when_the_device_went_idle() -> None:
    vr, dev, _ = make(num=8, event_idx=True)
    slots(vr)
    k = _Kernel(dev, 8)
    pump = vr.pump(4, k.kick, k.sleep)
    next(pump)
    dev.enable_notify()  # vhost drained the ring and sleeps: avail_event = last_avail
    assert next(pump) == 8 and k.kicks == 2


def test_pump_goes_on_after_out_of_order_completions_and_stops_at_a_bad_one() -> None:
    vr, dev, _ = make(num=8, event_idx=True)
    slots(vr)
    k = _Kernel(dev, 0)
    pump = vr.pump(2, k.kick, lambda: None)
    assert next(pump) == 8
    k.queue = pop_all(dev)
    dev.push([(3, 0), (1, 0)])
    assert next(pump) == 2
    assert pop_all(dev) == [3, 1]  # explicit avail entries for the freed slots
    dev.push([(0, 0), (0, 0)])
    assert next(pump) == 0  # the good prefix: one slot back, less than a batch
    with pytest.raises(IntegrityError, match="id 0 is not the head"):
        next(pump)


def test_pump_validation() -> None:
    vr, _, _ = make(num=8, event_idx=True)
    with pytest.raises(ValidationError, match="not in slot mode"):
        vr.pump(2, lambda: None, lambda: None)
    slots(vr)
    for batch in (0, 9):
        with pytest.raises(ValidationError, match=r"must be 1\.\.8"):
            vr.pump(batch, lambda: None, lambda: None)
    rx, _, _ = make(num=8, event_idx=True)
    slots(rx, writable=True)
    with pytest.raises(ValidationError, match="refilled, not re-posted"):
        rx.pump(2, lambda: None, lambda: None)
    plain, _, _ = make(num=8)
    slots(plain)
    with pytest.raises(ValidationError, match="needs EVENT_IDX"):
        plain.pump(2, lambda: None, lambda: None)


def test_pump_passes_on_what_sleep_raises() -> None:
    vr, _, _ = make(num=8, event_idx=True)
    slots(vr)

    def stuck() -> None:
        raise TimeoutError("nothing")

    with pytest.raises(TimeoutError):
        next(vr.pump(8, lambda: None, stuck))
    assert vr.in_flight == 8 and vr.pending == 0  # posted and published before the sleep


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.booleans()), min_size=1, max_size=40),
       st.sampled_from([0, 0xFFF0]), st.sampled_from([1, 2, 4]))
def test_pump_fused_cycle_is_the_separate_steps(script: list[tuple[int, bool]], base: int,
                                                batch: int) -> None:
    """The fused loop of pump() and cycle() step by step, on twin rings and twin kernels:
    the same posts, kicks, signals and wake-ups, and the same shared memory, every cycle."""
    twins = []
    for _ in range(2):
        vr, dev, buf = make(num=8, event_idx=True, base=base)
        slots(vr)
        twins.append((vr, dev, buf, _Kernel(dev, 0)))
    (fused, _, fbuf, fk), (steps, sdev, sbuf, sk) = twins
    pump = fused.pump(batch, fk.kick, fk.sleep)
    for done, idle in script:
        fk.done = sk.done = done
        if idle:  # vhost drained the ring and went to sleep: the next post must kick
            for _, dev, _, _ in twins:
                dev.enable_notify()
        assert next(pump) == steps.cycle(batch, sk.kick, sk.sleep)
        assert (fk.kicks, fk.signals, fk.popped) == (sk.kicks, sk.signals, sk.popped)
        assert fbuf == sbuf
        for name in ("num_free", "in_flight", "pending", "outstanding", "avail_idx"):
            assert getattr(fused, name) == getattr(steps, name), name
    assert sdev.used_idx == twins[0][1].used_idx


def test_harvest_uniform_takes_an_in_order_batch_of_one_length_at_once() -> None:
    vr, dev, _ = make(num=8, base=0xFFFC)  # every lap crosses the 16-bit wrap too
    slots(vr, writable=True)
    for lap in range(6):
        vr.post(vr.num_free)
        vr.publish()
        first = pop_all(dev)
        dev.push([(h, 100 + lap) for h in first[:5]])
        assert vr.harvest_uniform() == (first[0], 5, 100 + lap)
        assert vr.harvest_uniform() == (0, 0, 0)  # nothing new
        dev.push([(h, 100 + lap) for h in first[5:]])
        assert vr.harvest_uniform() == (first[5], 3, 100 + lap)  # across the ring's end
        check_invariants(vr)
    assert vr.num_free == 8


@pytest.mark.parametrize("elems, max_len", [
    ([(0, 60), (1, 60), (2, 70)], None),  # lengths differ (the last one)
    ([(0, 60), (1, 70), (2, 60)], None),  # lengths differ (in the middle)
    ([(1, 60), (0, 60)], None),  # out of order
    ([(0, 60), (1, 60)], 59),  # over the caller's bound
    ([(0, SZ + 1)], None),  # over the slot
])
def test_harvest_uniform_leaves_anything_else_to_harvest_slots(elems: list[tuple[int, int]],
                                                               max_len: int | None) -> None:
    vr, dev = in_flight(4, 4, writable=True)
    dev.push(elems)
    assert vr.harvest_uniform(max_len) is None
    assert vr.outstanding == 4 and vr.has_used()  # nothing taken
    if elems[0][1] > SZ:
        with pytest.raises(IntegrityError, match="exceeds"):
            vr.harvest_slots()
    else:
        assert vr.harvest_slots() == ([i for i, _ in elems], [ln for _, ln in elems])


def test_harvest_uniform_refuses_a_used_index_jump_through_harvest_slots() -> None:
    vr, dev = in_flight(4, 2, writable=True)
    dev.w16(dev.lay.used + 2, 3)  # three completions, two buffers in flight
    assert vr.harvest_uniform() is None
    with pytest.raises(IntegrityError, match="only 2 buffers are in flight"):
        vr.harvest_slots()
    with pytest.raises(ValidationError, match="not in slot mode"):
        make(num=4)[0].harvest_uniform()
