//! `banmesh node setup-probes`: the firewall rules that hand the kernel's
//! answers to closed ports to the node's NFLOG group.
//!
//! In the filter table, for IPv4 (`iptables`) and IPv6 (`ip6tables`):
//!
//! ```text
//! -N BANMESH-PROBES
//! -A BANMESH-PROBES -p tcp --tcp-flags RST,ACK RST,ACK  -m comment --comment banmesh-probes -j NFLOG --nflog-group N --nflog-prefix banmesh-probe --nflog-size 128
//! -A BANMESH-PROBES -p icmp --icmp-type port-unreachable ... (ipv6-icmp --icmpv6-type port-unreachable)
//! -I OUTPUT ! -o lo -m comment --comment banmesh-probes -j BANMESH-PROBES
//! ```
//!
//! The chain is banmesh's own, so the rules are found, compared and
//! removed exactly; every rule carries the comment [`COMMENT`], and a chain
//! of that name holding any rule without it was not written by banmesh:
//! setup and `--remove` then refuse and change nothing. Running again
//! with the same group changes nothing; with another group, rewrites
//! banmesh's chain. `NFLOG` never drops or alters a packet.
//!
//! This one-shot command runs `iptables`/`ip6tables` (whichever backend
//! the host's `iptables` is, nft or legacy): it is not on the ban path,
//! and the rules it writes stay in the operator's own firewall tooling,
//! where `iptables -S` shows them.
use std::process::Command;

use thiserror::Error;

use super::probes::PREFIX;

/// banmesh's chain.
pub const CHAIN: &str = "BANMESH-PROBES";
/// The comment on every rule banmesh writes.
pub const COMMENT: &str = "banmesh-probes";
/// The default NFLOG group.
pub const DEFAULT_GROUP: u16 = 5;

/// Why the probe rules could not be set up or removed.
#[derive(Debug, Error)]
pub enum ProbeRuleError {
    /// The tool could not be run at all.
    #[error("cannot run {tool}: {source} (install iptables, run as root)")]
    Spawn {
        /// `iptables` or `ip6tables`.
        tool: &'static str,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The chain holds a rule banmesh did not write.
    #[error(
        "{tool} chain {CHAIN} holds a rule banmesh did not write ({rule}); nothing changed: remove it (or the chain) yourself first"
    )]
    Foreign {
        /// `iptables` or `ip6tables`.
        tool: &'static str,
        /// The rule as `-S` prints it.
        rule: String,
    },
}

/// What a run did, per family.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The rules were written (or rewritten).
    Written(&'static str),
    /// They were already in place.
    Unchanged(&'static str),
    /// They were removed.
    Removed(&'static str),
    /// There was nothing to remove.
    Absent(&'static str),
}

/// One address family's tool and its ICMP match.
#[derive(Debug, Clone, Copy)]
struct Family {
    tool: &'static str,
    icmp: [&'static str; 4],
}

const FAMILIES: [Family; 2] = [
    Family {
        tool: "iptables",
        icmp: ["-p", "icmp", "--icmp-type", "port-unreachable"],
    },
    Family {
        tool: "ip6tables",
        icmp: ["-p", "ipv6-icmp", "--icmpv6-type", "port-unreachable"],
    },
];

/// The chain's rules for `group`, as argument lists after `-A CHAIN`.
fn chain_rules(family: Family, group: u16) -> Vec<Vec<String>> {
    let target = |m: &[&str]| -> Vec<String> {
        m.iter()
            .copied()
            .chain(["-m", "comment", "--comment", COMMENT, "-j", "NFLOG"])
            .map(str::to_string)
            .chain([
                "--nflog-group".to_string(),
                group.to_string(),
                "--nflog-prefix".to_string(),
                PREFIX.to_string(),
                "--nflog-size".to_string(),
                super::nflog::COPY_RANGE.to_string(),
            ])
            .collect()
    };
    vec![
        target(&["-p", "tcp", "--tcp-flags", "RST,ACK", "RST,ACK"]),
        target(&family.icmp),
    ]
}

/// The jump from OUTPUT, as arguments after `-I OUTPUT` / `-D OUTPUT`.
fn jump() -> Vec<String> {
    [
        "!",
        "-o",
        "lo",
        "-m",
        "comment",
        "--comment",
        COMMENT,
        "-j",
        CHAIN,
    ]
    .map(str::to_string)
    .to_vec()
}

fn run(tool: &'static str, args: &[String]) -> Result<std::process::Output, ProbeRuleError> {
    Command::new(tool)
        .arg("-w")
        .args(args)
        .output()
        .map_err(|source| ProbeRuleError::Spawn { tool, source })
}

fn must(tool: &'static str, args: &[String]) -> Result<String, ProbeRuleError> {
    let out = run(tool, args)?;
    if !out.status.success() {
        return Err(ProbeRuleError::Failed {
            command: format!("{tool} -w {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn args(first: &[&str], rest: &[String]) -> Vec<String> {
    first
        .iter()
        .map(|s| s.to_string())
        .chain(rest.iter().cloned())
        .collect()
}

/// The chain's rules as `-S` prints them, or `None` when there is no chain.
fn listed(tool: &'static str) -> Result<Option<Vec<String>>, ProbeRuleError> {
    let out = run(tool, &args(&["-S", CHAIN], &[]))?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_string)
            .collect(),
    ))
}

/// Refuses when a listed rule lacks banmesh's comment.
fn check_owned(tool: &'static str, rules: &[String]) -> Result<(), ProbeRuleError> {
    match rules
        .iter()
        .find(|r| !r.contains(&format!("--comment {COMMENT}")))
    {
        Some(rule) => Err(ProbeRuleError::Foreign {
            tool,
            rule: rule.clone(),
        }),
        None => Ok(()),
    }
}

fn jump_present(tool: &'static str) -> Result<bool, ProbeRuleError> {
    Ok(run(tool, &args(&["-C", "OUTPUT"], &jump()))?
        .status
        .success())
}

/// Each family's chain as listed (`None` when it does not exist), after
/// checking that every rule in it is banmesh's: both are read before either
/// is changed, so a refusal changes nothing.
fn owned_chains() -> Result<Vec<Option<Vec<String>>>, ProbeRuleError> {
    FAMILIES
        .iter()
        .map(|f| {
            let rules = listed(f.tool)?;
            if let Some(r) = &rules {
                check_owned(f.tool, r)?;
            }
            Ok(rules)
        })
        .collect()
}

/// Installs the rules for `group` in both families; checks both before
/// changing either.
pub fn install(group: u16) -> Result<Vec<Outcome>, ProbeRuleError> {
    let existing = owned_chains()?;
    let mut outcomes = Vec::new();
    for (f, rules) in FAMILIES.into_iter().zip(existing) {
        let want = chain_rules(f, group);
        let same = match &rules {
            Some(r) if r.len() == want.len() => want
                .iter()
                .map(|w| run(f.tool, &args(&["-C", CHAIN], w)).map(|o| o.status.success()))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .all(|ok| ok),
            _ => false,
        };
        let mut changed = false;
        if !same {
            if rules.is_some() {
                must(f.tool, &args(&["-F", CHAIN], &[]))?;
            } else {
                must(f.tool, &args(&["-N", CHAIN], &[]))?;
            }
            for w in &want {
                must(f.tool, &args(&["-A", CHAIN], w))?;
            }
            changed = true;
        }
        if !jump_present(f.tool)? {
            must(f.tool, &args(&["-I", "OUTPUT"], &jump()))?;
            changed = true;
        }
        outcomes.push(if changed {
            Outcome::Written(f.tool)
        } else {
            Outcome::Unchanged(f.tool)
        });
    }
    Ok(outcomes)
}

/// Removes banmesh's rules and chain in both families; refuses (changing
/// nothing) when the chain holds a rule banmesh did not write.
pub fn remove() -> Result<Vec<Outcome>, ProbeRuleError> {
    let existing = owned_chains()?;
    let mut outcomes = Vec::new();
    for (f, rules) in FAMILIES.into_iter().zip(existing) {
        let mut removed = false;
        while jump_present(f.tool)? {
            must(f.tool, &args(&["-D", "OUTPUT"], &jump()))?;
            removed = true;
        }
        if rules.is_some() {
            must(f.tool, &args(&["-F", CHAIN], &[]))?;
            must(f.tool, &args(&["-X", CHAIN], &[]))?;
            removed = true;
        }
        outcomes.push(if removed {
            Outcome::Removed(f.tool)
        } else {
            Outcome::Absent(f.tool)
        });
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_carries_the_comment_and_the_prefix() {
        for f in FAMILIES {
            for r in chain_rules(f, 7) {
                let line = r.join(" ");
                assert!(line.contains("--comment banmesh-probes"), "{line}");
                assert!(line.contains("--nflog-group 7 --nflog-prefix banmesh-probe"));
            }
        }
        assert!(
            jump()
                .join(" ")
                .contains("--comment banmesh-probes -j BANMESH-PROBES")
        );
    }

    #[test]
    fn a_rule_without_the_comment_is_foreign() {
        let ours =
            "-A BANMESH-PROBES -p tcp -m comment --comment banmesh-probes -j NFLOG".to_string();
        assert!(check_owned("iptables", std::slice::from_ref(&ours)).is_ok());
        let theirs = "-A BANMESH-PROBES -p tcp -j DROP".to_string();
        assert!(matches!(
            check_owned("iptables", &[ours, theirs]),
            Err(ProbeRuleError::Foreign { .. })
        ));
    }
}
