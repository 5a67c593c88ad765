//! Integration tests against a real RabbitMQ (`DROVER_TEST_AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). Each test works in its own namespace and deletes
//! its queues and exchanges afterwards, even when it fails, so the tests run in parallel.

use drover_broker::{
    Broker, BrokerError, Incoming, JobConsumer, OutgoingJob, Publisher, Topology, redact_url,
};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::timeout;

/// Upper bound for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(15);

fn amqp_url() -> String {
    std::env::var("DROVER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

fn unique_ns() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "t-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs `body` with a fresh namespace, then deletes that namespace's objects whatever
/// happened, then re-raises a failure.
async fn with_namespace<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let ns = unique_ns();
    let outcome = AssertUnwindSafe(body(ns.clone())).catch_unwind().await;
    cleanup(&ns).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn raw_connection() -> Connection {
    timeout(
        WAIT,
        Connection::connect(&amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("raw connect timed out")
    .expect("raw connect")
}

async fn cleanup(ns: &str) {
    let topo = Topology::new(ns);
    let conn = raw_connection().await;
    for queue in [topo.jobs_queue(), topo.dead_queue()] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = timeout(
                WAIT,
                ch.queue_delete(queue.into(), QueueDeleteOptions::default()),
            )
            .await;
        }
    }
    for exchange in [topo.jobs_exchange(), topo.dead_letter_exchange()] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = timeout(
                WAIT,
                ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()),
            )
            .await;
        }
    }
    let _ = timeout(WAIT, conn.close(200, "OK".into())).await;
}

async fn connect(name: &str) -> Broker {
    timeout(WAIT, Broker::connect(&amqp_url(), name))
        .await
        .expect("connect timed out")
        .expect("connect")
}

async fn next_delivery(consumer: &mut JobConsumer) -> Incoming {
    timeout(WAIT, consumer.next())
        .await
        .expect("no delivery in time")
        .expect("consumer ended")
        .expect("consumer error")
}

fn traceparent(i: usize) -> String {
    format!("00-{:032x}-{:016x}-01", i + 1, i + 1)
}

#[test]
fn public_types_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Broker>();
    send_sync::<Publisher>();
    send_sync::<Incoming>();
    send_sync::<BrokerError>();
    fn send<T: Send>() {}
    send::<JobConsumer>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_is_idempotent() {
    with_namespace(|ns| async move {
        let topo = Topology::new(&ns);
        let broker = connect("declare-idempotent").await;
        broker.declare(&topo).await.expect("first declare");
        broker.declare(&topo).await.expect("second declare");
        // Another client (a producer) declaring the same topology is fine too.
        let other = connect("declare-idempotent-2").await;
        other
            .declare(&topo)
            .await
            .expect("declare from another connection");
        other.close().await.expect("close other");

        // The queue really is a durable quorum queue: a passive declare finds it.
        let conn = raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                topo.jobs_queue().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        assert_eq!(q.message_count(), 0);
        conn.close(200, "OK".into()).await.expect("close raw");

        assert!(broker.is_connected());
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_against_conflicting_classic_queue_explains() {
    with_namespace(|ns| async move {
        let topo = Topology::new(&ns);
        // Someone created {ns}.jobs as a classic queue first.
        let conn = raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_declare(
            topo.jobs_queue().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("classic declare");
        conn.close(200, "OK".into()).await.expect("close raw");

        let broker = connect("declare-conflict").await;
        let err = broker.declare(&topo).await.expect_err("must conflict");
        let text = err.to_string();
        eprintln!("conflict error: {text}");
        assert!(
            matches!(err, BrokerError::TopologyMismatch { .. }),
            "{err:?}"
        );
        assert!(
            text.contains(&format!("queue {}", topo.jobs_queue())),
            "{text}"
        );
        assert!(text.contains("PRECONDITION_FAILED"), "{text}");
        assert!(text.contains("inequivalent arg"), "{text}");
        assert!(text.contains("not declared by drover"), "{text}");
        assert!(text.contains("quorum queue"), "{text}");
        // RabbitMQ names the first differing argument (x-dead-letter-exchange); the error
        // still names both types, the difference that cannot be fixed in place.
        assert!(
            text.contains(&format!(
                "{} is a classic queue (it has no x-queue-type argument",
                topo.jobs_queue()
            )),
            "{text}"
        );
        assert!(text.contains("drover needs a quorum queue"), "{text}");
        assert!(text.contains("127.0.0.1:5672") || !amqp_url().contains("127.0.0.1"));
        assert!(!text.contains("guest:guest"), "{text}");
        assert_eq!(err.kind(), drover_core::ErrorKind::Permanent);
        // Only the declare channel died; the connection is still usable.
        assert!(broker.is_connected());
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_against_exchange_of_other_type_explains() {
    with_namespace(|ns| async move {
        let topo = Topology::new(&ns);
        let conn = raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.exchange_declare(
            topo.jobs_exchange().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("fanout declare");
        conn.close(200, "OK".into()).await.expect("close raw");

        let broker = connect("declare-exchange-conflict").await;
        let err = broker.declare(&topo).await.expect_err("must conflict");
        let text = err.to_string();
        eprintln!("exchange conflict: {text}");
        assert!(
            text.starts_with(&format!("exchange {ns} on RabbitMQ at")),
            "{text}"
        );
        assert!(text.contains("delete exchange name="), "{text}");
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_with_other_delivery_limit_names_it() {
    with_namespace(|ns| async move {
        let broker = connect("declare-limit").await;
        broker.declare(&Topology::new(&ns)).await.expect("declare");
        let mut other = Topology::new(&ns);
        other.delivery_limit = 5;
        let err = broker.declare(&other).await.expect_err("must conflict");
        let text = err.to_string();
        eprintln!("limit error: {text}");
        assert!(text.contains("x-delivery-limit"), "{text}");
        assert!(text.contains("delivery limit"), "{text}");
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_jobs_confirmed_then_consumed_within_prefetch() {
    with_namespace(|ns| async move {
        const N: usize = 1000;
        const PREFETCH: usize = 10;
        let topo = Topology::new(&ns);
        let broker = connect("thousand").await;
        broker.declare(&topo).await.expect("declare");
        let publisher = broker.publisher(&topo).await.expect("publisher");
        let jobs: Vec<OutgoingJob> = (0..N)
            .map(|i| OutgoingJob {
                message_id: format!("job-{i}"),
                body: format!(r#"{{"v":1,"idempotency_key":"k-{i}","pipeline":"noop"}}"#)
                    .into_bytes(),
                traceparent: (i % 2 == 0).then(|| traceparent(i)),
            })
            .collect();
        timeout(WAIT, publisher.publish_jobs(&jobs))
            .await
            .expect("confirms timed out")
            .expect("all confirmed");

        let mut consumer = broker
            .consume(&topo, PREFETCH as u16, "thousand-consumer")
            .await
            .expect("consume");
        let mut seen = HashSet::new();
        let mut held: Vec<Incoming> = Vec::new();
        let mut max_unacked = 0;
        let mut rounds = 0usize;
        let mut checked_absence = false;
        while seen.len() < N {
            let d = next_delivery(&mut consumer).await;
            held.push(d);
            max_unacked = max_unacked.max(held.len());
            assert!(
                held.len() <= PREFETCH,
                "{} received-but-unacked deliveries, prefetch is {PREFETCH}",
                held.len()
            );
            let d = held.last().expect("just pushed");
            let id = d.message_id.clone().expect("message_id");
            let i: usize = id
                .strip_prefix("job-")
                .and_then(|s| s.parse().ok())
                .expect("job id");
            assert_eq!(d.body, jobs[i].body, "body of {id}");
            assert_eq!(d.traceparent, jobs[i].traceparent, "traceparent of {id}");
            assert_eq!(d.delivery_mode, Some(2), "persistent {id}");
            assert_eq!(d.content_type.as_deref(), Some("application/json"));
            assert!(d.timestamp.is_some());
            assert!(!d.redelivered);
            assert_eq!(d.delivery_count, None);
            assert_eq!(d.routing_key, topo.jobs_queue());
            assert!(seen.insert(id.clone()), "duplicate {id}");

            if held.len() == PREFETCH || seen.len() == N {
                if !checked_absence && held.len() == PREFETCH {
                    // With `prefetch` unacked, the broker must not send an 11th.
                    checked_absence = true;
                    let extra = timeout(Duration::from_millis(500), consumer.next()).await;
                    assert!(extra.is_err(), "a delivery beyond the prefetch arrived");
                }
                // Ack a varying number, oldest first, so the window slides unevenly.
                rounds += 1;
                let n = if seen.len() == N {
                    held.len()
                } else {
                    1 + rounds % held.len()
                };
                for d in held.drain(..n) {
                    timeout(WAIT, d.ack())
                        .await
                        .expect("ack timed out")
                        .expect("ack");
                }
            }
        }
        assert!(held.is_empty());
        assert_eq!(max_unacked, PREFETCH);
        assert_eq!(seen.len(), N);
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_producers_reach_the_consumer() {
    with_namespace(|ns| async move {
        let topo = Topology::new(&ns);
        let broker = connect("external").await;
        broker.declare(&topo).await.expect("declare");
        let mut consumer = broker.consume(&topo, 5, "").await.expect("consume");
        assert!(!consumer.tag().is_empty(), "broker-generated tag");

        // A producer in another language: plain basic.publish, no drover code.
        let conn = raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        // Header strings must be long strings: RabbitMQ reads field type 's' as a short int.
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(traceparent(7))),
        );
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id("via-default".into())
            .with_headers(headers);
        ch.basic_publish(
            "".into(),
            topo.jobs_queue().into(),
            BasicPublishOptions::default(),
            br#"{"via":"default"}"#,
            props,
        )
        .await
        .expect("publish via default exchange")
        .await
        .expect("confirm via default exchange");
        let props = BasicProperties::default().with_message_id("via-exchange".into());
        ch.basic_publish(
            topo.jobs_exchange().into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            br#"{"via":"exchange"}"#,
            props,
        )
        .await
        .expect("publish via the namespace exchange")
        .await
        .expect("confirm via the namespace exchange");

        let mut got = Vec::new();
        for _ in 0..2 {
            let d = next_delivery(&mut consumer).await;
            got.push((
                d.message_id.clone(),
                d.body.clone(),
                d.traceparent.clone(),
                d.exchange.clone(),
            ));
            d.ack().await.expect("ack");
        }
        got.sort();
        assert_eq!(
            got,
            vec![
                (
                    Some("via-default".to_string()),
                    br#"{"via":"default"}"#.to_vec(),
                    Some(traceparent(7)),
                    String::new(),
                ),
                (
                    Some("via-exchange".to_string()),
                    br#"{"via":"exchange"}"#.to_vec(),
                    None,
                    topo.jobs_exchange(),
                ),
            ]
        );
        conn.close(200, "OK".into()).await.expect("close raw");
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeued_until_the_delivery_limit_then_dead_lettered() {
    with_namespace(|ns| async move {
        let mut topo = Topology::new(&ns);
        topo.delivery_limit = 2;
        let broker = connect("poison").await;
        broker.declare(&topo).await.expect("declare");
        let publisher = broker.publisher(&topo).await.expect("publisher");
        let job = OutgoingJob {
            message_id: "poison-1".into(),
            body: br#"{"poison":true}"#.to_vec(),
            traceparent: None,
        };
        publisher
            .publish_jobs(std::slice::from_ref(&job))
            .await
            .expect("publish");

        // Watch {ns}.dead with a plain consumer.
        let conn = raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        let mut dead = ch
            .basic_consume(
                topo.dead_queue().into(),
                "dead-watch".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume dead");

        let mut consumer = broker.consume(&topo, 1, "poison-worker").await.expect("consume");
        let mut deliveries = Vec::new();
        let dead_letter = loop {
            assert!(deliveries.len() <= 10, "never dead-lettered: {deliveries:?}");
            tokio::select! {
                d = timeout(WAIT, consumer.next()) => {
                    let d = d.expect("no delivery in time").expect("ended").expect("error");
                    deliveries.push((d.redelivered, d.delivery_count));
                    d.nack_requeue().await.expect("nack");
                }
                m = timeout(WAIT, dead.next()) => {
                    break m.expect("no dead letter in time").expect("dead consumer ended").expect("dead consumer error");
                }
            }
        };
        eprintln!("deliveries before dead-lettering: {deliveries:?}");
        assert_eq!(deliveries[0], (false, None));
        assert!(deliveries.len() >= 2, "{deliveries:?}");
        for (i, (redelivered, count)) in deliveries.iter().enumerate().skip(1) {
            assert!(*redelivered, "delivery {i} flagged redelivered");
            assert_eq!(*count, Some(i as i64), "x-delivery-count of delivery {i}");
        }
        assert_eq!(deliveries.len(), topo.delivery_limit as usize + 1);
        assert_eq!(dead_letter.data, job.body);
        assert_eq!(
            dead_letter.properties.message_id().as_ref().map(|s| s.as_str()),
            Some("poison-1")
        );
        let headers = dead_letter.properties.headers().clone().unwrap_or_default();
        assert!(headers.contains_key("x-death") || headers.contains_key("x-first-death-reason"), "{headers:?}");
        dead_letter
            .ack(BasicAckOptions::default())
            .await
            .expect("ack dead letter");
        conn.close(200, "OK".into()).await.expect("close raw");
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_dead_copies_with_reason_and_key() {
    with_namespace(|ns| async move {
        let topo = Topology::new(&ns);
        let broker = connect("dead-copy").await;
        broker.declare(&topo).await.expect("declare");
        let publisher = broker.publisher(&topo).await.expect("publisher");
        let long_reason = format!("bad params: {}", "é".repeat(1500));
        publisher
            .publish_dead(
                b"{not json",
                Some("mid-1"),
                Some("acme:2026-11"),
                &long_reason,
            )
            .await
            .expect("publish_dead");
        publisher
            .publish_dead(b"second", None, None, "unknown pipeline \"x\"")
            .await
            .expect("publish_dead without key");

        let conn = raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        let mut dead = ch
            .basic_consume(
                topo.dead_queue().into(),
                "dead-reader".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume dead");
        let first = timeout(WAIT, dead.next())
            .await
            .expect("timed out")
            .expect("ended")
            .expect("error");
        assert_eq!(first.data, b"{not json");
        assert_eq!(
            first.properties.message_id().as_ref().map(|s| s.as_str()),
            Some("mid-1")
        );
        assert_eq!(*first.properties.delivery_mode(), Some(2));
        let headers = first.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get("x-drover-reason") {
            Some(AMQPValue::LongString(s)) => {
                String::from_utf8(s.as_bytes().to_vec()).expect("utf8")
            }
            other => panic!("reason header: {other:?}"),
        };
        assert_eq!(reason.chars().count(), 1000);
        assert!(long_reason.starts_with(&reason));
        assert_eq!(
            headers.inner().get("x-drover-key"),
            Some(&AMQPValue::LongString(LongString::from("acme:2026-11")))
        );
        first.ack(BasicAckOptions::default()).await.expect("ack");

        let second = timeout(WAIT, dead.next())
            .await
            .expect("timed out")
            .expect("ended")
            .expect("error");
        assert_eq!(second.data, b"second");
        assert_eq!(*second.properties.message_id(), None);
        let headers = second.properties.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get("x-drover-reason"),
            Some(&AMQPValue::LongString(LongString::from(
                "unknown pipeline \"x\""
            )))
        );
        assert!(!headers.contains_key("x-drover-key"));
        second.ack(BasicAckOptions::default()).await.expect("ack");
        conn.close(200, "OK".into()).await.expect("close raw");
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keeps_received_deliveries_ackable_and_close_requeues() {
    with_namespace(|ns| async move {
        let topo = Topology::new(&ns);
        let broker = connect("cancel").await;
        broker.declare(&topo).await.expect("declare");
        let publisher = broker.publisher(&topo).await.expect("publisher");
        let jobs: Vec<OutgoingJob> = (0..3)
            .map(|i| OutgoingJob {
                message_id: format!("c-{i}"),
                body: vec![b'0' + i as u8],
                traceparent: None,
            })
            .collect();
        publisher.publish_jobs(&jobs).await.expect("publish");
        let mut consumer = broker
            .consume(&topo, 5, "cancel-worker")
            .await
            .expect("consume");
        let a = next_delivery(&mut consumer).await;
        let b = next_delivery(&mut consumer).await;
        let c = next_delivery(&mut consumer).await;
        consumer.cancel().await.expect("cancel");
        consumer.cancel().await.expect("cancel is idempotent");
        // The stream ends; deliveries received before the cancel are still ackable.
        let end = timeout(WAIT, consumer.next())
            .await
            .expect("no end in time");
        assert!(end.is_none(), "expected the end, got {end:?}");
        assert!(consumer.next().await.is_none());
        a.ack().await.expect("ack after cancel");
        b.nack_requeue().await.expect("nack after cancel");
        let err = a.ack().await.expect_err("double ack");
        assert!(err.to_string().contains("already"), "{err}");
        // `c` stays unacked: closing the connection must give it back to the queue.
        broker.close().await.expect("clean close");
        let err = c.ack().await.expect_err("ack on a closed channel");
        eprintln!("ack after close: {err}");
        assert!(matches!(err, BrokerError::Settle { .. }), "{err:?}");

        let broker = connect("cancel-2").await;
        let mut consumer = broker
            .consume(&topo, 5, "cancel-worker-2")
            .await
            .expect("consume");
        let mut again = Vec::new();
        for _ in 0..2 {
            let d = next_delivery(&mut consumer).await;
            assert!(d.redelivered);
            again.push(d.message_id.clone().expect("id"));
            d.ack().await.expect("ack");
        }
        again.sort();
        assert_eq!(again, vec!["c-1".to_string(), "c-2".to_string()]);
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_acks_cover_exactly_the_acked_deliveries() {
    // Acks leave as `basic.ack` with `multiple` over runs of consecutive delivery tags: a run
    // must never cover a delivery that was nacked or not settled at all. 200 deliveries: 3
    // nacked (requeued), 1 left unsettled, the rest acked concurrently; exactly those 4 come
    // back (the nacked ones possibly to the same consumer at once), nothing else.
    with_namespace(|ns| async move {
        let topo = Topology::new(&ns);
        let broker = connect("batched-acks").await;
        broker.declare(&topo).await.expect("declare");
        let publisher = broker.publisher(&topo).await.expect("publisher");
        let jobs: Vec<OutgoingJob> = (0..200)
            .map(|i| OutgoingJob {
                message_id: format!("m-{i:03}"),
                body: format!("{i}").into_bytes(),
                traceparent: None,
            })
            .collect();
        publisher.publish_jobs(&jobs).await.expect("publish");
        let mut consumer = broker
            .consume(&topo, 200, "batched-acks-worker")
            .await
            .expect("consume");
        let mut deliveries = Vec::new();
        for _ in 0..200 {
            deliveries.push(next_delivery(&mut consumer).await);
        }
        let nacked = ["m-050", "m-100", "m-150"];
        let held = "m-120";
        let (kept, settle): (Vec<Incoming>, Vec<Incoming>) = deliveries
            .into_iter()
            .partition(|d| d.message_id.as_deref() == Some(held));
        let settled = futures_util::future::join_all(settle.iter().map(|d| async move {
            if nacked.contains(&d.message_id.as_deref().unwrap_or("")) {
                d.nack_requeue().await
            } else {
                d.ack().await
            }
        }))
        .await;
        for r in settled {
            r.expect("settle");
        }
        assert_eq!(kept.len(), 1);
        // basic.cancel is answered after the channel handled the acks before it; the copies
        // of the nacked messages the broker redelivered meanwhile are acked as they come
        // (before the cancel), or left for the next consumer.
        consumer.cancel().await.expect("cancel");
        let mut redelivered_here = Vec::new();
        while let Some(d) = timeout(WAIT, consumer.next())
            .await
            .expect("no end in time")
        {
            let d = d.expect("delivery");
            redelivered_here.push(d.message_id.clone().expect("id"));
            d.ack().await.expect("ack");
        }
        broker.close().await.expect("clean close");

        let broker = connect("batched-acks-2").await;
        let mut consumer = broker
            .consume(&topo, 50, "batched-acks-worker-2")
            .await
            .expect("consume");
        // The held one, and the nacked ones not redelivered to the first consumer.
        let mut back = redelivered_here;
        while back.len() < 4 {
            let d = next_delivery(&mut consumer).await;
            back.push(d.message_id.clone().expect("id"));
            d.ack().await.expect("ack");
        }
        back.sort();
        assert_eq!(back, vec!["m-050", "m-100", "m-120", "m-150"]);
        // Nothing else comes back: everything else was acked.
        let more = timeout(Duration::from_millis(500), consumer.next()).await;
        assert!(more.is_err(), "unexpected extra delivery: {more:?}");
        let depth = broker.queue_depth(&topo.jobs_queue()).await.expect("depth");
        assert_eq!(depth.ready, 0);
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_ends_when_the_queue_is_deleted() {
    with_namespace(|ns| async move {
        let topo = Topology::new(&ns);
        let broker = connect("queue-deleted").await;
        broker.declare(&topo).await.expect("declare");
        let mut consumer = broker.consume(&topo, 2, "doomed").await.expect("consume");
        let conn = raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_delete(topo.jobs_queue().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        let end = timeout(WAIT, consumer.next())
            .await
            .expect("no end in time");
        assert!(end.is_none(), "{end:?}");
        conn.close(200, "OK".into()).await.expect("close raw");
        broker.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_is_reported() {
    // No declare: {ns}.jobs does not exist, so the mandatory publish comes back.
    let topo = Topology::new(&unique_ns());
    let broker = connect("unroutable").await;
    let publisher = broker.publisher(&topo).await.expect("publisher");
    let jobs: Vec<OutgoingJob> = (0..3)
        .map(|i| OutgoingJob {
            message_id: format!("u-{i}"),
            body: b"{}".to_vec(),
            traceparent: None,
        })
        .collect();
    let err = timeout(WAIT, publisher.publish_jobs(&jobs))
        .await
        .expect("timed out")
        .expect_err("unroutable");
    let text = err.to_string();
    eprintln!("unroutable: {text}");
    assert!(text.contains("did not confirm 3 of 3"), "{text}");
    assert!(text.contains("returned as unroutable"), "{text}");
    assert!(text.contains(&topo.jobs_queue()), "{text}");
    broker.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_refused_without_panicking() {
    let broker = connect("bad-args").await;
    let topo = Topology::new(&unique_ns());
    let err = broker.consume(&topo, 0, "x").await.expect_err("prefetch 0");
    assert!(err.to_string().contains("prefetch"), "{err}");
    let err = broker
        .consume(&topo, 1, &"t".repeat(300))
        .await
        .expect_err("long tag");
    assert!(err.to_string().contains("consumer tag"), "{err}");
    let err = broker
        .declare(&Topology::new(""))
        .await
        .expect_err("empty ns");
    assert!(err.to_string().contains("namespace"), "{err}");
    let publisher = broker.publisher(&topo).await.expect("publisher");
    let err = publisher
        .publish_jobs(&[OutgoingJob {
            message_id: "m".repeat(300),
            body: vec![],
            traceparent: None,
        }])
        .await
        .expect_err("long message id");
    assert!(err.to_string().contains("message_id"), "{err}");
    broker.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_closed_port_names_endpoint_not_password() {
    // A port nobody listens on: bind one, then free it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("amqp://guest:sup3r-s3cret@127.0.0.1:{port}/%2f");
    let err = timeout(WAIT, Broker::connect(&url, "closed-port"))
        .await
        .expect("connect must fail within its own timeout")
        .expect_err("nothing listens there");
    let text = err.to_string();
    eprintln!("closed port: {text}");
    assert!(
        text.starts_with(&format!(
            "cannot connect to RabbitMQ at 127.0.0.1:{port} (vhost /)"
        )),
        "{text}"
    );
    assert!(text.to_lowercase().contains("refused"), "{text}");
    assert!(!text.contains("sup3r-s3cret"), "{text}");
    assert!(!format!("{err:?}").contains("sup3r-s3cret"));
    assert_eq!(err.kind(), drover_core::ErrorKind::Transient);
    assert_eq!(redact_url(&url), format!("127.0.0.1:{port} (vhost /)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_bad_url_do_not_leak_it() {
    let base = amqp_url();
    let Some((_, host_part)) = base.rsplit_once('@') else {
        return;
    };
    let url = format!("amqp://guest:wr0ng-pw-xyz@{host_part}");
    let err = timeout(WAIT, Broker::connect(&url, "wrong-password"))
        .await
        .expect("timed out")
        .expect_err("must be refused");
    let text = err.to_string();
    eprintln!("wrong password: {text}");
    assert!(text.starts_with("cannot connect to RabbitMQ at"), "{text}");
    assert!(!text.contains("wr0ng-pw-xyz"), "{text}");

    let err = Broker::connect("http://guest:wr0ng-pw-xyz@host/", "bad-url")
        .await
        .expect_err("bad scheme");
    let text = err.to_string();
    eprintln!("bad url: {text}");
    assert!(matches!(err, BrokerError::InvalidUrl { .. }));
    assert!(!text.contains("wr0ng-pw-xyz"), "{text}");
}
