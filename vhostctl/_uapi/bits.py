"""Named bit sets: feature words and flag words <-> their C names.

The kernel reports features and flags as bare integers; people (and error messages) want
names.  One :class:`BitNames` table holds every name a bit is known by, because the headers
alias bits: bit 27 is both ``VIRTIO_F_ANY_LAYOUT`` (virtio_config.h) and
``VHOST_NET_F_VIRTIO_NET_HDR`` (vhost_types.h), and ``IFF_NOFILTER`` equals ``IFF_NO_PI``
(if_tun.h).  :meth:`BitNames.decode` names each set bit once (the first name given for it);
:meth:`BitNames.encode` accepts any alias, in any case, with or without the prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import ValidationError

__all__ = ["BitNames"]

_SPLIT = re.compile(r"[\s,|+]+")
_BITN = re.compile(r"bit(\d+)")


class BitNames:
    """A table of single-bit names for one flag word.

    Build it with :meth:`from_bits` when the header defines bit *numbers*
    (``#define VIRTIO_F_VERSION_1 32``) or :meth:`from_masks` when it defines *masks*
    (``#define IFF_TAP 0x0002``).  Order matters: the first name given for a bit is the
    one :meth:`decode` prints.
    """

    def __init__(
        self,
        masks: Iterable[tuple[str, int]],
        *,
        numbered: bool,
        prefixes: Iterable[str] = (),
        what: str = "flag",
    ) -> None:
        self.numbered = numbered
        self.what = what
        self.prefixes = tuple(sorted(prefixes, key=len, reverse=True))
        self._by_mask: dict[int, list[str]] = {}
        self._by_name: dict[str, int] = {}
        short: dict[str, set[int]] = {}
        for name, mask in masks:
            if mask <= 0 or mask & (mask - 1):
                raise ValueError(f"{name}: {mask:#x} is not a single bit")
            key = name.upper()
            if self._by_name.get(key, mask) != mask:
                raise ValueError(f"{name} given two different bits")
            self._by_name[key] = mask
            names = self._by_mask.setdefault(mask, [])
            if name not in names:
                names.append(name)
            short.setdefault(self._short(key), set()).add(mask)
        # A short name is usable only if it means one bit; a clash needs the full name.
        self._by_short = {s: next(iter(m)) for s, m in short.items() if len(m) == 1}
        self.ambiguous = frozenset(s for s, m in short.items() if len(m) > 1)

    @classmethod
    def from_bits(cls, bits: Mapping[str, int] | Iterable[tuple[str, int]], **kw: Any) -> BitNames:
        """A table from bit numbers (``VIRTIO_NET_F_MRG_RXBUF`` = 15)."""
        items = bits.items() if isinstance(bits, Mapping) else bits
        return cls(((n, 1 << b) for n, b in items), numbered=True, **kw)

    @classmethod
    def from_masks(cls, masks: Mapping[str, int] | Iterable[tuple[str, int]],
                   **kw: Any) -> BitNames:
        """A table from masks (``TUN_F_TSO4`` = 0x02)."""
        items = masks.items() if isinstance(masks, Mapping) else masks
        return cls(items, numbered=False, **kw)

    def _short(self, upper_name: str) -> str:
        for p in self.prefixes:
            if upper_name.startswith(p.upper()) and len(upper_name) > len(p):
                return upper_name[len(p):]
        return upper_name

    # -- lookups -------------------------------------------------------------------------

    @property
    def mask(self) -> int:
        """Every bit that has a name."""
        m = 0
        for k in self._by_mask:
            m |= k
        return m

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """(canonical name, mask) in bit order."""
        for m in sorted(self._by_mask):
            yield self._by_mask[m][0], m

    def __len__(self) -> int:
        return len(self._by_mask)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def items(self) -> Iterator[tuple[str, int]]:
        """Every (name, mask) pair including aliases, for checks against the headers."""
        for m in sorted(self._by_mask):
            for n in self._by_mask[m]:
                yield n, m

    def names(self, bit_or_mask: int, *, numbered: bool | None = None) -> list[str]:
        """All names of one bit (canonical first); [] if it has none."""
        num = self.numbered if numbered is None else numbered
        mask = 1 << bit_or_mask if num else bit_or_mask
        return list(self._by_mask.get(mask, ()))

    def short_names(self) -> list[str]:
        """The names :meth:`encode` takes without prefix, lower case, in bit order."""
        out = []
        for m in sorted(self._by_mask):
            for n in self._by_mask[m]:
                s = self._short(n.upper())
                if s not in self.ambiguous:
                    out.append(s.lower())
        return out

    def _lookup(self, token: str) -> int | None:
        key = token.strip().upper()
        if key in self._by_name:
            return self._by_name[key]
        return self._by_short.get(key)

    # -- conversions ---------------------------------------------------------------------

    def _unknown(self, mask: int) -> str:
        return f"bit{mask.bit_length() - 1}" if self.numbered else f"{mask:#x}"

    def decode(self, value: int, *, aliases: bool = False) -> list[str]:
        """Name each set bit of ``value`` once, lowest first; unnamed bits as ``bit<N>``
        (numbered tables) or hex masks.  ``aliases=True`` joins every name of a bit with
        ``/`` so nothing is hidden (``VIRTIO_F_ANY_LAYOUT/VHOST_NET_F_VIRTIO_NET_HDR``)."""
        if value < 0:
            raise ValueError(f"negative {self.what} word {value}")
        out: list[str] = []
        v, pos = value, 0
        while v:
            if v & 1:
                m = 1 << pos
                names = self._by_mask.get(m)
                if names:
                    out.append("/".join(names) if aliases else names[0])
                else:
                    out.append(self._unknown(m))
            v >>= 1
            pos += 1
        return out

    def encode(self, names: str | Iterable[str]) -> int:
        """The word with the named bits set.

        ``names`` is an iterable of names or one string separated by commas, ``|``, ``+``
        or spaces.  Any alias works, case-insensitively, with or without the table's
        prefix (``"version_1"``, ``"VIRTIO_NET_F_MRG_RXBUF"``, ``"mrg_rxbuf"``), as do
        :meth:`decode`'s renderings of unnamed bits (``bit40``, ``0x80``) so that
        ``encode(decode(v)) == v``.  An unknown name raises
        :class:`~vhostctl.errors.ValidationError` listing the valid ones.
        """
        tokens = _SPLIT.split(names) if isinstance(names, str) else list(names)
        value = 0
        for tok in tokens:
            if not isinstance(tok, str):
                raise ValidationError(f"{self.what} names", f"not a name: {tok!r}")
            if not tok.strip():
                continue
            value |= self._token(tok)
        return value

    def _token(self, tok: str) -> int:
        for part in tok.split("/"):  # decode(aliases=True) output
            found = self._lookup(part)
            if found is not None:
                return found
        t = tok.strip().lower()
        m = _BITN.fullmatch(t)
        if m:
            return 1 << int(m.group(1))
        if t.startswith("0x"):
            try:
                mask = int(t, 16)
            except ValueError:
                mask = 0
            if mask > 0 and not mask & (mask - 1):
                return mask
        key = tok.strip().upper()
        if self._short(key) in self.ambiguous or key in self.ambiguous:
            detail = f"ambiguous {self.what} {tok!r}: give the full C name"
        else:
            detail = f"unknown {self.what} {tok!r}"
        raise ValidationError(
            f"{self.what} names",
            detail,
            hint="valid: " + ", ".join(self.short_names()),
        )

    def __repr__(self) -> str:
        return f"<BitNames {self.what}: {len(self)} bits>"
