//! Correlation and causation ids flow from a request through every message it sets off.

use platform::conformance::{Ping, MIGRATIONS};
use platform::context::{self, CausalContext};
use platform::envelope::header;
use platform::{Bus, Database, Incoming, SqlLog, StoreError, Subscription, UnitOfWork};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

async fn headers_of(db: &Database, seq: u32) -> Option<(String, BTreeMap<String, String>)> {
    let rows: Vec<(String, Vec<u8>, String)> = db
        .read(|conn| {
            Ok::<_, StoreError>(conn.query_map(
                "SELECT message_id, payload, headers FROM conveyor_log ORDER BY position",
                (),
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )?)
        })
        .await
        .expect("log");
    rows.into_iter().find_map(|(id, payload, headers)| {
        let ping: Ping = serde_json::from_slice(&payload).ok()?;
        (ping.seq == seq).then(|| (id, serde_json::from_str(&headers).expect("headers")))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_emits_with_the_incoming_correlation_and_its_id_as_causation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Database::open(&dir.path().join("ctx.db"))
        .await
        .expect("open");
    db.migrate(MIGRATIONS).await.expect("migrate");
    // Every Ping with seq 0 causes a Ping with seq 1.
    let echo = Subscription::new("echo").on(|incoming: Incoming<Ping>, uow: &mut UnitOfWork| {
        if incoming.message.seq == 0 {
            uow.emit(&Ping {
                key: incoming.message.key,
                seq: 1,
            })?;
        }
        Ok(())
    });
    let _consumer = SqlLog::new(db.clone())
        .subscribe(echo)
        .await
        .expect("subscribe");

    let request = CausalContext {
        correlation_id: Some("request-42".into()),
        causation_id: Some("request-42".into()),
    };
    let publish = db.write(|uow| {
        uow.emit(&Ping {
            key: "k".into(),
            seq: 0,
        })
    });
    context::scope(request, publish)
        .await
        .map_err(|e: StoreError| e)
        .expect("publish");

    let deadline = Instant::now() + Duration::from_secs(10);
    let (_, effect) = loop {
        if let Some(found) = headers_of(&db, 1).await {
            break found;
        }
        assert!(Instant::now() < deadline, "the handler emitted nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (cause_id, cause) = headers_of(&db, 0).await.expect("the first message");
    assert_eq!(cause[header::CORRELATION_ID], "request-42");
    assert_eq!(effect[header::CORRELATION_ID], "request-42");
    assert_eq!(effect[header::CAUSATION_ID], cause_id);
    assert_eq!(effect[header::CONTENT_TYPE], "application/json");
}
