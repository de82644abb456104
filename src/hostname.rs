//! Host names: the one rule for a new identity, shared by `banmesh ca
//! issue`, `banmesh enroll`, the hub's enrolment and `CreateToken`.
//!
//! A host name is what a certificate's common name and DNS name carry, and
//! it must never be mistaken for anything else: an IP address (a host
//! certificate naming the hub's address could pass as the hub), a path
//! component (`.`, `..`), or a log or SQL fragment. So it is a DNS host
//! name in the strict sense: labels of letters, digits and hyphens (not
//! first or last), 1-63 characters each, joined by single dots, 253 in
//! all, and a last label that is not all digits (which rules out IPv4
//! literals in every spelling; IPv6 needs a ':', which is not allowed).
//!
//! Certificates issued before this rule with other names (an underscore,
//! say) keep working until they expire, but cannot be renewed or issued
//! again under that name.
use thiserror::Error;

/// The longest host name (the DNS limit).
pub const MAX_LEN: usize = 253;
/// The longest label between dots.
pub const MAX_LABEL: usize = 63;
/// The reporter of the hub's own fleet bans (signal thresholds crossed):
/// no host may take the name, so a ban by `fleet` is never a host's.
pub const FLEET: &str = "fleet";

/// Why a name is not a host name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{shown} is not a valid host name ({why}): use letters, digits and '-' in dot-separated \
     labels of at most 63 characters, not an IP address"
)]
pub struct BadHostName {
    /// The name as it may be shown: escaped and cut to a bounded length.
    pub shown: String,
    /// Which part of the rule it breaks.
    pub why: &'static str,
}

/// A value from a client, fit for a log line or an error message: its
/// `Debug` form (control characters and quotes escaped), cut to about 64
/// characters with the full length noted.
pub fn shown(value: &str) -> String {
    const KEEP: usize = 64;
    if value.chars().count() <= KEEP {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(KEEP).collect();
    format!("{head:?}... ({} bytes)", value.len())
}

/// Checks `name` against the host-name rule (see the module doc).
pub fn validate(name: &str) -> Result<(), BadHostName> {
    let bad = |why| {
        Err(BadHostName {
            shown: shown(name),
            why,
        })
    };
    if name.is_empty() || name.len() > MAX_LEN {
        return bad("1 to 253 characters");
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL {
            return bad("each label between dots is 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("only letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label neither starts nor ends with '-'");
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return bad("the last label is not all digits, so it is never an IP address");
    }
    if name.eq_ignore_ascii_case(FLEET) {
        return bad("\"fleet\" is the reporter of the hub's own fleet bans");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_names() {
        for name in [
            "a",
            "web-1",
            "WEB1",
            "hub.example.net",
            "1web",
            "10-0-0-5.example",
            "x.y2",
            &"a".repeat(63),
            &["a".repeat(63).as_str(); 4].join(".")[..253],
        ] {
            assert_eq!(validate(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_paths_addresses_and_strays() {
        for name in [
            "",
            ".",
            "..",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "a_b",
            "a b",
            "a\nb",
            "a/b",
            "fleet",
            "FLEET",
            "127.0.0.1",
            "10.0.0.300",
            "1234",
            "host.123",
            "::1",
            "2001:db8::1",
            "[::1]",
            "ä.example",
            &"a".repeat(64),
            &"a.".repeat(127),
        ] {
            assert!(validate(name).is_err(), "{name:?} was accepted");
        }
    }

    #[test]
    fn shown_values_are_escaped_and_bounded() {
        assert_eq!(shown("a\nb"), "\"a\\nb\"");
        let long = shown(&"x\n".repeat(1 << 20));
        assert!(long.len() < 200, "{}", long.len());
        assert!(!long.contains('\n'));
        assert!(long.ends_with("(2097152 bytes)"), "{long}");
        let err = validate(&"a".repeat(1 << 20)).unwrap_err().to_string();
        assert!(err.len() < 400, "{err}");
    }
}
