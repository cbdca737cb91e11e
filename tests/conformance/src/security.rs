//! The monitor's probes cannot be steered by functions an attacker plants in the search path.

use std::time::Duration;

use routing_core::{Backend, NodeConfig, NodeRole, Router};

use super::{Harness, kit, shared_cluster, test_config};

/// A login role (not a superuser) whose search path puts an attacker's schema before `pg_catalog`, with look-alike
/// functions there that claim every node is in recovery with no WAL. Unqualified, they win (the
/// control below shows it); the router's schema-qualified probes ignore them and still elect the
/// real primary and see the replicas.
pub async fn probes_ignore_functions_planted_in_the_search_path<H: Harness>() {
    let c = shared_cluster();
    let tag = format!("evil_{}", std::process::id());
    let password = "planted-secret";
    let setup = format!(
        "CREATE SCHEMA IF NOT EXISTS {tag};
         CREATE OR REPLACE FUNCTION {tag}.pg_is_in_recovery() RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE OR REPLACE FUNCTION {tag}.pg_current_wal_lsn() RETURNS pg_lsn LANGUAGE sql AS 'SELECT ''0/0''::pg_lsn';
         CREATE OR REPLACE FUNCTION {tag}.pg_last_wal_replay_lsn() RETURNS pg_lsn LANGUAGE sql AS 'SELECT ''0/0''::pg_lsn';
         CREATE OR REPLACE FUNCTION {tag}.concat_ws(text, VARIADIC text[]) RETURNS text LANGUAGE sql AS 'SELECT ''true - - - - -''';
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{tag}') THEN
             CREATE ROLE {tag} LOGIN PASSWORD '{password}';
           END IF;
         END $$;
         GRANT USAGE ON SCHEMA {tag} TO {tag};
         ALTER ROLE {tag} SET search_path = {tag}, pg_catalog;"
    );
    kit(|| c.psql(0, &setup)).expect("plant the look-alikes");
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    let url = |i: usize| {
        format!(
            "postgres://{tag}:{password}@127.0.0.1:{}/postgres",
            c.node(i).port()
        )
    };

    let nodes: Vec<NodeConfig> = (0..c.nodes().len())
        .map(|i| {
            let name = c.node(i).name().to_string();
            if i == 0 {
                NodeConfig::writer(name, url(i))
            } else {
                NodeConfig::replica(name, url(i))
            }
        })
        .collect();
    let r = Router::builder(H::backend())
        .nodes(nodes)
        .config(test_config())
        .build()
        .await
        .expect("router");

    // Control: an unqualified call as this role runs the planted function.
    let mut w = r.write().await.expect("the real primary is elected");
    let unqualified = H::B::query_text(w.pooled(), "SELECT pg_is_in_recovery()::text AS v")
        .await
        .expect("query");
    assert_eq!(
        unqualified.as_deref(),
        Some("true"),
        "the planted function shadows pg_catalog for this role"
    );
    drop(w);

    let snap = r.snapshot();
    assert_eq!(
        snap.writer,
        Some(0),
        "the probe still sees node 0 out of recovery"
    );
    assert!(
        snap.primary_lsn.is_some_and(|l| l.0 > 0),
        "the real WAL position, not the planted 0/0"
    );
    for i in 1..c.nodes().len() {
        assert_eq!(
            snap.nodes[i].role,
            NodeRole::Replica,
            "{}",
            snap.nodes[i].name
        );
    }
    let conn = r.read().await.expect("read");
    assert!(!conn.on_primary(), "replicas serve reads");
}
