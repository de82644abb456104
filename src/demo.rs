//! `banmesh demo`: a throwaway fleet on this machine, to see banmesh work
//! with nothing installed but the binary.
//!
//! It makes a CA in a temp dir, starts a hub on the embedded store and
//! three nodes on loopback (in this process, with the same code as the
//! daemons, over real mTLS and real unix sockets), reports a few bans from
//! different nodes the way fail2ban's action does, prints each ban as it
//! lands in every other node's `shared.log` with its latency, then the
//! per-host status table in the seed's shape. Everything stops and the temp
//! dir is removed when it ends (or on Ctrl-C).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpListener, task::JoinHandle};

use crate::{ban::Ban, ca, hub, node, proto, shutdown, tls::TlsFiles};

/// Flags of `banmesh demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Number of bans to report, round-robin across nodes.
    #[arg(long, default_value_t = 6)]
    pub bans: usize,
    /// Pause between bans.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub gap: Duration,
    /// Keep the demo's files (CA, store, shared.log files) in this directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
}

/// When each IP was reported, for the latency column.
type Sent = Arc<Mutex<HashMap<String, (String, Instant)>>>;

fn issue(dir: &Path, name: &str, role: ca::Role) -> anyhow::Result<TlsFiles> {
    let sans = ["localhost".to_string(), "127.0.0.1".to_string()];
    Ok(ca::issue_once(
        dir,
        &ca::HostCert {
            name,
            sans: &sans,
            valid_for: ca::HOST_VALIDITY,
            role,
        },
    )?)
}

/// Runs the demo until its bans have crossed the fleet (or Ctrl-C), then
/// removes its files unless `--keep`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new().prefix("banmesh-demo-").tempdir()?;
    let root = args
        .keep
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&root)?;
    let (trigger, stop) = shutdown::channel();
    let mut tasks = Vec::new();
    let result = tokio::select! {
        r = fleet(&root, &args, stop, &mut tasks) => r,
        _ = shutdown::os_signal() => { println!("\ninterrupted"); Ok(()) }
    };
    // Every daemon finishes its current batch and stops before we return.
    trigger.trigger();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    result
}

async fn fleet(
    root: &Path,
    args: &DemoArgs,
    stop: shutdown::Shutdown,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<()> {
    let pki = root.join("pki");
    ca::init(&pki)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let hub_url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
    let hub_config = hub::HubConfig {
        peer_poll: None,
        name: None,
        db: None,
        data_dir: root.join("hub"),
        tls: issue(&pki, "hub", ca::Role::Hub)?,
        ca_key: None,
        report_limit: Default::default(),
        signals: Default::default(),
        ladder: Some(Default::default()),
    };
    println!("banmesh demo: a throwaway fleet in {}", root.display());
    println!(
        "  hub    {hub_url} (mTLS), embedded store {}",
        hub_config.db_url().trim_start_matches("sqlite:")
    );
    tasks.push(tokio::spawn({
        let stop = stop.clone();
        async move {
            if let Err(e) = hub::run(listener, hub_config, stop).await {
                eprintln!("hub failed: {e}");
            }
        }
    }));

    let names: Vec<String> = (1..=args.nodes.max(2))
        .map(|i| format!("node-{i}"))
        .collect();
    let mut sockets = Vec::new();
    for name in &names {
        let dir = root.join(name);
        let config =
            node::NodeConfig::in_dir(&dir, &hub_url, issue(&pki, name, ca::Role::Host)?, None);
        println!(
            "  {name:<6} socket {}, log {}",
            config.socket.display(),
            config.shared_log.display()
        );
        sockets.push(config.socket.clone());
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = node::run(config, stop).await {
                eprintln!("node failed: {e}");
            }
        }));
    }
    for (name, socket) in names.iter().zip(&sockets) {
        wait_connected(name, socket).await?;
    }

    let sent: Sent = Arc::default();
    let arrivals = Arc::new(Mutex::new(0usize));
    println!(
        "\n{:<12} {:<16} {:<12} {:>10}",
        "REPORTED ON", "IP", "ARRIVED ON", "LATENCY"
    );
    for name in &names {
        tasks.push(tokio::spawn(watch(
            name.clone(),
            root.join(name).join("shared.log"),
            sent.clone(),
            arrivals.clone(),
            stop.clone(),
        )));
    }

    let jails = [
        ("sshd", "tcp", "22"),
        ("postfix", "tcp", "smtp,465"),
        ("nginx-http-auth", "tcp", "http,https"),
    ];
    for i in 0..args.bans {
        let from = i % names.len();
        let ip = format!("192.0.2.{}", 10 + i);
        let (jail, protocol, port) = jails[i % jails.len()];
        let ban = Ban::new(jail, protocol, port, &ip)?;
        sent.lock()
            .unwrap()
            .insert(ip.clone(), (names[from].clone(), Instant::now()));
        crate::report::report(&sockets[from], ban).await?;
        tokio::time::sleep(args.gap).await;
    }

    let expected = args.bans * (names.len() - 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while *arrivals.lock().unwrap() < expected {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every ban arrived within 10s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Statuses travel back to the hub a moment after the lines are written.
    let admin = issue(&pki, "demo-admin", ca::Role::Admin)?;
    let mut client = crate::admin::client(&hub_url, &admin).await?;
    let bans = loop {
        let r = client
            .list_bans(proto::ListBansRequest {
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner();
        let settled = r.bans.len() == args.bans
            && r.bans.iter().all(|b| {
                b.statuses
                    .iter()
                    .filter(|s| names.contains(&s.host))
                    .all(|s| s.status == proto::Status::Added as i32)
            });
        if settled || Instant::now() > deadline {
            break r.bans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("\nPer-host status at the hub (the seed's ip_table; 1 = added):");
    print!("{}", crate::admin::seed_table(&bans));
    println!("\nall {expected} deliveries arrived; stopping the fleet");
    Ok(())
}

async fn wait_connected(name: &str, socket: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = crate::report::node_status(socket).await
            && s.hub_connected
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{name} did not connect to the hub within 10s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Tails one node's shared.log and prints each arriving ban.
async fn watch(
    name: String,
    log: PathBuf,
    sent: Sent,
    arrivals: Arc<Mutex<usize>>,
    mut stop: shutdown::Shutdown,
) {
    let mut offset = 0usize;
    let mut out = tokio::io::stdout();
    loop {
        if let Ok(text) = tokio::fs::read_to_string(&log).await
            && text.len() > offset
        {
            for line in text[offset..].lines() {
                let Some(node::shared_log::Logged { ip, .. }) = node::shared_log::parse(line)
                else {
                    continue;
                };
                let origin = sent.lock().unwrap().get(ip).cloned();
                // The reporter receives its own ban back too (it carries the
                // fleet's end); the table shows bans crossing the fleet.
                if let Some((from, at)) = origin.filter(|(from, _)| *from != name) {
                    let ms = at.elapsed().as_secs_f64() * 1000.0;
                    let row = format!("{from:<12} {ip:<16} {name:<12} {ms:>7.1} ms\n");
                    let _ = out.write_all(row.as_bytes()).await;
                    *arrivals.lock().unwrap() += 1;
                }
            }
            offset = text.len();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            _ = stop.recv() => return,
        }
    }
}
