//! A Rust producer: publishes a job, enqueues another inside its own transaction together
//! with a business row, and waits for both.
//!
//! ```sh
//! cargo run -p drover-client --example producer     # with a `drover worker` running
//! ```
//!
//! Uses the usual configuration variables (`DROVER_AMQP_URL`, `DATABASE_URL`,
//! `DROVER_NAMESPACE`) or the local defaults. The test suite runs [`produce`] against its
//! own database and namespace.

use drover_client::{Client, JobMessage, enqueue};
use drover_core::ExposeSecret;
use drover_core::config::{Connections, FileConfig};
use serde_json::json;
use std::time::Duration;

/// Publishes `{prefix}:report`, enqueues `{prefix}:invoice` with an order row in one
/// transaction, waits for both and returns their final states.
pub async fn produce(conns: &Connections, prefix: &str) -> anyhow::Result<Vec<String>> {
    let client = Client::connect(conns).await?;

    // 1. Publish: the ledger records the job, the broker confirms its message.
    let report = JobMessage::new(
        format!("{prefix}:report"),
        "noop",
        json!({ "batches": 2 })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        None,
        None,
    )?;
    client.publish(&report).await?;

    // 2. Enqueue in our own transaction: the job exists only if the order does.
    let pool = sqlx::PgPool::connect(conns.database_url.expose_secret()).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS example_orders (id text PRIMARY KEY)")
        .execute(&pool)
        .await?;
    let invoice = JobMessage::new(
        format!("{prefix}:invoice"),
        "noop",
        Default::default(),
        None,
        None,
    )?;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO example_orders (id) VALUES ($1)")
        .bind(prefix)
        .execute(&mut *tx)
        .await?;
    enqueue(&mut tx, &invoice).await?;
    tx.commit().await?;

    // 3. Wait for both (LISTEN/NOTIFY, with a polling fallback).
    let keys = [
        report.idempotency_key.clone(),
        invoice.idempotency_key.clone(),
    ];
    let done = client.wait(&keys, Duration::from_secs(60)).await?;
    client.close().await?;
    pool.close().await;
    Ok(done.into_iter().map(|p| p.state.to_string()).collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let conns = Connections::resolve(
        std::env::var("DROVER_AMQP_URL").ok(),
        std::env::var("DATABASE_URL").ok(),
        std::env::var("DROVER_NAMESPACE").ok(),
        &FileConfig::default(),
    )?;
    let states = produce(&conns, "example").await?;
    println!("example:report and example:invoice: {states:?}");
    Ok(())
}
