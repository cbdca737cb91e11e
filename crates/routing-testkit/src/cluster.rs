//! The cluster: a primary and streaming replicas from the system's PostgreSQL, plus Redis.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::bins::{self, PgBins};
use crate::proc::{self, RunAs};
use crate::proxy::FaultProxy;
use crate::{KitError, cleanup, ports};

/// Password of the `app` role (LOGIN SUPERUSER, scram-sha-256), for tests that need real auth.
pub const APP_PASSWORD: &str = "app-secret";
/// Role that may read everything and write nothing (`pg_read_all_data`; trusted on loopback
/// like the other router roles): what a router's read sessions log in as
/// ([`Cluster::reader_url`]), so that no `BEGIN READ WRITE` on the primary can write through
/// one.
pub const READER_ROLE: &str = "routing_reader";
/// Password of [`READER_ROLE`].
pub const READER_PASSWORD: &str = "reader-secret";
/// The application's writer role a router's write sessions log in as ([`Cluster::writer_url`]):
/// `LOGIN`, not a superuser, with `CREATE` on schema `public` (PostgreSQL 15 no longer grants it
/// to PUBLIC) so tests can create their tables, which it then owns; and, through default
/// privileges, `SELECT, INSERT, UPDATE, DELETE` on tables (and `USAGE, SELECT` on sequences)
/// that the superuser creates in `public` with [`Cluster::psql`], as a migration role would.
pub const WRITER_ROLE: &str = "routing_app";
/// Password of [`WRITER_ROLE`] (carried in its URLs; the kit lets the role in on loopback
/// without a password exchange, like the superuser, to keep logins cheap).
pub const WRITER_PASSWORD: &str = "writer-secret";
/// The monitoring role a router's probes log in as ([`Cluster::monitor_url`]): `LOGIN`,
/// `IN ROLE pg_monitor` and nothing else. `pg_monitor` (through `pg_read_all_stats`) is what
/// shows a replica's timeline in `pg_stat_wal_receiver`; the rest of the probe, the system
/// identifier (`pg_control_system()`) included, is executable by PUBLIC.
pub const MONITOR_ROLE: &str = "routing_monitor";
/// Password of [`MONITOR_ROLE`] (carried in its URLs; like [`WRITER_PASSWORD`], not checked).
pub const MONITOR_PASSWORD: &str = "monitor-secret";

/// Bump when the template's content changes, so caches from older kits are not reused.
const TEMPLATE_VERSION: u32 = 6;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Long enough for `pg_promote(true, 30)`.
const SQL_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);
/// Retries with a fresh port when a picked port was grabbed by someone else before the server bound it.
const PORT_RETRIES: usize = 3;

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another test thread must not make the cluster unusable (or undroppable).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Configures and starts a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    replicas: usize,
    synchronous: bool,
    redis: bool,
    primary_port: Option<u16>,
    base_dir: Option<PathBuf>,
    pg_bin_dir: Option<PathBuf>,
    redis_bin: Option<PathBuf>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterBuilder {
    /// Two async replicas, no Redis, free ports, default base dir (see [`ClusterBuilder::base_dir`]).
    pub fn new() -> Self {
        ClusterBuilder {
            replicas: 2,
            synchronous: false,
            redis: false,
            primary_port: None,
            base_dir: None,
            pg_bin_dir: None,
            redis_bin: None,
        }
    }

    /// Number of streaming replicas (nodes 1..=n).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// Quorum-synchronous replication: `synchronous_standby_names = 'ANY 1 (*)'` on the primary
    /// (node 0 only: a promoted replica runs asynchronous, so it never blocks on missing standbys).
    pub fn synchronous(mut self, on: bool) -> Self {
        self.synchronous = on;
        self
    }

    /// Also start a `redis-server` (no persistence).
    pub fn with_redis(mut self, on: bool) -> Self {
        self.redis = on;
        self
    }

    /// Pins the primary's port (for "port taken" tests); a taken port is [`KitError::PortInUse`],
    /// never a retry elsewhere.
    pub fn primary_port(mut self, port: u16) -> Self {
        self.primary_port = Some(port);
        self
    }

    /// Parent of the cluster's directory. Default: `$ROUTING_TESTKIT_DIR`, else
    /// `/dev/shm/routing-testkit` if that tmpfs has 2 GiB free (much faster), else
    /// `std::env::temp_dir()/routing-testkit`.
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = Some(dir.into());
        self
    }

    /// Uses PostgreSQL binaries from this directory only (default: PATH, then the highest
    /// `/usr/lib/postgresql/*/bin`). Mostly for testing the missing-binary error.
    pub fn pg_bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pg_bin_dir = Some(dir.into());
        self
    }

    /// Uses this `redis-server` executable (default: PATH, then /usr/bin, /usr/local/bin).
    pub fn redis_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.redis_bin = Some(path.into());
        self
    }

    /// Starts everything and returns once every replica streams from the primary (and Redis
    /// answers PING). On error everything already started is stopped and removed.
    pub fn start(self) -> Result<Cluster, KitError> {
        let pg = bins::find_pg(self.pg_bin_dir.as_deref())?;
        let redis_bin = if self.redis {
            Some(bins::find_redis(self.redis_bin.as_deref())?)
        } else {
            None
        };
        let run_as = proc::server_user()?;
        let base = self.base_dir.clone().unwrap_or_else(default_base);
        prepare_base(&base, run_as)?;
        cleanup::sweep(&base);

        // Fail fast on a taken pinned port, before any copying.
        let primary_port = match self.primary_port {
            Some(p) => ports::claim(p)?,
            None => ports::pick()?,
        };
        let template = ensure_template(&pg, &base, run_as)?;

        let dir = base.join(format!(
            "c-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|source| KitError::DataDir {
            path: dir.clone(),
            source,
        })?;
        proc::chown(&dir, run_as)?;
        // Started before any server, so a SIGKILLed test still gets everything cleaned.
        let watchdog = match cleanup::spawn_watchdog(&dir) {
            Ok(w) => w,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(KitError::DataDir { path: dir, source });
            }
        };

        let mut nodes = Vec::with_capacity(self.replicas + 1);
        for i in 0..=self.replicas {
            let port = if i == 0 { primary_port } else { ports::pick()? };
            let name = format!("pg{i}");
            nodes.push(Node {
                data_dir: dir.join(&name),
                log: dir.join(format!("{name}.log")),
                name,
                port: AtomicU16::new(port),
            });
        }
        let redis = match redis_bin {
            Some(bin) => Some(Redis {
                port: AtomicU16::new(ports::pick()?),
                bin,
                log: dir.join("redis.log"),
                child: Mutex::new(None),
            }),
            None => None,
        };
        // Unix sockets have a ~107 byte path limit; a deep base dir falls back to TCP only.
        let socket_dir = (dir.join(".s.PGSQL.65535").as_os_str().len() < 100).then(|| dir.clone());
        let cluster = Cluster {
            procs: nodes.iter().map(|_| Mutex::new(None)).collect(),
            nodes,
            dir,
            socket_dir,
            primary: AtomicUsize::new(0),
            pg,
            run_as,
            synchronous: self.synchronous,
            pinned_primary: self.primary_port.is_some(),
            redis,
            watchdog: Mutex::new(Some(watchdog)),
        };
        cluster.boot(&template)?;
        Ok(cluster)
    }
}

/// Where clusters go when the caller does not say: `$ROUTING_TESTKIT_DIR`, else
/// `/dev/shm/routing-testkit` when that tmpfs has room (on this kind of VM, writing the ~70 MB of
/// three data dirs to disk takes ~2.5 s; to tmpfs ~0.15 s), else `temp_dir()/routing-testkit`.
pub(crate) fn default_base() -> PathBuf {
    if let Some(d) = std::env::var_os("ROUTING_TESTKIT_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && available_kib(shm).is_some_and(|k| k >= 2 * 1024 * 1024) {
        return shm.join("routing-testkit");
    }
    std::env::temp_dir().join("routing-testkit")
}

/// Free space via `df` (no libc statvfs under the workspace's deny(unsafe_code)).
fn available_kib(dir: &Path) -> Option<u64> {
    let mut cmd = Command::new("df");
    cmd.arg("-Pk").arg(dir);
    let out = proc::run(&mut cmd, None, Duration::from_secs(5), "df").ok()?;
    out.stdout
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// Creates the base dir and checks that the server user can reach into it.
fn prepare_base(base: &Path, run_as: Option<RunAs>) -> Result<(), KitError> {
    let existed = base.is_dir();
    std::fs::create_dir_all(base).map_err(|source| KitError::DataDir {
        path: base.to_path_buf(),
        source,
    })?;
    if !existed {
        // Like /tmp: every user can make clusters here (root runs servers as `postgres`, other
        // users as themselves), and nobody can delete another's.
        let _ = std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o1777));
    }
    if let Some(r) = run_as {
        // The postgres user must traverse every ancestor, or the server fails obscurely later.
        let abs = std::fs::canonicalize(base).map_err(|source| KitError::DataDir {
            path: base.to_path_buf(),
            source,
        })?;
        for dir in abs.ancestors() {
            let m = std::fs::metadata(dir).map_err(|source| KitError::DataDir {
                path: dir.to_path_buf(),
                source,
            })?;
            let mode = m.mode();
            let ok = (m.uid() == r.uid && mode & 0o100 != 0)
                || (m.gid() == r.gid && mode & 0o010 != 0)
                || mode & 0o001 != 0;
            if !ok {
                return Err(KitError::DataDir {
                    path: dir.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "the `postgres` OS user cannot enter this directory (needs o+x); choose another base_dir",
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The least-privilege roles every router uses ([`WRITER_ROLE`], [`MONITOR_ROLE`]) log in like
/// the superuser, without a password exchange: their privileges are what tests check, and a
/// SCRAM login takes ~0.1 s in a debug build (over a second on a loaded 2-core machine, against
/// tens of milliseconds without), which failover tests, opening dozens of sessions at once, and the monitor, renewing
/// its session every second, cannot afford. `app` and [`READER_ROLE`] keep real passwords.
const PG_HBA: &str = "\
# routing-testkit: trust for the superuser, replication and the router's least-privilege roles
# (their privileges are what tests check; SCRAM in a debug build costs up to seconds a login on
# a loaded machine), real passwords for `app`, which the authentication tests use
local   all          postgres                 trust
local   replication  postgres                 trust
host    all          postgres  127.0.0.1/32   trust
host    replication  postgres  127.0.0.1/32   trust
host    all          routing_app,routing_monitor,routing_reader  127.0.0.1/32  trust
local   all          all                      scram-sha-256
host    all          all       127.0.0.1/32   scram-sha-256
";

/// Returns a cleanly shut down, initialised data directory to copy nodes from.
///
/// initdb is the slow part of a start (~1 s), so it runs once and the result is kept under the
/// base dir for later clusters and later test processes. The key covers the binary and the kit's
/// template version; it is built under a pid-named temp name and renamed into place, so a
/// half-built template is never used and a crashed build is swept like a stale cluster.
fn ensure_template(pg: &PgBins, base: &Path, run_as: Option<RunAs>) -> Result<PathBuf, KitError> {
    static BUILDING: Mutex<()> = Mutex::new(());
    let _g = lock(&BUILDING);

    let postgres = pg.tool("postgres");
    let meta = std::fs::metadata(&postgres)?;
    let key = fnv1a(&format!(
        "{}|{}|{}|{:?}|{TEMPLATE_VERSION}|{PG_HBA}|{}",
        postgres.display(),
        meta.mtime(),
        meta.size(),
        run_as.map(|r| r.uid),
        template_sql()
    ));
    let final_dir = base.join(format!("template-v{TEMPLATE_VERSION}-{key:016x}"));
    let data = final_dir.join("data");
    if final_dir.join("ok").is_file() {
        return Ok(data);
    }
    let _ = std::fs::remove_dir_all(&final_dir); // a dir without "ok" is junk

    let tmp = base.join(format!(
        "t-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&tmp).map_err(|source| KitError::DataDir {
        path: tmp.clone(),
        source,
    })?;
    let built = build_template(pg, &tmp, run_as);
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if std::fs::rename(&tmp, &final_dir).is_err() {
        // Another process won the race; its template is as good as ours.
        let _ = std::fs::remove_dir_all(&tmp);
        if !final_dir.join("ok").is_file() {
            return Err(KitError::DataDir {
                path: final_dir,
                source: std::io::Error::other("could not install the initdb template"),
            });
        }
    }
    Ok(data)
}

fn build_template(pg: &PgBins, tmp: &Path, run_as: Option<RunAs>) -> Result<(), KitError> {
    proc::chown(tmp, run_as)?;
    let data = tmp.join("data");
    let mut initdb = Command::new(pg.tool("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "-N",
        ])
        // 1 MB WAL segments instead of 16: the template (copied once per node) shrinks by 15 MB.
        .arg("--wal-segsize=1")
        .current_dir(tmp);
    proc::as_server(&mut initdb, run_as);
    proc::run(&mut initdb, None, Duration::from_secs(120), "initdb")?;

    proc::write_owned(&data.join("pg_hba.conf"), PG_HBA, run_as)?;
    let conf = data.join("postgresql.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(|source| KitError::DataDir {
            path: conf.clone(),
            source,
        })?;
    // Per-node settings (port, sockets, ...) live in testkit.conf, written for each node.
    writeln!(f, "\ninclude_if_exists = 'testkit.conf'")?;

    // Single-user mode creates the role without a port or socket, and ends with a clean
    // shutdown checkpoint, which is what makes a plain copy of the directory a valid base.
    let mut single = Command::new(pg.tool("postgres"));
    single
        .arg("--single")
        .arg("-D")
        .arg(&data)
        .args([
            "-F",
            "-c",
            "exit_on_error=true",
            "-c",
            "password_encryption=scram-sha-256",
        ])
        .arg("postgres")
        .current_dir(tmp);
    proc::as_server(&mut single, run_as);
    let sql = template_sql();
    proc::run(
        &mut single,
        Some(&sql),
        Duration::from_secs(60),
        "postgres --single (create roles)",
    )?;
    std::fs::write(tmp.join("ok"), "")?;
    Ok(())
}

/// The roles and grants every cluster starts with (run in single-user mode, one statement a
/// line). Part of the template's cache key, so a template with other roles is never reused.
pub(crate) fn template_sql() -> String {
    format!(
        "CREATE ROLE app LOGIN SUPERUSER PASSWORD '{APP_PASSWORD}';\n\
         CREATE ROLE {READER_ROLE} LOGIN PASSWORD '{READER_PASSWORD}' IN ROLE pg_read_all_data;\n\
         CREATE ROLE {WRITER_ROLE} LOGIN PASSWORD '{WRITER_PASSWORD}';\n\
         GRANT CREATE ON SCHEMA public TO {WRITER_ROLE};\n\
         ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public \
           GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {WRITER_ROLE};\n\
         ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public \
           GRANT USAGE, SELECT ON SEQUENCES TO {WRITER_ROLE};\n\
         CREATE ROLE {MONITOR_ROLE} LOGIN PASSWORD '{MONITOR_PASSWORD}' IN ROLE pg_monitor;\n"
    )
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// One PostgreSQL server of a cluster.
#[derive(Debug)]
pub struct Node {
    name: String,
    port: AtomicU16,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Node {
    /// `pg0` (initial primary), `pg1`, ...; replicas use it as their `application_name`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }
    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    /// The server log (stdout and stderr of the postmaster), kept across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()))
    }
}

#[derive(Debug)]
struct Redis {
    port: AtomicU16,
    bin: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

/// A running primary, its replicas and optionally Redis, in one throwaway directory.
///
/// Dropping it stops every process (immediate shutdown) and removes the directory, also while a
/// test panics.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    socket_dir: Option<PathBuf>,
    nodes: Vec<Node>,
    /// The postmaster of each node while it runs (the kit spawns `postgres` itself, so it can
    /// see an early exit and reap it).
    procs: Vec<Mutex<Option<Child>>>,
    primary: AtomicUsize,
    pg: PgBins,
    run_as: Option<RunAs>,
    synchronous: bool,
    pinned_primary: bool,
    redis: Option<Redis>,
    watchdog: Mutex<Option<Child>>,
}

impl Cluster {
    fn boot(&self, template: &Path) -> Result<(), KitError> {
        std::thread::scope(|s| {
            let redis = self
                .redis
                .as_ref()
                .map(|_| s.spawn(|| self.start_redis(true)));
            let pg = (|| {
                // Copies are independent: run them side by side.
                let copies: Vec<_> = self
                    .nodes
                    .iter()
                    .map(|n| s.spawn(move || self.copy_template(template, n)))
                    .collect();
                for c in copies {
                    c.join()
                        .map_err(|_| std::io::Error::other("copy thread panicked"))??;
                }
                self.start_node(0, !self.pinned_primary)?;
                let replicas: Vec<_> = (1..self.nodes.len())
                    .map(|i| {
                        s.spawn(move || {
                            self.write_standby(i)?;
                            self.start_node(i, true)
                        })
                    })
                    .collect();
                for r in replicas {
                    r.join()
                        .map_err(|_| std::io::Error::other("start thread panicked"))??;
                }
                self.wait_streaming(self.nodes.len() - 1)
            })();
            let redis = match redis {
                Some(h) => h
                    .join()
                    .map_err(|_| KitError::Io(std::io::Error::other("redis thread panicked")))?,
                None => Ok(()),
            };
            pg.and(redis)
        })
    }

    fn copy_template(&self, template: &Path, node: &Node) -> Result<(), KitError> {
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(template).arg(&node.data_dir);
        proc::run(
            &mut cp,
            None,
            Duration::from_secs(120),
            &format!("copying the template to {}", node.data_dir.display()),
        )?;
        Ok(())
    }

    fn write_conf(&self, i: usize) -> Result<(), KitError> {
        let n = &self.nodes[i];
        let sockets = self
            .socket_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let mut conf = format!(
            "# written by routing-testkit for {name}\n\
             port = {port}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{sockets}'\n\
             fsync = off\n\
             synchronous_commit = on\n\
             shared_buffers = 16MB\n\
             max_connections = 100\n\
             max_wal_senders = 16\n\
             max_replication_slots = 16\n\
             wal_keep_size = '256MB'\n\
             hot_standby = on\n\
             hot_standby_feedback = on\n\
             wal_receiver_status_interval = 1s\n\
             wal_retrieve_retry_interval = 200ms\n\
             jit = off\n\
             log_line_prefix = '%m [%p] %q%a '\n",
            name = n.name,
            port = n.port(),
        );
        if i == 0 && self.synchronous {
            conf.push_str("synchronous_standby_names = 'ANY 1 (*)'\n");
        }
        proc::write_owned(&n.data_dir.join("testkit.conf"), &conf, self.run_as)
    }

    fn conninfo_for(&self, replica: usize, primary: usize) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres application_name={}",
            self.nodes[primary].port(),
            self.nodes[replica].name
        )
    }

    /// A plain copy of the cleanly stopped template is a valid standby base: it has the same
    /// system identifier and starts replay at the shutdown checkpoint, which the primary still has.
    fn write_standby(&self, i: usize) -> Result<(), KitError> {
        let d = &self.nodes[i].data_dir;
        proc::write_owned(&d.join("standby.signal"), "", self.run_as)?;
        let auto = format!(
            "# Do not edit this file manually!\n\
             # It will be overwritten by the ALTER SYSTEM command.\n\
             primary_conninfo = '{}'\n",
            self.conninfo_for(i, 0)
        );
        proc::write_owned(&d.join("postgresql.auto.conf"), &auto, self.run_as)
    }

    /// Starts node `i` and waits until it accepts connections; a port grabbed by someone else
    /// in the meantime is retried elsewhere when `may_repick`.
    fn start_node(&self, i: usize, may_repick: bool) -> Result<(), KitError> {
        let mut attempt = 0;
        loop {
            self.write_conf(i)?;
            match self.spawn_pg(i) {
                Err(KitError::PortInUse { port }) if may_repick && attempt < PORT_RETRIES => {
                    attempt += 1;
                    let new = ports::pick()?;
                    self.nodes[i].port.store(new, Ordering::SeqCst);
                    ports::release([port]);
                }
                other => return other,
            }
        }
    }

    fn spawn_pg(&self, i: usize) -> Result<(), KitError> {
        let n = &self.nodes[i];
        let log_start = std::fs::metadata(&n.log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(self.pg.tool("postgres"));
        cmd.arg("-D").arg(&n.data_dir).current_dir(&n.data_dir);
        proc::as_server(&mut cmd, self.run_as);
        let mut child = proc::spawn_detached(&mut cmd, &n.log)?;
        let pid = child.id();
        let deadline = Instant::now() + START_TIMEOUT;
        let pidfile = n.data_dir.join("postmaster.pid");
        loop {
            if let Some(status) = child.try_wait()? {
                let log = read_from(&n.log, log_start);
                if log.contains("Address already in use") {
                    return Err(KitError::PortInUse { port: n.port() });
                }
                return Err(KitError::ServerStart {
                    name: n.name.clone(),
                    reason: format!("postgres exited ({status})"),
                    log: n.log.clone(),
                    log_tail: proc::tail(&log, 20),
                });
            }
            // pg_ctl's own readiness test: the postmaster writes its status into line 8.
            if let Ok(s) = std::fs::read_to_string(&pidfile) {
                let lines: Vec<&str> = s.lines().collect();
                if lines.first().map(|l| l.trim()) == Some(&pid.to_string())
                    && matches!(lines.get(7).map(|l| l.trim()), Some("ready" | "standby"))
                {
                    *lock(&self.procs[i]) = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(KitError::ServerStart {
                    name: n.name.clone(),
                    reason: format!("not accepting connections after {START_TIMEOUT:?}"),
                    log: n.log.clone(),
                    log_tail: proc::tail(&read_from(&n.log, log_start), 20),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the primary reports `n` streaming replicas.
    fn wait_streaming(&self, n: usize) -> Result<(), KitError> {
        if n == 0 {
            return Ok(());
        }
        let sql = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'";
        self.poll_until(
            0,
            sql,
            START_TIMEOUT,
            &format!("{n} replicas streaming from pg0"),
            |out| out.parse::<usize>().map(|c| c >= n).unwrap_or(false),
        )
    }

    /// Re-runs `sql` on node `i` until `done(output)`; connection errors count as "not yet".
    fn poll_until(
        &self,
        i: usize,
        sql: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> Result<(), KitError> {
        let deadline = Instant::now() + timeout;
        loop {
            // A wedged server must not stretch the caller's timeout by a whole SQL_TIMEOUT.
            let left = deadline.saturating_duration_since(Instant::now());
            let per_call = (left + Duration::from_secs(1)).min(SQL_TIMEOUT);
            let last = match self.psql_timeout(i, &[sql], per_call) {
                Ok(out) if done(&out) => return Ok(()),
                Ok(out) => out,
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(KitError::Timeout {
                    what: format!(
                        "{what} (after {timeout:?}; last answer: {last}; log: {})",
                        self.nodes[i].log.display()
                    ),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn check(&self, i: usize) -> Result<&Node, KitError> {
        self.nodes.get(i).ok_or(KitError::NoSuchNode {
            index: i,
            count: self.nodes.len(),
        })
    }

    /// All nodes; node 0 is the initial primary.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `i`. Panics if out of range, like slice indexing.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// The node currently considered primary: 0 until [`Cluster::promote`] moves it.
    pub fn primary(&self) -> usize {
        self.primary.load(Ordering::SeqCst)
    }

    /// Superuser URL of node `i` (trust auth): `postgres://postgres@127.0.0.1:PORT/postgres`.
    /// For inspection and fault injection, and for the rare router test that needs a superuser
    /// session; routers normally use [`Cluster::node_configs`], whose roles are least-privileged.
    pub fn url(&self, i: usize) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.nodes[i].port()
        )
    }

    /// URL of node `i` for role `app` with the given password (scram-sha-256), so tests can
    /// exercise real authentication and wrong passwords. The password is percent-encoded.
    pub fn app_url(&self, i: usize, password: &str) -> String {
        format!(
            "postgres://app:{}@127.0.0.1:{}/postgres",
            percent_encode(password),
            self.nodes[i].port()
        )
    }

    /// URL of node `i` for [`READER_ROLE`], the role that may only read.
    pub fn reader_url(&self, i: usize) -> String {
        format!(
            "postgres://{READER_ROLE}:{}@127.0.0.1:{}/postgres",
            percent_encode(READER_PASSWORD),
            self.nodes[i].port()
        )
    }

    /// URL of node `i` for [`WRITER_ROLE`], the application's least-privilege writer.
    pub fn writer_url(&self, i: usize) -> String {
        format!(
            "postgres://{WRITER_ROLE}:{}@127.0.0.1:{}/postgres",
            percent_encode(WRITER_PASSWORD),
            self.nodes[i].port()
        )
    }

    /// URL of node `i` for [`MONITOR_ROLE`], the least-privilege monitoring role.
    pub fn monitor_url(&self, i: usize) -> String {
        format!(
            "postgres://{MONITOR_ROLE}:{}@127.0.0.1:{}/postgres",
            percent_encode(MONITOR_PASSWORD),
            self.nodes[i].port()
        )
    }

    /// Every node as a router sees it: the current primary as a writer candidate, the others as
    /// replicas, named like the kit's nodes (`pg0`, `pg1`, ...), each role least-privileged:
    /// writes log in as [`WRITER_ROLE`] ([`Cluster::writer_url`]), reads as [`READER_ROLE`]
    /// ([`Cluster::reader_url`]) and the monitor's probes as [`MONITOR_ROLE`]
    /// ([`Cluster::monitor_url`]). No router session is a superuser's; the kit's own fault
    /// injection and inspection ([`Cluster::psql`], [`Cluster::url`]) are.
    pub fn node_configs(&self) -> Vec<routing_core::NodeConfig> {
        let primary = self.primary();
        (0..self.nodes.len())
            .map(|i| {
                let (name, url) = (self.nodes[i].name().to_string(), self.writer_url(i));
                let node = if i == primary {
                    routing_core::NodeConfig::writer(name, url)
                } else {
                    routing_core::NodeConfig::replica(name, url)
                };
                node.reader_url(self.reader_url(i))
                    .monitor_url(self.monitor_url(i))
            })
            .collect()
    }

    /// Runs SQL on node `i` with `psql -XAtq -v ON_ERROR_STOP=1` and returns its trimmed output
    /// (rows one per line, columns separated by `|`).
    pub fn psql(&self, i: usize, sql: &str) -> Result<String, KitError> {
        self.psql_all(i, &[sql])
    }

    /// Each statement goes in its own `-c`, so statements that refuse transaction blocks
    /// (ALTER SYSTEM) can be combined with others.
    fn psql_all(&self, i: usize, sqls: &[&str]) -> Result<String, KitError> {
        self.psql_timeout(i, sqls, SQL_TIMEOUT)
    }

    fn psql_timeout(&self, i: usize, sqls: &[&str], timeout: Duration) -> Result<String, KitError> {
        let n = self.check(i)?;
        let mut cmd = Command::new(self.pg.tool("psql"));
        proc::clean_env(&mut cmd);
        cmd.args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d"]).arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5 application_name=routing-testkit",
            n.port()
        ));
        for s in sqls {
            cmd.arg("-c").arg(s);
        }
        let shown: String = sqls.join("; ").chars().take(120).collect();
        let out = proc::run(
            &mut cmd,
            None,
            timeout,
            &format!("psql on {}: {shown}", n.name),
        )?;
        Ok(out.stdout.trim().to_string())
    }

    /// Makes replica `i` apply each commit only `d` after it was committed on the primary
    /// (`recovery_min_apply_delay`), i.e. injects replication lag. Returns once the setting is live.
    pub fn set_apply_delay(&self, i: usize, d: Duration) -> Result<(), KitError> {
        self.set_delay_ms(i, d.as_millis())
    }

    /// [`Cluster::set_apply_delay`] on every replica of the current primary; a zero delay
    /// removes it.
    pub fn set_replicas_apply_delay(&self, d: Duration) -> Result<(), KitError> {
        let primary = self.primary();
        (0..self.nodes.len())
            .filter(|&i| i != primary)
            .try_for_each(|i| self.set_apply_delay(i, d))
    }

    /// Removes the apply delay (commits held back are applied at once).
    pub fn clear_apply_delay(&self, i: usize) -> Result<(), KitError> {
        self.set_delay_ms(i, 0)
    }

    fn set_delay_ms(&self, i: usize, ms: u128) -> Result<(), KitError> {
        let set = if ms == 0 {
            "ALTER SYSTEM RESET recovery_min_apply_delay".to_string()
        } else {
            format!("ALTER SYSTEM SET recovery_min_apply_delay = '{ms}ms'")
        };
        self.psql_all(i, &[&set, "SELECT pg_reload_conf()"])?;
        // New sessions see the value once the postmaster has reloaded; the startup process is
        // signalled right after it and rereads the file at its next wakeup.
        let want = ms.to_string();
        self.poll_until(
            i,
            "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'",
            Duration::from_secs(10),
            "recovery_min_apply_delay to be reloaded",
            |s| s == want,
        )?;
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }

    /// Freezes WAL replay on replica `i` (`pg_wal_replay_pause()`); returns once it is paused.
    pub fn pause_replay(&self, i: usize) -> Result<(), KitError> {
        self.psql(i, "SELECT pg_wal_replay_pause()")?;
        self.poll_until(
            i,
            "SELECT pg_get_wal_replay_pause_state()",
            Duration::from_secs(10),
            "replay to pause",
            |s| s == "paused",
        )
    }

    /// Resumes WAL replay on replica `i`.
    pub fn resume_replay(&self, i: usize) -> Result<(), KitError> {
        self.psql(i, "SELECT pg_wal_replay_resume()")?;
        self.poll_until(
            i,
            "SELECT pg_get_wal_replay_pause_state()",
            Duration::from_secs(10),
            "replay to resume",
            |s| s == "not paused",
        )
    }

    /// Stops node `i` like `pg_ctl stop -m immediate` (SIGQUIT to the postmaster, i.e. a crash
    /// without checkpoint) and reaps it. The port stays reserved for [`Cluster::restart`].
    /// A node that is already down is left alone.
    pub fn kill(&self, i: usize) -> Result<(), KitError> {
        let n = self.check(i)?;
        let mut g = lock(&self.procs[i]);
        if let Some(mut child) = g.take() {
            proc::signal(&[child.id()], "QUIT");
            if proc::wait_timeout(&mut child, STOP_TIMEOUT)?.is_none() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(KitError::Timeout {
                    what: format!("{} to stop after SIGQUIT (it was SIGKILLed)", n.name),
                });
            }
        }
        Ok(())
    }

    /// Starts node `i` again on the same port and data directory (stopping it first if it runs)
    /// and waits until it accepts connections. A replica comes back as a replica; a former
    /// primary comes back as a primary.
    pub fn restart(&self, i: usize) -> Result<(), KitError> {
        self.check(i)?;
        self.kill(i)?;
        self.spawn_pg(i)
    }

    /// Promotes replica `i` (`pg_promote(true, 30)`); returns once it is out of recovery. It
    /// becomes [`Cluster::primary`].
    pub fn promote(&self, i: usize) -> Result<(), KitError> {
        let n = self.check(i)?;
        let out = self.psql(i, "SELECT pg_promote(true, 30)")?;
        if out != "t" {
            return Err(KitError::Timeout {
                what: format!("promotion of {} (pg_promote returned {out})", n.name),
            });
        }
        self.poll_until(
            i,
            "SELECT pg_is_in_recovery()",
            Duration::from_secs(10),
            "end of recovery",
            |s| s == "f",
        )?;
        self.primary.store(i, Ordering::SeqCst);
        Ok(())
    }

    /// Points `replica` at `new_primary` (`ALTER SYSTEM SET primary_conninfo` + reload; PG 13+
    /// restarts the WAL receiver, and the latest timeline is followed by default). Returns once
    /// it streams from the new primary.
    pub fn follow(&self, replica: usize, new_primary: usize) -> Result<(), KitError> {
        self.check(replica)?;
        let p = self.check(new_primary)?;
        let set = format!(
            "ALTER SYSTEM SET primary_conninfo = '{}'",
            self.conninfo_for(replica, new_primary)
        );
        self.psql_all(replica, &[&set, "SELECT pg_reload_conf()"])?;
        let want = format!("streaming|{}", p.port());
        self.poll_until(
            replica,
            "SELECT status || '|' || sender_port FROM pg_stat_wal_receiver",
            START_TIMEOUT,
            &format!("{} to stream from {}", self.nodes[replica].name, p.name),
            |s| s == want,
        )
    }

    /// Waits until every running replica (node in recovery) has replayed up to the primary's
    /// current WAL position. A paused or delayed replica makes this time out.
    pub fn wait_replicated(&self, timeout: Duration) -> Result<(), KitError> {
        let deadline = Instant::now() + timeout;
        let p = self.primary();
        let lsn = self.psql(p, "SELECT pg_current_wal_lsn()")?;
        for j in 0..self.nodes.len() {
            if j == p || !self.is_running(j) {
                continue;
            }
            let sql = format!(
                "SELECT NOT pg_is_in_recovery() OR coalesce(pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn, false)"
            );
            let left = deadline.saturating_duration_since(Instant::now());
            self.poll_until(
                j,
                &sql,
                left,
                &format!("{} to replay up to {lsn}", self.nodes[j].name),
                |s| s == "t",
            )?;
        }
        Ok(())
    }

    /// Whether node `i`'s postmaster is alive (false after [`Cluster::kill`] or a crash).
    pub fn is_running(&self, i: usize) -> bool {
        let Some(m) = self.procs.get(i) else {
            return false;
        };
        let mut g = lock(m);
        match g.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                *g = None;
                false
            }
            None => false,
        }
    }

    /// A [`FaultProxy`] in front of node `i`.
    pub fn proxy(&self, i: usize) -> Result<FaultProxy, KitError> {
        FaultProxy::start(self.check(i)?.addr())
    }

    /// `redis://127.0.0.1:PORT/` if the cluster has Redis.
    pub fn redis_url(&self) -> Option<String> {
        self.redis
            .as_ref()
            .map(|r| format!("redis://127.0.0.1:{}/", r.port.load(Ordering::SeqCst)))
    }

    /// The Redis port, if the cluster has Redis.
    pub fn redis_port(&self) -> Option<u16> {
        self.redis.as_ref().map(|r| r.port.load(Ordering::SeqCst))
    }

    /// SIGKILLs Redis (every mark in it is lost). Already down is fine.
    pub fn kill_redis(&self) -> Result<(), KitError> {
        let r = self.redis.as_ref().ok_or(KitError::NoRedis)?;
        if let Some(mut c) = lock(&r.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("redis.pid"));
        Ok(())
    }

    /// Starts Redis again on the same port, empty (no persistence); kills it first if it runs.
    pub fn restart_redis(&self) -> Result<(), KitError> {
        self.kill_redis()?;
        self.start_redis(false)
    }

    fn start_redis(&self, may_repick: bool) -> Result<(), KitError> {
        let r = self.redis.as_ref().ok_or(KitError::NoRedis)?;
        let mut attempt = 0;
        loop {
            match self.spawn_redis(r) {
                Err(KitError::PortInUse { port }) if may_repick && attempt < PORT_RETRIES => {
                    attempt += 1;
                    r.port.store(ports::pick()?, Ordering::SeqCst);
                    ports::release([port]);
                }
                other => return other,
            }
        }
    }

    fn spawn_redis(&self, r: &Redis) -> Result<(), KitError> {
        let port = r.port.load(Ordering::SeqCst);
        let log_start = std::fs::metadata(&r.log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&r.bin);
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--daemonize", "no", "--protected-mode", "no", "--dir"])
        .arg(&self.dir)
        .current_dir(&self.dir);
        let mut child = proc::spawn_detached(&mut cmd, &r.log)?;
        // For the watchdog: the pid changes on every restart.
        std::fs::write(self.dir.join("redis.pid"), child.id().to_string())?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let log = read_from(&r.log, log_start);
                if log.contains("Address already in use") {
                    return Err(KitError::PortInUse { port });
                }
                return Err(KitError::ServerStart {
                    name: "redis".into(),
                    reason: format!("redis-server exited ({status})"),
                    log: r.log.clone(),
                    log_tail: proc::tail(&log, 20),
                });
            }
            if redis_ping(port) {
                *lock(&r.child) = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(KitError::ServerStart {
                    name: "redis".into(),
                    reason: format!("no PONG after {START_TIMEOUT:?}"),
                    log: r.log.clone(),
                    log_tail: proc::tail(&read_from(&r.log, log_start), 20),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// The cluster's directory (data dirs, logs, sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pids of the running postmasters and Redis (for tests that check cleanup).
    pub fn server_pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .procs
            .iter()
            .filter_map(|m| lock(m).as_ref().map(Child::id))
            .collect();
        if let Some(r) = &self.redis {
            v.extend(lock(&r.child).as_ref().map(Child::id));
        }
        v
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Signal everything first, then wait: the servers shut down in parallel.
        let pids: Vec<u32> = self
            .procs
            .iter()
            .filter_map(|m| lock(m).as_ref().map(Child::id))
            .collect();
        proc::signal(&pids, "QUIT");
        if let Some(r) = &self.redis
            && let Some(mut c) = lock(&r.child).take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in &self.procs {
            if let Some(mut c) = lock(m).take()
                && !matches!(proc::wait_timeout(&mut c, STOP_TIMEOUT), Ok(Some(_)))
            {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(mut w) = lock(&self.watchdog).take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let mut removed = false;
        for _ in 0..10 {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => {
                    removed = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    removed = true;
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        if !removed {
            eprintln!("routing-testkit: could not remove {}", self.dir.display());
        }
        let mut used: Vec<u16> = self.nodes.iter().map(Node::port).collect();
        used.extend(self.redis_port());
        ports::release(used);
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut s = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(offset));
        let _ = f.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}

/// Raw-protocol PING (inline command), so the kit needs no Redis client.
pub(crate) fn redis_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

pub(crate) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One cluster per test process (primary + 2 replicas + Redis), started on first use, for tests
/// that do not kill, promote, pause or delay anything. Never dropped: the watchdog removes it
/// when the process exits. Panics (with the cause) if it cannot start.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(|| {
        ClusterBuilder::new()
            .replicas(2)
            .with_redis(true)
            .start()
            .unwrap_or_else(|e| panic!("routing-testkit: the shared cluster could not start: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn encodes_passwords() {
        assert_eq!(percent_encode("app-secret"), "app-secret");
        assert_eq!(percent_encode("a b@c:d/"), "a%20b%40c%3Ad%2F");
    }
}
