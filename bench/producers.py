"""Producer benchmarks: publish_many throughput (Python client and `drover publish --file`,
the Rust client) and drover.enqueue -> job start latency. Prints a markdown section.

    PY=$(scripts/ensure-python.sh); "$PY" bench/producers.py --drover PATH/TO/drover

Uses its own database drover_bench_producers (dropped and recreated, then dropped) and
namespaces bench-prod-<pid>-* (queues deleted afterwards). Needs the running services.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import drover
import pika
import psycopg

ADMIN = os.environ.get(
    "BENCH_ADMIN_DB_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)
AMQP = os.environ.get("DROVER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
DB = "drover_bench_producers"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drover", required=True)
    ap.add_argument(
        "--jobs", type=int, default=int(os.environ.get("BENCH_PUBLISH_JOBS", "20000"))
    )
    ap.add_argument(
        "--latency-jobs",
        type=int,
        default=int(os.environ.get("BENCH_ENQUEUE_JOBS", "200")),
    )
    args = ap.parse_args()
    db_url = f"{ADMIN.rsplit('/', 1)[0]}/{DB}"
    prefix = f"bench-prod-{os.getpid()}"
    env = dict(
        os.environ,
        DATABASE_URL=db_url,
        DROVER_AMQP_URL=AMQP,
        DROVER_LOG_FORMAT="json",
        DROVER_METRICS_ADDR="127.0.0.1:0",
    )
    env.pop("DROVER_CONFIG", None)
    namespaces: list[str] = []
    worker: subprocess.Popen[bytes] | None = None
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    subprocess.run([args.drover, "migrate"], env=env, check=True, capture_output=True)
    try:
        # 1. drover publish --file (the Rust client), one process, N jobs.
        ns = f"{prefix}-rust"
        namespaces.append(ns)
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            for i in range(args.jobs):
                f.write(
                    json.dumps(
                        {"v": 1, "idempotency_key": f"r-{i}", "pipeline": "noop"}
                    )
                    + "\n"
                )
        t0 = time.perf_counter()
        subprocess.run(
            [args.drover, "publish", "--file", f.name, "-q"],
            env=dict(env, DROVER_NAMESPACE=ns),
            check=True,
            capture_output=True,
        )
        rust_s = time.perf_counter() - t0
        os.unlink(f.name)

        # 2. Python Client.publish_many, N jobs (queues declared by a first drover publish).
        ns = f"{prefix}-py"
        namespaces.append(ns)
        subprocess.run(
            [args.drover, "publish", "--pipeline", "noop", "--key", "py-warm", "-q"],
            env=dict(env, DROVER_NAMESPACE=ns),
            check=True,
            capture_output=True,
        )
        jobs = [drover.Job(f"p-{i}", "noop") for i in range(args.jobs)]
        with drover.Client(amqp_url=AMQP, database_url=db_url, namespace=ns) as c:
            t0 = time.perf_counter()
            out = c.publish_many(jobs)
            py_s = time.perf_counter() - t0
        assert all(o.status == "published" for o in out)

        # 3. enqueue -> start: one job per transaction, the next once the previous finished.
        ns = f"{prefix}-enq"
        namespaces.append(ns)
        # The worker logs to a file (an unread pipe would fill up and block it).
        log = Path(tempfile.mkdtemp()) / "worker.log"
        with log.open("wb") as log_file:
            worker = subprocess.Popen(
                [args.drover, "worker", "--prefetch", "16"],
                env=dict(env, DROVER_NAMESPACE=ns),
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        deadline = time.monotonic() + 60
        while b'"consuming"' not in log.read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker did not start consuming:\n{log.read_text()}")
            time.sleep(0.05)
        delays: list[float] = []
        with (
            psycopg.connect(db_url) as conn,
            drover.Client(amqp_url=AMQP, database_url=db_url, namespace=ns) as c,
        ):
            for i in range(args.latency_jobs):
                key = f"e-{i}"
                with conn.transaction():
                    drover.enqueue(conn, key, "noop")
                [job] = c.wait([key], timeout=30)
                assert job.succeeded and job.started_at is not None
                delays.append((job.started_at - job.created_at).total_seconds() * 1000)
        delays.sort()
        p50 = statistics.median(delays)
        p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        conn_amqp = pika.BlockingConnection(pika.URLParameters(AMQP))
        ch = conn_amqp.channel()
        for ns in namespaces:
            for q in (f"{ns}.jobs", f"{ns}.dead", f"{ns}.poison"):
                ch.queue_delete(q)
            for x in (ns, f"{ns}.dlx"):
                ch.exchange_delete(x)
        conn_amqp.close()
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

    n = args.jobs
    print(f"## 6. Producers ({n:,} noop jobs; {args.latency_jobs} enqueues)")
    print()
    print(
        "Throughput: ledger insert (`drover.record_jobs`, 1,000 per statement), publish with"
    )
    print(
        "publisher confirms, `drover.mark_published`; no worker running. Latency: one"
    )
    print(
        "`drover.enqueue` per transaction, the next after the previous job succeeded; from"
    )
    print(
        "`created_at` (the enqueueing transaction's start) to `started_at` (the worker's"
    )
    print("claim), both from the ledger's clock.")
    print()
    print("| producer | wall s | jobs/s |")
    print("| --- | ---: | ---: |")
    print(
        f"| `drover publish --file` (Rust client, incl. process start) | {rust_s:.2f} "
        f"| {n / rust_s:,.0f} |"
    )
    print(f"| Python `Client.publish_many` | {py_s:.2f} | {n / py_s:,.0f} |")
    print()
    print("| interval | p50 ms | p99 ms |")
    print("| --- | ---: | ---: |")
    print(f"| `drover.enqueue` commit → job started | {p50:.1f} | {p99:.1f} |")


if __name__ == "__main__":
    main()
