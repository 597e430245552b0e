"""The Redis capacity benchmark at a small N, so that it runs and its figures keep their meaning."""

from __future__ import annotations

import pytest

from benchmarks.redis_capacity import run

JOBS = 60


def _per_job(path: dict[str, dict[str, object]], server: str) -> dict[str, float]:
    return path[server]["by_command_per_job"]  # type: ignore[return-value]


@pytest.mark.timeout(240)
def test_capacity_counts_each_path_per_job() -> None:
    report = run(jobs=JOBS, per_message=20, timeout=120)
    paths = report["paths"]
    # Submit: one broker message per job; the ledger in one ZADD and one HSET per round trip.
    assert _per_job(paths["submit_single"], "broker")["lpush"] == 1.0
    ledger = _per_job(paths["submit_single"], "results")
    assert ledger["zadd"] == ledger["hset"] == pytest.approx(1 / JOBS, abs=1e-3)
    # Chunk messages: one LPUSH per 20 jobs.
    chunked = _per_job(paths["submit_chunked"], "broker")
    assert chunked["lpush"] == pytest.approx(1 / 20, abs=1e-3)
    for label in ("single", "chunked"):
        results = _per_job(paths[f"worker_{label}"], "results")
        # Every job answered by the answer script: one stream event, its ledger entry cleared.
        assert results["xadd"] == 1.0, results
        assert results["evalsha"] >= 1.0, results
        assert results["zrem"] == 1.0, results
        assert paths[f"worker_{label}"]["redis_cpu_us_per_job"] > 0
        assert report[label]["jobs_per_s_per_redis_core"]["one_redis"] > 0
        assert report[label]["results_bytes_per_job"] > 0
    # Taking a message: one BRPOP per message, far fewer for chunks.
    assert _per_job(paths["worker_single"], "broker")["brpop"] >= 0.9
    assert _per_job(paths["worker_chunked"], "broker").get("brpop", 0) < 0.5
    # One reaper sweep reads a bounded window of the ledger, whatever its size.
    sweep = paths["reaper_sweep"]["by_command_per_job"]
    assert sweep["zrangebyscore"] == 1 and sweep["mget"] == 1
