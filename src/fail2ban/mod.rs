//! fail2ban, from banmesh's side: its control socket ([`client`], over the
//! [`pickle`] subset it speaks) and the configuration banmesh installs
//! ([`setup`]).
pub mod client;
pub mod pickle;
pub mod setup;

pub use client::{BanTime, Fail2ban, Fail2banError};
