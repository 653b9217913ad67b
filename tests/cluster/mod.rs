//! A 3-node JetStream cluster on loopback for the failover tests: real `nats-server`
//! processes with their own store directories, routes and monitoring ports, stopped
//! by their PIDs when the `Cluster` is dropped (also when a test panics).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One cluster at a time: failover timings need the machine's two cores.
static TURN: Mutex<()> = Mutex::new(());

/// How long a server may take to start, or the cluster to elect a leader.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// The ports of this suite: 14403 to 14438, nine per cluster (client, route and
/// monitoring port of each of the three servers).
const FIRST_PORT: u16 = 14403;

struct Server {
    name: String,
    port: u16,
    route: u16,
    http: u16,
    log: PathBuf,
    child: Option<Child>,
}

/// Three servers, one JetStream cluster.
pub struct Cluster {
    servers: Mutex<Vec<Server>>,
    namespace: String,
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    _store: tempfile::TempDir,
    _turn: MutexGuard<'static, ()>,
}

fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("AGENTBUS_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/agentbus-ci-venv/bin/nats-server"));
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipped: no nats-server at {} (set AGENTBUS_NATS_SERVER, or run .ci/run, which \
             installs one)",
            path.display()
        );
        None
    }
}

impl Cluster {
    /// Starts cluster number `k` (0 to 3, each on its own ports) and waits until it has
    /// a JetStream meta leader; `None` (with a note) when there is no nats-server.
    pub fn start(k: u16) -> Option<Cluster> {
        let binary = binary()?;
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let store = tempfile::tempdir().unwrap();
        let base = FIRST_PORT + 9 * k;
        let mut servers: Vec<Server> = (0..3)
            .map(|i| Server {
                name: format!("n{i}"),
                port: base + i,
                route: base + 3 + i,
                http: base + 6 + i,
                log: store.path().join(format!("n{i}.log")),
                child: None,
            })
            .collect();
        let routes: Vec<String> = servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.route))
            .collect();
        for s in &mut servers {
            let dir = store.path().join(&s.name);
            std::fs::create_dir_all(&dir).unwrap();
            let log = std::fs::File::create(&s.log).unwrap();
            let child = Command::new(&binary)
                .args(["-a", "127.0.0.1", "-js", "-n", &s.name])
                .args(["-p", &s.port.to_string(), "-m", &s.http.to_string()])
                .arg("-sd")
                .arg(&dir)
                .args(["--cluster_name", "agentbus-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", s.route)])
                .args(["--routes", &routes.join(",")])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start nats-server");
            s.child = Some(child);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addrs: Vec<async_nats::ServerAddr> = servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.port).parse().unwrap())
            .collect();
        let cluster_servers = Mutex::new(servers);
        // Until the cluster exists, the guard below stops what has started.
        let guard = Stopper(&cluster_servers);
        let start = Instant::now();
        for s in guard.0.lock().unwrap().iter() {
            while !std::fs::read_to_string(&s.log)
                .unwrap_or_default()
                .contains("Server is ready")
            {
                assert!(
                    start.elapsed() < START_PATIENCE,
                    "{} did not start: {}",
                    s.name,
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let client = rt
            .block_on(async {
                tokio::time::timeout(START_PATIENCE, async_nats::connect(addrs)).await
            })
            .expect("connect in time")
            .expect("connect to the cluster");
        std::mem::forget(guard);
        let cluster = Cluster {
            servers: cluster_servers,
            namespace: format!("c{k}"),
            rt,
            client,
            _store: store,
            _turn: turn,
        };
        let names = cluster.names();
        let first = names[0].clone();
        let start = Instant::now();
        while cluster.meta_leader(&first).is_none() {
            assert!(start.elapsed() < START_PATIENCE, "no meta leader elected");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(cluster)
    }

    /// The bus URL: every server as the seed list, the cluster's namespace, and
    /// `?replicas=N` if given.
    pub fn url(&self, replicas: Option<usize>) -> String {
        let seeds: Vec<String> = self
            .servers
            .lock()
            .unwrap()
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let query = replicas.map_or(String::new(), |n| format!("?replicas={n}"));
        format!("nats://{}/{}{query}", seeds.join(","), self.namespace)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The stream of `mailbox` (names without `.` or `_`).
    pub fn stream_name(&self, mailbox: &str) -> String {
        format!("{}_MB_{mailbox}", self.namespace)
    }

    /// The names of the servers still running.
    pub fn names(&self) -> Vec<String> {
        self.servers
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| s.name.clone())
            .collect()
    }

    pub fn port(&self, name: &str) -> u16 {
        self.server(name, |s| s.port)
    }

    fn server<T>(&self, name: &str, f: impl Fn(&Server) -> T) -> T {
        f(self
            .servers
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == name)
            .expect("a server of the cluster"))
    }

    /// Stops server `name` with kill -9 (SIGKILL to its PID).
    pub fn kill(&self, name: &str) {
        let mut servers = self.servers.lock().unwrap();
        let s = servers.iter_mut().find(|s| s.name == name).unwrap();
        let mut child = s.child.take().expect("the server runs");
        child.kill().expect("kill -9");
        child.wait().expect("reap");
    }

    /// The meta leader as server `via` sees it (its monitoring endpoint); `None`
    /// while there is none.
    pub fn meta_leader(&self, via: &str) -> Option<String> {
        let http = self.server(via, |s| s.http);
        let jsz = http_get(http, "/jsz")?;
        let leader = jsz["meta_cluster"]["leader"].as_str()?.to_owned();
        (!leader.is_empty()).then_some(leader)
    }

    /// A request to the JetStream API; the JSON reply.
    fn api(&self, subject: String) -> Option<serde_json::Value> {
        let client = self.client.clone();
        let reply = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), client.request(subject, "".into())).await
        });
        let msg = reply.ok()?.ok()?;
        serde_json::from_slice(&msg.payload).ok()
    }

    /// The leader of `stream`, waiting (bounded) until it has one.
    pub fn stream_leader(&self, stream: &str) -> String {
        self.leader(format!("$JS.API.STREAM.INFO.{stream}"))
    }

    /// The leader of consumer `consumer` of `stream`, waiting (bounded) for one.
    pub fn consumer_leader(&self, stream: &str, consumer: &str) -> String {
        self.leader(format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"))
    }

    /// How many servers hold consumer `consumer` of `stream` (leader and replicas).
    pub fn consumer_replicas(&self, stream: &str, consumer: &str) -> usize {
        self.leader(format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"));
        let info = self
            .api(format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"))
            .expect("consumer info");
        1 + info["cluster"]["replicas"].as_array().map_or(0, Vec::len)
    }

    fn leader(&self, subject: String) -> String {
        let start = Instant::now();
        loop {
            let info = self.api(subject.clone());
            let leader = info
                .as_ref()
                .and_then(|i| i["cluster"]["leader"].as_str().map(str::to_owned))
                .filter(|l| self.names().contains(l));
            if let Some(l) = leader {
                return l;
            }
            assert!(
                start.elapsed() < START_PATIENCE,
                "no leader for {subject}: {info:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the consumer's leader to step down (`$JS.API.CONSUMER.LEADER.STEPDOWN`).
    pub fn step_down_consumer(&self, stream: &str, consumer: &str) {
        let reply = self.api(format!(
            "$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"
        ));
        assert!(
            reply.as_ref().is_some_and(|r| r["success"] == true),
            "step-down: {reply:?}"
        );
    }
}

/// `GET path` from the monitoring port; the JSON body.
fn http_get(port: u16, path: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (_, json) = body.split_once("\r\n\r\n")?;
    serde_json::from_str(json).ok()
}

/// Stops every server still running.
fn stop(servers: &Mutex<Vec<Server>>) {
    let mut servers = servers.lock().unwrap_or_else(|e| e.into_inner());
    for s in servers.iter_mut() {
        if let Some(mut child) = s.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Stopper<'a>(&'a Mutex<Vec<Server>>);

impl Drop for Stopper<'_> {
    fn drop(&mut self) {
        stop(self.0);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop(&self.servers);
    }
}
