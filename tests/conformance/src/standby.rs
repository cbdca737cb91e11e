//! The standby writer session: while no writer is elected, each replica's writer pool holds one
//! connected session, never handed out; the elected node's is pooled after the writer check, so
//! the first write after a promotion needs no connection setup, and the others are closed.

use std::time::Duration;

use routing_core::{Access, Backend, NodeConfig, PoolState};
use routing_testkit::Cluster;

use super::{
    Harness, create_table, drop_cluster, insert, kit, own_cluster_with, router, shared_cluster,
    spec, table, test_config, wait_until, whoami,
};

/// Node `i`'s writer URL with an `application_name` that finds its sessions in
/// `pg_stat_activity`.
fn tagged_url(c: &Cluster, i: usize, app: &str) -> String {
    format!("{}?application_name={app}", c.writer_url(i))
}

/// Backend pids of node `i`'s sessions named `app`.
fn pids(c: &Cluster, i: usize, app: &str) -> Vec<String> {
    let sql = format!(
        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE application_name = '{app}' ORDER BY pid"
    );
    kit(|| c.psql(i, &sql))
        .expect("list sessions")
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

fn state<B: Backend>(pool: &B::Pool) -> PoolState {
    B::pool_state(pool).expect("the adapter reports its pool state")
}

/// A writer pool for node `i` of the shared cluster, holding a standby session (waited for).
async fn holding<H: Harness>(c: &Cluster, i: usize, app: &str) -> <H::B as Backend>::Pool {
    let node = NodeConfig::writer(c.node(i).name(), tagged_url(c, i, app));
    let pool = H::backend()
        .build_pool(spec(node, Access::ReadWrite))
        .expect("pool");
    H::B::hold_standby(&pool);
    H::B::hold_standby(&pool);
    wait_until(
        "the standby session to be held",
        Duration::from_secs(5),
        || state::<H::B>(&pool).standby,
    )
    .await;
    assert_eq!(
        pids(c, i, app).len(),
        1,
        "one standby session, however often asked"
    );
    assert_eq!(
        state::<H::B>(&pool).connections,
        0,
        "a standby is not one of the pool's sessions"
    );
    pool
}

/// A standby session is pooled only once it passed the writer check on its own connection: one
/// on a replica, or whose server session died, is closed instead; one on the primary is the
/// very session the next checkout gets. Readers never hold one, and a released one is closed
/// at the server.
pub async fn a_standby_writer_session_is_pooled_only_after_the_writer_check<H: Harness>() {
    let c = shared_cluster();
    let tag = table("standby");

    let reader = H::backend()
        .build_pool(spec(
            NodeConfig::writer(c.node(0).name(), tagged_url(c, 0, &tag)),
            Access::ReadOnly,
        ))
        .expect("pool");
    H::B::hold_standby(&reader);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !state::<H::B>(&reader).standby,
        "a reader pool holds no standby"
    );
    assert!(pids(c, 0, &tag).is_empty(), "nor connects one");
    assert!(!H::B::admit_standby(&reader).await);

    // On a replica: refused by the check (in recovery), never pooled.
    let app = format!("{tag}_replica");
    let pool = holding::<H>(c, 1, &app).await;
    assert!(
        !H::B::admit_standby(&pool).await,
        "a standby on a node in recovery was pooled"
    );
    let s = state::<H::B>(&pool);
    assert_eq!((s.connections, s.standby), (0, false), "{s:?}");
    wait_until(
        "the refused standby to be closed",
        Duration::from_secs(5),
        || pids(c, 1, &app).is_empty(),
    )
    .await;

    // On the primary, but its server session died while held: not pooled.
    let app = format!("{tag}_dead");
    let pool = holding::<H>(c, 0, &app).await;
    let sql = format!(
        "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity \
         WHERE application_name = '{app}'"
    );
    assert_eq!(kit(|| c.psql(0, &sql)).expect("terminate"), "1");
    wait_until("the session to end", Duration::from_secs(5), || {
        pids(c, 0, &app).is_empty()
    })
    .await;
    assert!(
        !H::B::admit_standby(&pool).await,
        "a dead standby session was pooled"
    );
    assert_eq!(state::<H::B>(&pool).connections, 0);
    let mut s = H::B::checkout(&pool).await.expect("a new session instead");
    whoami::<H::B>(&mut s).await.expect("the new session works");
    drop(s);

    // On the primary: pooled, and it is what the next checkout gets.
    let app = format!("{tag}_ok");
    let pool = holding::<H>(c, 0, &app).await;
    let held = pids(c, 0, &app);
    assert!(
        H::B::admit_standby(&pool).await,
        "the standby was not pooled"
    );
    let s = state::<H::B>(&pool);
    assert_eq!((s.connections, s.idle, s.standby), (1, 1, false), "{s:?}");
    let mut s = H::B::checkout(&pool).await.expect("checkout");
    let me = whoami::<H::B>(&mut s).await.expect("whoami");
    assert_eq!(
        vec![me.pid.to_string()],
        held,
        "the checkout got the standby session"
    );
    assert!(
        !H::B::admit_standby(&pool).await,
        "admitted once: nothing left to admit"
    );
    drop(s);

    // Released: closed at the server.
    let app = format!("{tag}_released");
    let pool = holding::<H>(c, 0, &app).await;
    H::B::release_standby(&pool);
    assert!(!state::<H::B>(&pool).standby);
    wait_until(
        "the released standby to be closed",
        Duration::from_secs(5),
        || pids(c, 0, &app).is_empty(),
    )
    .await;
    assert!(!H::B::admit_standby(&pool).await);
}

/// The primary dies; while no writer is elected both replicas' writer pools hold a standby
/// session (one replica is down at first: it gets one once it is back).
/// The promoted replica's serves the first write (made before the promotion, so no connection
/// setup after it), and the other replica's is closed.
pub async fn the_first_write_after_a_promotion_uses_the_standby_session<H: Harness>() {
    let c = own_cluster_with(2);
    let r = router::<H>(&c, test_config()).await;
    let t = table("standby_failover");
    create_table(&r, &t).await;
    let mut w = r.write().await.expect("write");
    insert(&mut w, &t, 1).await.expect("insert");
    drop(w);

    kit(|| c.kill(0)).expect("kill the primary");
    kit(|| c.kill(1)).expect("kill a replica");
    let standby = |i: usize| {
        r.status().nodes[i]
            .pool
            .writer
            .is_some_and(|p: PoolState| p.standby)
    };
    wait_until(
        "the live replica to hold a standby writer session",
        Duration::from_secs(10),
        || r.snapshot().writer.is_none() && standby(2),
    )
    .await;
    assert!(
        !standby(0) && !standby(1),
        "a standby on a node that is down"
    );
    kit(|| c.restart(1)).expect("restart the replica");
    let held = wait_until(
        "both replicas to hold a standby writer session",
        Duration::from_secs(10),
        || r.snapshot().writer.is_none() && standby(1) && standby(2),
    )
    .await;
    eprintln!("[conformance] standby session held {held:?} after the replica came back");

    let before = kit(|| c.psql(1, "SELECT pg_catalog.clock_timestamp()")).expect("server time");
    kit(|| c.promote(1)).expect("promote");
    let promoted = std::time::Instant::now();
    let mut w = r
        .write()
        .await
        .expect("the first write after the promotion");
    let waited = promoted.elapsed();
    assert_eq!(
        whoami::<H::B>(w.pooled()).await.expect("whoami").port,
        c.node(1).port()
    );
    let sql = format!(
        "SELECT (backend_start < '{before}'::timestamptz)::text AS v \
         FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid()"
    );
    let made_before = H::B::query_text(w.pooled(), &sql)
        .await
        .expect("backend_start");
    assert_eq!(
        made_before.as_deref(),
        Some("true"),
        "the first write after the promotion ran on a session made after it"
    );
    insert(&mut w, &t, 2)
        .await
        .expect("insert on the new primary");
    drop(w);
    eprintln!("[conformance] first write {waited:?} after the promotion, on the standby session");

    wait_until(
        "the other replica's standby to be closed",
        Duration::from_secs(10),
        || !standby(2),
    )
    .await;
    drop(r);
    drop_cluster(c);
}
