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


class CrashJournal:
    """Runs as a Ray actor (0 CPUs) for the length of a job."""

    def __init__(self):
        self.unfinished: dict[str, int] = {}
        self.workers: dict[str, object] = {}  # actor id -> handle

    def register(self, actor_id: str, handle) -> None:
        self.workers[actor_id] = handle

    def worker_handles(self) -> list:
        return list(self.workers.values())

    def start(self, key: str) -> int:
        """Record a start; returns how many earlier starts of `key` never ended."""
        earlier = self.unfinished.get(key, 0)
        self.unfinished[key] = earlier + 1
        return earlier

    def end(self, key: str) -> None:
        self.unfinished.pop(key, None)


def start_journal():
    import ray

    return ray.remote(num_cpus=0)(CrashJournal).remote()


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
    """A stage's handle on the journal; when it cannot be reached, crash handling is off."""

    def __init__(self, journal):
        self.journal = journal
        if journal is None:
            return
        try:
            import ray

            context = ray.get_runtime_context()
            if context.get_actor_id():
                journal.register.remote(context.get_actor_id(), context.current_actor)
        except Exception as e:  # noqa: BLE001 - only the clean-up after a failure needs it
            log.warning("k3batch: could not register with the crash journal: %s", e)

    def start(self, key: str) -> int:
        if self.journal is None:
            return 0
        try:
            import ray

            return ray.get(self.journal.start.remote(key), timeout=CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - generation goes on without crash isolation
            log.warning("k3batch: crash journal unreachable, crash isolation is off: %s", e)
            self.journal = None
            return 0

    def end(self, key: str) -> None:
        if self.journal is None:
            return
        try:
            self.journal.end.remote(key)  # not waited for: the next start is ordered after it
        except Exception as e:  # noqa: BLE001
            log.warning("k3batch: crash journal unreachable, crash isolation is off: %s", e)
            self.journal = None
