//! Least privilege: a router whose every session logs in as a role that is not a superuser
//! (the kit's `node_configs`: writes as the application's writer role, reads as a read-only role,
//! probes as a `pg_monitor` role) still knows every replica's timeline and the cluster's system
//! identifier, and still routes guarded reads to replicas.

use std::time::Duration;

use routing_core::{Backend, Consistency, NodeRole, RequestContext, Router};
use routing_testkit::{MONITOR_ROLE, READER_ROLE, WRITER_ROLE};

use super::{
    Harness, codec, count_id, create_table, insert, kit, shared_cluster, table, test_config,
    wait_until,
};

const CURRENT_USER: &str = "SELECT current_user::pg_catalog.text AS v";

/// With the monitoring role (`IN ROLE pg_monitor`, nothing else) the snapshot shows each
/// replica's timeline and the system identifier, as the superuser sees them; tokens are bound to
/// that system identifier, and Causal and ReadYourWrites reads go to replicas, through sessions
/// of the least-privilege roles. The control: the same nodes probed as the application's writer
/// role see no replica's timeline (what `monitor_url` is for).
pub async fn least_privilege_monitor_sees_timelines_and_system_id<H: Harness>() {
    let c = shared_cluster();
    let replicas: Vec<usize> = (0..c.nodes().len()).filter(|&i| i != c.primary()).collect();
    // What the superuser sees.
    let system_id: u64 = kit(|| c.psql(0, "SELECT system_identifier FROM pg_control_system()"))
        .expect("psql")
        .parse()
        .expect("a system identifier");
    let timelines: Vec<u32> = replicas
        .iter()
        .map(|&i| {
            kit(|| c.psql(i, "SELECT received_tli FROM pg_stat_wal_receiver"))
                .expect("psql")
                .parse()
                .expect("a streaming replica's timeline")
        })
        .collect();
    // No role a router session uses is a superuser.
    let supers = kit(|| {
        c.psql(
            0,
            &format!(
                "SELECT string_agg(rolname || '=' || rolsuper, ',' ORDER BY rolname) FROM pg_roles \
                 WHERE rolname IN ('{WRITER_ROLE}', '{READER_ROLE}', '{MONITOR_ROLE}')"
            ),
        )
    })
    .expect("psql");
    assert_eq!(
        supers,
        format!("{WRITER_ROLE}=false,{MONITOR_ROLE}=false,{READER_ROLE}=false")
    );

    let nodes = c.node_configs();
    for n in &nodes {
        let monitor = n
            .monitor_url
            .as_ref()
            .expect("node_configs sets monitor_url");
        assert!(
            monitor
                .expose()
                .starts_with(&format!("postgres://{MONITOR_ROLE}:")),
            "{}: probes log in as {MONITOR_ROLE}",
            n.name
        );
    }
    let r = Router::builder(H::backend())
        .nodes(nodes.clone())
        .config(test_config())
        .tokens(codec())
        .build()
        .await
        .expect("router");
    wait_until("a probe of every node", Duration::from_secs(5), || {
        r.snapshot().nodes.iter().all(|n| n.last_probe.is_some())
    })
    .await;
    let snap = r.snapshot();
    assert_eq!(snap.writer, Some(c.primary()), "{snap:?}");
    assert_eq!(
        snap.system_id,
        Some(system_id),
        "the cluster's system identifier"
    );
    for (&i, &tli) in replicas.iter().zip(&timelines) {
        let n = &snap.nodes[i];
        assert_eq!(n.role, NodeRole::Replica, "{}", n.name);
        assert_eq!(
            n.timeline,
            Some(tli),
            "{}: the replica's timeline, as the superuser sees it",
            n.name
        );
        assert_eq!(
            n.timeline, snap.timeline,
            "{}: the writer's timeline",
            n.name
        );
        assert_eq!(n.system_id, Some(system_id), "{}", n.name);
    }

    // Guarded reads still go to replicas, through the least-privilege roles' sessions.
    let t = table("least_privilege");
    create_table(&r, &t).await;
    let user = RequestContext::new().user("least-privilege-user");
    let mut w = r.write_with(&user).await.expect("write");
    let login = H::B::query_text(w.pooled(), CURRENT_USER)
        .await
        .expect("current_user");
    assert_eq!(login.as_deref(), Some(WRITER_ROLE), "writes log in as");
    insert(&mut w, &t, 1)
        .await
        .expect("insert as the writer role");
    let receipt = w.finish().await.expect("finish");
    let token = r
        .verify_token(receipt.token.as_deref().expect("a token"))
        .expect("own token verifies");
    assert_eq!(
        token.system_id, system_id,
        "tokens are bound to the system identifier the monitor reads"
    );
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    wait_until(
        "the snapshot to show a replica past the write",
        Duration::from_secs(5),
        || {
            let snap = r.snapshot();
            replicas
                .iter()
                .any(|&i| snap.nodes[i].lsn >= Some(receipt.lsn))
        },
    )
    .await;
    let before = r.stats();
    for ctx in [
        RequestContext::new()
            .consistency(Consistency::Causal)
            .token(token),
        user.clone().consistency(Consistency::ReadYourWrites),
    ] {
        let mut conn = r.read_with(&ctx).await.expect("read");
        assert!(
            !conn.on_primary(),
            "{:?}: a caught-up replica serves, not the primary",
            ctx.consistency
        );
        let login = H::B::query_text(conn.pooled(), CURRENT_USER)
            .await
            .expect("current_user");
        assert_eq!(login.as_deref(), Some(READER_ROLE), "reads log in as");
        assert_eq!(
            count_id(&mut conn, &t, 1).await,
            1,
            "{:?}: sees the write",
            ctx.consistency
        );
    }
    assert_eq!(
        r.stats().tokens_untrusted,
        before.tokens_untrusted,
        "the token was trusted"
    );
    r.shutdown();

    // Control: probes as the application's writer role (no monitor URL) see no replica's
    // timeline: `pg_stat_wal_receiver` hides it from roles without `pg_read_all_stats`.
    let unmonitored = nodes.into_iter().map(|mut n| {
        n.monitor_url = None;
        n
    });
    let control = Router::builder(H::backend())
        .nodes(unmonitored)
        .config(test_config())
        .build()
        .await
        .expect("router");
    wait_until("a probe of every node", Duration::from_secs(5), || {
        control
            .snapshot()
            .nodes
            .iter()
            .all(|n| n.last_probe.is_some())
    })
    .await;
    let snap = control.snapshot();
    for &i in &replicas {
        assert_eq!(
            snap.nodes[i].timeline, None,
            "{}: without the monitoring role the timeline reads as unknown",
            snap.nodes[i].name
        );
    }
    control.shutdown();
}
