//! pgpool-II in front of a kit cluster: the peer the benchmarks compare the router with. It does
//! its own read/write split (`streaming_replication` mode) and load balancing per session.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::{Cluster, KitError, ports, proc};

/// Where Debian's `pgpool2` package installs the server.
const PGPOOL: &str = "/usr/sbin/pgpool";

/// A running pgpool-II; stopped (with its children) on drop.
#[derive(Debug)]
pub struct Pgpool {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Pgpool {
    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL through pgpool for `role` (trust on loopback, as the kit's roles are).
    pub fn url(&self, role: &str, password: &str) -> String {
        format!(
            "postgres://{role}:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// The directory holding its configuration and log.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Pgpool {
    fn drop(&mut self) {
        // Its own process group: the master and every child it forked.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(std::process::Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.wait();
        ports::release([self.port]);
    }
}

impl Cluster {
    /// Starts pgpool-II (Debian package `pgpool2`) in front of every node: writes to the current
    /// primary, reads load-balanced over all nodes by weight, `max_connections` client sessions.
    pub fn start_pgpool(&self, max_connections: usize) -> Result<Pgpool, KitError> {
        if !std::path::Path::new(PGPOOL).exists() {
            return Err(KitError::MissingBinary {
                name: "pgpool".into(),
                package: "pgpool2".into(),
                searched: vec![PathBuf::from("/usr/sbin")],
            });
        }
        let run_as = proc::server_user()?;
        let dir = self.dir().join("pgpool");
        std::fs::create_dir_all(&dir).map_err(|source| KitError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let port = ports::pick()?;
        let pcp_port = ports::pick()?;
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{d}'\n\
             pcp_listen_addresses = '127.0.0.1'\n\
             pcp_port = {pcp_port}\n\
             pcp_socket_dir = '{d}'\n\
             pid_file_name = '{d}/pgpool.pid'\n\
             logdir = '{d}'\n\
             backend_clustering_mode = 'streaming_replication'\n\
             load_balance_mode = on\n\
             num_init_children = {max_connections}\n\
             max_pool = 2\n\
             child_life_time = 0\n\
             connection_cache = on\n\
             enable_pool_hba = off\n\
             pool_passwd = ''\n\
             sr_check_period = 1\n\
             sr_check_user = 'postgres'\n\
             sr_check_password = ''\n\
             health_check_period = 0\n\
             failover_on_backend_error = off\n\
             log_min_messages = warning\n",
            d = dir.display()
        );
        for (i, node) in self.nodes().iter().enumerate() {
            conf.push_str(&format!(
                "backend_hostname{i} = '127.0.0.1'\n\
                 backend_port{i} = {}\n\
                 backend_weight{i} = 1\n\
                 backend_data_directory{i} = '{}'\n\
                 backend_flag{i} = 'DISALLOW_TO_FAILOVER'\n\
                 backend_application_name{i} = '{}'\n",
                node.port(),
                node.data_dir().display(),
                node.name()
            ));
        }
        let conf_path = dir.join("pgpool.conf");
        proc::write_owned(&conf_path, &conf, run_as)?;
        proc::write_owned(&dir.join("pcp.conf"), "", run_as)?;
        proc::chown(&dir, run_as)?;
        let mut cmd = Command::new(PGPOOL);
        cmd.arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-F")
            .arg(dir.join("pcp.conf"));
        proc::clean_env(&mut cmd);
        proc::as_server(&mut cmd, run_as);
        let child = proc::spawn_detached(&mut cmd, &dir.join("pgpool.log"))?;
        let pool = Pgpool { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(pool.dir.join("pgpool.log")).unwrap_or_default();
                return Err(KitError::Command {
                    what: "starting pgpool".into(),
                    status: "no listener after 15 s".into(),
                    stderr: proc::tail(&log, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pool)
    }
}
