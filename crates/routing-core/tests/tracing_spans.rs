//! Every routed request runs in a debug span that says where it went and why; topology
//! changes are events at info/warn, and a healthy request logs nothing at info.

mod fake;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake::{FakeBackend, World};
use routing_core::{Consistency, RequestContext, Router, RouterConfig};
use tracing_subscriber::fmt::format::FmtSpan;

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

impl Logs {
    fn since(&self, from: usize) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()[from..]).into_owned()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

#[tokio::test]
async fn spans_name_mode_node_and_reason_and_events_mark_topology_changes() {
    let logs = Logs::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(FmtSpan::CLOSE)
        .init();
    let world = World::new(2);
    let r = Router::builder(FakeBackend(world.clone()))
        .nodes(world.node_configs())
        .config(RouterConfig {
            probe_interval: Duration::from_millis(20),
            probe_timeout: Duration::from_millis(200),
            write_deadline: Duration::from_millis(800),
            ..RouterConfig::default()
        })
        .build()
        .await
        .expect("router");
    let startup = logs.since(0);
    assert!(
        startup.contains("INFO") && startup.contains("writer elected node=n0"),
        "{startup}"
    );

    let from = logs.len();
    drop(
        r.read_with(&RequestContext::new().consistency(Consistency::Eventual))
            .await
            .unwrap(),
    );
    drop(
        r.read_with(&RequestContext::new().consistency(Consistency::Primary))
            .await
            .unwrap(),
    );
    drop(r.write().await.unwrap());
    // A user who just wrote, in a region: the span says the mark guarded the read and where
    // the request came from.
    let user = RequestContext::new()
        .user("span-user")
        .consistency(Consistency::ReadYourWrites)
        .region("eu");
    let w = r.write_with(&user).await.unwrap();
    w.finish().await.unwrap();
    drop(r.read_with(&user).await.unwrap());
    let requests = logs.since(from);
    let lines: Vec<&str> = requests.lines().collect();
    let read_spans: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("routing.read{"))
        .collect();
    assert_eq!(read_spans.len(), 3, "{requests}");
    assert!(
        read_spans[2].contains("guard=\"mark\"") && read_spans[2].contains("region=\"eu\""),
        "{requests}"
    );
    assert!(
        read_spans[0].contains("mode=Eventual") && read_spans[0].contains("reason=\"eventual\""),
        "{requests}"
    );
    assert!(
        read_spans[0].contains("node=\"n1\"") || read_spans[0].contains("node=\"n2\""),
        "{requests}"
    );
    assert!(
        read_spans[1].contains("mode=Primary node=\"n0\" reason=\"mode\""),
        "{requests}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("routing.write{node=\"n0\"}")),
        "{requests}"
    );
    assert!(
        lines.iter().all(|l| l.contains("DEBUG")),
        "requests log only at debug: {requests}"
    );

    // A replica goes down: banned (warn); back up: re-admitted (info).
    let from = logs.len();
    world.set(2, |n| n.up = false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    world.set(2, |n| n.up = true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = logs.since(from);
    assert_eq!(
        events
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("node banned from reads node=n2"))
            .count(),
        1,
        "one ban event, however many failed probes: {events}"
    );
    assert_eq!(
        events
            .lines()
            .filter(|l| l.contains("INFO") && l.contains("node re-admitted after a ban node=n2"))
            .count(),
        1,
        "{events}"
    );

    // A failover: the writer is replaced (warn), the generation moves (info).
    let from = logs.len();
    world.set(0, |n| n.up = false);
    world.set(1, |n| {
        n.in_recovery = false;
        n.timeline = 2;
    });
    assert!(r.topology_changed(Duration::from_secs(2)).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let events = logs.since(from);
    assert!(
        events.contains("failover: another node is the writer from=n0 to=n1"),
        "{events}"
    );
    assert!(events.contains("topology generation moved"), "{events}");
    assert!(
        events.contains("node role changed node=n1 from=Replica to=Primary"),
        "{events}"
    );
}
