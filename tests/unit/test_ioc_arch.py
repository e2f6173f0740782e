"""Which ioctl layout each ``uname -m`` gets: a wrong pick gives every ioctl a wrong number."""

from __future__ import annotations

import ctypes

import pytest

from vhostctl._uapi import ioc
from vhostctl._uapi.vhost import VHOST_GET_FEATURES, VHOST_SET_OWNER


@pytest.mark.parametrize(("machine", "arch"), [
    ("ppc64le", ioc.POWERPC), ("ppc64", ioc.POWERPC), ("ppc", ioc.POWERPC),
    ("powerpc", ioc.POWERPC), ("PPC64LE", ioc.POWERPC),
    ("mips64", ioc.MIPS), ("mipsel", ioc.MIPS), ("sparc64", ioc.SPARC), ("alpha", ioc.ALPHA),
    ("parisc64", ioc.PARISC),
    ("x86_64", ioc.GENERIC), ("aarch64", ioc.GENERIC), ("s390x", ioc.GENERIC),
    ("riscv64", ioc.GENERIC), ("loongarch64", ioc.GENERIC), ("", ioc.GENERIC),
])
def test_arch_for_machine(machine: str, arch: ioc.IocArch) -> None:
    assert ioc.arch_for_machine(machine) is arch


def test_ppc64le_numbers_are_powerpcs() -> None:
    """VHOST_GET_FEATURES = _IOR(0xAF, 0x00, __u64): read is 2 << 29 on powerpc (3 direction
    bits above 13 size bits), 2 << 30 on asm-generic; VHOST_SET_OWNER = _IO: none is 1 << 29."""
    ppc = ioc.arch_for_machine("ppc64le")
    assert VHOST_GET_FEATURES.for_arch(ppc) == 0x4008AF00
    assert VHOST_GET_FEATURES.for_arch(ioc.GENERIC) == 0x8008AF00
    assert VHOST_SET_OWNER.for_arch(ppc) == 0x2000AF01
    assert VHOST_SET_OWNER.for_arch(ioc.GENERIC) == 0x0000AF01


@pytest.mark.parametrize("arch", sorted(ioc.ARCHES.values(), key=lambda a: a.name),
                         ids=lambda a: a.name)
def test_field_ranges_are_exact(arch: ioc.IocArch) -> None:
    """typ and nr take 8 bits, size ``sizebits``: the largest value fits, one more raises."""
    top = (1 << arch.sizebits) - 1
    assert ioc.ioc_decode(ioc._encode(arch, "rw", 255, 255, top), arch) == ("rw", 255, 255, top)
    for typ, nr in ((256, 0), (0, 256), (-1, 0), (0, -1)):
        with pytest.raises(ValueError, match="out of range"):
            ioc._encode(arch, "read", typ, nr, 8)
    with pytest.raises(ValueError, match=rf"size {top + 1} does not fit {arch.sizebits} bits "
                       rf"on {arch.name}"):
        ioc._encode(arch, "read", 1, 1, top + 1)


@pytest.mark.parametrize(("made", "number", "parts"), [
    # The C definitions, called now (the header modules call them once, at import): the
    # numbers as the kernel headers give them on x86-64 (asm-generic).
    (lambda: ioc._IO(0xAF, 0x01), 0x0000AF01, ("none", 0xAF, 0x01, 0)),  # VHOST_SET_OWNER
    (lambda: ioc._IOR(0xAF, 0x00, ctypes.c_uint64), 0x8008AF00, ("read", 0xAF, 0x00, 8)),
    (lambda: ioc._IOW(ord("T"), 202, ctypes.c_int), 0x400454CA, ("write", 0x54, 202, 4)),
    (lambda: ioc._IOWR(0xAF, 0x12, 8), 0xC008AF12, ("rw", 0xAF, 0x12, 8)),  # GET_VRING_BASE
    (lambda: ioc._IOC("rw", 0xAF, 0x12, 8), 0xC008AF12, ("rw", 0xAF, 0x12, 8)),
])
def test_helpers_build_the_kernels_numbers(made, number: int, parts: tuple) -> None:
    req = made()
    assert isinstance(req, ioc.Ioctl)
    assert (req.direction, req.type, req.nr, req.size) == parts
    assert req.for_arch(ioc.GENERIC) == number
    assert ioc.ioc_decode(number, ioc.GENERIC) == parts


def test_collect_ioctls_takes_upper_case_ioctls_only() -> None:
    ns = {"VHOST_SET_OWNER": ioc._IO(0xAF, 0x01), "helper": ioc._IO(0xAF, 0x02),
          "VHOST_VIRTIO": 0xAF, "_IO": ioc._IO}
    assert ioc.collect_ioctls(ns) == {int(ns["VHOST_SET_OWNER"]): "VHOST_SET_OWNER"}


def test_decode_names_a_direction_the_arch_does_not_have() -> None:
    # powerpc has 3 direction bits: 7 (all set) is none|read|write, no valid combination
    with pytest.raises(ValueError, match=r"direction bits 0x7 are not valid on powerpc"):
        ioc.ioc_decode(7 << ioc.POWERPC.dirshift, ioc.POWERPC)
