//! Command-line interface: `clap` definitions and dispatch. Each command is
//! a thin call into the library; daemons run until SIGINT/SIGTERM.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::{admin, ban::Ban, ca, hub, node, shutdown, tls::TlsFiles};

/// Directory of the default certificate paths.
pub const DEFAULT_CERT_DIR: &str = "/etc/banmesh";

/// The `banmesh` command line, as parsed from `argv` (after [`seed_args`]).
#[derive(Parser, Debug)]
#[command(
    name = "banmesh",
    version,
    about = "Share fail2ban bans across a fleet in milliseconds"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Every `banmesh` subcommand; each variant's doc is its line in `banmesh --help`.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage the fleet's private certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run the hub: stores bans and fans them out to every node (or manage its data).
    Hub(Box<HubCommand>),
    /// Run the node daemon beside fail2ban on every server (or set fail2ban up for it).
    Node(Box<NodeCommand>),
    /// Hand a ban to the local node (what fail2ban's actionban runs).
    Report(ReportArgs),
    /// Lift a ban on every host (needs an admin certificate).
    Unban(UnbanArgs),
    /// List bans with every host's status, in the seed's table shape.
    Bans(BansArgs),
    /// The fleet allow-list: networks no ban may cover (add and remove need an admin certificate).
    Allow(AllowArgs),
    /// Start a throwaway local fleet (CA, hub, three nodes) and show bans crossing it.
    Demo(crate::demo::DemoArgs),
    /// Join this server to the fleet with a one-time token from `banmesh hub token create`.
    Enroll(EnrollArgs),
    /// Measure propagation latency, ingest, fan-out, catch-up and report time on MariaDB.
    Bench(crate::bench::BenchArgs),
    /// The local node's health: hub, lag, outbox, fail2ban, certificate, last error (exit 1 on a problem, 2 if the node does not answer).
    Status(StatusArgs),
    /// Check a daemon's config file, or show its effective settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Write the man pages or print shell completions (for packaging).
    #[command(subcommand, hide = true)]
    Generate(GenerateCommand),
}

/// `banmesh generate`: files the package ships, made from this CLI definition.
#[derive(Subcommand, Debug)]
pub enum GenerateCommand {
    /// Write banmesh.1 and a page per subcommand (banmesh-hub.1, ...) into DIR.
    Man {
        /// Output directory.
        dir: PathBuf,
    },
    /// Print the completion script for SHELL.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Flags of `banmesh status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The node's unix socket.
    #[arg(long, default_value = node::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Events received but not yet applied past which the node is behind.
    #[arg(long, value_name = "EVENTS", default_value_t = 1000)]
    pub max_lag: u64,
    /// Certificate validity left under which the check fails (renewal
    /// should have run long before).
    #[arg(long, default_value = "14d", value_parser = humantime::parse_duration)]
    pub cert_warn: Duration,
}

/// `banmesh config`: the daemons' files, without starting anything.
#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a config file: exit 0 if the daemon would start with it, 1 naming the file, line and key if not.
    Check {
        /// Whose file (default: from the file's name, hub.toml or node.toml; without --config, both default files that exist).
        #[arg(value_enum)]
        daemon: Option<crate::config::Daemon>,
        /// The file (default: /etc/banmesh/hub.toml or node.toml).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Print the effective settings of `banmesh hub|node [FLAGS]` and where each came from (secrets redacted).
    Show {
        /// Whose settings.
        #[arg(value_enum)]
        daemon: crate::config::Daemon,
        /// The daemon's flags, as it would be started with them (e.g. --config PATH).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// Flags every daemon has: its config file and its logging.
#[derive(Args, Debug, Clone)]
pub struct ServiceArgs {
    /// Config file (default: /etc/banmesh/hub.toml or node.toml, if present).
    /// Its keys are this command's long flag names; flags and BANMESH_*
    /// variables override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// What to log: a level (error, warn, info, debug, trace) or tracing
    /// directives (info,banmesh::hub=debug). RUST_LOG wins while this is
    /// left at its default. SIGHUP re-reads it from the config file.
    #[arg(long, value_name = "FILTER", default_value = "info", value_parser = crate::logging::parse_filter)]
    pub log_level: String,
    /// Log line format: text for people, json for a log pipeline (one
    /// object per line, with the spans naming the peer host).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics over plain HTTP at http://ADDR/metrics
    /// (e.g. 127.0.0.1:9464; keep it on a local or private address).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `banmesh enroll`.
#[derive(Args, Debug)]
pub struct EnrollArgs {
    /// The hub, HOST:PORT.
    #[arg(long)]
    pub hub: String,
    /// One-time token from `banmesh hub token create`. The command line is
    /// visible to every user of the machine: prefer --token-file or the
    /// environment.
    #[arg(
        long,
        env = "BANMESH_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// Read the token from the first line of this file (not readable by
    /// other users).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// SHA-256 of the fleet CA, as printed with the token; the hub must prove it holds this CA.
    #[arg(long)]
    pub ca_sha256: String,
    /// This server's identity (default: its host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Where to write host.key (0600), host.crt and ca.crt.
    #[arg(long, default_value = DEFAULT_CERT_DIR)]
    pub dir: PathBuf,
}

/// The hub to talk to, and the admin certificate to do it with.
#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Hub address.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    pub hub: String,
    /// The admin certificate, key and fleet CA.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `banmesh hub token`: enrolment token management.
#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// Print a one-time enrolment token and the CA's SHA-256 (needs an admin certificate).
    Create {
        /// How long the token can be used.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The only host name the token may enrol (required unless --any-name).
        #[arg(long, required_unless_present = "any_name")]
        name: Option<String>,
        /// Let the token's holder pick any free host name instead (never an
        /// IP address or one of the hub's names).
        #[arg(long, conflicts_with = "name")]
        any_name: bool,
        /// Validity of the certificate the token buys.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        cert_ttl: Duration,
        /// The hub to ask, and the admin certificate to ask with.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `banmesh ca`: making the fleet CA and issuing certificates by hand.
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a new CA: DIR/ca.crt and DIR/ca.key (0600).
    Init {
        /// Directory for the CA files.
        #[arg(long, default_value = DEFAULT_CERT_DIR)]
        dir: PathBuf,
    },
    /// Issue DIR/NAME.crt and DIR/NAME.key (0600) for a host named NAME.
    Issue {
        /// Directory holding the CA; the new files go there too.
        #[arg(long, default_value = DEFAULT_CERT_DIR)]
        dir: PathBuf,
        /// The host's identity (its certificate's common name).
        #[arg(long)]
        name: String,
        /// Extra DNS names or IP addresses the host is reached by (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Grant the admin role (unban and other fleet-wide calls).
        #[arg(long, conflicts_with = "hub")]
        admin: bool,
        /// The hub's certificate: carries the hub mark nodes require, and
        /// the hub's DNS names and addresses (--san). Never a host's.
        #[arg(long)]
        hub: bool,
        /// Validity, e.g. 90d.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
}

/// Certificate flags shared by every mTLS command.
#[derive(Args, Debug, Clone)]
pub struct TlsArgs {
    /// This host's certificate (PEM).
    #[arg(long, default_value = "/etc/banmesh/host.crt")]
    pub cert: PathBuf,
    /// This host's private key (PEM).
    #[arg(long, default_value = "/etc/banmesh/host.key")]
    pub key: PathBuf,
    /// The fleet CA certificate (PEM).
    #[arg(long, default_value = "/etc/banmesh/ca.crt")]
    pub ca: PathBuf,
}

impl From<&TlsArgs> for TlsFiles {
    fn from(a: &TlsArgs) -> Self {
        TlsFiles {
            cert: a.cert.clone(),
            key: a.key.clone(),
            ca: a.ca.clone(),
        }
    }
}

/// `banmesh hub`: run the hub (no subcommand) or one of its management actions.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HubCommand {
    /// A management action; `None` runs the hub daemon with [`HubArgs`].
    #[command(subcommand)]
    pub action: Option<HubAction>,
    /// The daemon's flags, used when no action is given.
    #[command(flatten)]
    pub run: HubArgs,
}

/// `banmesh hub`'s management actions (against a running hub or its store).
#[derive(Subcommand, Debug)]
pub enum HubAction {
    /// Enrolment tokens.
    #[command(subcommand)]
    Token(TokenAction),
    /// Refuse a host from now on and end its open streams (needs an admin certificate).
    Revoke {
        /// The host's name.
        name: String,
        /// The hub to ask, and the admin certificate to ask with.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List hosts: enrolment, last seen, certificate expiry, subscription lag, revoked.
    Hosts {
        /// The hub to ask, and the admin certificate to ask with.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the fleet policy in force: the escalation ladder and its window,
    /// the signal thresholds, dry run, and how full the signal windows are.
    Policy {
        /// The hub to ask, and the certificate to ask with.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Copy a hub's data to another store, e.g. from the embedded one to MySQL.
    Migrate {
        /// Source store: sqlite:PATH or mysql://...
        #[arg(long)]
        from: String,
        /// Target store: mysql://... or sqlite:PATH
        #[arg(long)]
        to: String,
        /// Write even if the target already holds data (rows with existing ids are kept).
        #[arg(long)]
        force: bool,
    },
    /// Import the seed's MySQL `ip_table` (with its host_* columns) into the hub's store.
    ImportSeed {
        /// The seed's database, e.g. mysql://f2ban:pass@db:3306/fail2ban
        #[arg(long)]
        from: String,
        /// Target store (default: the embedded store in --data-dir).
        #[arg(long)]
        to: Option<String>,
        /// Directory of the default embedded store.
        #[arg(long, default_value = hub::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Write even if the target already holds data (rows with existing ids are kept).
        #[arg(long)]
        force: bool,
    },
}

/// Flags of the hub daemon (`banmesh hub` with no action).
#[derive(Args, Debug)]
pub struct HubArgs {
    /// Address to listen on (mutual TLS).
    #[arg(long, default_value = hub::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Store: mysql://user:pass@host:port/db or sqlite:PATH (default: SQLite in --data-dir).
    /// Several MySQL URLs (the flag repeated, or separated by commas) are
    /// addresses of one Galera cluster: the hub uses the first healthy one
    /// and moves to another when it fails.
    /// A password here is visible to every user of the machine: prefer
    /// --db-file or the environment.
    #[arg(
        long,
        env = "BANMESH_DB",
        hide_env_values = true,
        conflicts_with = "db_file",
        action = clap::ArgAction::Append
    )]
    pub db: Vec<String>,
    /// Read the store URL from the first line of this file (not readable
    /// by other users).
    #[arg(long, value_name = "PATH")]
    pub db_file: Option<PathBuf>,
    /// Directory for the embedded store.
    #[arg(long, default_value = hub::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The hub's own certificate and key, and the fleet CA it verifies clients against.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// CA private key, to sign enrolments and renewals (default: ca.key beside --ca, if present).
    #[arg(long)]
    pub ca_key: Option<PathBuf>,
    /// Reports one host may send: N/s, N/min or N/h, or off. Past it (and
    /// the burst) the hub takes no more from that host for now; its reports
    /// wait in its outbox and go out at this pace.
    #[arg(long, value_name = "RATE", default_value = hub::rate_limit::DEFAULT_RATE)]
    pub report_rate: hub::rate_limit::ReportRate,
    /// Reports one host may send at once, above --report-rate.
    #[arg(long, value_name = "N", default_value_t = hub::rate_limit::DEFAULT_BURST)]
    pub report_burst: u32,
    /// The escalation ladder: fleet ban durations (s, m, h, d), first
    /// offence first. An address banned again while an earlier ban of it
    /// ended within --ladder-window gets the next rung; the top one holds.
    /// `off`: bans carry no fleet end (each host's jail bantime applies)
    /// and reports of a banned address are not coalesced.
    #[arg(long, value_name = "DURATIONS", default_value = hub::ladder::DEFAULT_LADDER,
          value_parser = ladder_arg)]
    pub ladder: String,
    /// How long a ban's end counts in an address's history.
    #[arg(long, value_name = "DURATION", default_value = hub::ladder::DEFAULT_WINDOW,
          value_parser = ladder_window_arg)]
    pub ladder_window: String,
    /// How often the hub reads the store for bans committed through other
    /// hubs sharing it (MySQL/Galera), to stream them to its own nodes
    /// within this delay; 0s: never (a lone hub saves the idle queries).
    /// Ignored with SQLite, which only one hub can use.
    #[arg(long, value_name = "DURATION", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub peer_poll: Duration,
    /// This hub's name, recorded against each host subscribed through it
    /// (`banmesh hub hosts` on any hub shows it). Hubs sharing a database
    /// need distinct names. Default: this machine's host name.
    #[arg(long, value_name = "NAME", value_parser = hub_name_arg)]
    pub name: Option<String>,
    /// The fleet signal policy.
    #[command(flatten)]
    pub signals: SignalArgs,
    /// Config file and logging.
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// Checks `--name` where clap reads it: a host name (letters, digits,
/// `-`, `.`), as the column that records it holds.
fn hub_name_arg(s: &str) -> Result<String, String> {
    crate::hostname::validate(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Checks `--ladder` where clap reads it, so that `config check` refuses
/// a bad ladder in a file instead of the hub refusing it at start.
fn ladder_arg(s: &str) -> Result<String, hub::ladder::LadderError> {
    if s != "off" {
        hub::ladder::Ladder::parse(s, hub::ladder::DEFAULT_WINDOW)?;
    }
    Ok(s.to_string())
}

/// Checks `--ladder-window` where clap reads it (see [`ladder_arg`]).
fn ladder_window_arg(s: &str) -> Result<String, hub::ladder::LadderError> {
    hub::ladder::parse_duration(s)?;
    Ok(s.to_string())
}

/// The hub's fleet signal policy: when hosts' observations become a
/// fleet ban (README "Fleet signals" gives the defaults' reasons).
#[derive(Args, Debug)]
pub struct SignalArgs {
    /// Failures of one address, summed over hosts, that ban it fleet-wide
    /// (jail banmesh-fleet); 0 turns failure signals off.
    #[arg(long, value_name = "N", default_value_t = hub::signals::windows::DEFAULT_FLEET_MAXRETRY)]
    pub fleet_maxretry: u32,
    /// The window --fleet-maxretry failures must fall in.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub fleet_findtime: Duration,
    /// Distinct hosts that must have seen those failures (one host's own
    /// jail covers the single-host case).
    #[arg(long, value_name = "N", default_value_t = hub::signals::windows::DEFAULT_FLEET_MIN_HOSTS)]
    pub fleet_min_hosts: u32,
    /// Distinct closed ports an address may probe, on one host or across
    /// hosts, before it is banned fleet-wide (jail banmesh-portscan); 0
    /// turns probe signals off.
    #[arg(long, value_name = "N", default_value_t = hub::signals::windows::DEFAULT_PROBE_PORTS)]
    pub probe_ports: u32,
    /// The window --probe-ports probes must fall in.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = humantime::parse_duration)]
    pub probe_findtime: Duration,
    /// Most addresses the signal windows hold (about 150 bytes each; the
    /// address signalled longest ago is dropped first, and counted).
    #[arg(long, value_name = "N", default_value_t = hub::signals::windows::DEFAULT_MAX_ADDRESSES)]
    pub signal_max_addresses: usize,
    /// Log what the signal thresholds would ban, ban nothing.
    #[arg(long)]
    pub signals_dry_run: bool,
    /// Signals one host may send: N/s, N/min or N/h, or off. Past it (and
    /// the burst) the host's batches are refused and it drops them; its
    /// bans are not affected.
    #[arg(long, value_name = "RATE", default_value = hub::signals::limit::DEFAULT_RATE)]
    pub signal_rate: hub::rate_limit::ReportRate,
    /// Signals one host may send at once, above --signal-rate.
    #[arg(long, value_name = "N", default_value_t = hub::signals::limit::DEFAULT_BURST)]
    pub signal_burst: u32,
}

impl From<&SignalArgs> for hub::signals::SignalConfig {
    fn from(a: &SignalArgs) -> Self {
        hub::signals::SignalConfig {
            thresholds: hub::signals::windows::Thresholds {
                fleet_maxretry: a.fleet_maxretry,
                fleet_findtime: a.fleet_findtime,
                fleet_min_hosts: a.fleet_min_hosts,
                probe_ports: a.probe_ports,
                probe_findtime: a.probe_findtime,
            },
            max_addresses: a.signal_max_addresses,
            dry_run: a.signals_dry_run,
            limit: hub::signals::limit::SignalLimit {
                rate: a.signal_rate,
                burst: a.signal_burst,
            },
        }
    }
}

/// `banmesh node`: run the node daemon (no subcommand) or set fail2ban up for it.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeCommand {
    /// `setup-fail2ban`; `None` runs the node daemon with [`NodeArgs`].
    #[command(subcommand)]
    pub action: Option<NodeAction>,
    /// The daemon's flags, used when no action is given.
    #[command(flatten)]
    pub run: NodeArgs,
}

/// `banmesh node`'s one-shot actions.
#[derive(Subcommand, Debug)]
pub enum NodeAction {
    /// Write the `shared` jail, its filter, shared.log and the reporting ban action.
    SetupFail2ban(SetupArgs),
    /// Install (or --remove) the OUTPUT rules that hand the kernel's answers to closed ports to an NFLOG group.
    SetupProbes(ProbeSetupArgs),
}

/// Flags of `banmesh node setup-probes`.
#[derive(Args, Debug)]
pub struct ProbeSetupArgs {
    /// NFLOG group the rules log to; give the node the same `--probe-nflog-group`.
    #[arg(long, value_name = "N", default_value_t = node::signals::probe_rule::DEFAULT_GROUP)]
    pub nflog_group: u16,
    /// Remove banmesh's rules and chain instead.
    #[arg(long)]
    pub remove: bool,
}

/// The shared jail's bantime `setup-fail2ban` writes by default: the
/// default ladder's top (its longest ban).
pub const DEFAULT_SHARED_BANTIME: &str = "25d";

/// Flags of `banmesh node setup-fail2ban`.
#[derive(Args, Debug)]
pub struct SetupArgs {
    /// fail2ban's configuration directory.
    #[arg(long, default_value = "/etc/fail2ban")]
    pub config_dir: PathBuf,
    /// The node's paths (written into the jail and into the action's `banmesh report` call).
    #[command(flatten)]
    pub paths: NodePaths,
    /// bantime (and findtime) of the shared jail (fail2ban syntax: 3600, 1d,
    /// 25d): the hub's ladder top (`hub --ladder`), so fail2ban never lifts
    /// a fleet ban early; the node lifts each at the fleet's end itself.
    #[arg(long, default_value = DEFAULT_SHARED_BANTIME)]
    pub bantime: String,
    /// Also block banned IPs forwarded from this interface (the seed's NAT FORWARD rule), e.g. ppp+.
    #[arg(long, value_name = "IFACE")]
    pub nat_forward: Option<String>,
    /// banmesh binary the action runs (default: this one; from
    /// `banmesh-node`, the `banmesh` beside it).
    #[arg(long)]
    pub banmesh: Option<PathBuf>,
    /// Print the files instead of writing them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Where a node keeps its things; shared by `node`, `node setup-fail2ban`.
#[derive(Args, Debug)]
pub struct NodePaths {
    /// Log file of fail2ban's `shared` jail; bans from other hosts are appended here.
    #[arg(long, default_value = node::DEFAULT_SHARED_LOG)]
    pub shared_log: PathBuf,
    /// Unix socket for `banmesh report`.
    #[arg(long, default_value = node::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// State directory (outbox, spool, last applied event).
    #[arg(long, default_value = node::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// Flags of the node daemon (`banmesh node` with no action).
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Hub address, https://HOST:PORT; repeat for failover across hubs.
    #[arg(long = "hub", default_value = "https://127.0.0.1:7443")]
    pub hubs: Vec<String>,
    /// This host's certificate and key (its identity to the hub), and the fleet CA.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The shared log, report socket and state directory.
    #[command(flatten)]
    pub paths: NodePaths,
    /// Most reports kept while the hub is unreachable.
    #[arg(long, default_value_t = node::DEFAULT_OUTBOX_LIMIT)]
    pub outbox_limit: usize,
    /// fail2ban's control socket (checks what fail2ban already bans; lifts unbans).
    #[arg(long, default_value = crate::fail2ban::client::DEFAULT_SOCKET)]
    pub fail2ban_socket: PathBuf,
    /// Apply bans through shared.log only, never asking fail2ban's socket.
    #[arg(long)]
    pub no_fail2ban_socket: bool,
    /// Keep the socket for checks and unbans, but ban only through shared.log
    /// (no fast path; fail2ban then bans within its ~0.35 s polling).
    #[arg(long)]
    pub no_fail2ban_socket_ban: bool,
    /// An IP fail2ban already bans with more than this share of its time
    /// left is status 2 (already banned recently); with less, the new ban
    /// is applied when the old one ends.
    #[arg(long, default_value_t = node::apply::DEFAULT_RECENT_RATIO)]
    pub recent_ratio: f64,
    /// Renew this host's certificate when less than this is left.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub renew_before: Duration,
    /// Also serve status, health and reflection over mTLS here, for grpcurl (e.g. 0.0.0.0:7444).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Do not send the hub a signal per failure fail2ban's filters find
    /// here (by default they go, read from fail2ban's own log).
    #[arg(long)]
    pub no_failure_signals: bool,
    /// Send the hub a signal per connection attempt to a closed port, read
    /// from this NFLOG group (install its rules with `banmesh node setup-probes`).
    #[arg(long, value_name = "N")]
    pub probe_nflog_group: Option<u16>,
    /// Closed ports whose probes are not reported (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    pub probe_ignore_ports: Vec<u16>,
    /// Config file and logging.
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// The seed's `add2db.py` flags. `-pr` is accepted too (rewritten to
/// `--protocol` before parsing, as clap has no two-letter short flags).
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The node's unix socket.
    #[arg(long, default_value = node::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The node's data dir: when the node is down, the ban waits in its spool there.
    #[arg(long, default_value = node::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Jail that banned the IP (fail2ban's <name>).
    #[arg(short = 'j', long)]
    pub jail: String,
    /// Protocol (fail2ban's <protocol>); also `-pr`.
    #[arg(long, visible_alias = "pr")]
    pub protocol: String,
    /// Port or ports (fail2ban's <port>).
    #[arg(short = 'p', long)]
    pub port: String,
    /// The banned IP (fail2ban's <ip>).
    #[arg(short = 'i', long)]
    pub ip: String,
}

/// Flags of `banmesh unban`.
#[derive(Args, Debug)]
pub struct UnbanArgs {
    /// IP to lift everywhere.
    pub ip: String,
    /// Also clear the address's fleet history: its next ban starts again
    /// on the ladder's first rung (a plain unban keeps its place).
    #[arg(long)]
    pub forget: bool,
    /// Hub address.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    pub hub: String,
    /// An admin certificate: only admins may lift bans fleet-wide.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Flags of `banmesh bans`.
#[derive(Args, Debug)]
pub struct BansArgs {
    /// Hub address.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    pub hub: String,
    /// This host's (or an admin's) certificate, key and the fleet CA.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Only this IP: its whole history, every ban of it (lifted, ended,
    /// forgotten) with its rung and reporters.
    #[arg(long)]
    pub ip: Option<String>,
    /// At most this many bans.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// List the reports the hub refused because the address is on the allow-list instead.
    #[arg(long, conflicts_with = "ip")]
    pub refused: bool,
}

/// Flags of `banmesh allow`.
#[derive(Args, Debug)]
pub struct AllowArgs {
    /// What to do with the list.
    #[command(subcommand)]
    pub action: AllowAction,
}

/// The hub and certificate an `allow` subcommand calls with.
#[derive(Args, Debug)]
pub struct HubConn {
    /// Hub address.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    pub hub: String,
    /// An admin certificate (any fleet certificate may list).
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `banmesh allow` subcommands.
#[derive(Subcommand, Debug)]
pub enum AllowAction {
    /// Add a network (address or CIDR, IPv4 or IPv6); every active ban inside it is lifted on every host.
    Add {
        /// The network, e.g. 192.0.2.0/24 or 2001:db8::/48 (host bits must be zero; /0 is refused).
        network: String,
        /// Why it is there (who it belongs to), shown by `allow list`.
        #[arg(long, default_value = "")]
        note: String,
        /// The hub and an admin certificate.
        #[command(flatten)]
        conn: HubConn,
    },
    /// Show the entries, the built-ins and the fleet's own addresses.
    List {
        /// The hub and a fleet certificate.
        #[command(flatten)]
        conn: HubConn,
    },
    /// Remove a network; bans inside it are shared again from then on (none is re-applied).
    Remove {
        /// The network exactly as listed.
        network: String,
        /// The hub and an admin certificate.
        #[command(flatten)]
        conn: HubConn,
    },
}

/// Rewrites the seed's `-pr X` into `--protocol X`.
pub fn seed_args(args: impl Iterator<Item = String>) -> Vec<String> {
    args.map(|a| match a.as_str() {
        "-pr" => "--protocol".to_string(),
        _ => a
            .strip_prefix("-pr=")
            .map_or(a.clone(), |v| format!("--protocol={v}")),
    })
    .collect()
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A daemon's process-wide parts: its log output and its `SIGHUP` reload.
struct Service {
    reloader: Option<crate::config::reload::Reloader>,
}

impl Service {
    fn start(
        args: &ServiceArgs,
        argv: Vec<std::ffi::OsString>,
        effective: Option<crate::config::Effective>,
    ) -> Service {
        let level_is_default = effective.as_ref().is_none_or(|e| {
            e.sources
                .iter()
                .any(|(id, s)| id == "log_level" && *s == crate::config::Source::Default)
        });
        let log = crate::logging::init(&args.log_level, level_is_default, args.log_format);
        Service {
            reloader: effective.map(|e| crate::config::reload::Reloader::new(argv, e, log)),
        }
    }

    /// Starts handling `SIGHUP` (inside the runtime).
    fn serve(self) {
        crate::systemd::spawn_watchdog();
        if let Some(r) = self.reloader {
            r.spawn();
        }
    }
}

/// Runs a daemon future until SIGINT/SIGTERM, then lets it finish.
async fn until_signal<F, Fut, E>(run: F) -> anyhow::Result<()>
where
    F: FnOnce(shutdown::Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let (trigger, stop) = shutdown::channel();
    tokio::spawn(async move {
        shutdown::os_signal().await;
        crate::systemd::stopping();
        trigger.trigger();
        // Keep the trigger alive until the process exits.
        std::future::pending::<()>().await;
    });
    run(stop).await?;
    Ok(())
}

/// `banmesh report` on its own: fail2ban's action runs it once per ban
/// and waits for it, so it parses its own flags only, not the whole
/// command tree (a hundred fewer page faults a run), and reads no config
/// file (it never did: only daemons read one).
#[derive(Parser, Debug)]
#[command(
    name = "banmesh report",
    bin_name = "banmesh report",
    version,
    about = "Hand a ban to the local node (what fail2ban's actionban runs)"
)]
struct ReportOnly {
    #[command(flatten)]
    args: ReportArgs,
}

/// Entry point for the binary: returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let argv = process_argv();
    // The lean path (issue 19): `report` as the first word.
    if argv.get(1).is_some_and(|a| a == "report") {
        return match ReportOnly::try_parse_from(&argv[1..]) {
            Ok(r) => report(r.args),
            Err(e) => e.exit(),
        };
    }
    let loaded = match load(argv.clone()) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let effective = loaded.effective;
    let result = match loaded.cli.command {
        Command::Report(args) => return report(args),
        Command::Ca(cmd) => {
            init_logging("warn");
            ca_command(cmd)
        }
        Command::Hub(hub) => match *hub {
            HubCommand {
                action: Some(action),
                ..
            } => {
                init_logging("warn");
                runtime().block_on(hub_action(action))
            }
            HubCommand { run, .. } => {
                // SAFETY: no thread has been started yet.
                unsafe { crate::hub::store::mysql::bound_buffer_pool() };
                let service = Service::start(&run.service, argv, effective);
                runtime().block_on(run_hub(run, service))
            }
        },
        Command::Node(node) => node_command(*node, argv, effective),
        Command::Unban(args) => {
            init_logging("warn");
            runtime().block_on(async {
                print!(
                    "{}",
                    admin::unban(&args.hub, &(&args.tls).into(), &args.ip, args.forget).await?
                );
                Ok(())
            })
        }
        Command::Bans(args) if args.refused => {
            init_logging("warn");
            runtime().block_on(async {
                let tls = (&args.tls).into();
                print!(
                    "{}",
                    admin::allow::refused(&args.hub, &tls, args.limit).await?
                );
                Ok(())
            })
        }
        Command::Allow(args) => {
            init_logging("warn");
            runtime().block_on(allow(args))
        }
        Command::Bans(args) => {
            init_logging("warn");
            runtime().block_on(async {
                let tls = (&args.tls).into();
                print!(
                    "{}",
                    admin::bans::list(&args.hub, &tls, args.ip, args.limit).await?
                );
                Ok(())
            })
        }
        Command::Demo(args) => {
            init_logging("warn");
            runtime().block_on(crate::demo::run(args))
        }
        Command::Bench(args) => {
            init_logging("error");
            runtime().block_on(crate::bench::run(args))
        }
        Command::Enroll(args) => {
            init_logging("warn");
            runtime().block_on(enroll(args))
        }
        Command::Config(cmd) => return crate::config::command::run(cmd),
        Command::Status(args) => return status(args),
        Command::Generate(GenerateCommand::Man { dir }) => std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(crate::config::definition(), &dir))
            .with_context(|| format!("cannot write man pages to {}", dir.display())),
        Command::Generate(GenerateCommand::Completions { shell }) => {
            clap_complete::generate(
                shell,
                &mut crate::config::command(),
                "banmesh",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    };
    exit_code(result)
}

/// This process's arguments, with the seed's `-pr` rewritten ([`seed_args`]).
fn process_argv() -> Vec<std::ffi::OsString> {
    seed_args(std::env::args())
        .into_iter()
        .map(Into::into)
        .collect()
}

/// [`crate::config::load`], a refusal printed: a clap error (`--help`
/// too) exits as clap does, a refused config file with 2.
fn load(argv: Vec<std::ffi::OsString>) -> Result<crate::config::Loaded, std::process::ExitCode> {
    match crate::config::load(argv) {
        Ok(Ok(loaded)) => Ok(loaded),
        Ok(Err(e)) => {
            eprintln!("banmesh: {e}");
            Err(std::process::ExitCode::from(2))
        }
        Err(e) => e.exit(),
    }
}

/// A command's result as the process's exit code (the error printed).
fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banmesh: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `banmesh node [ACTION]`: the daemon, or one of its setup actions.
/// `argv` is the process's (re-read with the config file on `SIGHUP`).
fn node_command(
    node: NodeCommand,
    argv: Vec<std::ffi::OsString>,
    effective: Option<crate::config::Effective>,
) -> anyhow::Result<()> {
    match node {
        NodeCommand {
            action: Some(NodeAction::SetupFail2ban(args)),
            ..
        } => setup_fail2ban(args),
        NodeCommand {
            action: Some(NodeAction::SetupProbes(args)),
            ..
        } => setup_probes(args),
        NodeCommand { run, .. } => {
            let service = Service::start(&run.service, argv, effective);
            node::memory::runtime()
                .expect("start the tokio runtime")
                .block_on(run_node(run, service))
        }
    }
}

/// The name of the node-only binary.
pub const NODE_BINARY: &str = "banmesh-node";

/// `banmesh-node`'s command line: `banmesh node`'s own definition (its
/// flags, their `BANMESH_*` variables, its actions), under its own name.
pub fn node_only_command() -> clap::Command {
    crate::config::definition()
        .find_subcommand(crate::config::Daemon::Node.name())
        .expect("node is a subcommand")
        .clone()
        .name(NODE_BINARY)
        .bin_name(NODE_BINARY)
        .version(env!("CARGO_PKG_VERSION"))
}

/// Entry point of `banmesh-node`: exactly `banmesh node ARGS` (the same
/// definition, config file, environment, `SIGHUP` reload and code path),
/// in a binary that links the node only (issue 19: the code a node maps
/// and keeps resident; see docs/perf/node-memory.txt).
///
/// Its own argv is checked first against [`node_only_command`], so that
/// `--help`, `--version` and a bad flag speak as `banmesh-node`; then
/// `node` is put after argv\[0\] and it runs as `banmesh node` does.
pub fn node_main() -> std::process::ExitCode {
    let mut argv = process_argv();
    if let Err(e) = node_only_command().try_get_matches_from(&argv) {
        e.exit();
    }
    argv.insert(1, crate::config::Daemon::Node.name().into());
    let loaded = match load(argv.clone()) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    match loaded.cli.command {
        Command::Node(node) => exit_code(node_command(*node, argv, loaded.effective)),
        _ => unreachable!("argv's first word is `node`"),
    }
}

async fn allow(args: AllowArgs) -> anyhow::Result<()> {
    match args.action {
        AllowAction::Add {
            network,
            note,
            conn,
        } => print!(
            "{}",
            admin::allow::add(&conn.hub, &(&conn.tls).into(), &network, &note).await?
        ),
        AllowAction::List { conn } => print!(
            "{}",
            admin::allow::list(&conn.hub, &(&conn.tls).into()).await?
        ),
        AllowAction::Remove { network, conn } => print!(
            "{}",
            admin::allow::remove(&conn.hub, &(&conn.tls).into(), &network).await?
        ),
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime")
}

fn ca_command(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { dir } => {
            ca::init(&dir)?;
            println!(
                "created {} and {}",
                dir.join("ca.crt").display(),
                dir.join("ca.key").display()
            );
        }
        CaCommand::Issue {
            dir,
            name,
            sans,
            admin,
            hub,
            valid_for,
        } => {
            let role = match (admin, hub) {
                (true, _) => ca::Role::Admin,
                (_, true) => ca::Role::Hub,
                _ => ca::Role::Host,
            };
            let (crt, key) = ca::issue(
                &dir,
                &ca::HostCert {
                    name: &name,
                    sans: &sans,
                    valid_for,
                    role,
                },
            )?;
            println!("issued {} and {}", crt.display(), key.display());
        }
    }
    Ok(())
}

/// The first line of a file holding a secret (`what`), trimmed. A file
/// that every user may read is refused: the point of the file form is to
/// keep the secret from other users, as the command line cannot. A group-
/// readable file is accepted (0640, root-owned, the service's group).
fn read_secret(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read {what} from {shown}"))?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        anyhow::bail!(
            "{shown} holds {what} but every user can read it (mode {:o}): \
             run `chmod o-rwx {shown}` (0600, or 0640 for a service group)",
            mode & 0o777
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} from {shown}"))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        anyhow::bail!("{shown} should hold {what} on its first line, and it is empty");
    }
    Ok(line.to_string())
}

async fn run_hub(args: HubArgs, service: Service) -> anyhow::Result<()> {
    service.serve();
    let (_stop_metrics, stop) = shutdown::channel();
    if let Some(addr) = args.service.metrics {
        crate::metrics::serve(addr, crate::metrics::hub::exposition(), stop)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    let db = match (args.db.is_empty(), args.db_file) {
        (true, Some(file)) => Some(read_secret(&file, "the store URL")?),
        (true, None) => None,
        // Several addresses of one cluster: `store::mysql::urls` splits them.
        (false, _) => Some(args.db.join(",")),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let ladder = match args.ladder.as_str() {
        "off" => None,
        rungs => Some(
            hub::ladder::Ladder::parse(rungs, &args.ladder_window)
                .context("bad --ladder or --ladder-window")?,
        ),
    };
    let config = hub::HubConfig {
        ladder,
        db,
        data_dir: args.data_dir,
        tls: (&args.tls).into(),
        ca_key: args.ca_key,
        report_limit: hub::rate_limit::ReportLimit {
            rate: args.report_rate,
            burst: args.report_burst,
        },
        signals: (&args.signals).into(),
        peer_poll: Some(args.peer_poll).filter(|d| !d.is_zero()),
        name: args.name,
    };
    until_signal(|stop| hub::run(listener, config, stop)).await
}

fn setup_fail2ban(args: SetupArgs) -> anyhow::Result<()> {
    use crate::fail2ban::setup::{Outcome, Setup, next_steps};
    let banmesh = match args.banmesh {
        Some(p) => p,
        // From `banmesh-node`: the `banmesh` beside it (the action runs
        // `banmesh report` where `banmesh-report` is missing).
        None => std::env::current_exe()
            .map(|exe| match exe.file_name() {
                Some(name) if name == NODE_BINARY => exe.with_file_name("banmesh"),
                _ => exe,
            })
            .context("cannot find the banmesh binary's path; pass --banmesh")?,
    };
    let setup = Setup {
        config_dir: args.config_dir,
        shared_log: args.paths.shared_log,
        socket: args.paths.socket,
        data_dir: args.paths.data_dir,
        banmesh,
        bantime: args.bantime,
        nat_forward: args.nat_forward,
    };
    // A refused value fails the command (exit 2 path), --dry-run included.
    setup.check()?;
    if args.dry_run {
        print!("{}", setup.dry_run());
        return Ok(());
    }
    for outcome in setup.apply()? {
        match outcome {
            Outcome::Written(p) => println!("wrote      {}", p.display()),
            Outcome::Unchanged(p) => println!("unchanged  {}", p.display()),
        }
    }
    println!("{}", next_steps());
    Ok(())
}

/// `banmesh node setup-probes`: runs iptables/ip6tables once (a setup
/// command, not the ban path).
fn setup_probes(args: ProbeSetupArgs) -> anyhow::Result<()> {
    use node::signals::probe_rule::{self, Outcome};
    let outcomes = if args.remove {
        probe_rule::remove()?
    } else {
        probe_rule::install(args.nflog_group)?
    };
    for outcome in outcomes {
        match outcome {
            Outcome::Written(t) => println!("wrote      {t} chain {}", probe_rule::CHAIN),
            Outcome::Unchanged(t) => println!("unchanged  {t} chain {}", probe_rule::CHAIN),
            Outcome::Removed(t) => println!("removed    {t} chain {}", probe_rule::CHAIN),
            Outcome::Absent(t) => println!("absent     {t} chain {}", probe_rule::CHAIN),
        }
    }
    if !args.remove {
        println!(
            "Next: start the node with --probe-nflog-group {} (it reads the group; failures of fail2ban's filters flow without it).",
            args.nflog_group
        );
    }
    Ok(())
}

fn when(ms: i64) -> String {
    admin::utc(ms, false)
}

/// `banmesh hub ACTION`: the bodies are in [`admin`]; this prints them.
async fn hub_action(action: HubAction) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let progress = std::io::stderr().is_terminal();
    match action {
        HubAction::Token(TokenAction::Create {
            ttl,
            name,
            any_name: _,
            cert_ttl,
            admin: a,
        }) => {
            let tls = (&a.tls).into();
            print!(
                "{}",
                admin::membership::create_token(&a.hub, &tls, ttl, name, cert_ttl).await?
            );
        }
        HubAction::Revoke { name, admin: a } => {
            print!(
                "{}",
                admin::membership::revoke(&a.hub, &(&a.tls).into(), &name).await?
            );
        }
        HubAction::Hosts { admin: a } => {
            print!(
                "{}",
                admin::membership::hosts(&a.hub, &(&a.tls).into()).await?
            );
        }
        HubAction::Policy { admin: a } => {
            print!("{}", admin::bans::policy(&a.hub, &(&a.tls).into()).await?);
        }
        HubAction::Migrate { from, to, force } => {
            print!(
                "{}",
                admin::data::migrate(&from, &to, force, progress).await?
            );
        }
        HubAction::ImportSeed {
            from,
            to,
            data_dir,
            force,
        } => {
            let report = admin::data::import_seed(&from, to, &data_dir, force, progress).await?;
            print!("{report}");
        }
    }
    Ok(())
}

async fn run_node(args: NodeArgs, service: Service) -> anyhow::Result<()> {
    service.serve();
    let (_stop_metrics, stop) = shutdown::channel();
    if let Some(addr) = args.service.metrics {
        crate::metrics::serve(addr, crate::metrics::node::exposition(), stop)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    let config = node::NodeConfig {
        hubs: args.hubs,
        tls: (&args.tls).into(),
        shared_log: args.paths.shared_log,
        socket: args.paths.socket,
        data_dir: args.paths.data_dir,
        outbox_limit: args.outbox_limit,
        fail2ban_socket: (!args.no_fail2ban_socket).then_some(args.fail2ban_socket),
        recent_ratio: args.recent_ratio,
        fast_path: !args.no_fail2ban_socket_ban,
        renew_before: args.renew_before,
        listen: args.listen,
        observer: None,
        failure_signals: !args.no_failure_signals,
        probe_nflog_group: args.probe_nflog_group,
        probe_ignore_ports: args.probe_ignore_ports,
    };
    until_signal(|stop| node::run(config, stop)).await
}

/// `banmesh status`: 0 healthy, 1 a problem (named), 2 no answer.
fn status(args: StatusArgs) -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    let answer = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            crate::report::node_status(&args.socket),
        )
        .await
    });
    let s = match answer {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            println!(
                "PROBLEM      the node does not answer on {}: {e}",
                args.socket.display()
            );
            return std::process::ExitCode::from(2);
        }
        Err(_) => {
            println!(
                "PROBLEM      the node did not answer on {} within 10 s",
                args.socket.display()
            );
            return std::process::ExitCode::from(2);
        }
    };
    let (text, problems) = crate::status::assess(
        &s,
        crate::clock::now_ms(),
        crate::status::Thresholds {
            max_lag: args.max_lag,
            cert_warn: args.cert_warn,
        },
    );
    print!("{text}");
    if problems.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// `banmesh report`: exit 0 once the node has the ban on disk; 2 for a bad
/// argument; 1 when the node cannot take it.
fn report(args: ReportArgs) -> std::process::ExitCode {
    let ban = match Ban::new(&args.jail, &args.protocol, &args.port, &args.ip) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("banmesh report: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // No async runtime: one blocking call (`report::wire`), since this
    // runs once per ban inside fail2ban's action.
    match crate::report::report_or_spool_blocking(&args.socket, &args.data_dir, ban) {
        Ok(crate::report::Accepted::Queued(_)) => std::process::ExitCode::SUCCESS,
        Ok(crate::report::Accepted::Spooled(path)) => {
            eprintln!(
                "banmesh report: the node is not running; the ban waits in {} for it to start",
                path.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("banmesh report: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let name = args.name.unwrap_or_else(crate::enroll::host_name);
    let token = match (args.token, args.token_file) {
        (_, Some(file)) => read_secret(&file, "an enrolment token")?,
        (Some(token), None) => token,
        (None, None) => anyhow::bail!("pass --token-file PATH, BANMESH_TOKEN or --token"),
    };
    let done = crate::enroll::enroll(&crate::enroll::EnrollRequest {
        hub: args.hub.clone(),
        token,
        ca_sha256: args.ca_sha256,
        name: name.clone(),
        dir: args.dir,
    })
    .await?;
    println!(
        "enrolled as {name}; certificate valid until {} UTC",
        when(done.expires_ms)
    );
    println!(
        "wrote {} (0600), {}, {}",
        done.key.display(),
        done.cert.display(),
        done.ca.display()
    );
    let hub = args.hub.trim_start_matches("https://");
    println!(
        "start the node:\n  banmesh node --hub https://{hub} --cert {} --key {} --ca {}",
        done.cert.display(),
        done.key.display(),
        done.ca.display()
    );
    Ok(())
}
