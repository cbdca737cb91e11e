//! The router's configuration as data: what a TOML file (feature `toml`), any serde format
//! (feature `serde`) or `ROUTING_*` environment variables hold, turned into a
//! [`RouterBuilder`](crate::RouterBuilder) or into a [`RouterConfig`] and [`NodeConfig`]s.
//!
//! Builders remain the primary API: [`RouterSettings`] only fills them in. What data cannot
//! hold (the marks store, the token key, a custom picker, lag alert handlers) is set on the
//! builder it returns.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{
    Backend, BanPolicy, ConnString, Consistency, Error, LagAlertThresholds, LagBounds,
    MarksFailure, NodeConfig, PoolSettings, Region, RegionPolicy, Router, RouterBuilder,
    RouterConfig, redact,
};

/// A byte size as written in a configuration: a number of bytes, or text with a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(untagged))]
pub enum ByteSize {
    /// A plain number of bytes.
    Bytes(u64),
    /// Text such as `"16MB"`, parsed when the settings are turned into a configuration.
    Text(String),
}

/// Lag bounds as written (see [`LagBounds`]).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct LagSettings {
    /// [`LagBounds::max_bytes`]; `0`/`"off"` for none.
    pub max_bytes: Option<ByteSize>,
    /// [`LagBounds::max_time`]; `"off"` for none.
    pub max_time: Option<String>,
    /// [`LagBounds::readmit_ratio`].
    pub readmit_ratio: Option<f64>,
}

/// Ban backoff as written (see [`BanPolicy`]).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct BanSettings {
    /// [`BanPolicy::base`].
    pub base: Option<String>,
    /// [`BanPolicy::max`].
    pub max: Option<String>,
}

/// Pool settings as written (see [`PoolSettings`]).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct PoolSettingsText {
    /// [`PoolSettings::max_size`].
    pub max_size: Option<u32>,
    /// [`PoolSettings::connect_timeout`].
    pub connect_timeout: Option<String>,
    /// [`PoolSettings::max_lifetime`]; `"off"` for none.
    pub max_lifetime: Option<String>,
    /// [`PoolSettings::idle_timeout`]; `"off"` for none.
    pub idle_timeout: Option<String>,
    /// [`PoolSettings::pre_ping`].
    pub pre_ping: Option<bool>,
}

/// Lag alert thresholds as written (see [`LagAlertThresholds`]).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct LagAlertSettings {
    /// [`LagAlertThresholds::max_bytes`]; `0`/`"off"` for none.
    pub max_bytes: Option<ByteSize>,
    /// [`LagAlertThresholds::max_time`]; `"off"` for none.
    pub max_time: Option<String>,
    /// [`LagAlertThresholds::clear_ratio`].
    pub clear_ratio: Option<f64>,
}

/// Region fallbacks as written (see [`RegionPolicy`]).
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct RegionSettings {
    /// For requests from each region, the regions to try next, in order.
    pub fallback: BTreeMap<String, Vec<String>>,
    /// [`RegionPolicy::wait_locally_first`].
    pub wait_locally_first: Option<bool>,
}

/// One node as written (see [`NodeConfig`]). Its connection strings are [`ConnString`]s, so
/// printing the settings never shows a password.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct NodeSettings {
    /// [`NodeConfig::name`].
    pub name: String,
    /// [`NodeConfig::url`] (required).
    pub url: Option<ConnString>,
    /// `writer` or `replica` (default).
    pub role: Option<String>,
    /// [`NodeConfig::region`].
    pub region: Option<String>,
    /// [`NodeConfig::weight`].
    pub weight: Option<u32>,
    /// [`NodeConfig::reader_url`].
    pub reader_url: Option<ConnString>,
    /// [`NodeConfig::monitor_url`].
    pub monitor_url: Option<ConnString>,
    /// [`NodeConfig::load_balanced`].
    pub load_balanced: Option<bool>,
    /// [`NodeConfig::no_reads`]: `true` keeps reads off the node (it may still be the writer).
    pub no_reads: Option<bool>,
    /// [`NodeConfig::lag_alert`]: replaces the router's thresholds for this node; the fields
    /// left out are the router's.
    pub lag_alert: Option<LagAlertSettings>,
}

/// A router's whole configuration as data: deserialize it from any serde format (feature
/// `serde`), read it from a TOML file (feature `toml`) or from `ROUTING_*` environment
/// variables, then turn it into a builder ([`RouterSettings::builder`]) or into its parts
/// ([`RouterSettings::parts`]).
///
/// ```no_run
/// # async fn run<B: routing_core::Backend>(backend: B) -> Result<(), routing_core::Error> {
/// use routing_core::RouterSettings;
///
/// // `RouterSettings::load(Some(path))` (feature `toml`) reads a file first.
/// let router = RouterSettings::from_env()?
///     .builder(backend)?
///     // What data cannot hold: .marks(...), .tokens(...), .on_lag_alert(...)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
///
/// # Precedence
///
/// Environment variables over the file over the defaults: every setting left out of the file
/// keeps [`RouterConfig::default`]'s value, and every `ROUTING_*` variable replaces what the
/// file said ([`RouterSettings::with_env`]).
///
/// # Values
///
/// - Durations are text with a unit: `"250ms"`, `"5s"`, `"1.5s"`, `"2m"`, `"1h"`. `"0"` or
///   `"off"` is zero, which turns off the settings that may be off (`lag.max_time`,
///   `lag_alert.max_time`, `pool.max_lifetime`, `pool.idle_timeout`).
/// - Byte sizes are a number of bytes or text with a unit: `"512kB"`, `"16MB"`, `"1GB"`
///   (multiples of 1024, as in `postgresql.conf`; `KiB`/`MiB`/`GiB` are accepted too). `0` or
///   `"off"` turns off `lag.max_bytes` and `lag_alert.max_bytes`.
/// - `consistency`: `primary`, `eventual`, `read_your_writes`, `causal`, or
///   `recent_writer_ttl` (with `recent_writer_ttl = "2s"`, the TTL).
/// - A node's `role`: `writer` (a writer candidate) or `replica` (the default). Roles are
///   always verified by probing; the hint only breaks ties.
///
/// # Environment variables
///
/// `ROUTING_` then the setting's path in capitals, with `__` between levels:
///
/// | variable | setting |
/// |---|---|
/// | `ROUTING_PROBE_INTERVAL=100ms` | `probe_interval` |
/// | `ROUTING_LAG__MAX_BYTES=8MB` | `lag.max_bytes` |
/// | `ROUTING_POOL__MAX_SIZE=32` | `pool.max_size` |
/// | `ROUTING_LAG_ALERT__MAX_TIME=30s` | `lag_alert.max_time` |
/// | `ROUTING_REGIONS__FALLBACK__EU=us,ap` | `regions.fallback.eu = ["us", "ap"]` |
/// | `ROUTING_NODES__PG_A__URL=postgres://...` | `url` of the node named `pg-a` (or `pg_a`) |
/// | `ROUTING_NODES__PG_A__LAG_ALERT__MAX_BYTES=64MB` | that node's `lag_alert.max_bytes` |
///
/// A node is matched by name case-insensitively with `-`, `.` and `_` taken as equal; a name
/// no node has adds a node (named in lower case), which then needs at least a `URL`. A
/// variable inside one of the router's sections (`ROUTING_NODES__*`, `ROUTING_LAG__*`,
/// `ROUTING_LAG_ALERT__*`, `ROUTING_POOL__*`, `ROUTING_BAN__*`, `ROUTING_REGIONS__*`) that names
/// no setting is an error, so a typo there does not go unnoticed. Any other `ROUTING_*` variable
/// that names no setting may belong to the application (for example a token key) and is
/// ignored with a `warn` event naming it (a misspelt top-level setting shows there); those of
/// the workspace's own tools (`ROUTING_TESTKIT_*`, `ROUTING_ADVISORY_DB`) are skipped silently.
///
/// # Errors
///
/// Every error names the setting (as `nodes[1].url`, or the environment variable it came
/// from) and the bad value, with passwords masked: a connection string's password never
/// appears in an error.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct RouterSettings {
    /// [`RouterConfig::default_consistency`].
    pub consistency: Option<String>,
    /// The TTL of `consistency = "recent_writer_ttl"`.
    pub recent_writer_ttl: Option<String>,
    /// [`RouterConfig::probe_interval`].
    pub probe_interval: Option<String>,
    /// [`RouterConfig::probe_timeout`].
    pub probe_timeout: Option<String>,
    /// [`RouterConfig::write_deadline`].
    pub write_deadline: Option<String>,
    /// [`RouterConfig::wait_budget`].
    pub wait_budget: Option<String>,
    /// [`RouterConfig::mark_ttl`].
    pub mark_ttl: Option<String>,
    /// [`RouterConfig::marks_timeout`].
    pub marks_timeout: Option<String>,
    /// [`RouterConfig::on_marks_failure`]: `primary` or `eventual`.
    pub on_marks_failure: Option<String>,
    /// [`RouterConfig::future_lsn_tolerance`].
    pub future_lsn_tolerance: Option<ByteSize>,
    /// [`RouterConfig::lag`].
    pub lag: LagSettings,
    /// [`RouterConfig::ban`].
    pub ban: BanSettings,
    /// [`RouterConfig::pool`].
    pub pool: PoolSettingsText,
    /// [`RouterConfig::lag_alert`].
    pub lag_alert: LagAlertSettings,
    /// The [`RegionPolicy`].
    pub regions: RegionSettings,
    /// The nodes, in order.
    pub nodes: Vec<NodeSettings>,
    /// Which environment variable set a path, for errors.
    #[cfg_attr(feature = "serde", serde(skip))]
    origins: BTreeMap<String, String>,
}

/// The parts a [`RouterSettings`] describes, validated.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouterParts {
    /// The router's configuration.
    pub config: RouterConfig,
    /// The nodes, in order.
    pub nodes: Vec<NodeConfig>,
    /// The region fallbacks.
    pub regions: RegionPolicy,
}

fn config_error(message: String) -> Error {
    Error::Config(message)
}

/// `"250ms"`, `"5s"`, `"1.5s"`, `"2m"`, `"1h"`, `"0"`, `"off"`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    const HINT: &str = "not a duration (a number and a unit: 250ms, 5s, 2m, 1h; or off)";
    let t = text.trim();
    if t == "0" || t.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or(HINT)?;
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().map_err(|_| HINT)?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(HINT),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|_| HINT)
}

/// `16777216`, `"512kB"`, `"16MB"`, `"1GB"`, `"off"`.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, &'static str> {
    const HINT: &str =
        "not a byte size (a number of bytes, or with a unit: 512kB, 16MB, 1GB; or off)";
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| HINT)?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "kib" => 1 << 10,
        "mb" | "mib" => 1 << 20,
        "gb" | "gib" => 1 << 30,
        "tb" | "tib" => 1 << 40,
        _ => return Err(HINT),
    };
    n.checked_mul(scale).ok_or(HINT)
}

/// The router's sections: an unknown variable inside one is an error, not an application's.
const SECTIONS: [&str; 6] = ["nodes", "lag", "lag_alert", "pool", "ban", "regions"];

/// Lower case, with `-`, `.` and `_` taken as equal: how environment names match node names.
fn env_key(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

impl RouterSettings {
    /// Settings from TOML text (feature `toml`). Errors show the line and column, with
    /// passwords masked.
    #[cfg(feature = "toml")]
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        toml::from_str(text)
            .map_err(|e| config_error(format!("invalid TOML: {}", redact(&e.to_string()))))
    }

    /// Settings from a TOML file (feature `toml`).
    #[cfg(feature = "toml")]
    pub fn from_toml_file(path: impl AsRef<std::path::Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_error(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml_str(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The documented precedence in one call (feature `toml`): the file at `path` if given,
    /// then every `ROUTING_*` variable of this process over it, over the defaults.
    #[cfg(feature = "toml")]
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, Error> {
        match path {
            Some(p) => Self::from_toml_file(p)?,
            None => Self::default(),
        }
        .with_env()
    }

    /// Settings from this process's `ROUTING_*` environment variables only.
    pub fn from_env() -> Result<Self, Error> {
        Self::default().with_env()
    }

    /// These settings with this process's `ROUTING_*` environment variables applied over them.
    pub fn with_env(self) -> Result<Self, Error> {
        self.with_vars(std::env::vars_os().filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with("ROUTING_")
                .then(|| (k, v.to_string_lossy().into_owned()))
        }))
    }

    /// These settings with `vars` (name, value) applied over them, as [`RouterSettings::with_env`]
    /// applies the process environment; names without the `ROUTING_` prefix are ignored.
    pub fn with_vars(
        mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let mut vars: Vec<_> = vars.into_iter().collect();
        vars.sort();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("ROUTING_") else {
                continue;
            };
            if rest.starts_with("TESTKIT_") || rest == "ADVISORY_DB" {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            self.set_var(&name, &path, value)?;
        }
        Ok(self)
    }

    fn set_var(&mut self, var: &str, path: &[String], value: String) -> Result<(), Error> {
        let unknown = || config_error(format!("{var}: no such setting"));
        let parse = |what: &str| -> Result<_, Error> {
            Err(config_error(format!(
                "{var} = {:?}: not {what}",
                redact(&value)
            )))
        };
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = || Some(value.clone());
        let bytes = || Some(ByteSize::Text(value.clone()));
        let origin = p.join(".");
        match p.as_slice() {
            ["consistency"] => self.consistency = text(),
            ["recent_writer_ttl"] => self.recent_writer_ttl = text(),
            ["probe_interval"] => self.probe_interval = text(),
            ["probe_timeout"] => self.probe_timeout = text(),
            ["write_deadline"] => self.write_deadline = text(),
            ["wait_budget"] => self.wait_budget = text(),
            ["mark_ttl"] => self.mark_ttl = text(),
            ["marks_timeout"] => self.marks_timeout = text(),
            ["on_marks_failure"] => self.on_marks_failure = text(),
            ["future_lsn_tolerance"] => self.future_lsn_tolerance = bytes(),
            ["lag", "max_bytes"] => self.lag.max_bytes = bytes(),
            ["lag", "max_time"] => self.lag.max_time = text(),
            ["lag", "readmit_ratio"] => match value.trim().parse() {
                Ok(r) => self.lag.readmit_ratio = Some(r),
                Err(_) => return parse("a number"),
            },
            ["ban", "base"] => self.ban.base = text(),
            ["ban", "max"] => self.ban.max = text(),
            ["pool", "max_size"] => match value.trim().parse() {
                Ok(n) => self.pool.max_size = Some(n),
                Err(_) => return parse("a whole number"),
            },
            ["pool", "connect_timeout"] => self.pool.connect_timeout = text(),
            ["pool", "max_lifetime"] => self.pool.max_lifetime = text(),
            ["pool", "idle_timeout"] => self.pool.idle_timeout = text(),
            ["pool", "pre_ping"] => match parse_bool(&value) {
                Some(b) => self.pool.pre_ping = Some(b),
                None => return parse("true or false"),
            },
            ["lag_alert", field] => {
                set_alert(&mut self.lag_alert, field, &value).ok_or_else(|| {
                    if ["max_bytes", "max_time", "clear_ratio"].contains(field) {
                        config_error(format!("{var} = {:?}: not a number", redact(&value)))
                    } else {
                        unknown()
                    }
                })?
            }
            ["regions", "fallback", region] => {
                self.regions.fallback.insert(
                    (*region).to_string(),
                    value
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                );
            }
            ["regions", "wait_locally_first"] => match parse_bool(&value) {
                Some(b) => self.regions.wait_locally_first = Some(b),
                None => return parse("true or false"),
            },
            ["nodes", name, field @ ..] if !field.is_empty() => {
                let i = match self.nodes.iter().position(|n| env_key(&n.name) == *name) {
                    Some(i) => i,
                    None => {
                        self.nodes.push(NodeSettings {
                            name: (*name).to_string(),
                            ..NodeSettings::default()
                        });
                        self.nodes.len() - 1
                    }
                };
                let node = &mut self.nodes[i];
                match field {
                    ["url"] => node.url = Some(ConnString::new(value.clone())),
                    ["reader_url"] => node.reader_url = Some(ConnString::new(value.clone())),
                    ["monitor_url"] => node.monitor_url = Some(ConnString::new(value.clone())),
                    ["role"] => node.role = text(),
                    ["region"] => node.region = text(),
                    ["weight"] => match value.trim().parse() {
                        Ok(w) => node.weight = Some(w),
                        Err(_) => return parse("a whole number"),
                    },
                    ["load_balanced"] => match parse_bool(&value) {
                        Some(b) => node.load_balanced = Some(b),
                        None => return parse("true or false"),
                    },
                    ["no_reads"] => match parse_bool(&value) {
                        Some(b) => node.no_reads = Some(b),
                        None => return parse("true or false"),
                    },
                    ["lag_alert", f] => {
                        let alert = node.lag_alert.get_or_insert_with(Default::default);
                        set_alert(alert, f, &value).ok_or_else(|| {
                            if ["max_bytes", "max_time", "clear_ratio"].contains(f) {
                                config_error(format!("{var} = {:?}: not a number", redact(&value)))
                            } else {
                                unknown()
                            }
                        })?
                    }
                    _ => return Err(unknown()),
                }
                let origin = format!("nodes[{i}].{}", field.join("."));
                self.origins.insert(origin, var.to_string());
                return Ok(());
            }
            [section, ..] if !SECTIONS.contains(section) => {
                tracing::warn!(variable = var, "not a router setting: ignored");
                return Ok(());
            }
            _ => return Err(unknown()),
        }
        self.origins.insert(origin, var.to_string());
        Ok(())
    }

    /// How a path is named in errors: the environment variable that set it, or the path.
    fn name(&self, path: &str) -> String {
        match self.origins.get(path) {
            Some(var) => var.clone(),
            None => path.to_string(),
        }
    }

    fn duration(&self, path: &str, value: &Option<String>) -> Result<Option<Duration>, Error> {
        value
            .as_deref()
            .map(|v| {
                parse_duration(v).map_err(|why| {
                    config_error(format!("{} = {:?}: {why}", self.name(path), redact(v)))
                })
            })
            .transpose()
    }

    fn bytes(&self, path: &str, value: &Option<ByteSize>) -> Result<Option<u64>, Error> {
        match value {
            None => Ok(None),
            Some(ByteSize::Bytes(n)) => Ok(Some(*n)),
            Some(ByteSize::Text(v)) => parse_bytes(v).map(Some).map_err(|why| {
                config_error(format!("{} = {:?}: {why}", self.name(path), redact(v)))
            }),
        }
    }

    fn alert(
        &self,
        path: &str,
        s: &LagAlertSettings,
        base: LagAlertThresholds,
    ) -> Result<LagAlertThresholds, Error> {
        let mut t = base;
        if let Some(b) = self.bytes(&format!("{path}.max_bytes"), &s.max_bytes)? {
            t.max_bytes = (b > 0).then_some(b);
        }
        if let Some(d) = self.duration(&format!("{path}.max_time"), &s.max_time)? {
            t.max_time = (!d.is_zero()).then_some(d);
        }
        if let Some(r) = s.clear_ratio {
            t.clear_ratio = r;
        }
        Ok(t)
    }

    /// The configuration, nodes and region policy these settings describe, validated: every
    /// value parsed, then [`RouterConfig::validate`]. Errors name the setting and the value.
    pub fn parts(&self) -> Result<RouterParts, Error> {
        let mut c = RouterConfig::default();
        let d = |path: &str, v: &Option<String>| self.duration(path, v);
        macro_rules! set_duration {
            ($($field:ident),*) => {$(
                if let Some(v) = d(stringify!($field), &self.$field)? {
                    c.$field = v;
                }
            )*};
        }
        set_duration!(
            probe_interval,
            probe_timeout,
            write_deadline,
            wait_budget,
            mark_ttl,
            marks_timeout
        );
        if let Some(mode) = &self.consistency {
            c.default_consistency = match mode.trim().replace('-', "_").as_str() {
                "primary" => Consistency::Primary,
                "eventual" => Consistency::Eventual,
                "read_your_writes" => Consistency::ReadYourWrites,
                "causal" => Consistency::Causal,
                "recent_writer_ttl" => Consistency::RecentWriterTtl {
                    ttl: d("recent_writer_ttl", &self.recent_writer_ttl)?.ok_or_else(|| {
                        config_error(format!(
                            "{} = \"recent_writer_ttl\" needs recent_writer_ttl (for example \"2s\")",
                            self.name("consistency")
                        ))
                    })?,
                },
                _ => {
                    return Err(config_error(format!(
                        "{} = {:?}: expected primary, eventual, read_your_writes, causal or recent_writer_ttl",
                        self.name("consistency"),
                        redact(mode)
                    )));
                }
            };
        }
        if let Some(mode) = &self.on_marks_failure {
            c.on_marks_failure = match mode.trim() {
                "primary" => MarksFailure::Primary,
                "eventual" => MarksFailure::Eventual,
                _ => {
                    return Err(config_error(format!(
                        "{} = {:?}: expected primary or eventual",
                        self.name("on_marks_failure"),
                        redact(mode)
                    )));
                }
            };
        }
        if let Some(b) = self.bytes("future_lsn_tolerance", &self.future_lsn_tolerance)? {
            c.future_lsn_tolerance = b;
        }
        let lag: &mut LagBounds = &mut c.lag;
        if let Some(b) = self.bytes("lag.max_bytes", &self.lag.max_bytes)? {
            lag.max_bytes = (b > 0).then_some(b);
        }
        if let Some(t) = d("lag.max_time", &self.lag.max_time)? {
            lag.max_time = (!t.is_zero()).then_some(t);
        }
        if let Some(r) = self.lag.readmit_ratio {
            lag.readmit_ratio = r;
        }
        let ban: &mut BanPolicy = &mut c.ban;
        if let Some(t) = d("ban.base", &self.ban.base)? {
            ban.base = t;
        }
        if let Some(t) = d("ban.max", &self.ban.max)? {
            ban.max = t;
        }
        let pool: &mut PoolSettings = &mut c.pool;
        if let Some(n) = self.pool.max_size {
            pool.max_size = n;
        }
        if let Some(t) = d("pool.connect_timeout", &self.pool.connect_timeout)? {
            pool.connect_timeout = t;
        }
        if let Some(t) = d("pool.max_lifetime", &self.pool.max_lifetime)? {
            pool.max_lifetime = (!t.is_zero()).then_some(t);
        }
        if let Some(t) = d("pool.idle_timeout", &self.pool.idle_timeout)? {
            pool.idle_timeout = (!t.is_zero()).then_some(t);
        }
        if let Some(p) = self.pool.pre_ping {
            pool.pre_ping = p;
        }
        c.lag_alert = self.alert("lag_alert", &self.lag_alert, c.lag_alert)?;

        let mut nodes = Vec::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            let at = |field: &str| self.name(&format!("nodes[{i}].{field}"));
            let url = n.url.clone().ok_or_else(|| {
                config_error(format!("{} is missing (node {:?})", at("url"), n.name))
            })?;
            let mut node = match n.role.as_deref().map(str::trim) {
                None | Some("replica") => NodeConfig::replica(n.name.clone(), url),
                Some("writer") => NodeConfig::writer(n.name.clone(), url),
                Some(other) => {
                    return Err(config_error(format!(
                        "{} = {:?}: expected writer or replica",
                        at("role"),
                        redact(other)
                    )));
                }
            };
            if let Some(r) = &n.region {
                node = node.region(Region::new(r));
            }
            if let Some(w) = n.weight {
                node = node.weight(w);
            }
            if let Some(u) = &n.reader_url {
                node = node.reader_url(u.clone());
            }
            if let Some(u) = &n.monitor_url {
                node = node.monitor_url(u.clone());
            }
            if n.load_balanced == Some(true) {
                node = node.load_balanced();
            }
            if n.no_reads == Some(true) {
                node = node.no_reads();
            }
            if let Some(a) = &n.lag_alert {
                node =
                    node.lag_alert(self.alert(&format!("nodes[{i}].lag_alert"), a, c.lag_alert)?);
            }
            nodes.push(node);
        }
        let mut regions = RegionPolicy::new();
        for (from, order) in &self.regions.fallback {
            regions = regions.fallback(Region::new(from), order.iter().map(Region::new));
        }
        if let Some(w) = self.regions.wait_locally_first {
            regions = regions.wait_locally_first(w);
        }
        c.validate(&nodes)?;
        Ok(RouterParts {
            config: c,
            nodes,
            regions,
        })
    }

    /// A builder with these settings' nodes, configuration and region policy, validated. Set
    /// what data cannot hold (marks store, token codec, picker, alert handlers) on it, then
    /// `build().await`.
    pub fn builder<B: Backend>(&self, backend: B) -> Result<RouterBuilder<B>, Error> {
        let parts = self.parts()?;
        Ok(Router::builder(backend)
            .nodes(parts.nodes)
            .config(parts.config)
            .regions(parts.regions))
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Sets one lag alert field from text; `None` if the field or value is bad.
fn set_alert(a: &mut LagAlertSettings, field: &str, value: &str) -> Option<()> {
    match field {
        "max_bytes" => a.max_bytes = Some(ByteSize::Text(value.to_string())),
        "max_time" => a.max_time = Some(value.to_string()),
        "clear_ratio" => a.clear_ratio = Some(value.trim().parse().ok()?),
        _ => return None,
    }
    Some(())
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ConnString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(ConnString::new)
    }
}

/// Serializes the **redacted** text: a serialized configuration never holds a password (and
/// so cannot be loaded back as it was).
#[cfg(feature = "serde")]
impl serde::Serialize for ConnString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_with_units() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("off"), Ok(Duration::ZERO));
        for bad in ["", "5", "5 parsecs", "ms", "-1s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_bytes("16MB"), Ok(16 << 20));
        assert_eq!(parse_bytes("512kB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("off"), Ok(0));
        for bad in ["", "MB", "1.5MB", "12 apples", "99999999999999999999"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_names_match_nodes_by_normalized_name() {
        let s = RouterSettings {
            nodes: vec![NodeSettings {
                name: "pg-a.eu".into(),
                url: Some("postgres://a".into()),
                ..NodeSettings::default()
            }],
            ..RouterSettings::default()
        };
        let s = s
            .with_vars([
                (
                    "ROUTING_NODES__PG_A_EU__REGION".to_string(),
                    "eu".to_string(),
                ),
                (
                    "ROUTING_NODES__PG_B__URL".to_string(),
                    "postgres://b".to_string(),
                ),
                ("HOME".to_string(), "/root".to_string()),
            ])
            .expect("vars apply");
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes[0].region.as_deref(), Some("eu"));
        assert_eq!(s.nodes[1].name, "pg_b");
    }
}
