//! `WriteConn::commit`: the LSN that read-your-writes waits for is the one *after* COMMIT.

use std::time::Duration;

use routing_core::{Backend, Consistency, Lsn, RequestContext, RouterConfig, sql};

use super::{Harness, PAIRS, count_id, insert, staleness_setup, test_config};

/// What a hand-rolled commit LSN looks like: the current position, read whenever.
const NAIVE_LSN: &str = "SELECT pg_catalog.pg_current_wal_lsn()::pg_catalog.text AS v";

/// An explicit transaction committed with `WriteConn::commit` (one round trip where the driver
/// allows it) yields a commit LSN that makes read-your-writes exact: with 300 ms apply delay and a
/// budget above it, every read waits on a replica and sees the row. The control reads an LSN
/// *inside* the transaction (before the commit record) and waits for a replica to pass it: that
/// replica has not applied the commit yet, so the row is missing — the trap this API avoids.
pub async fn explicit_commit_returns_the_lsn_after_commit<H: Harness>() {
    let config = RouterConfig {
        wait_budget: Duration::from_secs(2),
        ..test_config()
    };
    let (r, t) = staleness_setup::<H>("commit", config).await;
    let user = RequestContext::new().user("commit-user");
    let read = user.clone().consistency(Consistency::ReadYourWrites);
    let (mut stale, mut on_replica, mut control_stale) = (0, 0, 0);
    for id in 0..PAIRS {
        let mut w = r.write_with(&user).await.expect("write session");
        let began = H::B::execute(w.pooled(), "BEGIN").await;
        w.check_backend(began).expect("begin");
        insert(&mut w, &t, id).await.expect("insert");
        let receipt = w.commit().await.expect("commit");
        let mut conn = r.read_with(&read).await.expect("read");
        if count_id(&mut conn, &t, id).await == 0 {
            stale += 1;
        }
        if !conn.on_primary() {
            on_replica += 1;
        }
        drop(conn);
        assert!(receipt.lsn > Lsn::ZERO);

        // Control: the LSN read inside the transaction.
        let control_id = 1_000 + id;
        let mut w = r.write().await.expect("write session");
        let began = H::B::execute(w.pooled(), "BEGIN").await;
        w.check_backend(began).expect("begin");
        insert(&mut w, &t, control_id).await.expect("insert");
        let inside = H::B::query_text(w.pooled(), NAIVE_LSN)
            .await
            .expect("lsn")
            .expect("a value");
        let inside: Lsn = inside.parse().expect("lsn text");
        let committed = H::B::execute(w.pooled(), "COMMIT").await;
        w.check_backend(committed).expect("commit");
        drop(w);
        let mut conn = r
            .read_with(&RequestContext::new().consistency(Consistency::Eventual))
            .await
            .expect("read");
        loop {
            let replayed = H::B::query_text(conn.pooled(), sql::REPLAY_LSN)
                .await
                .expect("replay lsn");
            if replayed.and_then(|t| t.parse::<Lsn>().ok()) >= Some(inside) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if count_id(&mut conn, &t, control_id).await == 0 {
            control_stale += 1;
        }
    }
    eprintln!(
        "[conformance] commit(): {stale} stale of {PAIRS}, {on_replica} served by replicas; \
         control (LSN read inside the transaction): {control_stale} stale of {PAIRS}"
    );
    assert_eq!(stale, 0, "the commit LSN makes read-your-writes exact");
    assert!(on_replica > 0, "replicas serve after replaying the commit");
    assert!(
        control_stale > 0,
        "an LSN read inside the transaction gives a false 'caught up'"
    );
}
