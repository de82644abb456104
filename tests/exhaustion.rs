//! Connection exhaustion without a certificate: a hub limited to 256 open
//! files, flooded with 2,000 half-open handshakes and 500 TLS connections
//! that present no client certificate and then sit idle, still carries a
//! node's ban to another node at once, does not spin, and closes the
//! attacker's connections on its own (half-open ones after the handshake
//! timeout, certificate-less ones after their short lifetime).
mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use tokio::{io::AsyncWriteExt, net::TcpSocket, task::JoinSet};

/// The hub's open-file limit, soft and hard: the hub cannot raise it.
const NOFILE: u64 = 256;
/// How long a ban may take to cross while the hub is under attack.
const CROSS_DEADLINE: Duration = Duration::from_secs(5);
/// Connections the hub may hold besides the ones it held before the attack
/// (its own housekeeping, a store connection opened meanwhile).
const SLACK: usize = 8;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The process's CPU time (user + system), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

async fn connect_from(source: Ipv4Addr, hub: SocketAddr) -> Option<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).ok()?;
    tokio::time::timeout(Duration::from_secs(3), socket.connect(hub))
        .await
        .ok()?
        .ok()
}

/// `count` TLS connections from `source` that trust the fleet CA and
/// present no certificate; returns the ones whose handshake finished.
async fn tls_without_certificate(
    pki: &Pki,
    source: Ipv4Addr,
    hub: SocketAddr,
    count: usize,
) -> Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
    let ca = pki.hub().ca;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let connector = connector.clone();
        tasks.spawn(async move {
            let tcp = connect_from(source, hub).await?;
            let name = ServerName::try_from("localhost").unwrap();
            tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
                .await
                .ok()?
                .ok()
        });
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

/// `per_source` connections from each of `sources` that send nothing or
/// the first bytes of a ClientHello, and then nothing more.
async fn half_open(
    sources: &[Ipv4Addr],
    per_source: usize,
    hub: SocketAddr,
) -> Vec<tokio::net::TcpStream> {
    let mut tasks = JoinSet::new();
    for (i, source) in sources.iter().enumerate() {
        for j in 0..per_source {
            let source = *source;
            tasks.spawn(async move {
                let mut tcp = connect_from(source, hub).await?;
                if (i + j) % 2 == 1 {
                    // A handshake record header announcing 512 bytes, and
                    // the ClientHello type: the rest never comes.
                    let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
                }
                Some(tcp)
            });
        }
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_survives_connections_without_a_certificate() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(root.path());
    let db = TestDb::new().await;
    let hub = Hub::start_with(root.path(), &pki, &db.url, "127.0.0.1", 0, |cmd| {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: NOFILE,
                    rlim_max: NOFILE,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
    .await;
    let pid = hub.proc.child.id();
    let addr: SocketAddr = format!("127.0.0.1:{}", hub.port).parse().unwrap();
    let a = Node::start(root.path(), &pki, "node-a", &hub.url).await;
    let b = Node::start(root.path(), &pki, "node-b", &hub.url).await;
    let before = open_fds(pid);

    // The attacker: certificate-less TLS connections from one address,
    // then half-open handshakes from 125 addresses (16 each), all on the
    // loopback network, apart from the nodes' 127.0.0.1.
    let attack = Instant::now();
    let tls = tls_without_certificate(&pki, Ipv4Addr::new(127, 0, 0, 2), addr, 500).await;
    let sources: Vec<Ipv4Addr> = (1..=125).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect();
    let held = half_open(&sources, 16, addr).await;
    let during = open_fds(pid);
    let opened = attack.elapsed();
    println!(
        "attack: {} certificate-less TLS connections finished of 500, \
         {} of 2000 half-open connected, in {opened:?}; hub fds {before} before, {during} during",
        tls.len(),
        held.len()
    );

    let (ok, err) = a.report("sshd", "tcp", "22", "198.51.100.9");
    assert!(ok, "report failed under attack: {err}");
    let report = Instant::now();
    wait_for("the ban in node-b's shared.log", CROSS_DEADLINE, || async {
        b.lines_for("198.51.100.9") == 1
    })
    .await;
    let crossed = report.elapsed();
    println!("ban crossed in {crossed:?} under attack");

    let cpu = cpu_seconds(pid);
    let idle = Instant::now();
    // Left: the 16 certificate-less connections one address may keep.
    wait_for(
        "the hub to close the half-open handshakes and keep 16 certificate-less ones",
        Duration::from_secs(12),
        || async { open_fds(pid) <= before + 16 + SLACK },
    )
    .await;
    let half_open_closed = attack.elapsed();
    let after_handshakes = open_fds(pid);
    let busy = (cpu_seconds(pid) - cpu) / idle.elapsed().as_secs_f64().max(0.5);
    println!(
        "hub fds: {after_handshakes} at {half_open_closed:?} (half-open closed); \
         hub CPU meanwhile {:.0}%",
        busy * 100.0
    );
    assert!(
        busy < 0.5,
        "the hub used {:.0}% of a core while the attacker sat idle",
        busy * 100.0
    );

    // The attacker still holds all its sockets: the hub takes a new node,
    // and its ban crosses too.
    let joined = Instant::now();
    let c = Node::start(root.path(), &pki, "node-c", &hub.url).await;
    let (ok, err) = c.report("sshd", "tcp", "22", "198.51.100.10");
    assert!(ok, "report failed during the attack: {err}");
    wait_for(
        "node-c's ban in node-b's shared.log",
        CROSS_DEADLINE,
        || async { b.lines_for("198.51.100.10") == 1 },
    )
    .await;
    println!(
        "a new node connected and its ban crossed in {:?}",
        joined.elapsed()
    );

    wait_for(
        "the hub to close the certificate-less connections",
        Duration::from_secs(30),
        || async { open_fds(pid) <= before + 1 + SLACK },
    )
    .await;
    println!(
        "hub fds: {} at {:?} (certificate-less closed; one more node)",
        open_fds(pid),
        attack.elapsed()
    );
    drop((tls, held));
}
