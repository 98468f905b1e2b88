"""Which generation batches and rows were running when a worker process died.

Ray Data replaces a dead pool actor and retries its batch on the replacement without limit
(its actor pools default to `max_restarts=-1`, `max_task_retries=-1`), so a row that kills its
process every time (a kernel fault on one input, an out-of-memory kill) would be retried
forever. The journal, one small actor per job, records each batch and row as it starts and
ends: work that started more often than it ended was running when a process died.

It also keeps the job's generation actors: when a job fails, Ray Data shuts its pools down
without force, dropping its handles, and an actor stuck in a batch (the stall a timeout
caught) then lives on holding its GPU; the runner kills them (`stop_workers`).
"""

from __future__ import annotations

import hashlib
import logging

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 60


# Ray restarts a job's bookkeeping actor (this journal, or the job actor that includes it:
# `job_actor.JobActor`) this many times when its process dies; then it is lost for the run.
MAX_RESTARTS = 5


class CrashJournal:
    """Runs as a Ray actor (0 CPUs) for the length of a job."""

    def __init__(self):
        self.unfinished: dict[str, int] = {}
        self.workers: dict[str, object] = {}  # actor id -> handle

    def register(self, actor_id: str, handle) -> None:
        self.workers[actor_id] = handle

    def worker_handles(self) -> list:
        return list(self.workers.values())

    def start(self, key: str, actor_id: str | None = None, handle=None) -> int:
        """Record a start; returns how many earlier starts of `key` never ended. The
        calling actor (`actor_id`, `handle`) registers again with each start: a restarted
        journal knows the job's workers again after their next batch."""
        if actor_id is not None:
            self.workers[actor_id] = handle
        earlier = self.unfinished.get(key, 0)
        self.unfinished[key] = earlier + 1
        return earlier

    def end(self, key: str) -> None:
        self.unfinished.pop(key, None)


def on_driver_node() -> dict:
    """Ray options for a job's bookkeeping actor: 0 CPUs, on the driver's own node, restarted
    there if its process dies. Left to Ray, a 0-CPU actor goes to any node, and a worker
    node lost (a spot machine taken back) took the job's progress and crash journal with it;
    the driver's node lost ends the job anyway. Calls made while it restarts are retried."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False),
        "max_restarts": MAX_RESTARTS,
        "max_task_retries": -1,
    }


def start_journal():
    """A journal of its own, for a run without the job actor (`job_actor.JobActor`). A
    restart empties it: crash counts start again."""
    import ray

    return ray.remote(**on_driver_node())(CrashJournal).remote()


def lost(error: BaseException) -> bool:
    """Whether `error` says the actor called is gone for good (not slow, not restarting)."""
    try:
        from ray.exceptions import ActorDiedError
    except ImportError:  # pragma: no cover - Ray is there wherever an actor was called
        return False
    return isinstance(error, ActorDiedError)


def stop_workers(journal) -> None:
    """Kill the job's generation actors (after a failed run: see the module's note)."""
    import ray

    try:
        handles = ray.get(journal.worker_handles.remote(), timeout=CALL_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - the job's own error matters more
        log.warning("k3batch: could not list the generation actors to stop them: %s", e)
        return
    for handle in handles:
        ray.kill(handle, no_restart=True)


def key(row_keys: list) -> str:
    return hashlib.blake2b("\x1f".join(map(str, row_keys)).encode(), digest_size=16).hexdigest()


class JournalClient:
    """A stage's handle on the journal; when it cannot be reached, crash handling is off.

    A journal lost for good (its actor died past its restarts) is said once for the whole
    job by the driver, which watches it (`progress.Tracker`): each worker only notes it in
    its debug log. A journal that does not answer in time is a warning here."""

    def __init__(self, journal):
        self.journal = journal
        self.actor_id = self.handle = None
        if journal is None:
            return
        try:
            import ray

            context = ray.get_runtime_context()
            if context.get_actor_id():
                self.actor_id, self.handle = context.get_actor_id(), context.current_actor
                journal.register.remote(self.actor_id, self.handle)
        except Exception as e:  # noqa: BLE001 - only the clean-up after a failure needs it
            log.warning("k3batch: could not register with the crash journal: %s", e)

    def _off(self, e: Exception) -> None:
        if lost(e):
            log.debug("k3batch: the crash journal is lost, crash isolation is off: %s", e)
        else:
            log.warning("k3batch: crash journal unreachable, crash isolation is off: %s", e)
        self.journal = None

    def start(self, key: str) -> int:
        if self.journal is None:
            return 0
        try:
            import ray

            call = self.journal.start.remote(key, self.actor_id, self.handle)
            return ray.get(call, timeout=CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - generation goes on without crash isolation
            self._off(e)
            return 0

    def end(self, key: str) -> None:
        if self.journal is None:
            return
        try:
            self.journal.end.remote(key)  # not waited for: the next start is ordered after it
        except Exception as e:  # noqa: BLE001
            self._off(e)
