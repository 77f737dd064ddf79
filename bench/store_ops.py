"""Ephemeral store operations per second: the embedded SQLite store called directly (as
it is) and through one thread (the alternative it was measured against), beside memory://
and Redis for scale, and several processes sharing one file.

    .venv/bin/python bench/store_ops.py [--ops 4000] [--redis redis://127.0.0.1:6379/0]

Each round is the hot path's mix: put a ticket, get it, touch it, take it, count a
failure (incr); ops/s counts every call. Prints one line per store.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from portcullis.store import EphemeralStore, MemoryStore, SqliteStore, open_ephemeral

OPS_PER_ROUND = 5


async def rounds(store: EphemeralStore, count: int, tag: str) -> float:
    """Seconds for `count` rounds of the mix."""
    return (await timed_rounds(store, count, tag))[0]


async def timed_rounds(store: EphemeralStore, count: int, tag: str) -> tuple[float, float]:
    """Seconds for `count` rounds of the mix, and the slowest round's seconds (with the
    calls synchronous, how long the event loop stood still at worst)."""
    started = time.perf_counter()
    slowest = 0.0
    for i in range(count):
        key = f"bench:{tag}:{i}"
        begun = time.perf_counter()
        await store.put(key, b"t" * 64, 100.0)
        await store.get(key)
        await store.touch(key, 100.0)
        await store.take(key)
        await store.incr(f"bench:{tag}:count:{i % 50}", 100.0)
        slowest = max(slowest, time.perf_counter() - begun)
        await asyncio.sleep(0)   # let the loop's other tasks run, as between requests
    return time.perf_counter() - started, slowest


async def threaded_rounds(store: SqliteStore, count: int, tag: str) -> float:
    """The same mix with every call handed to one thread (the loop stays free)."""
    pool = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()

    def run(method: str, *args: object) -> object:
        # SqliteStore's methods never suspend: one send() runs one to its end, with no
        # event loop in the thread (that would cost more than the statement).
        try:
            getattr(store, method)(*args).send(None)
        except StopIteration as done:
            return done.value
        raise RuntimeError(f"{method} suspended")

    async def call(method: str, *args: object) -> object:
        return await loop.run_in_executor(pool, run, method, *args)

    started = time.perf_counter()
    for i in range(count):
        key = f"bench:{tag}:{i}"
        await call("put", key, b"t" * 64, 100.0)
        await call("get", key)
        await call("touch", key, 100.0)
        await call("take", key)
        await call("incr", f"bench:{tag}:count:{i % 50}", 100.0)
    elapsed = time.perf_counter() - started
    pool.shutdown()
    return elapsed


async def longest_stall(stalls: list[float]) -> None:
    """Until cancelled, the longest time (in stalls[0]) the loop took past a 1 ms sleep:
    how long other connections of this process would have waited."""
    while True:
        began = time.perf_counter()
        await asyncio.sleep(0.001)
        stalls[0] = max(stalls[0], time.perf_counter() - began - 0.001)


def _worker(path: str, count: int, tag: str,
            results: multiprocessing.Queue[tuple[float, float]]) -> None:
    async def main() -> tuple[float, float]:
        store = SqliteStore(Path(path))
        stalls = [0.0]
        watch = asyncio.create_task(longest_stall(stalls))
        try:
            elapsed, _slowest = await timed_rounds(store, count, tag)
            return elapsed, stalls[0]
        finally:
            watch.cancel()
            await store.close()
    results.put(asyncio.run(main()))


def processes_sharing(path: Path, processes: int, count: int) -> tuple[float, float]:
    """Total ops/s of `processes` processes each running `count` rounds on one file, and
    the longest event-loop stall (milliseconds) any of them saw."""
    results: multiprocessing.Queue[tuple[float, float]] = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_worker, args=(str(path), count, f"p{n}",
                                                             results))
               for n in range(processes)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    elapsed = time.perf_counter() - started
    slowest = max(results.get(timeout=10)[1] for _ in workers)
    return processes * count * OPS_PER_ROUND / elapsed, slowest * 1000


async def main(ops: int, redis_url: str | None) -> None:
    count = ops // OPS_PER_ROUND
    with tempfile.TemporaryDirectory() as directory:
        sqlite = SqliteStore(Path(directory) / "ephemeral.db")
        await sqlite.ping()
        print(f"sqlite, direct calls:    {ops / await rounds(sqlite, count, 'a'):9.0f} ops/s")
        print(f"sqlite, one thread:      "
              f"{ops / await threaded_rounds(sqlite, count, 'b'):9.0f} ops/s")
        await sqlite.close()
        for processes in (2, 4):
            total, slowest = processes_sharing(Path(directory) / "ephemeral.db", processes,
                                               count)
            print(f"sqlite, {processes} processes:     {total:9.0f} ops/s (all together; "
                  f"longest event-loop stall {slowest:.1f} ms)")
    memory = MemoryStore()
    print(f"memory://:               {ops / await rounds(memory, count, 'c'):9.0f} ops/s")
    if redis_url:
        redis = open_ephemeral(redis_url, prefix=f"bench-{secrets.token_hex(4)}:")
        print(f"redis:                   {ops / await rounds(redis, count, 'd'):9.0f} ops/s")
        await redis.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=4000)
    parser.add_argument("--redis", default=None, help="also measure this Redis")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.ops, arguments.redis))
