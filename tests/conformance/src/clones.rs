//! Causal tokens and cloned clusters. Every kit cluster is a copy of one initdb template, so any
//! two share a PostgreSQL system identifier and a timeline: exactly a base backup restored as
//! staging, or a blue/green pair. Only the configured cluster name tells their tokens apart.

use std::time::Duration;

use routing_core::{
    CausalToken, Consistency, Error, Lsn, RequestContext, Router, RouterConfig, TokenCodec,
    TokenError,
};

use super::{
    Harness, codec, create_table, drop_cluster, insert, kit, own_cluster_with, router,
    shared_cluster, table, test_config, token_key, wait_until,
};

async fn signed_write<B: routing_core::Backend>(r: &Router<B>, t: &str, id: u64) -> String {
    let mut w = r.write().await.expect("write");
    insert(&mut w, t, id).await.expect("insert");
    let receipt = w.finish().await.expect("finish");
    receipt.token.expect("a signed token")
}

fn causal(token: CausalToken) -> RequestContext {
    RequestContext::new()
        .consistency(Consistency::Causal)
        .token(token)
}

/// Two clones (an own cluster A, the shared cluster B), routers with the same token key.
/// - With different cluster names, A's token fails B's `verify_token` with `ForeignCluster`
///   (so a web layer reads on the primary), though B would otherwise take it.
/// - With the same name (a misconfiguration, or anyone holding the key) the name cannot help:
///   a token forged as if from A with an LSN far ahead of B's primary is refused by B's read as
///   `FromTheFuture` (that request fails; other reads still go to replicas), and tokens with no
///   system identifier or another one read on the primary, counted as untrusted.
/// - The control, the hole the name closes: with no name on either side, B accepts A's token
///   and, once its replicas have passed A's LSN, serves it from a replica on the strength of a
///   position in another cluster's history.
pub async fn tokens_from_a_cloned_cluster_are_not_trusted<H: Harness>() {
    let config = RouterConfig {
        wait_budget: Duration::from_secs(2),
        ..test_config()
    };
    let a = own_cluster_with(1);
    let b = shared_cluster();
    let codec_a = TokenCodec::new(token_key()).cluster("conformance-clone-a");
    let build = |c: &routing_testkit::Cluster, codec: TokenCodec| {
        Router::builder(H::backend())
            .nodes(c.node_configs())
            .config(config.clone())
            .tokens(codec)
            .build()
    };
    let ra = build(&a, codec_a.clone()).await.expect("router on A");
    let rb = router::<H>(b, config.clone()).await; // named "conformance", same key
    let (sa, sb) = (ra.snapshot(), rb.snapshot());
    assert!(sa.system_id.is_some(), "A's system identifier is known");
    assert_eq!(
        sa.system_id, sb.system_id,
        "kit clusters are clones: one system identifier"
    );
    assert_eq!(sa.timeline, sb.timeline, "and one timeline");

    // Different names: A's token is foreign to B, and only to B.
    let ta = table("clone_a");
    create_table(&ra, &ta).await;
    let text = signed_write(&ra, &ta, 1).await;
    let from_a = ra.verify_token(&text).expect("A trusts its own token");
    match rb.verify_token(&text) {
        Err(Error::Token(TokenError::ForeignCluster)) => {}
        other => panic!("B verified A's token: expected ForeignCluster, got {other:?}"),
    }

    // The same name on both: a token forged as if from A, far ahead of B's primary.
    let b_primary = sb.primary_lsn.expect("B's primary position");
    let forged = CausalToken {
        lsn: Lsn(b_primary.0 + (1 << 30)),
        ..from_a
    };
    match rb.verify_token(&codec_a.sign(&forged)) {
        Err(Error::Token(TokenError::ForeignCluster)) => {}
        other => panic!("signed for A's name: expected ForeignCluster, got {other:?}"),
    }
    let same_name = rb
        .verify_token(&codec().sign(&forged))
        .expect("signed for B's name with B's key: verifies");
    match rb.read_with(&causal(same_name)).await {
        Err(Error::Token(TokenError::FromTheFuture { lsn, .. })) => assert_eq!(lsn, forged.lsn),
        Err(e) => panic!("a far-future LSN: expected FromTheFuture, got {e}"),
        Ok(conn) => panic!(
            "a far-future LSN was served by {} (on primary: {})",
            conn.node_name(),
            conn.on_primary()
        ),
    }
    let conn = rb
        .read_with(&RequestContext::new().consistency(Consistency::Eventual))
        .await
        .expect("read");
    assert!(
        !conn.on_primary(),
        "a forged token does not send other reads to the primary"
    );
    drop(conn);
    let system_id = from_a.system_id;
    for (what, system_id) in [("no system id", 0), ("another system id", system_id ^ 1)] {
        let token = CausalToken {
            system_id,
            lsn: b_primary,
            ..from_a
        };
        let untrusted = rb.stats().tokens_untrusted;
        let token = rb.verify_token(&codec().sign(&token)).expect("verifies");
        let conn = rb.read_with(&causal(token)).await.expect("read");
        assert!(conn.on_primary(), "{what}: read on the primary");
        assert_eq!(
            rb.stats().tokens_untrusted,
            untrusted + 1,
            "{what}: counted as untrusted"
        );
    }
    ra.shutdown();
    rb.shutdown();
    drop((ra, rb));

    // Control: no cluster name on either side (the old behaviour).
    let ra0 = build(&a, TokenCodec::new(token_key()))
        .await
        .expect("router on A");
    let rb0 = build(b, TokenCodec::new(token_key()))
        .await
        .expect("router on B");
    let text = signed_write(&ra0, &ta, 2).await;
    let token = rb0
        .verify_token(&text)
        .expect("without a name B cannot tell A's token from its own");
    // Let B's history pass A's LSN (usually it already has), and its replicas replay it.
    let pad = table("clone_pad");
    kit(|| -> Result<(), routing_testkit::KitError> {
        b.psql(b.primary(), &format!("CREATE TABLE {pad} (x text)"))?;
        while b
            .psql(b.primary(), "SELECT pg_current_wal_lsn()")?
            .parse::<Lsn>()
            .expect("an LSN")
            < token.lsn
        {
            b.psql(
                b.primary(),
                &format!(
                    "INSERT INTO {pad} SELECT repeat('x', 1000) FROM generate_series(1, 1000)"
                ),
            )?;
        }
        b.wait_replicated(Duration::from_secs(10))
    })
    .expect("B past A's LSN");
    wait_until(
        "B's snapshot to show a replica past A's LSN",
        Duration::from_secs(5),
        || {
            let snap = rb0.snapshot();
            snap.nodes
                .iter()
                .enumerate()
                .any(|(i, n)| Some(i) != snap.writer && n.lsn >= Some(token.lsn))
        },
    )
    .await;
    let untrusted = rb0.stats().tokens_untrusted;
    let conn = rb0.read_with(&causal(token)).await.expect("read");
    assert!(
        !conn.on_primary(),
        "the hole: B serves A's token from a replica, trusting A's LSN"
    );
    assert_eq!(rb0.stats().tokens_untrusted, untrusted, "and trusts it");
    drop(conn);
    ra0.shutdown();
    rb0.shutdown();
    drop((ra0, rb0));
    drop_cluster(a);
}
