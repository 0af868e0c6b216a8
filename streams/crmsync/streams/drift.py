"""Schema drift: what changed in a workflow's targets since its Start, and whether data is lost.

The preflight's list of what a config needs (tables, columns with their types and lengths, keys,
navigation properties, resources, fields, custom filters) is taken at Start as the baseline and
read again every `CRMSYNC_DRIFT_CHECK_S`, and at once when a write is refused for a reason that
names one of them. A piece gone, or a type or length changed so values no longer fit, is
*breaking*: the worker stops itself before its next write. A new column or a longer length is
only reported.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from crmsync.streams import preflight
from crmsync.streams.config import WorkflowConfig
from crmsync.streams.preflight import Inventory, Requirement
from crmsync.targets._http import RetryPolicy
from crmsync.targets.campaign import CampaignClient
from crmsync.targets.dynamics import DynamicsClient
from crmsync.targets.settings import CampaignTarget, DynamicsTarget

log = logging.getLogger(__name__)

MISSING = "missing"
ABSENT = "absent"
#: The shortest time between two checks that a refused write asks for.
REFUSAL_CHECK_MIN_S = 1.0

_SHAPE = re.compile(r"^(?P<kind>[^()]*)(?:\((?P<bound>\d+)\))?$")
_Key = tuple[str, str, str]  # target, kind, name


@dataclass(frozen=True, slots=True)
class Difference:
    """One thing that changed in a target: `was` and `now` are shapes, `missing` or `absent`."""

    target: str
    kind: str
    name: str
    was: str
    now: str
    breaking: bool

    def text(self) -> str:
        return f"{self.name}: was {self.was}, now {self.now}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Difference:
        return cls(
            str(data.get("target", "")),
            str(data.get("kind", "")),
            str(data.get("name", "")),
            str(data.get("was", "")),
            str(data.get("now", "")),
            bool(data.get("breaking", True)),
        )


@dataclass(frozen=True)
class Snapshot:
    """What one workflow's config needs, as its targets showed it at one moment."""

    requirements: dict[_Key, Requirement]
    inventory: Inventory = field(default_factory=dict)

    @classmethod
    def of(
        cls, workflow: str, found: Iterable[Requirement], inventory: Inventory | None = None
    ) -> Snapshot:
        mine: dict[_Key, Requirement] = {
            (str(r.target), str(r.kind), r.name): r for r in found if r.workflow in (workflow, "*")
        }
        return cls(mine, dict(inventory or {}))

    def missing(self) -> list[Difference]:
        """What is needed and not there (no baseline to say what it was)."""
        return [
            Difference(r.target, r.kind, r.name, r.shape or "needed", MISSING, True)
            for r in self.requirements.values()
            if not r.present
        ]


def fits(was: str, now: str) -> bool:
    """Whether every value a column or field of shape `was` held still fits `now`: the same
    type with at least the same length (or decimal places)."""
    if was == now:
        return True
    before, after = _SHAPE.match(was), _SHAPE.match(now)
    if before is None or after is None or before["kind"] != after["kind"]:
        return False
    if before["bound"] is None or after["bound"] is None:
        return before["bound"] is None and after["bound"] is None
    return int(after["bound"]) >= int(before["bound"])


def widens(kept: Mapping[str, str], reported: Mapping[str, str]) -> bool:
    """Whether a worker's baseline shapes replace the kept ones: different, and every kept
    shape still fits (a longer field), so a baseline is never narrowed."""
    return reported != kept and all(
        key in reported and fits(shape, reported[key]) for key, shape in kept.items()
    )


def compare(was: Snapshot, now: Snapshot) -> list[Difference]:
    """Every difference between two snapshots of one workflow's needs, breaking ones first."""
    found: list[Difference] = []
    for key, before in sorted(was.requirements.items()):
        after = now.requirements.get(key)
        target, kind, name = key
        if not before.present:
            continue  # missing at Start: `Snapshot.missing` says so
        if after is None or not after.present:
            found.append(Difference(target, kind, name, before.shape or "present", MISSING, True))
        elif before.shape != after.shape:
            breaking = not fits(before.shape, after.shape)
            found.append(Difference(target, kind, name, before.shape, after.shape, breaking))
    for where, names in sorted(now.inventory.items()):
        target, _, container = where.partition(":")
        known = was.inventory.get(where)
        if known is None:
            continue
        for added in sorted(names - known):
            kind = "column" if target == "d365" else "field"
            found.append(Difference(target, kind, f"{container}.{added}", ABSENT, "present", False))
    return sorted(found, key=lambda d: not d.breaking)


def _text(key: _Key) -> str:
    return "|".join(key)


def breaking(differences: Iterable[Difference]) -> list[Difference]:
    return [d for d in differences if d.breaking]


def reason(differences: Sequence[Difference]) -> str:
    """One line naming each breaking difference: ``new_purchases.new_amount: was Decimal(2),
    now missing``."""
    return "; ".join(d.text() for d in breaking(differences))


def still_breaking(
    differences: Iterable[Difference], found: Iterable[Requirement], workflow: str
) -> list[Difference]:
    """Which of the breaking differences a worker reported remain, judged against what the
    config to start needs now: none once the target is put back (the shape fits what it was) or
    the config no longer needs the piece."""
    now = Snapshot.of(workflow, found).requirements
    remaining = []
    for difference in breaking(differences):
        requirement = now.get((difference.target, difference.kind, difference.name))
        if requirement is None:
            continue  # the edited config does not need it any more
        if not requirement.present:
            remaining.append(difference)
        elif difference.was not in ("present", "needed", MISSING) and not fits(
            difference.was, requirement.shape
        ):
            remaining.append(
                Difference(
                    difference.target,
                    difference.kind,
                    difference.name,
                    difference.was,
                    requirement.shape,
                    True,
                )
            )
    return remaining


def _names(requirement: Requirement) -> set[str]:
    """The words a target's refusal would use for the piece: a column's and table's names."""
    text = requirement.name.split("?")[0]
    return {part for part in re.split(r"[./(),]", text) if len(part) > 2}


@dataclass
class DriftWatch:
    """One worker's drift checks against its targets' metadata for its active config."""

    workflow: str
    dynamics: DynamicsTarget
    campaign: CampaignTarget
    timeout_s: float = 15.0
    clock: Callable[[], float] = time.monotonic
    #: The latest differences found (breaking and additive), for the status record.
    differences: list[Difference] = field(default_factory=list)
    _config: WorkflowConfig | None = None
    _baseline: Snapshot | None = None
    _kept: dict[str, str] | None = None
    _refusal_checked_at: float = float("-inf")
    _names: set[str] = field(default_factory=set)

    async def baseline(
        self, config: WorkflowConfig, kept: Mapping[str, str] | None = None
    ) -> list[Difference]:
        """At Start: takes what the targets show now as the baseline; returns what is missing
        or, against `kept` (the shapes this config version was first started with, from the
        control record), no longer fits (breaking) — nothing when a target cannot be reached
        (the next check takes it). A shape that grew since is taken as the new baseline."""
        self._config = config
        self._kept = dict(kept) if kept else None
        self._baseline = None
        self.differences = []
        snapshot = await self._snapshot(config)
        if snapshot is None:
            return []
        base = snapshot
        if kept:
            earlier = {
                key: replace(requirement, present=True, shape=kept[_text(key)])
                for key, requirement in snapshot.requirements.items()
                if _text(key) in kept
                and not (requirement.present and fits(kept[_text(key)], requirement.shape))
            }
            base = Snapshot({**snapshot.requirements, **earlier}, snapshot.inventory)
        self._baseline = base
        self._names = {n.lower() for r in base.requirements.values() for n in _names(r)}
        found = compare(base, snapshot)
        seen = {(d.target, d.kind, d.name) for d in found}
        found += [d for d in snapshot.missing() if (d.target, d.kind, d.name) not in seen]
        self.differences = sorted(found, key=lambda d: not d.breaking)
        return list(self.differences)

    def shapes(self) -> dict[str, str]:
        """The baseline's shapes, for the control record (empty until one was taken)."""
        if self._baseline is None:
            return {}
        return {
            _text(key): requirement.shape
            for key, requirement in self._baseline.requirements.items()
            if requirement.present and requirement.shape
        }

    async def check(self) -> list[Difference]:
        """Compares the targets with the baseline; returns the breaking differences."""
        if self._config is None:
            return []
        if self._baseline is None:
            return breaking(await self.baseline(self._config, self._kept))
        now = await self._snapshot(self._config)
        if now is None:
            return []
        found = compare(self._baseline, now)
        seen = {(d.target, d.kind, d.name) for d in found}
        found += [d for d in now.missing() if (d.target, d.kind, d.name) not in seen]
        found.sort(key=lambda d: not d.breaking)
        for difference in found:
            if not difference.breaking and difference not in self.differences:
                log.info(
                    "event=drift_additive workflow=%s change=%r", self.workflow, difference.text()
                )
        self.differences = found
        return breaking(found)

    def names_a_dependency(self, refusal: str) -> bool:
        """Whether a target's refusal names a table, column, key, field or filter the config
        needs (then it may be drift rather than the record's fault)."""
        words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]+", refusal)}
        return bool(words & self._names)

    async def after_refusals(self, refusals: Iterable[str]) -> list[Difference]:
        """At once when writes were refused naming a dependency (at most once a second)."""
        if not any(self.names_a_dependency(r) for r in refusals):
            return []
        if self.clock() - self._refusal_checked_at < REFUSAL_CHECK_MIN_S:
            return []
        self._refusal_checked_at = self.clock()
        log.info("event=drift_check_on_refusal workflow=%s", self.workflow)
        return await self.check()

    async def _snapshot(self, config: WorkflowConfig) -> Snapshot | None:
        once = RetryPolicy(attempts=1, budget_s=0.0)
        inventory: Inventory = {}
        try:
            async with asyncio.timeout(self.timeout_s):
                async with (
                    DynamicsClient(self.dynamics, retry=once) as d365,
                    CampaignClient(self.campaign, retry=once) as acs,
                ):
                    found = await preflight.check({self.workflow: config}, d365, acs, inventory)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # SinkError, a timeout, a token endpoint that is down...
            log.warning("event=drift_check_failed workflow=%s error=%r", self.workflow, error)
            return None
        if any(r.workflow == "*" for r in found):
            # A whole API did not answer (outage, throttling): no verdict this time.
            log.warning(
                "event=drift_check_incomplete workflow=%s reason=%r",
                self.workflow,
                next(r.fix for r in found if r.workflow == "*"),
            )
            return None
        return Snapshot.of(self.workflow, found, inventory)
