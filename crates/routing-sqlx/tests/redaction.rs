//! Redaction kept across the operability surface: a sentinel password in every connection
//! string form (`user:pass@`, `?password=`, key=value conninfo) and in a configuration file
//! appears in no Debug, Display, error, log line, metric label or status JSON, while a router
//! built from that file serves real reads and writes and meets real failures (a wrong
//! password, a refusing node, a conninfo the driver rejects).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use routing_sqlx::{Consistency, RequestContext, Router, RouterSettings, SqlxBackend, sqlx};
use routing_testkit::ClusterBuilder;

const SENTINEL: &str = "Zq9SentinelPw4711";

fn kit<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything shown to anyone, collected to be searched for the sentinel.
#[derive(Default)]
struct Shown(Vec<(String, String)>);

impl Shown {
    fn add(&mut self, what: &str, text: impl Into<String>) {
        self.0.push((what.to_string(), text.into()));
    }
    fn err(&mut self, what: &str, e: &dyn std::error::Error) {
        self.add(&format!("{what} (Display)"), e.to_string());
        self.add(&format!("{what} (Debug)"), format!("{e:?}"));
        let mut source = e.source();
        while let Some(s) = source {
            self.add(&format!("{what} (source)"), format!("{s} / {s:?}"));
            source = s.source();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_password_appears_nowhere() {
    let logs = Logs::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .init();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    let mut shown = Shown::default();

    let c = kit(|| ClusterBuilder::new().replicas(2).start()).expect("cluster");
    kit(|| {
        c.psql(
            0,
            &format!(
                "CREATE ROLE sentinel_user LOGIN PASSWORD '{SENTINEL}' \
                 IN ROLE pg_monitor, pg_read_all_data, pg_write_all_data; \
                 CREATE TABLE t (n int); GRANT ALL ON t TO sentinel_user"
            ),
        )
    })
    .expect("role");
    kit(|| c.wait_replicated(Duration::from_secs(10))).expect("replicated");
    let port = |i: usize| c.node(i).port();

    // The configuration file: the sentinel in the user:pass@ form, in ?password=, and (for the
    // monitor and a wrong-password reader) inside longer passwords.
    let toml = format!(
        r#"
probe_interval = "50ms"
probe_timeout = "2s"
write_deadline = "10s"
wait_budget = "200ms"

[lag_alert]
max_bytes = "1kB"
clear_ratio = 1.0

[[nodes]]
name = "pg0"
role = "writer"
url = "postgres://sentinel_user:{SENTINEL}@127.0.0.1:{p0}/postgres"
monitor_url = "postgres://sentinel_user@127.0.0.1:{p0}/postgres?password={SENTINEL}"

[[nodes]]
name = "pg1"
url = "postgres://sentinel_user@127.0.0.1:{p1}/postgres?sslmode=disable&password={SENTINEL}"

[[nodes]]
name = "pg2"
url = "postgres://sentinel_user:{SENTINEL}@127.0.0.1:{p2}/postgres"
reader_url = "postgres://sentinel_user:wrong{SENTINEL}x@127.0.0.1:{p2}/postgres"

[[nodes]]
name = "ghost"
url = "postgres://sentinel_user:{SENTINEL}@127.0.0.1:1/postgres"
"#,
        p0 = port(0),
        p1 = port(1),
        p2 = port(2),
    );
    let dir = std::env::temp_dir().join(format!("routing-redaction-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("routing.toml");
    std::fs::write(&path, &toml).unwrap();

    let settings = RouterSettings::from_toml_file(&path).expect("file");
    shown.add("settings Debug", format!("{settings:?}"));
    shown.add("settings JSON", serde_json::to_string(&settings).unwrap());
    let parts = settings.parts().expect("valid");
    // Positive control: the sentinel is really in what the driver gets, only masked in output.
    assert!(parts.nodes[0].url.expose().contains(SENTINEL));
    assert!(
        parts.nodes[1]
            .url
            .expose()
            .contains(&format!("password={SENTINEL}"))
    );
    shown.add("parts Debug", format!("{parts:?}"));
    for n in &parts.nodes {
        shown.add(
            "NodeConfig Display",
            format!(
                "{} {}",
                n.url,
                n.reader_url
                    .as_ref()
                    .map(|u| u.to_string())
                    .unwrap_or_default()
            ),
        );
    }
    let alerts = Arc::new(Mutex::new(Vec::new()));
    let seen = alerts.clone();
    let builder = settings
        .builder(SqlxBackend::new())
        .expect("builder")
        .on_lag_alert(move |a: &routing_sqlx::LagAlert| {
            seen.lock().unwrap().push(format!("{a:?}"))
        });
    shown.add("builder Debug", format!("{builder:?}"));
    let router: Router = builder.build().await.expect("router");
    shown.add("router Debug", format!("{router:?}"));
    // SCRAM logins are slow on a loaded machine: let the monitor find the writer first.
    for _ in 0..200 {
        if router.status().writer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Real work: writes, reads of every mode, and failures.
    let user = RequestContext::new().user("u");
    for n in 0..5 {
        let mut w = router.write_with(&user).await.expect("write");
        let done = sqlx::query("INSERT INTO t VALUES ($1)")
            .bind(n)
            .execute(&mut *w)
            .await;
        w.check(done).expect("insert");
        let receipt = w.finish().await.expect("finish");
        shown.add("receipt Debug", format!("{receipt:?}"));
        for mode in [
            Consistency::Eventual,
            Consistency::ReadYourWrites,
            Consistency::Primary,
        ] {
            match router.read_with(&user.clone().consistency(mode)).await {
                Ok(r) => shown.add("ReadConn Debug", format!("{r:?}")),
                Err(e) => shown.err("read error", &e),
            }
        }
    }
    // Replay paused on pg1 under writes: a lag alert (threshold 1 kB) with its event.
    kit(|| c.pause_replay(1)).expect("pause");
    for n in 0..20 {
        let mut w = router.write().await.expect("write");
        let done = sqlx::query("INSERT INTO t SELECT g FROM generate_series(1, 100) g")
            .execute(&mut *w)
            .await;
        w.check(done).expect("insert");
        drop(w.finish().await);
        let _ = n;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kit(|| c.resume_replay(1)).expect("resume");
    // A driver error from a read session: the wrong-password reader of pg2, asked directly.
    let mut reader = parts.nodes[2].clone();
    reader.url = reader.url_for(routing_sqlx::Access::ReadOnly).clone();
    let e = <SqlxBackend as routing_sqlx::Backend>::build_pool(
        &SqlxBackend::new(),
        routing_sqlx::PoolSpec {
            node: reader,
            access: routing_sqlx::Access::ReadOnly,
            settings: routing_sqlx::PoolSettings::default(),
            epoch: routing_sqlx::Epoch::default(),
        },
    )
    .expect("pool");
    match <SqlxBackend as routing_sqlx::Backend>::checkout(&e).await {
        Ok(_) => panic!("the wrong password logged in"),
        Err(err) => {
            assert_eq!(err.kind, routing_sqlx::ErrorKind::Auth, "{err}");
            shown.err("auth error", &err);
        }
    }
    // A key=value conninfo, which sqlx cannot parse: a typed configuration error.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=sentinel_user password={SENTINEL} dbname=postgres",
        port(0)
    );
    let err = Router::builder(SqlxBackend::new())
        .node(routing_sqlx::NodeConfig::writer("kv", conninfo.as_str()))
        .build()
        .await
        .expect_err("sqlx takes URLs only");
    shown.err("conninfo error", &err);
    shown.add(
        "conninfo Debug",
        format!("{:?}", routing_sqlx::ConnString::new(conninfo)),
    );
    // A configuration file that fails to parse on a URL line, and one that fails validation.
    let broken = toml.replace("role = \"writer\"", "role = \"primary\"");
    std::fs::write(&path, &broken).unwrap();
    shown.err(
        "invalid role",
        &RouterSettings::from_toml_file(&path)
            .unwrap()
            .parts()
            .unwrap_err(),
    );
    let broken = toml.replacen(&format!("{SENTINEL}@"), &format!("{SENTINEL}@\" oops"), 1);
    std::fs::write(&path, &broken).unwrap();
    shown.err(
        "TOML syntax error",
        &RouterSettings::from_toml_file(&path).unwrap_err(),
    );
    std::fs::remove_dir_all(&dir).ok();
    tokio::time::sleep(Duration::from_millis(600)).await;

    let status = router.status();
    assert!(
        status.node("ghost").unwrap().last_error.is_some(),
        "ghost refuses: {status:?}"
    );
    shown.add("status Debug", format!("{status:?}"));
    shown.add("status JSON", serde_json::to_string(&status).unwrap());
    shown.add("snapshot Debug", format!("{:?}", router.snapshot()));
    for a in alerts.lock().unwrap().iter() {
        shown.add("lag alert", a.clone());
    }
    assert!(
        !alerts.lock().unwrap().is_empty(),
        "the paused replica raised a lag alert"
    );
    let log = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("node banned from reads node=ghost"),
        "the ghost's failures are logged"
    );
    assert!(
        log.contains("password authentication failed"),
        "pg2's wrong reader password failed on the request path and was logged"
    );
    assert!(
        log.contains("replica lag above the alert threshold node=pg1"),
        "{log}"
    );
    shown.add("logs", log);
    shown.add("metrics", metrics.render());

    let mut leaks = Vec::new();
    for (what, text) in &shown.0 {
        assert!(
            !text.is_empty() || what.contains("Display"),
            "{what} is empty"
        );
        if let Some(at) = text.find(SENTINEL) {
            let from = text[..at]
                .char_indices()
                .rev()
                .nth(80)
                .map_or(0, |(i, _)| i);
            leaks.push(format!(
                "{what}: ...{}...",
                &text[from..(at + SENTINEL.len()).min(text.len())]
            ));
        }
    }
    assert!(
        leaks.is_empty(),
        "the sentinel leaked:\n{}",
        leaks.join("\n")
    );
    assert!(shown.0.len() > 30, "searched {} texts", shown.0.len());
    drop(router);
    kit(|| drop(c));
}
