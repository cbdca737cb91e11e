//! Routers from configuration: a TOML file, `ROUTING_*` variables over it, the documented
//! precedence, the example configurations of docs/deployments.md, and one test per invalid
//! setting showing its error text (never a password).

mod fake;

use std::time::Duration;

use fake::{FakeBackend, World};
use routing_core::{Consistency, LagAlertThresholds, MarksFailure, RequestContext, RouterSettings};

const SENTINEL: &str = "S3ntinel-pw-7f3a";

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The fake backend maps nodes by name (`n0` is its primary).
fn fake_nodes_toml() -> String {
    format!(
        r#"
[[nodes]]
name = "n0"
role = "writer"
url = "postgres://app:{SENTINEL}@db-0/shop"

[[nodes]]
name = "n1"
region = "eu"
url = "postgres://app:{SENTINEL}@db-1/shop"

[[nodes]]
name = "n2"
region = "us"
url = "host=db-2 user=app password={SENTINEL} dbname=shop"
lag_alert = {{ max_bytes = "1MB" }}
"#
    )
}

#[tokio::test]
async fn a_router_from_a_toml_file() {
    let toml = format!(
        r#"
consistency = "eventual"
probe_interval = "20ms"
probe_timeout = "200ms"
write_deadline = "800ms"
on_marks_failure = "eventual"

[lag]
max_bytes = "8MB"
max_time = "off"

[pool]
max_size = 4
max_lifetime = "10m"

[lag_alert]
max_time = "30s"
clear_ratio = 0.25

[regions.fallback]
eu = ["us"]
{}"#,
        fake_nodes_toml()
    );
    let dir = tempfile_dir();
    let path = dir.join("routing.toml");
    std::fs::write(&path, toml).unwrap();
    let settings = RouterSettings::from_toml_file(&path).expect("parses");
    let world = World::new(2);
    let router = settings
        .builder(FakeBackend(world.clone()))
        .expect("valid")
        .build()
        .await
        .expect("builds");

    let c = router.config();
    assert_eq!(c.default_consistency, Consistency::Eventual);
    assert_eq!(c.probe_interval, Duration::from_millis(20));
    assert_eq!(c.on_marks_failure, MarksFailure::Eventual);
    assert_eq!(c.lag.max_bytes, Some(8 << 20));
    assert_eq!(c.lag.max_time, None, "\"off\"");
    assert_eq!(c.pool.max_size, 4);
    assert_eq!(c.pool.max_lifetime, Some(Duration::from_secs(600)));
    assert_eq!(
        c.wait_budget,
        routing_core::RouterConfig::default().wait_budget,
        "left out: the default"
    );
    assert_eq!(
        c.lag_alert,
        LagAlertThresholds::time(Duration::from_secs(30)).clear_ratio(0.25)
    );

    let parts = settings.parts().unwrap();
    assert_eq!(parts.nodes[0].role, routing_core::RoleHint::WriterCandidate);
    assert_eq!(parts.nodes[1].role, routing_core::RoleHint::Replica);
    assert_eq!(
        parts.nodes[2].lag_alert,
        Some(
            LagAlertThresholds::time(Duration::from_secs(30))
                .and_bytes(1 << 20)
                .clear_ratio(0.25)
        ),
        "a node's lag_alert overrides the router's field by field"
    );
    assert_eq!(
        parts.regions.rank(Some(&"eu".into()), Some(&"us".into())),
        1
    );

    // It routes: writes to n0, a European read to the European replica.
    let w = router.write().await.expect("write");
    assert_eq!(w.node_name(), "n0");
    drop(w);
    let r = router
        .read_with(&RequestContext::new().region("eu"))
        .await
        .expect("read");
    assert_eq!(r.node_name(), "n1");
    // Nothing printed shows a password.
    for text in [
        format!("{settings:?}"),
        format!("{router:?}"),
        format!("{parts:?}"),
    ] {
        assert!(!text.contains(SENTINEL), "{text}");
    }
    std::fs::remove_dir_all(dir).ok();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "routing-settings-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn a_router_from_environment_variables() {
    let env = vars(&[
        ("ROUTING_CONSISTENCY", "primary"),
        ("ROUTING_PROBE_INTERVAL", "20ms"),
        ("ROUTING_PROBE_TIMEOUT", "200ms"),
        ("ROUTING_LAG_ALERT__MAX_BYTES", "16MB"),
        ("ROUTING_NODES__N0__URL", "postgres://app:pw@db-0/shop"),
        ("ROUTING_NODES__N0__ROLE", "writer"),
        ("ROUTING_NODES__N1__URL", "postgres://app:pw@db-1/shop"),
        ("ROUTING_NODES__N1__WEIGHT", "3"),
        ("ROUTING_NODES__N1__LOAD_BALANCED", "true"),
        ("ROUTING_NODES__N0__NO_READS", "true"),
        ("PATH", "/usr/bin"),
    ]);
    let settings = RouterSettings::default().with_vars(env).expect("applies");
    let world = World::new(1);
    let router = settings
        .builder(FakeBackend(world))
        .expect("valid")
        .build()
        .await
        .expect("builds");
    assert_eq!(router.config().default_consistency, Consistency::Primary);
    assert_eq!(router.config().probe_interval, Duration::from_millis(20));
    assert_eq!(router.config().lag_alert.max_bytes, Some(16 << 20));
    let parts = settings.parts().unwrap();
    assert_eq!(parts.nodes.len(), 2);
    assert_eq!(parts.nodes[1].weight, 3);
    assert!(parts.nodes[1].load_balanced);
    assert!(
        !parts.nodes[0].reads && parts.nodes[1].reads,
        "no_reads from the environment"
    );
    let r = router.read().await.expect("read");
    assert!(r.on_primary(), "consistency = primary from the environment");
}

#[test]
fn environment_over_file_over_defaults() {
    let file = RouterSettings::from_toml_str(&format!(
        "probe_interval = \"100ms\"\nwait_budget = \"20ms\"\n{}",
        fake_nodes_toml()
    ))
    .unwrap();
    let merged = file
        .with_vars(vars(&[
            ("ROUTING_PROBE_INTERVAL", "50ms"),
            (
                "ROUTING_NODES__N1__URL",
                "postgres://app:from-env@db-1b/shop",
            ),
        ]))
        .unwrap();
    let parts = merged.parts().unwrap();
    assert_eq!(
        parts.config.probe_interval,
        Duration::from_millis(50),
        "env wins"
    );
    assert_eq!(
        parts.config.wait_budget,
        Duration::from_millis(20),
        "file kept"
    );
    assert_eq!(
        parts.config.write_deadline,
        routing_core::RouterConfig::default().write_deadline,
        "default kept"
    );
    assert_eq!(parts.nodes.len(), 3, "the env var named an existing node");
    assert_eq!(
        parts.nodes[1].url.expose(),
        "postgres://app:from-env@db-1b/shop"
    );
    assert_eq!(
        parts.nodes[1].region.as_ref().map(|r| r.as_str()),
        Some("eu")
    );
}

/// Every TOML block of docs/deployments.md parses and validates.
#[test]
fn the_documented_deployments_are_valid() {
    let doc = include_str!("../../../docs/deployments.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            _ => {}
        }
    }
    assert_eq!(
        blocks.len(),
        6,
        "direct, candidates, haproxy, aurora, cloud sql, regions"
    );
    for b in &blocks {
        let s = RouterSettings::from_toml_str(b).unwrap_or_else(|e| panic!("{e}\n{b}"));
        let parts = s.parts().unwrap_or_else(|e| panic!("{e}\n{b}"));
        assert!(!parts.nodes.is_empty());
    }
    let aurora = RouterSettings::from_toml_str(&blocks[3])
        .unwrap()
        .parts()
        .unwrap();
    assert!(aurora.nodes[1].load_balanced && !aurora.nodes[0].load_balanced);
}

/// The error text for a TOML file.
fn file_error(toml: &str) -> String {
    let text = format!("{toml}\n{}", fake_nodes_toml());
    let e = match RouterSettings::from_toml_str(&text) {
        Ok(s) => s.parts().expect_err("invalid").to_string(),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains(SENTINEL), "{e}");
    e
}

/// The error text for environment variables over the valid fake nodes.
fn env_error(pairs: &[(&str, &str)]) -> String {
    let base = RouterSettings::from_toml_str(&fake_nodes_toml()).unwrap();
    let e = match base.with_vars(vars(pairs)) {
        Ok(s) => s.parts().expect_err("invalid").to_string(),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains(SENTINEL), "{e}");
    e
}

const PREFIX: &str = "invalid router configuration: ";

#[test]
fn invalid_duration() {
    assert_eq!(
        file_error("probe_interval = \"fast\""),
        format!(
            "{PREFIX}probe_interval = \"fast\": not a duration (a number and a unit: 250ms, 5s, 2m, 1h; or off)"
        )
    );
}

#[test]
fn duration_without_a_unit() {
    assert!(
        file_error("write_deadline = \"5\"")
            .starts_with(&format!("{PREFIX}write_deadline = \"5\": not a duration"))
    );
}

#[test]
fn duration_out_of_range() {
    assert_eq!(
        file_error("probe_interval = \"2h\""),
        format!("{PREFIX}probe_interval = 7200s is outside 10ms..=3600s")
    );
}

#[test]
fn invalid_byte_size() {
    assert_eq!(
        file_error("[lag]\nmax_bytes = \"lots\""),
        format!(
            "{PREFIX}lag.max_bytes = \"lots\": not a byte size (a number of bytes, or with a unit: 512kB, 16MB, 1GB; or off)"
        )
    );
}

#[test]
fn invalid_consistency() {
    assert_eq!(
        file_error("consistency = \"strong\""),
        format!(
            "{PREFIX}consistency = \"strong\": expected primary, eventual, read_your_writes, causal or recent_writer_ttl"
        )
    );
}

#[test]
fn recent_writer_ttl_without_its_ttl() {
    assert_eq!(
        file_error("consistency = \"recent_writer_ttl\""),
        format!(
            "{PREFIX}consistency = \"recent_writer_ttl\" needs recent_writer_ttl (for example \"2s\")"
        )
    );
}

#[test]
fn recent_writer_ttl_longer_than_marks_live() {
    assert_eq!(
        file_error(
            "consistency = \"recent_writer_ttl\"\nrecent_writer_ttl = \"1m\"\nmark_ttl = \"30s\""
        ),
        format!(
            "{PREFIX}RecentWriterTtl ttl = 60s exceeds mark_ttl = 30s (marks would expire first)"
        )
    );
}

#[test]
fn invalid_marks_failure() {
    assert_eq!(
        file_error("on_marks_failure = \"panic\""),
        format!("{PREFIX}on_marks_failure = \"panic\": expected primary or eventual")
    );
}

#[test]
fn invalid_pool_size() {
    assert_eq!(
        file_error("[pool]\nmax_size = 0"),
        format!("{PREFIX}pool.max_size = 0 is outside 1..=10000")
    );
}

#[test]
fn invalid_readmit_ratio() {
    assert_eq!(
        file_error("[lag]\nreadmit_ratio = 2.0"),
        format!("{PREFIX}lag.readmit_ratio = 2 is outside (0, 1]")
    );
}

#[test]
fn invalid_lag_alert_clear_ratio() {
    assert_eq!(
        file_error("[lag_alert]\nmax_bytes = 1000\nclear_ratio = 0"),
        format!("{PREFIX}lag_alert.clear_ratio = 0 is outside (0, 1]")
    );
}

#[test]
fn invalid_node_lag_alert() {
    let e = RouterSettings::from_toml_str(&format!(
        "{}\n[[nodes]]\nname = \"n3\"\nurl = \"postgres://app:{SENTINEL}@db-3/shop\"\nlag_alert = {{ max_time = \"1s\", clear_ratio = 3.0 }}",
        fake_nodes_toml()
    ))
    .unwrap()
    .parts()
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        format!("{PREFIX}node \"n3\" lag_alert.clear_ratio = 3 is outside (0, 1]")
    );
}

#[test]
fn invalid_role_never_shows_the_password() {
    let e = RouterSettings::from_toml_str(&format!(
        "[[nodes]]\nname = \"pg-x\"\nrole = \"primary\"\nurl = \"postgres://app:{SENTINEL}@db/shop\""
    ))
    .unwrap()
    .parts()
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        format!("{PREFIX}nodes[0].role = \"primary\": expected writer or replica")
    );
}

#[test]
fn missing_url() {
    assert_eq!(
        file_error("[[nodes]]\nname = \"n9\"\nregion = \"eu\""),
        format!("{PREFIX}nodes[0].url is missing (node \"n9\")")
    );
}

#[test]
fn duplicate_node_name() {
    assert_eq!(
        file_error(&format!(
            "[[nodes]]\nname = \"n1\"\nurl = \"postgres://app:{SENTINEL}@elsewhere/shop\""
        )),
        format!("{PREFIX}duplicate node name \"n1\"")
    );
}

#[test]
fn no_nodes() {
    let e = RouterSettings::from_toml_str("probe_interval = \"1s\"")
        .unwrap()
        .parts()
        .unwrap_err();
    assert_eq!(e.to_string(), format!("{PREFIX}no nodes configured"));
}

#[test]
fn unknown_key_in_the_file() {
    let e = file_error("probe_intervall = \"1s\"");
    assert!(e.starts_with(&format!("{PREFIX}invalid TOML: ")), "{e}");
    assert!(e.contains("unknown field `probe_intervall`"), "{e}");
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn toml_syntax_error_on_a_url_line_masks_the_password() {
    let e = RouterSettings::from_toml_str(&format!(
        "[[nodes]]\nname = \"n0\"\nurl = \"postgres://app:{SENTINEL}@db/shop\" trailing"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("line 3"), "{e}");
    assert!(e.contains("postgres://app:***@db/shop"), "{e}");
    assert!(!e.contains(SENTINEL), "{e}");
}

#[test]
fn wrong_type_in_the_file() {
    let e = file_error("[pool]\nmax_size = \"many\"");
    assert!(e.contains("max_size"), "{e}");
    assert!(
        e.contains("invalid type: string \"many\", expected u32"),
        "{e}"
    );
}

#[test]
fn invalid_env_duration_names_the_variable() {
    assert_eq!(
        env_error(&[("ROUTING_PROBE_TIMEOUT", "soon")]),
        format!(
            "{PREFIX}ROUTING_PROBE_TIMEOUT = \"soon\": not a duration (a number and a unit: 250ms, 5s, 2m, 1h; or off)"
        )
    );
}

#[test]
fn invalid_env_number() {
    assert_eq!(
        env_error(&[("ROUTING_POOL__MAX_SIZE", "lots")]),
        format!("{PREFIX}ROUTING_POOL__MAX_SIZE = \"lots\": not a whole number")
    );
}

#[test]
fn invalid_env_bool() {
    assert_eq!(
        env_error(&[("ROUTING_NODES__N1__LOAD_BALANCED", "maybe")]),
        format!("{PREFIX}ROUTING_NODES__N1__LOAD_BALANCED = \"maybe\": not true or false")
    );
}

#[test]
fn unknown_env_variable_in_a_router_section() {
    assert_eq!(
        env_error(&[("ROUTING_NODES__N1__PASSWORD", SENTINEL)]),
        format!("{PREFIX}ROUTING_NODES__N1__PASSWORD: no such setting")
    );
    assert_eq!(
        env_error(&[("ROUTING_POOL__MAX_SIZ", "4")]),
        format!("{PREFIX}ROUTING_POOL__MAX_SIZ: no such setting")
    );
}

/// Outside the router's sections a `ROUTING_*` variable may be the application's (the web
/// examples read `ROUTING_TOKEN_KEY`): ignored, not an error.
#[test]
fn other_routing_variables_are_ignored() {
    let base = RouterSettings::from_toml_str(&fake_nodes_toml()).unwrap();
    let with = base
        .clone()
        .with_vars(vars(&[
            ("ROUTING_TOKEN_KEY", SENTINEL),
            ("ROUTING_PROBE_INTERVALL", "1s"),
            ("ROUTING_TESTKIT_DIR", "/tmp/x"),
        ]))
        .expect("not errors");
    assert_eq!(with, base, "nothing applied");
}

#[test]
fn invalid_env_role_masks_the_password_in_a_url_given_as_role() {
    let e = env_error(&[(
        "ROUTING_NODES__N2__ROLE",
        &format!("postgres://app:{SENTINEL}@oops/shop"),
    )]);
    assert_eq!(
        e,
        format!(
            "{PREFIX}ROUTING_NODES__N2__ROLE = \"postgres://app:***@oops/shop\": expected writer or replica"
        )
    );
}

#[test]
fn env_value_out_of_range_after_parsing() {
    assert_eq!(
        env_error(&[("ROUTING_BAN__BASE", "2h")]),
        format!("{PREFIX}ban.base = 7200s is outside 1ms..=3600s")
    );
}

/// `with_env` reads the real process environment: this test runs itself again as a child
/// process with `ROUTING_*` variables set (setting them in this process would race other
/// tests), and the child checks what it read.
#[test]
fn the_process_environment_is_read() {
    const CHILD: &str = "SETTINGS_TEST_ENV_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let file = RouterSettings::from_toml_str(&format!(
            "probe_interval = \"100ms\"\nwait_budget = \"20ms\"\n{}",
            fake_nodes_toml()
        ))
        .unwrap();
        let parts = file
            .with_env()
            .expect("env applies")
            .parts()
            .expect("valid");
        assert_eq!(parts.config.probe_interval, Duration::from_millis(42));
        assert_eq!(parts.config.wait_budget, Duration::from_millis(20));
        assert_eq!(
            parts.nodes[0].url.expose(),
            "postgres://app:from-env@db-0/shop"
        );
        let only_env = RouterSettings::from_env().unwrap().parts().unwrap();
        assert_eq!(only_env.nodes.len(), 1, "n0, from the environment alone");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "the_process_environment_is_read",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("ROUTING_PROBE_INTERVAL", "42ms")
        .env(
            "ROUTING_NODES__N0__URL",
            "postgres://app:from-env@db-0/shop",
        )
        .output()
        .expect("child runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
