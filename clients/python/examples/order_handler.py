"""A web-style handler: store an order and enqueue its invoice job in ONE transaction.

If anything fails before the commit (a bad order, a crash), the transaction rolls back and
no invoice job exists; once it commits, a drover worker publishes and runs the job within a
second. Retrying the same request is harmless: the same key with the same params is "already
exists", so the handler is idempotent end to end.

Run it against a migrated ledger with a worker running (`drover migrate`, `drover worker`)::

    python examples/order_handler.py 1001 acme 4999

The orders table lives in the ledger's database here for brevity; in an application it is
any table of the same database.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import psycopg

import drover

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id        bigint PRIMARY KEY,
    customer  text   NOT NULL,
    cents     bigint NOT NULL CHECK (cents > 0)
)
"""


def handle_order(conn: psycopg.Connection[Any], order: dict[str, Any]) -> dict[str, Any]:
    """POST /orders: validate, store, enqueue the invoice; all or nothing."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO orders (id, customer, cents) VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO NOTHING",
            (order["id"], order["customer"], order["cents"]),
        )
        new = drover.enqueue(
            conn,
            key=f"invoice:{order['id']}",
            pipeline="noop",  # your invoice pipeline here
            params={"batches": 1},
            max_attempts=3,
        )
    return {"order": order["id"], "invoice_job": f"invoice:{order['id']}", "new": new}


def main() -> None:
    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/drover")
    order_id, customer, cents = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    with psycopg.connect(url) as conn:
        conn.execute(SCHEMA)
        conn.commit()
        print(handle_order(conn, {"id": order_id, "customer": customer, "cents": cents}))
    with drover.Client(database_url=url) as client:
        [job] = client.wait([f"invoice:{order_id}"], timeout=60)
        print(job.key, job.state, job.result)


if __name__ == "__main__":
    main()
