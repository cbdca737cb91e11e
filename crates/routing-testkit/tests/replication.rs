//! Non-destructive checks against the shared cluster: replication, roles, auth and settings.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use routing_testkit::{APP_PASSWORD, MONITOR_ROLE, READER_ROLE, WRITER_ROLE, shared};

#[test]
fn write_on_primary_appears_on_each_replica() {
    let c = shared();
    assert_eq!(c.nodes().len(), 3);
    let t = table("repl");
    c.psql(
        0,
        &format!("CREATE TABLE {t} (v text); INSERT INTO {t} VALUES ('hello')"),
    )
    .unwrap();
    for i in 1..c.nodes().len() {
        let took = wait_for(
            c,
            i,
            &format!("SELECT coalesce(max(v), '') FROM {t}"),
            "hello",
            Duration::from_secs(10),
        );
        eprintln!("row visible on {} after {took:?}", c.node(i).name());
        assert_eq!(c.psql(i, "SELECT pg_is_in_recovery()").unwrap(), "t");
    }
    c.wait_replicated(Duration::from_secs(10)).unwrap();
}

#[test]
fn replicas_report_under_their_node_names() {
    let c = shared();
    let names = c
        .psql(0, "SELECT string_agg(application_name || ':' || state, ',' ORDER BY application_name) FROM pg_stat_replication")
        .unwrap();
    assert_eq!(names, "pg1:streaming,pg2:streaming");
    for (i, n) in c.nodes().iter().enumerate() {
        assert_eq!(n.name(), format!("pg{i}"));
        assert!(n.data_dir().starts_with(c.dir()));
        assert_eq!(
            c.url(i),
            format!("postgres://postgres@127.0.0.1:{}/postgres", n.port())
        );
        assert!(c.is_running(i));
    }
    assert_eq!(c.psql(1, "SHOW hot_standby_feedback").unwrap(), "on");
    assert_eq!(
        c.psql(1, "SHOW wal_receiver_status_interval").unwrap(),
        "1s"
    );
    assert_eq!(c.psql(0, "SHOW listen_addresses").unwrap(), "127.0.0.1");
    assert_eq!(c.psql(0, "SHOW synchronous_standby_names").unwrap(), "");
}

#[test]
fn app_role_needs_its_password() {
    let c = shared();
    assert_eq!(
        c.psql(0, "SELECT rolsuper, rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app'").unwrap(),
        "t|t|t"
    );
    assert_eq!(
        c.app_url(1, APP_PASSWORD),
        format!(
            "postgres://app:app-secret@127.0.0.1:{}/postgres",
            c.node(1).port()
        )
    );
    // On the wire: `app` is asked for SASL (type 10), `postgres` is let in at once (type 0).
    for (user, want) in [("app", 10u32), ("postgres", 0)] {
        let mut s = TcpStream::connect(addr(c.node(0).port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&startup(user)).unwrap();
        let (t, body) = read_msg(&mut s).unwrap();
        assert_eq!(t, b'R', "user {user}");
        assert_eq!(
            u32::from_be_bytes(body[..4].try_into().unwrap()),
            want,
            "user {user}"
        );
    }
}

/// The roles `node_configs` hands a router are least-privileged, and each has what it needs: the
/// writer may create tables in `public`, the monitor sees a replica's timeline and the system
/// identifier, the application's roles do not see the timeline (why probes need the monitor).
#[test]
fn node_configs_use_least_privilege_roles() {
    let c = shared();
    let roles = c
        .psql(
            0,
            "SELECT string_agg(rolname || ':' || rolsuper || ':' || rolcanlogin || ':' || \
             coalesce((SELECT string_agg(g.rolname, '+' ORDER BY g.rolname) FROM pg_auth_members m \
               JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid), ''), ',' ORDER BY rolname) \
             FROM pg_roles r WHERE rolname IN ('routing_app', 'routing_monitor', 'routing_reader')",
        )
        .unwrap();
    assert_eq!(
        roles,
        "routing_app:false:true:,routing_monitor:false:true:pg_monitor,\
         routing_reader:false:true:pg_read_all_data"
    );
    assert_eq!(
        c.psql(
            0,
            &format!("SELECT has_schema_privilege('{WRITER_ROLE}', 'public', 'CREATE')")
        )
        .unwrap(),
        "t"
    );
    // Tables the superuser creates (as a migration would) are the writer's to use, not the
    // monitor's to read.
    let t = table("grants");
    c.psql(0, &format!("CREATE TABLE {t} (x int)")).unwrap();
    assert_eq!(
        c.psql(
            0,
            &format!(
                "SELECT has_table_privilege('{WRITER_ROLE}', '{t}', 'INSERT, UPDATE, DELETE') \
                 || ' ' || has_table_privilege('{MONITOR_ROLE}', '{t}', 'SELECT')"
            )
        )
        .unwrap(),
        "true false"
    );
    let sysid = c
        .psql(0, "SELECT system_identifier FROM pg_control_system()")
        .unwrap();
    let tli = c
        .psql(1, "SELECT received_tli FROM pg_stat_wal_receiver")
        .unwrap();
    assert_eq!(tli, "1");
    let probe = "SELECT coalesce(w.received_tli::text, '-') || ' ' || s.system_identifier \
                 FROM pg_stat_wal_receiver w, pg_control_system() s";
    for (role, want_tli) in [(MONITOR_ROLE, "1"), (WRITER_ROLE, "-"), (READER_ROLE, "-")] {
        assert_eq!(
            c.psql(1, &format!("SET ROLE {role}; {probe}")).unwrap(),
            format!("{want_tli} {sysid}"),
            "{role}"
        );
    }
    for (i, n) in c.node_configs().iter().enumerate() {
        let port = c.node(i).port();
        for (url, role) in [
            (Some(&n.url), WRITER_ROLE),
            (n.reader_url.as_ref(), READER_ROLE),
            (n.monitor_url.as_ref(), MONITOR_ROLE),
        ] {
            let url = url.unwrap().expose();
            assert!(
                url.starts_with(&format!("postgres://{role}:"))
                    && url.contains(&format!(":{port}/")),
                "{}: {}",
                n.name,
                n.url
            );
        }
    }
}

#[test]
fn psql_reports_sql_errors_and_bad_nodes() {
    let c = shared();
    let e = c.psql(0, "SELECT * FROM no_such_table").unwrap_err();
    assert!(e.to_string().contains("no_such_table"), "{e}");
    assert!(matches!(
        c.psql(7, "SELECT 1"),
        Err(routing_testkit::KitError::NoSuchNode { index: 7, count: 3 })
    ));
    assert_eq!(c.psql(0, "SELECT 1, 'a'").unwrap(), "1|a");
}

#[test]
fn shared_redis_answers() {
    let c = shared();
    let url = c.redis_url().unwrap();
    let port: u16 = url
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    assert_eq!(redis_cmd(port, "PING").unwrap(), "+PONG");
}
