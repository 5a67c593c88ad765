#!/usr/bin/env python3
"""RabbitMQ ceiling for bench/run.sh: persistent publish with confirms, then consume with
manual ack, on a scratch quorum queue (the kind drover's {ns}.jobs is), timing both.

Publishes N persistent messages (~100 bytes, like a noop job message) in windows of --window
unconfirmed publishes, waiting for the broker's confirms after each window; then consumes them
all with basic.qos prefetch --prefetch and one basic.ack per message; deletes the scratch
queue; prints JSON.

usage: rabbit_ceiling.py [--url amqp://guest:guest@127.0.0.1:5672/%2f] [--n 20000]
"""

import argparse
import json
import os
import sys
import time

import pika


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=os.environ.get("DROVER_AMQP_URL",
                                                    "amqp://guest:guest@127.0.0.1:5672/%2f"))
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--prefetch", type=int, default=256)
    ap.add_argument("--window", type=int, default=500, help="publishes per confirm wait")
    ap.add_argument("--queue", default=f"bench-ceiling-{os.getpid()}")
    ap.add_argument("--queue-type", default="quorum", choices=["quorum", "classic"])
    args = ap.parse_args()

    conn = pika.BlockingConnection(pika.URLParameters(args.url))
    ch = conn.channel()
    ch.queue_declare(args.queue, durable=True,
                     arguments={"x-queue-type": args.queue_type})
    body = json.dumps({"v": 1, "idempotency_key": "bench-ceiling-000000", "pipeline": "noop",
                       "params": {}}).encode()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    try:
        # Publish with confirms. pika's BlockingChannel in confirm mode waits for each
        # publish's confirm (one round trip per message), which `drover publish` avoids by
        # pipelining; to measure the broker, not pika, use the asynchronous channel under a
        # blocking one: publish a window of messages, then wait until the broker confirmed
        # them all (it confirms with multiple=true), then the next window.
        raw = conn.channel()
        impl = raw._impl
        state = {"last": 0, "acked": 0, "nacked": 0, "selected": False}

        def on_confirm(frame):
            m = frame.method
            n = (m.delivery_tag - state["last"]) if m.multiple else 1
            state["last"] = max(state["last"], m.delivery_tag)
            state["acked" if isinstance(m, pika.spec.Basic.Ack) else "nacked"] += n

        impl.confirm_delivery(ack_nack_callback=on_confirm,
                              callback=lambda _f: state.__setitem__("selected", True))
        while not state["selected"]:
            conn.process_data_events(time_limit=1)
        t0 = time.perf_counter()
        sent = 0
        while sent < args.n:
            k = min(args.window, args.n - sent)
            for _ in range(k):
                impl.basic_publish("", args.queue, body, props)
            sent += k
            while state["acked"] + state["nacked"] < sent:
                # short polls: the impl-level callback does not wake the blocking loop
                conn.process_data_events(time_limit=0.001)
        publish_s = time.perf_counter() - t0
        nacked = state["nacked"]
        if nacked:
            print(f"broker nacked {nacked} messages", file=sys.stderr)

        # Consume with manual ack.
        ch.basic_qos(prefetch_count=args.prefetch)
        got = 0
        t1 = time.perf_counter()
        for method, _props, _body in ch.consume(args.queue, auto_ack=False, inactivity_timeout=10):
            if method is None:
                break
            ch.basic_ack(method.delivery_tag)
            got += 1
            if got >= args.n:
                break
        ch.cancel()
        consume_s = time.perf_counter() - t1
    finally:
        try:
            ch.queue_delete(args.queue)
        finally:
            conn.close()
    print(json.dumps({
        "messages": args.n, "queue_type": args.queue_type,
        "publish_confirm_per_s": round(args.n / publish_s),
        "consume_ack_per_s": round(got / consume_s) if got else 0,
        "consumed": got, "nacked": nacked, "window": args.window,
    }))
    return 0 if got == args.n and not nacked else 1


if __name__ == "__main__":
    sys.exit(main())
