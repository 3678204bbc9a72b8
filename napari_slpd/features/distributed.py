"""Several processes extracting one cohort (torchrun, on one machine or many): who does which slide.

The ranks meet in the key-value store of torch.distributed (the one torchrun's agent serves, or rank 0's
own under a plain RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT launch); no file in the cohort folder is
used to coordinate, so nodes that see one output folder through different mount paths, or that start
minutes apart, still meet. Every wait has a timeout.

* **Joining**: each rank announces itself; a rank missing after ``join_timeout_s`` is named.
* **Order**: rank 0 publishes the slides, largest first, by slide id; every rank maps the ids to its own
  paths (a rank that does not see one of them says so).
* **Dynamic claiming**: a free rank takes the next slide with an atomic counter (``add``), so a rank with
  small slides takes more of them; nothing is assigned ahead.
* **Liveness**: each rank beats a counter from a thread; a rank waiting for the others judges a peer dead
  when its counter did not move for ``peer_timeout_s`` on the waiting rank's own monotonic clock (no clocks
  of different machines are compared).
* **End**: every rank waits until each claimed slide is finished or its rank is dead. Each finished slide
  is registered in the cohort by the rank that made it, at once (napari_slpd.cohort's registry takes any
  number of writers), so a lost node loses only its unfinished slides; the survivors say which rank and
  which slides are missing and exit non-zero; a rerun resumes the partial files and finishes identically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

from napari_slpd.errors import SlpdError

log = logging.getLogger(__name__)

PEER_TIMEOUT_ENV = "SLPD_PEER_TIMEOUT_S"
JOIN_TIMEOUT_ENV = "SLPD_JOIN_TIMEOUT_S"


class PeersLost(SlpdError):
    """Ranks died (or lost the store) before their slides were finished."""

    def __init__(self, message: str, missing: dict[int, list[str]], rows: dict[int, dict] | None = None):
        super().__init__(message)
        self.missing = missing
        self.rows = rows or {}


@dataclass
class RankInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ=os.environ) -> "RankInfo":
        try:
            rank = int(environ.get("RANK", "0"))
            world = int(environ.get("WORLD_SIZE", "1"))
            local = int(environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise SlpdError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc})") from exc
        if world < 1 or not 0 <= rank < world:
            raise SlpdError(f"RANK {rank} does not fit WORLD_SIZE {world}")
        return cls(rank, world, local)


def _seconds(env: str, default: float) -> float:
    value = os.environ.get(env, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise SlpdError(f"${env} must be a number of seconds, not {value!r}") from None
    if seconds <= 0:
        raise SlpdError(f"${env} must be positive, not {value!r}")
    return seconds


@dataclass
class Timeouts:
    peer_s: float = field(default_factory=lambda: _seconds(PEER_TIMEOUT_ENV, 120.0))  # silent peer -> dead
    join_s: float = field(default_factory=lambda: _seconds(JOIN_TIMEOUT_ENV, 900.0))  # all ranks present
    poll_s: float = 0.5

    @property
    def beat_s(self) -> float:
        return max(0.05, min(5.0, self.peer_s / 8))


class LocalCoordinator:
    """One process: every slide is this process's, in the order given."""

    rank, world = 0, 1

    def plan(self, slide_ids: list[str]) -> list[str]:
        return list(slide_ids)

    def check_shared(self, folder) -> None:
        pass

    def claims(self, n: int) -> Iterator[int]:
        yield from range(n)

    def finished(self, index: int, row: dict) -> None:
        pass

    def gather(self, own: dict[int, dict]) -> dict[int, dict]:
        return dict(own)

    def close(self) -> None:
        pass


class StoreCoordinator:
    """Ranks of one launch sharing the slides through a torch.distributed store (see the module)."""

    def __init__(self, info: RankInfo, timeouts: Timeouts | None = None, store=None):
        import socket

        import torch.distributed as dist

        self.info, self.rank, self.world = info, info.rank, info.world
        self.timeouts = timeouts or Timeouts()
        if store is None:
            store = _env_store(info, self.timeouts)
        run = os.environ.get("TORCHELASTIC_RUN_ID", "")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"slpd-extract/{run}/{attempt}/", store)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.dead: set[int] = set()
        self.n = 0
        self.where = f"{socket.gethostname()} pid {os.getpid()}"
        self._call("set", f"joined/{self.rank}", self.where)
        self._beat_store = self.store
        self._beater = threading.Thread(target=self._beat, name="slpd-heartbeat", daemon=True)
        self._beater.start()
        self._wait_joined()

    # -- store calls: one at a time, every failure a clear error ------------------------------------
    def _call(self, op: str, *args):
        with self._lock:
            try:
                return getattr(self.store, op)(*args)
            except Exception as exc:  # DistStoreError, RuntimeError: the store (rank 0's node) is gone
                raise SlpdError(f"rank {self.rank}: lost the coordination store "
                                f"({os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the node "
                                "serving it (rank 0's) is probably gone. Finished slides are registered; "
                                "run the same command again to finish the others") from exc

    def _beat(self) -> None:
        while not self._closing.wait(self.timeouts.beat_s):
            try:
                self._call("add", f"beat/{self.rank}", 1)
            except SlpdError:
                return

    def _wait_joined(self) -> None:
        deadline = time.monotonic() + self.timeouts.join_s
        keys = [f"joined/{r}" for r in range(self.world)]
        while True:
            present = [r for r, key in enumerate(keys) if self._call("check", [key])]
            if len(present) == self.world:
                return
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world)) - set(present))
                raise SlpdError(f"rank {self.rank}: rank(s) {missing} of {self.world} did not join within "
                                f"{self.timeouts.join_s:.0f} s (${JOIN_TIMEOUT_ENV}); check that every node was "
                                "started with the same rendezvous settings")
            time.sleep(self.timeouts.poll_s)

    # -- the plan --------------------------------------------------------------------------------
    def plan(self, slide_ids: list[str]) -> list[str]:
        """Rank 0's order of the slides (ids), the same on every rank; checks each rank has them all."""
        if self.rank == 0:
            self._call("set", "plan", json.dumps(slide_ids))
        else:
            self._wait_key("plan", "rank 0's list of slides")
            theirs = json.loads(self._call("get", "plan"))
            if sorted(theirs) != sorted(slide_ids):
                only_0 = sorted(set(theirs) - set(slide_ids))[:5]
                only_me = sorted(set(slide_ids) - set(theirs))[:5]
                message = (f"rank {self.rank} was given other slides than rank 0 (only rank 0: {only_0 or 'none'}; "
                           f"only rank {self.rank}: {only_me or 'none'}); give every node the same slides")
                self._call("set", f"refused/{self.rank}", message)
                raise SlpdError(message)
            slide_ids = theirs
        self.n = len(slide_ids)
        self.ids = list(slide_ids)
        return list(slide_ids)

    def check_shared(self, folder, wait_s: float = 60.0) -> None:
        """Every rank writes into one ``folder``: rank 0 leaves a marker file there and publishes its name;
        each other rank must see it (NFS may show a new name only after its attribute cache expires:
        retried for ``wait_s``). A folder that is not shared is refused before any work, naming it."""
        import uuid
        from pathlib import Path

        folder = Path(folder)
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            self._marker = folder / f".slpd-run-{uuid.uuid4().hex[:12]}"
            self._marker.write_text(self.where, encoding="utf-8")
            self._call("set", "marker", self._marker.name)
        else:
            self._wait_key("marker", "rank 0's marker in the output folder")
            name = self._call("get", "marker").decode()
            deadline = time.monotonic() + wait_s
            while not (folder / name).exists():
                if time.monotonic() > deadline:
                    message = (f"rank {self.rank} ({self.where}) does not see rank 0's output folder: {folder} here "
                               f"has no {name} (written by rank 0 on {self._where(0)}); every node must write to "
                               "one shared folder (or give each job its own part with --shard and its own cohort)")
                    self._call("set", f"refused/{self.rank}", message)
                    raise SlpdError(message)
                time.sleep(min(1.0, self.timeouts.poll_s * 4))
        self._call("set", f"shared/{self.rank}", "1")
        deadline = time.monotonic() + wait_s + self.timeouts.join_s
        while not all(self._call("check", [f"shared/{r}"]) for r in range(self.world)):
            refused = [r for r in range(self.world) if self._call("check", [f"refused/{r}"])]
            if refused:
                raise SlpdError(f"rank {self.rank}: rank {refused[0]} stopped: "
                                f"{self._call('get', f'refused/{refused[0]}').decode()}")
            if time.monotonic() > deadline:
                raise SlpdError(f"rank {self.rank}: the other ranks did not confirm the output folder in time")
            time.sleep(self.timeouts.poll_s)

    def _wait_key(self, key: str, what: str) -> None:
        deadline = time.monotonic() + self.timeouts.join_s
        while not self._call("check", [key]):
            refused = [r for r in range(self.world) if self._call("check", [f"refused/{r}"])]
            if refused:
                raise SlpdError(f"rank {self.rank}: rank {refused[0]} stopped: {self._call('get', f'refused/{refused[0]}').decode()}")
            if time.monotonic() > deadline:
                raise SlpdError(f"rank {self.rank}: {what} did not come within {self.timeouts.join_s:.0f} s")
            time.sleep(self.timeouts.poll_s)

    def claims(self, n: int) -> Iterator[int]:
        """Indices this rank takes, one at a time, as it becomes free."""
        while True:
            index = int(self._call("add", "next", 1)) - 1
            if index >= n:
                return
            self._call("set", f"claim/{index}", str(self.rank))
            yield index

    def finished(self, index: int, row: dict) -> None:
        self._call("set", f"row/{index}", json.dumps(row))

    # -- the end ---------------------------------------------------------------------------------
    def gather(self, own: dict[int, dict]) -> dict[int, dict]:
        """Every slide's row once all are finished; PeersLost (after registering nothing more: each rank
        registered its own) when ranks died with slides unfinished."""
        n, rows = self.n, dict(own)
        claims: dict[int, int] = {}
        beats: dict[int, tuple[int, float]] = {}
        unnamed: dict[int, float] = {}
        while True:
            issued = min(n, int(self._call("add", "next", 0)))
            for i in range(issued):
                if i not in claims and self._call("check", [f"claim/{i}"]):
                    claims[i] = int(self._call("get", f"claim/{i}"))
            for i in range(n):
                if i not in rows and self._call("check", [f"row/{i}"]):
                    rows[i] = json.loads(self._call("get", f"row/{i}"))
            open_ranks = {claims.get(i) for i in range(n) if i not in rows}
            now = time.monotonic()
            for i in range(n):  # counted out but never named: its rank died between the two store calls
                if i not in rows and i not in claims:
                    unnamed.setdefault(i, now)
                    if now - unnamed[i] > self.timeouts.peer_s:
                        claims[i] = -1
                        self.dead.add(-1)
            for r in sorted(x for x in open_ranks if x is not None and x != self.rank):
                count = int(self._call("add", f"beat/{r}", 0))
                seen = beats.get(r)
                if seen is None or seen[0] != count:
                    beats[r] = (count, now)
                elif now - seen[1] > self.timeouts.peer_s:
                    self.dead.add(r)
            unfinished = [i for i in range(n) if i not in rows]
            if not unfinished:
                self._call("set", f"done/{self.rank}", "1")
                return rows
            if unfinished and all(claims.get(i) in self.dead for i in unfinished):
                missing: dict[int, list[str]] = {}
                for i in unfinished:
                    missing.setdefault(claims[i], []).append(self.ids[i])
                lines = [f"rank {r} ({self._where(r)}) stopped answering for {self.timeouts.peer_s:.0f} s "
                         f"(${PEER_TIMEOUT_ENV}) with {len(ids)} slide(s) unfinished: {', '.join(ids)}"
                         for r, ids in sorted(missing.items())]
                raise PeersLost("; ".join(lines) + f". The {len(rows)} finished slide(s) are registered; run the "
                                "same command again (any number of ranks) to finish the others: the partial "
                                "feature files are resumed", missing, rows)
            time.sleep(self.timeouts.poll_s)

    def _where(self, rank: int) -> str:
        if rank < 0:
            return "unknown rank"
        try:
            return self._call("get", f"joined/{rank}").decode()
        except SlpdError:
            return "?"

    def close(self) -> None:
        """Rank 0 (whose process may serve the store) waits a little for the live ranks to be done."""
        if self.rank == 0:
            deadline = time.monotonic() + min(30.0, self.timeouts.peer_s)
            others = [r for r in range(1, self.world) if r not in self.dead]
            while others and time.monotonic() < deadline:
                try:
                    others = [r for r in others if not self._call("check", [f"done/{r}"])]
                except SlpdError:
                    break
                time.sleep(self.timeouts.poll_s)
        self._closing.set()
        marker = getattr(self, "_marker", None)
        if marker is not None:
            with contextlib.suppress(OSError):
                marker.unlink()


def _env_store(info: RankInfo, timeouts: Timeouts):
    """The store of a torchrun launch (its agent's) or of a plain env launch (rank 0 serves it)."""
    import torch.distributed as dist

    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise SlpdError(f"WORLD_SIZE is {info.world} but ${var} is not set: launch the ranks with torchrun "
                            "(or set MASTER_ADDR and MASTER_PORT), or give each job its part with --shard I/N")
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=info.rank, world_size=info.world,
                                           timeout=timedelta(seconds=timeouts.join_s)))
    except Exception as exc:
        raise SlpdError(f"rank {info.rank}: cannot reach the coordination store at "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeouts.join_s:.0f} s "
                        f"({type(exc).__name__}: {exc})") from exc
    store.set_timeout(timedelta(seconds=max(timeouts.peer_s, 30.0)))
    return store


def coordinator_for(info: RankInfo, timeouts: Timeouts | None = None):
    return LocalCoordinator() if info.world == 1 else StoreCoordinator(info, timeouts)
