//! The benchmark's fleet: a hub as a child process (so its memory is its
//! own), on a fresh MariaDB database, and simulated nodes in this process
//! running the real node code over real mTLS.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use mysql_async::prelude::*;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::{
    ca,
    node::{
        self,
        apply::{Observed, Observer},
        link,
        outbox::Outbox,
    },
    shutdown::{self, Shutdown, ShutdownTrigger},
    tls::TlsFiles,
};

/// A CA and the certificates of everything in the benchmark.
pub struct Pki {
    /// Directory holding `ca.crt`, `ca.key` and every issued pair.
    pub dir: PathBuf,
}

impl Pki {
    /// Makes a new CA in `ROOT/pki`.
    pub fn new(root: &Path) -> anyhow::Result<Pki> {
        let dir = root.join("pki");
        ca::init(&dir)?;
        Ok(Pki { dir })
    }

    /// Issues (or reuses) the certificate of host `name`, valid for `127.0.0.1`.
    pub fn host(&self, name: &str) -> anyhow::Result<TlsFiles> {
        self.issue(name, ca::Role::Host)
    }

    /// An admin's certificate (allow-list entries).
    pub fn admin(&self, name: &str) -> anyhow::Result<TlsFiles> {
        self.issue(name, ca::Role::Admin)
    }

    /// The hub's certificate, with the hub mark nodes require.
    pub fn hub(&self) -> anyhow::Result<TlsFiles> {
        self.issue("hub", ca::Role::Hub)
    }

    fn issue(&self, name: &str, role: ca::Role) -> anyhow::Result<TlsFiles> {
        let sans = ["127.0.0.1".to_string()];
        Ok(ca::issue_once(
            &self.dir,
            &ca::HostCert {
                name,
                sans: &sans,
                valid_for: ca::HOST_VALIDITY,
                role,
            },
        )?)
    }
}

/// `--cert`, `--key` and `--ca` for a hub or node child process.
pub fn tls_flags(tls: &TlsFiles) -> [&std::ffi::OsStr; 6] {
    [
        "--cert".as_ref(),
        tls.cert.as_os_str(),
        "--key".as_ref(),
        tls.key.as_os_str(),
        "--ca".as_ref(),
        tls.ca.as_os_str(),
    ]
}

/// The hub, as a child process.
pub struct HubProc {
    child: Child,
    /// The hub's address, `https://127.0.0.1:PORT`, for nodes to connect to.
    pub url: String,
    /// The hub's log (stderr).
    pub log: PathBuf,
}

impl HubProc {
    /// Starts a hub on a fresh database `db` of the MariaDB server at `server`.
    pub async fn start(root: &Path, pki: &Pki, server: &str, db: &str) -> anyhow::Result<HubProc> {
        Self::start_with(root, pki, server, db, &[]).await
    }

    /// [`HubProc::start`] with extra hub flags (`--ladder off`, say).
    pub async fn start_with(
        root: &Path,
        pki: &Pki,
        server: &str,
        db: &str,
        extra: &[&str],
    ) -> anyhow::Result<HubProc> {
        Self::start_logging(root, pki, server, db, extra, false).await
    }

    /// [`HubProc::start_with`], with `hops` the hub's log also gets a line
    /// per hop of every ban ([`crate::hops`]; [`HubProc::log`] reads them).
    pub async fn start_logging(
        root: &Path,
        pki: &Pki,
        server: &str,
        db: &str,
        extra: &[&str],
        hops: bool,
    ) -> anyhow::Result<HubProc> {
        let mut c = mysql_async::Conn::from_url(server)
            .await
            .with_context(|| "cannot reach MariaDB for the benchmark (see --mysql)")?;
        c.query_drop(format!("DROP DATABASE IF EXISTS {db}"))
            .await?;
        c.disconnect().await?;
        let log = if hops {
            "warn,banmesh::hub=info,banmesh::hops=debug"
        } else {
            "warn,banmesh::hub=info"
        };
        Self::spawn(root, pki, &format!("{server}/{db}"), extra, log).await
    }

    /// A hub on the database at `db_url` as it is (another hub may be on
    /// it: several hubs on one Galera cluster), logging `rust_log`.
    pub async fn spawn(
        root: &Path,
        pki: &Pki,
        db_url: &str,
        extra: &[&str],
        rust_log: &str,
    ) -> anyhow::Result<HubProc> {
        std::fs::create_dir_all(root)?;
        let tls = pki.hub()?;
        // The kernel picks the port and the hub's log says which: choosing
        // a free port first races with every connection this process opens.
        let log_path = root.join("hub.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "hub",
                "--listen",
                "127.0.0.1:0",
                "--db",
                db_url,
                // Ingest pushes 100,000 reports per publisher: measured
                // without the per-host report limit.
                "--report-rate",
                "off",
            ])
            .args(tls_flags(&tls))
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let start = Instant::now();
        let port = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let port = text.split("hub listening addr=").nth(1).and_then(|a| {
                a.split_whitespace()
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse::<u16>()
                    .ok()
            });
            if let Some(port) = port {
                break port;
            }
            if child.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(30) {
                bail!("the hub did not start:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(HubProc {
            child,
            url: format!("https://127.0.0.1:{port}"),
            log: log_path,
        })
    }

    /// The hub's process id (its CPU time, [`super::cpu`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The hub's resident memory now and at peak, in bytes.
    pub fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Full nodes (outbox, publisher, subscriber, apply to shared.log), in
/// this process, each telling `observer` what it applied.
pub struct Nodes {
    /// Each node's report socket, in node order.
    pub sockets: Vec<PathBuf>,
    /// Each node's host name (`bench-I`), in node order.
    pub names: Vec<String>,
    trigger: ShutdownTrigger,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Nodes {
    /// Starts `count` nodes under `root` against `hub` and waits until every
    /// one is connected to it; `observer` gets (node index, IPs applied, when).
    pub async fn start(
        root: &Path,
        pki: &Pki,
        hub: &str,
        count: usize,
        observer: mpsc::UnboundedSender<(usize, Observed)>,
    ) -> anyhow::Result<Nodes> {
        Self::start_spread(root, pki, &[hub.to_string()], count, observer).await
    }

    /// [`Nodes::start`] over several hubs: node `i` is given hub
    /// `i % hubs.len()` only, so the spread is known to the caller.
    pub async fn start_spread(
        root: &Path,
        pki: &Pki,
        hubs: &[String],
        count: usize,
        observer: mpsc::UnboundedSender<(usize, Observed)>,
    ) -> anyhow::Result<Nodes> {
        let (trigger, stop) = shutdown::channel();
        let mut nodes = Nodes {
            sockets: vec![],
            names: vec![],
            trigger,
            tasks: vec![],
        };
        for i in 0..count {
            let name = format!("bench-{i}");
            let dir = root.join(&name);
            // Each node's observer tags what it applied with its index.
            let (tx, mut rx): (Observer, _) = mpsc::unbounded_channel();
            let forward = observer.clone();
            nodes.tasks.push(tokio::spawn(async move {
                while let Some(o) = rx.recv().await {
                    let _ = forward.send((i, o));
                }
            }));
            let hub = &hubs[i % hubs.len()];
            let config = node::NodeConfig::in_dir(&dir, hub, pki.host(&name)?, Some(tx));
            nodes.sockets.push(config.socket.clone());
            nodes.names.push(name);
            let stop = stop.clone();
            nodes.tasks.push(tokio::spawn(async move {
                if let Err(e) = node::run(config, stop).await {
                    eprintln!("bench node failed: {e}");
                }
            }));
        }
        let start = Instant::now();
        for s in &nodes.sockets {
            loop {
                if let Ok(st) = crate::report::node_status(s).await
                    && st.hub_connected
                {
                    break;
                }
                if start.elapsed() > Duration::from_secs(120) {
                    let status = crate::report::node_status(s).await;
                    bail!(
                        "node {} did not connect within 120s (its status: {status:?})",
                        s.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(nodes)
    }

    /// Stops every node and waits (up to 10 s each) for its tasks to finish.
    pub async fn stop(self) {
        self.trigger.trigger();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// Publish-only nodes: a pre-filled outbox and the node's publisher.
pub async fn publishers(
    root: &Path,
    pki: &Pki,
    hub: &str,
    count: usize,
    reports_each: usize,
    stop: Shutdown,
) -> anyhow::Result<Vec<(Arc<Outbox>, tokio::task::JoinHandle<()>)>> {
    let names: Vec<String> = (0..count).map(|i| format!("pub-{i}")).collect();
    publishers_of(root, pki, hub, &names, stop, |i| {
        (0..reports_each)
            .map(|j| {
                let n = (i * reports_each + j) as u32;
                crate::ban::Ban::new(
                    "sshd",
                    "tcp",
                    "22",
                    &std::net::Ipv4Addr::from(0x0A00_0000 + n).to_string(),
                )
            })
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    })
    .await
}

/// Publish-only nodes named `names`, host `i`'s outbox pre-filled with
/// `bans(i)` before any publisher starts.
pub async fn publishers_of(
    root: &Path,
    pki: &Pki,
    hub: &str,
    names: &[String],
    stop: Shutdown,
    bans: impl Fn(usize) -> anyhow::Result<Vec<crate::ban::Ban>>,
) -> anyhow::Result<Vec<(Arc<Outbox>, tokio::task::JoinHandle<()>)>> {
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let dir = root.join(name);
        let (outbox, _) = Outbox::open(&dir, usize::MAX)?;
        for chunk in bans(i)?.chunks(10_000) {
            outbox.append_batch(chunk)?;
        }
        out.push((Arc::new(outbox), name.clone(), dir));
    }
    let mut started = Vec::new();
    for (outbox, name, _) in out {
        let tls = pki.host(&name)?;
        let link = link::Link::single(hub, &tls)?;
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(
            node::publisher::run(outbox.clone(), link, connected, stop.clone())
                .instrument(tracing::info_span!("node", host = %name)),
        );
        started.push((outbox, task));
    }
    Ok(started)
}

/// Subscribe-only nodes: the node's subscriber feeding a counter instead
/// of the apply task, one per host `sub-I` for I in `hosts`. Returns the
/// total count of events received.
pub async fn subscribers(
    pki: &Pki,
    hub: &str,
    hosts: std::ops::Range<usize>,
    stop: Shutdown,
) -> anyhow::Result<(
    Arc<std::sync::atomic::AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in hosts {
        let name = format!("sub-{i}");
        let tls = pki.host(&name)?;
        let link = link::Link::single(hub, &tls)?;
        let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<crate::ban::Event>>(64);
        let position = Arc::new(node::position::Position::at(
            PathBuf::from("/dev/null/none"),
            0,
        ));
        tasks.push(tokio::spawn(
            node::subscriber::run(link, position, batch_tx, stop.clone())
                .instrument(tracing::info_span!("node", host = %name)),
        ));
        let counter = received.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(b) = batch_rx.recv().await {
                counter.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    Ok((received, tasks))
}

/// One subscriber per host name, each counting the ban events it received
/// (unbans and allow-list events are not counted): deliveries per host.
pub async fn counting_subscribers(
    pki: &Pki,
    hub: &str,
    names: &[String],
    stop: Shutdown,
) -> anyhow::Result<(
    Vec<Arc<std::sync::atomic::AtomicU64>>,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let mut counts = Vec::new();
    let mut tasks = Vec::new();
    for name in names {
        let tls = pki.host(name)?;
        let link = link::Link::single(hub, &tls)?;
        let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<crate::ban::Event>>(64);
        let position = Arc::new(node::position::Position::at(
            PathBuf::from("/dev/null/none"),
            0,
        ));
        tasks.push(tokio::spawn(
            node::subscriber::run(link, position, batch_tx, stop.clone())
                .instrument(tracing::info_span!("node", host = %name)),
        ));
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        counts.push(counter.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(b) = batch_rx.recv().await {
                let bans = b
                    .iter()
                    .filter(|e| e.kind == crate::ban::EventKind::Ban)
                    .count();
                counter.fetch_add(bans as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    Ok((counts, tasks))
}
