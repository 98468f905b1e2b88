"""The job's actor: the progress tally every stage feeds and the crash journal, in one Ray
actor on the driver's node (`progress.Tracker` starts it, reads it and restores it after a
restart)."""

from __future__ import annotations

from k3batch.crashes import CrashJournal, on_driver_node

# How often the driver reads the job actor's state (also when no progress is shown): the
# most a restart of the actor can lose (see JobActor).
STATE_INTERVAL_S = 5.0


class Tally:
    """Counts per stage; runs as a Ray actor (see `Tracker`), plain Python otherwise."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.actors: dict[str, dict[str, list[float]]] = {}  # stage -> actor -> [start, last]

    def add(self, stats: dict, actor: tuple | None = None) -> None:
        s = self.stages.setdefault(
            stats["stage"],
            {"rows": 0, "ok": 0, "images": 0, "error_rows": 0, "errors": {}, "batches": 0},
        )
        s["busy_seconds"] = s.get("busy_seconds", 0.0) + stats["seconds"]
        s["batches"] += 1
        for key in ("rows", "ok", "images", "error_rows"):
            s[key] += stats[key]
        for kind, n in stats["errors"].items():
            s["errors"][kind] = s["errors"].get(kind, 0) + n
        if actor is not None:
            actor_id, started, finished = actor
            span = self.actors.setdefault(stats["stage"], {}).setdefault(
                actor_id, [started, finished]
            )
            span[1] = max(span[1], finished)

    def snapshot(self) -> dict:
        return stage_snapshot(self.stages, self.actors)

    def merge(self, stages: dict, actors: dict) -> None:
        """Add another tally's counts (`stages`, `actors` as this one keeps them) to these."""
        for name, other in stages.items():
            s = self.stages.setdefault(
                name,
                {"rows": 0, "ok": 0, "images": 0, "error_rows": 0, "errors": {}, "batches": 0},
            )
            for key in ("rows", "ok", "images", "error_rows", "batches", "busy_seconds"):
                s[key] = s.get(key, 0) + other.get(key, 0)
            for kind, n in other.get("errors", {}).items():
                s["errors"][kind] = s["errors"].get(kind, 0) + n
        for stage, spans in actors.items():
            for actor_id, (started, finished) in spans.items():
                span = self.actors.setdefault(stage, {}).setdefault(actor_id, [started, finished])
                span[0], span[1] = min(span[0], started), max(span[1], finished)


def stage_snapshot(stages: dict, actors: dict) -> dict:
    """Per stage: its counts, how many pool actors ran it and the seconds they held."""
    actor_seconds = {
        stage: sum(last - start for start, last in spans.values())
        for stage, spans in actors.items()
    }
    return {
        name: {
            **s,
            "actors": len(actors.get(name, {})),
            "actor_seconds": actor_seconds.get(name, 0.0),
        }
        for name, s in stages.items()
    }


class JobActor(Tally, CrashJournal):
    """The job's one small actor: the progress tally and the crash journal (`k3batch.crashes`).

    One process rather than two: each Ray actor is a Python process that takes about a second
    of CPU to start, on the first image's path, and a little CPU all along while idle.

    It runs on the driver's node (`crashes.on_driver_node`): a worker node lost does not take
    it along. Should its own process die, Ray starts it again there, empty (up to
    `crashes.MAX_RESTARTS` times), and the driver's `Tracker`, which reads its `state` every
    `STATE_INTERVAL_S` seconds, hands it back the last state it read (`restore`). So a
    restart loses only what arrived since that read: the counts of batches that ended in
    those seconds (progress and run.json's stage counts come out short by them), the crash
    journal's starts and ends in them (a row that was running alone when its worker died
    may take one death more to be isolated), and the generation actors' handles, until each
    registers again with its next batch (a run that fails before then may leave an actor
    stuck in a batch running). Past its restarts it is lost: the Tracker says so, once.
    """

    def __init__(self):
        import uuid

        Tally.__init__(self)
        CrashJournal.__init__(self)
        self.devices: dict[str, dict] = {}  # actor -> its device record (k3batch.gpus)
        # Which start of the actor this is: a restart runs __init__ again.
        self.incarnation = uuid.uuid4().hex

    def record_devices(self, record: dict) -> None:
        """A model actor's devices; a restarted actor keeps its id and its one entry."""
        self.devices[record.get("actor_id") or f"pid {record.get('pid')}"] = record

    def device_records(self) -> list[dict]:
        return list(self.devices.values())

    def state(self) -> dict:
        """Everything but the workers' handles, which the driver must not hold (a handle
        keeps its actor alive): plain data, a few kB whatever the number of rows."""
        return {
            "incarnation": self.incarnation,
            "stages": self.stages,
            "actors": self.actors,
            "devices": self.devices,
            "unfinished": self.unfinished,
        }

    def restore(self, state: dict) -> None:
        """Add an earlier incarnation's `state` to this one's (after a restart)."""
        self.merge(state["stages"], state["actors"])
        for actor, record in state["devices"].items():
            self.devices.setdefault(actor, record)
        for key, n in state["unfinished"].items():
            self.unfinished[key] = self.unfinished.get(key, 0) + n


def start_job_actor():
    """The job's actor, on the driver's node (`crashes.on_driver_node`)."""
    import ray

    return ray.remote(**on_driver_node())(JobActor).remote()
