//! Graceful shutdown as a value every task owns.
//!
//! One [`ShutdownTrigger`] is held by whoever decides to stop (a signal
//! handler, a test); every task holds a cloned [`Shutdown`] and finishes its
//! current unit of work (a batch, a line, an acknowledgement) before it
//! returns. A task never learns of shutdown by being dropped mid-write.
use tokio::sync::watch;

/// Sends the stop signal; dropping it also stops everything.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A task's view of the stop signal.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected trigger and receiver.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Asks every task to finish and return.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Whether the stop signal has been given.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the stop signal is given (or its trigger is dropped).
    pub async fn recv(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// A future for `serve_with_shutdown` and friends.
    pub fn signalled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut me = self.clone();
        async move { me.recv().await }
    }
}

/// Resolves on SIGINT or SIGTERM: what the daemons wait for in `main`.
pub async fn os_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
