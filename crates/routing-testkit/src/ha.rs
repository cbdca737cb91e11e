//! A real HA stack on 127.0.0.1 (feature `ha`): one etcd member, PostgreSQL nodes managed by
//! Patroni (synchronous mode, tuned for fast failover) and HAProxy with a writer and a reader
//! frontend driven by Patroni's REST checks, all from the machine's Debian packages
//! (`etcd-server`, `patroni`, `haproxy`, `postgresql`).
//!
//! Like [`crate::Cluster`] it is blocking, and every process it starts is gone afterwards: on
//! drop, on panic, and (through a watchdog process) when the owning process dies. Its directory
//! is named `ha-<pid>-<n>` under the kit's base dir, so a later start sweeps what a killed run
//! left, and `cargo xtask test`'s leftover check sees it.
//!
//! ```no_run
//! let ha = routing_testkit::HaStack::builder().members(3).start()?;
//! let leader = ha.wait_healthy(std::time::Duration::from_secs(60))?;
//! ha.switchover(None)?;
//! # let _ = leader;
//! # Ok::<(), routing_testkit::KitError>(())
//! ```

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::bins::{self, PgBins};
use crate::cluster::{default_base, percent_encode, template_sql};
use crate::proc::{self, RunAs};
use crate::{KitError, MONITOR_PASSWORD, MONITOR_ROLE, READER_PASSWORD, READER_ROLE, ports};
use crate::{WRITER_PASSWORD, WRITER_ROLE};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Patroni's DCS settings: a leader key lives 10 s, the HA loop runs every second.
pub const TTL_SECS: u64 = 10;
const LOOP_WAIT_SECS: u64 = 1;
const RETRY_TIMEOUT_SECS: u64 = 4;
const START_TIMEOUT: Duration = Duration::from_secs(90);
const HTTP_TIMEOUT: Duration = Duration::from_millis(500);

/// Shell functions: `cleanup` ends every process that runs in or names directory `$D` (Patroni
/// and helpers first, so nothing restarts PostgreSQL; then postmasters with SIGQUIT, the
/// immediate shutdown that also removes shared memory; then etcd and HAProxy), waits, kills
/// what is left and removes `$D`. A process counts as ours when its working directory is inside
/// `$D` (everything the stack starts runs there, PostgreSQL in its data dir) or its command line
/// names `$D`.
const CLEANUP: &str = r#"
running() {
  read -r l < "/proc/$1/stat" 2>/dev/null || return 1
  case "${l##*) }" in Z*|X*) return 1;; esac
  return 0
}
under() {
  c=$(readlink "/proc/$1/cwd" 2>/dev/null)
  case "$c" in "$D"|"$D"/*) return 0;; esac
  cl=$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null)
  case "$cl" in *"$D"/*|*"$D "*) return 0;; esac
  return 1
}
ours() {
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    under "$p" && running "$p" && echo "$p"
  done
}
comm() { cat "/proc/$1/comm" 2>/dev/null; }
cleanup() {
  for p in $(ours); do
    case "$(comm "$p")" in postgres|postmaster) ;; *) kill -KILL "$p" 2>/dev/null;; esac
  done
  for p in $(ours); do
    case "$(comm "$p")" in postgres|postmaster) kill -QUIT "$p" 2>/dev/null;; *) kill -KILL "$p" 2>/dev/null;; esac
  done
  i=0
  while [ $i -lt 50 ]; do
    left=$(ours)
    [ -z "$left" ] && break
    sleep 0.1
    i=$((i+1))
  done
  left=$(ours)
  [ -n "$left" ] && kill -KILL $left 2>/dev/null
  sleep 0.1
  rm -rf "$D"
}
"#;

/// Configures and starts an [`HaStack`].
#[derive(Debug, Clone)]
pub struct HaBuilder {
    members: usize,
    spares: usize,
    base_dir: Option<PathBuf>,
}

impl Default for HaBuilder {
    fn default() -> Self {
        HaBuilder {
            members: 3,
            spares: 0,
            base_dir: None,
        }
    }
}

impl HaBuilder {
    /// Number of PostgreSQL/Patroni members (default 3).
    pub fn members(mut self, n: usize) -> Self {
        self.members = n.max(1);
        self
    }

    /// Members configured (ports, Patroni config, an HAProxy server line) but not started:
    /// [`HaStack::add_member`] starts them one by one while the stack runs, and they join the
    /// cluster as replicas cloned from the leader (default 0).
    pub fn spares(mut self, n: usize) -> Self {
        self.spares = n;
        self
    }

    /// Parent of the stack's directory (default: the kit's, see
    /// [`crate::ClusterBuilder::base_dir`]).
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = Some(dir.into());
        self
    }

    /// Starts etcd, the Patroni members and HAProxy, waits for a leader, creates the router's
    /// least-privilege roles on it, and returns once every member runs with one synchronous
    /// standby. On error everything already started is stopped and removed.
    pub fn start(self) -> Result<HaStack, KitError> {
        let pg = bins::find_pg(None)?;
        let patroni = find_tool("patroni", "patroni")?;
        let patronictl = find_tool("patronictl", "patroni")?;
        let etcd = find_tool("etcd", "etcd-server")?;
        let haproxy = find_tool("haproxy", "haproxy")?;
        let run_as = proc::server_user()?;
        let base = self.base_dir.clone().unwrap_or_else(default_base);
        std::fs::create_dir_all(&base).map_err(|source| KitError::DataDir {
            path: base.clone(),
            source,
        })?;
        sweep(&base);
        let dir = base.join(format!(
            "ha-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|source| KitError::DataDir {
            path: dir.clone(),
            source,
        })?;
        proc::chown(&dir, run_as)?;
        let watchdog = spawn_watchdog(&dir).map_err(|source| KitError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let members = (0..self.members + self.spares)
            .map(|i| {
                Ok(Member {
                    name: format!("pg{i}"),
                    pg_port: ports::pick()?,
                    rest_port: ports::pick()?,
                    data_dir: dir.join(format!("pg{i}")),
                    config: dir.join(format!("patroni-pg{i}.yml")),
                    log: dir.join(format!("patroni-pg{i}.log")),
                    patroni: Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>, KitError>>()?;
        let stack = HaStack {
            scope: format!("ha{}x{}", std::process::id(), SEQ.load(Ordering::Relaxed)),
            etcd_client: ports::pick()?,
            etcd_peer: ports::pick()?,
            writer_port: ports::pick()?,
            reader_port: ports::pick()?,
            members,
            dir,
            run_as,
            pg,
            patroni,
            patronictl,
            etcd_bin: etcd,
            haproxy_bin: haproxy,
            etcd: Mutex::new(None),
            haproxy: Mutex::new(None),
            watchdog: Mutex::new(Some(watchdog)),
            stopped: std::sync::atomic::AtomicBool::new(false),
            active: AtomicUsize::new(self.members),
        };
        stack.boot()?;
        Ok(stack)
    }
}

fn find_tool(name: &str, package: &str) -> Result<PathBuf, KitError> {
    let searched: Vec<PathBuf> = ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(PathBuf::from)
        .collect();
    searched
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| KitError::MissingBinary {
            name: name.into(),
            package: package.into(),
            searched,
        })
}

/// One Patroni-managed PostgreSQL member.
#[derive(Debug)]
pub struct Member {
    name: String,
    pg_port: u16,
    rest_port: u16,
    data_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    patroni: Mutex<Option<Child>>,
}

impl Member {
    /// Patroni's member name (`pg0`, `pg1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// PostgreSQL's port.
    pub fn port(&self) -> u16 {
        self.pg_port
    }
    /// Patroni's REST API port.
    pub fn rest_port(&self) -> u16 {
        self.rest_port
    }
    /// PostgreSQL's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// A member as Patroni's `/cluster` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberState {
    /// Member name.
    pub name: String,
    /// `leader`, `sync_standby`, `replica`, ...
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped`, ...
    pub state: String,
    /// PostgreSQL host and port.
    pub host: String,
    /// PostgreSQL port.
    pub port: u16,
    /// Timeline.
    pub timeline: Option<u64>,
    /// Replication lag in bytes (replicas; `None` when unknown).
    pub lag: Option<u64>,
    /// Tag `nofailover`.
    pub nofailover: bool,
    /// Tag `noloadbalance`.
    pub noloadbalance: bool,
}

/// The running stack. Dropping it stops everything and removes its directory.
#[derive(Debug)]
pub struct HaStack {
    scope: String,
    etcd_client: u16,
    etcd_peer: u16,
    writer_port: u16,
    reader_port: u16,
    members: Vec<Member>,
    dir: PathBuf,
    run_as: Option<RunAs>,
    pg: PgBins,
    patroni: PathBuf,
    patronictl: PathBuf,
    etcd_bin: PathBuf,
    haproxy_bin: PathBuf,
    etcd: Mutex<Option<Child>>,
    haproxy: Mutex<Option<Child>>,
    watchdog: Mutex<Option<Child>>,
    stopped: std::sync::atomic::AtomicBool,
    /// Members started so far (the first ones; the rest are spares).
    active: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HaStack {
    /// A builder with three members.
    pub fn builder() -> HaBuilder {
        HaBuilder::default()
    }

    fn boot(&self) -> Result<(), KitError> {
        self.start_etcd()?;
        for i in 0..self.members.len() {
            self.write_patroni_config(i)?;
        }
        // The first member bootstraps alone, so it is the leader the others clone from.
        self.start_member(0)?;
        let leader_deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.leader() == Some(0) && self.psql(0, "SELECT 1").is_ok() {
                break;
            }
            if Instant::now() >= leader_deadline {
                return Err(self.start_error(0, "no leader after bootstrap"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.psql(0, &template_sql())?;
        for i in 1..self.active() {
            self.start_member(i)?;
        }
        self.write_haproxy_config()?;
        self.start_haproxy()?;
        self.wait_healthy(START_TIMEOUT)?;
        Ok(())
    }

    fn start_error(&self, i: usize, reason: &str) -> KitError {
        let m = &self.members[i];
        KitError::ServerStart {
            name: format!("patroni {}", m.name),
            reason: reason.into(),
            log: m.log.clone(),
            log_tail: proc::tail(&std::fs::read_to_string(&m.log).unwrap_or_default(), 30),
        }
    }

    fn spawn(&self, cmd: &mut Command, log: &Path) -> Result<Child, KitError> {
        proc::as_server(cmd, self.run_as);
        cmd.current_dir(&self.dir);
        let child = proc::spawn_detached(cmd, log)?;
        let _ = proc::chown(log, self.run_as);
        Ok(child)
    }

    fn start_etcd(&self) -> Result<(), KitError> {
        let data = self.dir.join("etcd");
        let log = self.dir.join("etcd.log");
        let (c, p) = (self.etcd_client, self.etcd_peer);
        let mut cmd = Command::new(&self.etcd_bin);
        cmd.arg("--name")
            .arg("e0")
            .arg("--data-dir")
            .arg(&data)
            .arg(format!("--listen-client-urls=http://127.0.0.1:{c}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{c}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{p}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{p}"
            ))
            .arg(format!("--initial-cluster=e0=http://127.0.0.1:{p}"))
            .arg("--initial-cluster-state=new");
        let child = self.spawn(&mut cmd, &log)?;
        *lock(&self.etcd) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(c, "/health").is_none_or(|(s, _)| s != 200) {
            if Instant::now() >= deadline {
                return Err(KitError::ServerStart {
                    name: "etcd".into(),
                    reason: "no healthy answer within 20 s".into(),
                    log: log.clone(),
                    log_tail: proc::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn write_patroni_config(&self, i: usize) -> Result<(), KitError> {
        let m = &self.members[i];
        let d = self.dir.display();
        let yml = format!(
            r#"scope: {scope}
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    ttl: {TTL_SECS}
    loop_wait: {LOOP_WAIT_SECS}
    retry_timeout: {RETRY_TIMEOUT_SECS}
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_wal_senders: 10
        max_replication_slots: 10
        max_connections: 200
        wal_keep_size: 128MB
  initdb:
    - encoding: UTF8
    - no-locale
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {d}/pgpass-{name}
  authentication:
    superuser:
      username: postgres
      password: postgres-secret
    replication:
      username: postgres
      password: postgres-secret
    rewind:
      username: postgres
      password: postgres-secret
  parameters:
    unix_socket_directories: '{d}'
  pg_hba:
    - local all postgres trust
    - local replication postgres trust
    - host all postgres 127.0.0.1/32 trust
    - host replication postgres 127.0.0.1/32 trust
    - host all routing_app,routing_monitor,routing_reader 127.0.0.1/32 trust
    - local all all scram-sha-256
    - host all all 127.0.0.1/32 scram-sha-256
watchdog:
  mode: "off"
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
"#,
            scope = self.scope,
            name = m.name,
            rest = m.rest_port,
            etcd = self.etcd_client,
            port = m.pg_port,
            data = m.data_dir.display(),
            bin = self.pg.dir.display(),
        );
        proc::write_owned(&m.config, &yml, self.run_as)
    }

    fn start_member(&self, i: usize) -> Result<(), KitError> {
        let m = &self.members[i];
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(&self.patroni).arg(&m.config);
        let child = self.spawn(&mut cmd, &m.log)?;
        *lock(&m.patroni) = Some(child);
        Ok(())
    }

    fn write_haproxy_config(&self) -> Result<(), KitError> {
        let servers = |check: &str| {
            let mut s = format!(
                "    option httpchk OPTIONS /{check}\n    http-check expect status 200\n    \
                 default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions\n"
            );
            for m in &self.members {
                s.push_str(&format!(
                    "    server {} 127.0.0.1:{} maxconn 200 check port {}\n",
                    m.name, m.pg_port, m.rest_port
                ));
            }
            s
        };
        let cfg = format!(
            "global\n    maxconn 2000\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    \
             timeout client 30m\n    timeout server 30m\n    timeout check 1s\n\n\
             listen writer\n    bind 127.0.0.1:{w}\n{ws}\n\
             listen reader\n    bind 127.0.0.1:{r}\n    balance roundrobin\n{rs}",
            w = self.writer_port,
            r = self.reader_port,
            ws = servers("primary"),
            rs = servers("replica"),
        );
        proc::write_owned(&self.dir.join("haproxy.cfg"), &cfg, self.run_as)
    }

    fn start_haproxy(&self) -> Result<(), KitError> {
        let log = self.dir.join("haproxy.log");
        let mut cmd = Command::new(&self.haproxy_bin);
        cmd.arg("-db").arg("-f").arg(self.dir.join("haproxy.cfg"));
        let child = self.spawn(&mut cmd, &log)?;
        *lock(&self.haproxy) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, self.writer_port)),
            HTTP_TIMEOUT,
        )
        .is_err()
        {
            if Instant::now() >= deadline {
                return Err(KitError::ServerStart {
                    name: "haproxy".into(),
                    reason: "writer frontend not listening within 10 s".into(),
                    log: log.clone(),
                    log_tail: proc::tail(&std::fs::read_to_string(&log).unwrap_or_default(), 30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The members, spares not started yet included (see [`HaStack::active`]).
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// How many members were started (the first ones of [`HaStack::members`]).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Starts the next spare member ([`HaBuilder::spares`]) while the stack runs; returns its
    /// index. Patroni clones it from the leader and it joins as a replica; this does not wait
    /// for that ([`HaStack::wait_healthy`] does).
    pub fn add_member(&self) -> Result<usize, KitError> {
        let i = self.active();
        if i >= self.members.len() {
            return Err(KitError::Timeout {
                what: "add_member: no spare member left (HaBuilder::spares)".into(),
            });
        }
        self.start_member(i)?;
        self.active.store(i + 1, Ordering::SeqCst);
        Ok(i)
    }

    /// The stack's directory (configs, logs, data dirs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Patroni's scope (cluster name).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// HAProxy's writer frontend port (`OPTIONS /primary`).
    pub fn writer_port(&self) -> u16 {
        self.writer_port
    }

    /// HAProxy's reader frontend port (`OPTIONS /replica`, round robin).
    pub fn reader_port(&self) -> u16 {
        self.reader_port
    }

    /// etcd's client port.
    pub fn etcd_port(&self) -> u16 {
        self.etcd_client
    }

    /// Patroni's `/cluster` as seen by the first member that answers within a short timeout.
    pub fn cluster(&self) -> Option<Vec<MemberState>> {
        self.members.iter().find_map(|m| {
            let (status, body) = http_get(m.rest_port, "/cluster")?;
            (status == 200).then(|| parse_cluster(&body))?
        })
    }

    /// The index of the member Patroni lists as leader and that runs.
    pub fn leader(&self) -> Option<usize> {
        let c = self.cluster()?;
        let l = c
            .iter()
            .find(|s| s.role == "leader" && s.state == "running")?;
        self.members.iter().position(|m| m.name == l.name)
    }

    /// Waits until every member runs, one is leader and (with more than one member) one is the
    /// synchronous standby, and every replica's lag is known to be zero; returns the leader.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<usize, KitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.cluster() {
                let active = self.active();
                let all_run = c.len() == active
                    && c.iter()
                        .all(|s| matches!(s.state.as_str(), "running" | "streaming"));
                let sync = active == 1 || c.iter().any(|s| s.role == "sync_standby");
                let caught_up = c
                    .iter()
                    .filter(|s| s.role != "leader")
                    .all(|s| s.lag == Some(0));
                if all_run
                    && sync
                    && caught_up
                    && let Some(l) = self.leader()
                    && self.psql(l, "SELECT 1").is_ok()
                {
                    return Ok(l);
                }
            }
            if Instant::now() >= deadline {
                return Err(KitError::Timeout {
                    what: format!(
                        "HA stack healthy (3 running, a sync standby): last /cluster {:?}",
                        self.cluster()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `patronictl switchover --force` from the current leader to `candidate` (or Patroni's
    /// choice, the synchronous standby).
    pub fn switchover(&self, candidate: Option<usize>) -> Result<(), KitError> {
        let leader = self.leader().ok_or_else(|| KitError::Timeout {
            what: "switchover: no leader".into(),
        })?;
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(&self.patronictl)
            .arg("-c")
            .arg(&self.members[leader].config)
            .arg("switchover")
            .arg("--leader")
            .arg(&self.members[leader].name)
            .arg("--force");
        if let Some(c) = candidate {
            cmd.arg("--candidate").arg(&self.members[c].name);
        }
        cmd.arg(&self.scope);
        proc::as_server(&mut cmd, self.run_as);
        cmd.current_dir(&self.dir);
        proc::run(
            &mut cmd,
            None,
            Duration::from_secs(60),
            "patronictl switchover",
        )?;
        Ok(())
    }

    /// The postmaster's pid of member `i`, from its `postmaster.pid`, if it runs.
    pub fn postmaster_pid(&self, i: usize) -> Option<u32> {
        let text = std::fs::read_to_string(self.members[i].data_dir.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        proc::pid_alive(pid).then_some(pid)
    }

    /// Kills member `i`'s postmaster with SIGKILL (its backends follow it); Patroni restarts it.
    pub fn crash_postmaster(&self, i: usize) -> Result<(), KitError> {
        let pid = self.postmaster_pid(i).ok_or_else(|| KitError::Timeout {
            what: format!("{}: no running postmaster", self.members[i].name),
        })?;
        proc::signal(&[pid], "KILL");
        Ok(())
    }

    /// Kills member `i` whole: its Patroni and every PostgreSQL process, with SIGKILL, at once.
    pub fn kill_member(&self, i: usize) -> Result<(), KitError> {
        let m = &self.members[i];
        let mut targets = Vec::new();
        if let Some(child) = lock(&m.patroni).as_ref() {
            // spawn_detached made Patroni a process group leader.
            targets.push(format!("-{}", child.id()));
        }
        // Patroni starts the postmaster in a session of its own.
        if let Some(pid) = self.postmaster_pid(i) {
            match process_group(pid) {
                Some(pgid) if pgid > 1 => targets.push(format!("-{pgid}")),
                _ => targets.push(pid.to_string()),
            }
        }
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("kill -KILL \"$@\" 2>/dev/null; exit 0")
            .arg("sh")
            .args(&targets);
        proc::run(&mut cmd, None, Duration::from_secs(5), "kill member")?;
        if let Some(mut child) = lock(&m.patroni).take() {
            let _ = child.wait();
        }
        // Wait for every process of the data dir to be gone, so a restart finds it free.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.postmaster_pid(i).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts member `i`'s Patroni again (after [`HaStack::kill_member`]); it rejoins as a
    /// replica (rewinding if needed).
    pub fn restart_member(&self, i: usize) -> Result<(), KitError> {
        if lock(&self.members[i].patroni).is_some() {
            return Ok(());
        }
        self.start_member(i)
    }

    /// Runs SQL on member `i` as the superuser with `psql` (rows one per line, `|` between
    /// columns).
    pub fn psql(&self, i: usize, sql: &str) -> Result<String, KitError> {
        let mut cmd = Command::new(self.pg.tool("psql"));
        cmd.args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U"])
            .arg("postgres")
            .arg("-p")
            .arg(self.members[i].pg_port.to_string())
            .arg("-d")
            .arg("postgres");
        proc::clean_env(&mut cmd);
        cmd.env("PGCONNECT_TIMEOUT", "3");
        let out = proc::run(
            &mut cmd,
            Some(sql),
            Duration::from_secs(30),
            &format!("psql on {}", self.members[i].name),
        )?;
        Ok(out.stdout.trim().to_string())
    }

    /// URL of `port` (a member's or a frontend's) for the kit's least-privilege writer role.
    pub fn writer_url(port: u16) -> String {
        format!(
            "postgres://{WRITER_ROLE}:{}@127.0.0.1:{port}/postgres",
            percent_encode(WRITER_PASSWORD)
        )
    }

    /// URL of `port` for the kit's read-only role.
    pub fn reader_url(port: u16) -> String {
        format!(
            "postgres://{READER_ROLE}:{}@127.0.0.1:{port}/postgres",
            percent_encode(READER_PASSWORD)
        )
    }

    /// URL of `port` for the kit's monitoring role.
    pub fn monitor_url(port: u16) -> String {
        format!(
            "postgres://{MONITOR_ROLE}:{}@127.0.0.1:{port}/postgres",
            percent_encode(MONITOR_PASSWORD)
        )
    }

    /// Superuser URL of `port` (inspection, fault probes; not for routers).
    pub fn superuser_url(port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    /// The router's nodes behind HAProxy: the writer frontend as a writer candidate and the
    /// reader frontend as a load-balanced replica.
    pub fn haproxy_node_configs(&self) -> Vec<routing_core::NodeConfig> {
        vec![
            routing_core::NodeConfig::writer("haproxy-writer", Self::writer_url(self.writer_port))
                .reader_url(Self::reader_url(self.writer_port))
                .monitor_url(Self::monitor_url(self.writer_port)),
            routing_core::NodeConfig::replica("haproxy-reader", Self::writer_url(self.reader_port))
                .reader_url(Self::reader_url(self.reader_port))
                .monitor_url(Self::monitor_url(self.reader_port))
                .load_balanced(),
        ]
    }

    /// The router's nodes listed directly: every member a writer candidate (Patroni may promote
    /// any of them; the monitor decides roles from the servers).
    pub fn direct_node_configs(&self) -> Vec<routing_core::NodeConfig> {
        self.members[..self.active()]
            .iter()
            .map(|m| {
                routing_core::NodeConfig::writer(m.name.clone(), Self::writer_url(m.pg_port))
                    .reader_url(Self::reader_url(m.pg_port))
                    .monitor_url(Self::monitor_url(m.pg_port))
            })
            .collect()
    }

    /// Stops everything and removes the directory (what drop does; once).
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        cleanup_now(&self.dir);
        for m in &self.members {
            if let Some(mut c) = lock(&m.patroni).take() {
                let _ = c.wait();
            }
        }
        for c in [&self.etcd, &self.haproxy] {
            if let Some(mut c) = lock(c).take() {
                let _ = c.wait();
            }
        }
        if let Some(mut w) = lock(&self.watchdog).take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let mut used = vec![
            self.etcd_client,
            self.etcd_peer,
            self.writer_port,
            self.reader_port,
        ];
        for m in &self.members {
            used.push(m.pg_port);
            used.push(m.rest_port);
        }
        ports::release(used);
    }
}

impl Drop for HaStack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Field 5 of /proc/<pid>/stat: the process group.
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok()
}

/// A plain HTTP/1.0 GET on 127.0.0.1:`port` with a short timeout: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).ok()?;
    s.set_read_timeout(Some(HTTP_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(HTTP_TIMEOUT)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Parses Patroni's `/cluster` answer.
pub fn parse_cluster(body: &str) -> Option<Vec<MemberState>> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let members = v.get("members")?.as_array()?;
    Some(
        members
            .iter()
            .filter_map(|m| {
                let tags = m.get("tags");
                let tag = |k: &str| {
                    tags.and_then(|t| t.get(k))
                        .and_then(|b| b.as_bool())
                        .unwrap_or(false)
                };
                Some(MemberState {
                    name: m.get("name")?.as_str()?.to_string(),
                    role: m.get("role")?.as_str()?.to_string(),
                    state: m.get("state")?.as_str()?.to_string(),
                    host: m.get("host")?.as_str()?.to_string(),
                    port: u16::try_from(m.get("port")?.as_u64()?).ok()?,
                    timeline: m.get("timeline").and_then(|t| t.as_u64()),
                    lag: m.get("lag").and_then(|l| l.as_u64()),
                    nofailover: tag("nofailover"),
                    noloadbalance: tag("noloadbalance"),
                })
            })
            .collect(),
    )
}

fn spawn_watchdog(dir: &Path) -> std::io::Result<Child> {
    let script = format!("{CLEANUP}\nwhile running \"$P\"; do sleep 0.2; done\ncleanup");
    Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .env("P", std::process::id().to_string())
        .env("D", dir)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
}

fn cleanup_now(dir: &Path) {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("{CLEANUP}\ncleanup"))
        .env("D", dir)
        .current_dir("/");
    let _ = proc::run(&mut cmd, None, Duration::from_secs(60), "HA stack cleanup");
}

/// The owning pid of an HA stack directory name (`ha-<pid>-<n>`).
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("ha-")?.split('-').next()?.parse().ok()
}

/// Stops and removes HA stacks under `base` whose owning process is dead.
pub fn sweep(base: &Path) {
    for d in crate::cleanup::orphaned_dirs(base, owner_pid) {
        cleanup_now(&d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner() {
        assert_eq!(owner_pid("ha-123-4"), Some(123));
        assert_eq!(owner_pid("c-123-4"), None);
    }

    #[test]
    fn parses_patroni_cluster() {
        let body = r#"{"members": [
          {"name": "pg0", "role": "leader", "state": "running", "api_url": "http://127.0.0.1:8008/patroni",
           "host": "127.0.0.1", "port": 5432, "timeline": 2},
          {"name": "pg1", "role": "sync_standby", "state": "streaming", "host": "127.0.0.1",
           "port": 5433, "timeline": 2, "lag": 0, "tags": {"nofailover": true}},
          {"name": "pg2", "role": "replica", "state": "running", "host": "127.0.0.1",
           "port": 5434, "timeline": 2, "lag": "unknown", "tags": {"noloadbalance": true}}]}"#;
        let c = parse_cluster(body).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].role, "leader");
        assert_eq!(c[1].lag, Some(0));
        assert!(c[1].nofailover && !c[1].noloadbalance);
        assert_eq!(c[2].lag, None);
        assert!(c[2].noloadbalance);
    }
}
