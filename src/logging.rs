//! Log output: text or JSON lines on stderr (journald keeps them), with a
//! filter that `SIGHUP` can change without a restart.
//!
//! JSON lines carry the spans they were written in (`rpc` with `peer` at
//! the hub, `node` with `host` on a node), so every line of a stream or a
//! connection names the host at its other end.
use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

use crate::cli::LogFormat;

/// The last warning or error logged: (unix ms, message with its fields).
static LAST_PROBLEM: std::sync::Mutex<Option<(i64, String)>> = std::sync::Mutex::new(None);

/// The last warning or error this process logged, for `banmesh status`.
pub fn last_problem() -> Option<(i64, String)> {
    LAST_PROBLEM.lock().ok()?.clone()
}

/// Keeps the last warning or error (what `status` shows as last error).
struct LastProblem;

struct Text(String);

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_debug(field, &format_args!("{value}"));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LastProblem {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if *event.metadata().level() > tracing::Level::WARN {
            return;
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        if let Ok(mut last) = LAST_PROBLEM.lock() {
            *last = Some((crate::clock::now_ms(), text.0));
        }
    }
}

/// Changes the live filter (what `SIGHUP` does with a new `log-level`).
#[derive(Clone)]
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Replaces the filter with `directives`.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// `--log-level`'s value parser: refuses what tracing would not understand,
/// so a config file with a bad level is refused by `config check` too.
pub fn parse_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not a level or tracing filter: {e}"))
}

/// The filter: `RUST_LOG` when set and `level` was left at its default,
/// otherwise `level`.
fn filter(level: &str, level_is_default: bool) -> EnvFilter {
    if level_is_default && let Ok(env) = EnvFilter::try_from_default_env() {
        return env;
    }
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the process's subscriber.
pub fn init(level: &str, level_is_default: bool, format: LogFormat) -> LogHandle {
    let (filter, handle) = reload::Layer::new(filter(level, level_is_default));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(LastProblem);
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("banmesh: logging was already set up: {e}");
    }
    LogHandle(handle)
}
