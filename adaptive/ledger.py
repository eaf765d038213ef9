"""The byte ledger: what the variant cache has charged against its limit, and nothing else.

A pure data structure (no locks, no threads, no clock): the cache calls it under its own lock.
Every session holding memory, every load in progress and every host-tier entry is a
:class:`Hold`: its *private* bytes plus its hold on shared *groups* (a frozen backbone two
task models use, the prefix a full model shares with its exit variant). A group is charged
once, while anybody holds it, and uncharged when its last holder releases it.

The one invariant: :meth:`ByteLedger.reserve` and :meth:`ByteLedger.resize` never take
``charged`` above ``limit``. Lowering the limit charges nothing, so ``charged`` may be above
a freshly lowered limit until holders are released; only releases and shrinks are allowed
then. A hold goes through three states: live (serving or loading), retired (out of service,
still running requests: its bytes come back once it drains; see :meth:`freeable`), released.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["ByteLedger", "Hold", "LedgerError"]


class LedgerError(AssertionError):
    """A caller released or resized a hold twice or that is not this ledger's: a bug."""


@dataclass(eq=False)
class Hold:
    """One holder's claim: ``private`` bytes and the shared ``groups`` it needs."""

    private: int
    groups: frozenset[str] = frozenset()
    what: str = ""
    live: bool = field(default=True, init=False)
    released: bool = field(default=False, init=False)


class ByteLedger:
    """Bytes charged against ``limit``, each shared group once while anybody holds it."""

    def __init__(self, limit: int, groups: Mapping[str, int] | None = None):
        self.limit = int(limit)
        self.groups: dict[str, int] = {g: int(b) for g, b in (groups or {}).items()}
        self.charged = 0
        self._holders = dict.fromkeys(self.groups, 0)
        self._live = dict.fromkeys(self.groups, 0)
        self._draining = 0  # private bytes of retired holds
        self._holds: set[int] = set()

    # -- queries ---------------------------------------------------------------------------

    def cost(self, private: int, groups: Iterable[str] = ()) -> int:
        """What a new hold of ``private`` bytes and ``groups`` would add now."""
        return int(private) + sum(self.groups[g] for g in set(groups) if not self._holders[g])

    def fits(self, private: int, groups: Iterable[str] = (), *, freed: int = 0) -> bool:
        """Whether such a hold fits under the limit (with ``freed`` bytes given back first)."""
        return self.charged - freed + self.cost(private, groups) <= self.limit

    def freeable(self) -> int:
        """Bytes that come back once every retired hold has drained (their private bytes and
        the groups only retired holds still hold)."""
        return self._draining + sum(b for g, b in self.groups.items()
                                    if self._holders[g] and not self._live[g])

    def frees(self, hold: Hold, *, keep: Iterable[str] = ()) -> int:
        """What releasing ``hold`` would give back (groups in ``keep`` excepted)."""
        keep = set(keep)
        return hold.private + sum(self.groups[g] for g in hold.groups
                                  if self._holders[g] == 1 and g not in keep)

    def held_groups(self) -> int:
        """Bytes of the shared groups charged now."""
        return sum(b for g, b in self.groups.items() if self._holders[g])

    def holds(self, group: str) -> int:
        """How many holds (live or retired) need ``group``."""
        return self._holders[group]

    # -- moves -----------------------------------------------------------------------------

    def reserve(self, private: int, groups: Iterable[str] = (), what: str = "") -> Hold | None:
        """Charge a new hold if it fits under the limit; None (nothing charged) if not."""
        groups = frozenset(groups)
        unknown = groups - self.groups.keys()
        if unknown:
            raise LedgerError(f"{what or 'hold'}: unknown groups {sorted(unknown)}")
        if private < 0:
            raise LedgerError(f"{what or 'hold'}: negative bytes {private}")
        if not self.fits(private, groups):
            return None
        self.charged += self.cost(private, groups)
        for g in groups:
            self._holders[g] += 1
            self._live[g] += 1
        hold = Hold(int(private), groups, what)
        self._holds.add(id(hold))
        return hold

    def resize(self, hold: Hold, private: int) -> bool:
        """Change ``hold``'s private bytes (a load's transient peak settling to its steady
        size); a growth is refused (False) when it does not fit, a shrink always succeeds."""
        self._check(hold)
        delta = int(private) - hold.private
        if delta > 0 and self.charged + delta > self.limit:
            return False
        self.charged += delta
        if not hold.live:
            self._draining += delta
        hold.private = int(private)
        return True

    def retire(self, hold: Hold) -> None:
        """``hold`` leaves service but keeps its bytes until :meth:`release`."""
        self._check(hold)
        if not hold.live:
            return
        hold.live = False
        self._draining += hold.private
        for g in hold.groups:
            self._live[g] -= 1

    def release(self, hold: Hold) -> None:
        """Give ``hold``'s bytes back; a group nobody holds any more is uncharged."""
        self._check(hold)
        self.retire(hold)
        hold.released = True
        self._holds.discard(id(hold))
        self._draining -= hold.private
        self.charged -= hold.private
        for g in hold.groups:
            self._holders[g] -= 1
            if not self._holders[g]:
                self.charged -= self.groups[g]

    def audit(self, holds: Iterable[Hold]) -> None:
        """Raise :class:`LedgerError` unless ``holds`` (every unreleased hold) add up to
        ``charged``, each group once."""
        holds = list(holds)
        total = sum(h.private for h in holds)
        used = set().union(*(h.groups for h in holds)) if holds else set()
        total += sum(self.groups[g] for g in used)
        if total != self.charged:
            raise LedgerError(f"ledger says {self.charged} bytes, its holds add up to {total}")

    def _check(self, hold: Hold) -> None:
        if hold.released or id(hold) not in self._holds:
            raise LedgerError(f"{hold.what or 'hold'}: released already or not this ledger's")
