//! A throwaway local Redis Cluster: three `redis-server --cluster-enabled yes` masters in a
//! temp dir, joined with `redis-cli --cluster create` (about 2 s). Every process is killed and
//! the directory removed on drop, also when a test panics.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RedisCluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    children: Vec<Mutex<Option<Child>>>,
}

fn free_port() -> u16 {
    // The cluster bus listens on port + 10000: both must be free.
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let started = Instant::now();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ports = Vec::new();
        while ports.len() < masters {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut c = RedisCluster {
            dir,
            children: ports.iter().map(|_| Mutex::new(None)).collect(),
            ports,
        };
        for i in 0..masters {
            c.spawn(i);
        }
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = redis_cli(&args);
        assert!(
            out.contains("All 16384 slots covered"),
            "cluster create: {out}"
        );
        c.wait_ok(Duration::from_secs(10));
        println!(
            "redis cluster of {masters} on {:?} in {:?}",
            c.ports,
            started.elapsed()
        );
        c
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(self.ports[i].to_string())
    }

    fn spawn(&mut self, i: usize) {
        let dir = self.node_dir(i);
        std::fs::create_dir_all(&dir).expect("node dir");
        let port = self.ports[i].to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "no",
            ])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--logfile", "redis.log"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (is it installed?)");
        *self.children[i].lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_cli(&["-p", &port, "ping"]).contains("PONG") {
            assert!(Instant::now() < deadline, "node {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ok(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for p in &self.ports {
            let port = p.to_string();
            while !redis_cli(&["-p", &port, "cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster not ok on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// SIGKILLs node `i` (its data is lost: no persistence).
    pub fn kill(&self, i: usize) {
        if let Some(mut c) = self.children[i].lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again, empty, with its cluster config (same node id and slots).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ok(Duration::from_secs(10));
    }

    /// Keys held by node `i`.
    pub fn dbsize(&self, i: usize) -> u64 {
        redis_cli(&["-p", &self.ports[i].to_string(), "dbsize"])
            .trim()
            .parse()
            .expect("dbsize")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}
