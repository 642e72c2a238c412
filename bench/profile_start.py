"""What a `/v4/listen` start reads for speaker matching when the user has many people (issue 12: every stream start
loaded every profile with all its embeddings).

    .venv/bin/python bench/profile_start.py --people 500 --rows 64 --backend sqlite
    .venv/bin/python bench/profile_start.py --people 500 --rows 200 --backend postgres

Stores `--people` person profiles (plus the user's own) of `--rows` 256-dim rows each, directly (no cap, as profiles
could grow before PROFILE_MAX_EMBEDDINGS), for one uid; then times, `--repeat` times each, the two ways to build the
stream's `ProfileIndex`: "all" (the old `_speaker_tagger`: `list_profiles`, every profile with all its rows) and
"matching" (`matching_profiles`: one centroid per profile of the running model, at most PROFILE_MAX_EMBEDDINGS rows
read per profile). Printed: median and max wall time, rows and bytes handed to the server, peak Python allocation
(tracemalloc) of one build, and that both indexes agree (same ids, centroids within 1e-5).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.base import SpeakerProfile, Storage  # noqa: E402
from storage.profile_rows import ProfileLimits  # noqa: E402
from streaming.speaker import ProfileIndex  # noqa: E402

MODEL, DIM, UID = "resemblyzer", 256, "bench-user"


async def open_store(backend: str, workdir: Path, dsn: str) -> tuple[Storage, str | None]:
    if backend == "sqlite":
        from storage.sqlite import SqliteStorage

        store: Storage = SqliteStorage(workdir / "bench.sqlite3")
        schema = None
    else:
        from storage.postgres import PostgresStorage

        schema = f"bench_{uuid.uuid4().hex[:12]}"
        store = PostgresStorage(dsn, schema=schema)
    await store.open()
    return store, schema


async def fill(store: Storage, people: int, rows: int) -> None:
    """Profiles stored with every row (the cap lifted for the fill: profiles from before it could hold this many)."""
    store.profile_limits = ProfileLimits(max_embeddings=10**9, dedup_cosine=1.01)
    rng = np.random.default_rng(0)
    for i in range(people + 1):
        vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        await store.save_profile(SpeakerProfile(uid=UID, kind="user" if i == 0 else "person", model=MODEL,
                                                embeddings=vectors, name=f"p{i}", created_at=float(i)))
    store.profile_limits = ProfileLimits()


async def build(store: Storage, way: str) -> tuple[ProfileIndex, int]:
    if way == "all":
        profiles = await store.list_profiles(UID)
    else:
        profiles = await store.matching_profiles(UID, MODEL)
    return ProfileIndex.from_profiles(profiles, MODEL), sum(p.embeddings.nbytes for p in profiles)


async def measure(store: Storage, way: str, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        index, nbytes = await build(store, way)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    await build(store, way)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"index": index, "bytes": nbytes, "median_s": statistics.median(times), "max_s": max(times),
            "peak_mb": peak / 2**20}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--people", type=int, default=500)
    ap.add_argument("--rows", type=int, default=64, help="rows per stored profile")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store, schema = await open_store(args.backend, Path(tmp), args.dsn)
        try:
            await fill(store, args.people, args.rows)
            results = {way: await measure(store, way, args.repeat) for way in ("all", "matching")}
        finally:
            await store.close()
            if schema is not None:
                import asyncpg

                con = await asyncpg.connect(args.dsn)
                await con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                await con.close()
    cap = ProfileLimits().max_embeddings
    print(f"{args.backend}: {args.people} people + the user, {args.rows} rows x {DIM} dims each "
          f"(PROFILE_MAX_EMBEDDINGS {cap}), {args.repeat} builds each")
    for way, r in results.items():
        print(f"  {way:8s} median {r['median_s'] * 1000:8.1f} ms  max {r['max_s'] * 1000:8.1f} ms  "
              f"embeddings read {r['bytes'] / 2**20:7.2f} MiB  peak alloc {r['peak_mb']:7.1f} MiB")
    old, new = results["all"]["index"], results["matching"]["index"]
    same = old.ids == new.ids and np.allclose(old.centroids, new.centroids, atol=1e-5) if args.rows <= cap else \
        old.ids == new.ids
    print(f"  same profiles{'' if args.rows > cap else ' and centroids'}: {same}"
          f"{'  (rows above the cap: matching uses the newest ' + str(cap) + ')' if args.rows > cap else ''}")


if __name__ == "__main__":
    asyncio.run(main())
