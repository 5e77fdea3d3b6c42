"""Release the placement groups a stopped trial's Ray Train run leaves behind.

Why: stopping a trial (ASHA) ends the trial's process; its Ray Train controller and workers die
with it, but the workers' placement group does not.  Ray keeps a non-detached placement group
until both its creator actor *and* the creator's job are dead, and the job here is the sweep
driver, which lives on.  Ray Train V2 covers this with a detached ``PlacementGroupCleaner`` that
polls the controller through the state API, which needs the Ray dashboard: on a Ray without it
(sepit's embedded default, ``include_dashboard=False``) the cleaner fails and every stopped trial
leaks its workers' CPUs/GPUs until the sweep ends, starving the next trials (measured: 0.5 CPU
per stopped tiny trial).

:func:`release_orphaned_placement_groups` removes exactly the groups Ray itself would remove once
the driver exits: created by an actor of *this* job that is dead, not detached, still holding
resources.  Groups created by the driver (Tune's own per-trial groups) have no creator actor and
are never touched.  It reads the GCS placement-group table through ``ray._private.state`` (the
public ``placement_group_table()`` omits the creator fields).
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

logger = logging.getLogger(__name__)

#: States in which a group reserves (or is about to reserve) cluster resources.
_HOLDING_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def actor_placement_groups() -> dict[str, bool]:
    """This job's resource-holding, non-detached groups created by an actor: ``{hex id: creator dead}``."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job_id = ray.get_runtime_context().get_job_id()
    nil_actor = ray.ActorID.nil().binary()
    out = {}
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        state_name = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(pg.state)
        if (pg.creator_job_id.hex() == job_id and pg.creator_actor_id and pg.creator_actor_id != nil_actor
                and not pg.is_detached and state_name in _HOLDING_STATES):
            out[pg.placement_group_id.hex()] = bool(pg.creator_actor_dead)
    return out


def orphaned_placement_groups() -> list[str]:
    """Hex ids of this job's placement groups whose creator actor is dead (see module doc)."""
    return [pg for pg, dead in actor_placement_groups().items() if dead]


def release_orphaned_placement_groups() -> int:
    """Remove the orphaned groups; returns how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for pg_hex in orphaned_placement_groups():
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex))))
            removed += 1
        except Exception as exc:  # already removed concurrently: nothing to release
            logger.debug("placement group %s not removed: %s", pg_hex, exc)
    return removed


class ReleaseOrphanedPlacementGroups(Callback):
    """Tune callback: release orphaned groups every ``every_s`` seconds while the sweep runs, so a
    stopped trial's resources go to the next trial (Tune calls ``on_step_end`` every loop turn)."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self.released = 0
        self._last = 0.0

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        n = release_orphaned_placement_groups()
        if n:
            self.released += n
            logger.info("released %d placement group(s) left by stopped trials", n)
