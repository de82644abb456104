//! Which hub a node uses first, second, ...: rendezvous (highest random
//! weight) hashing of (host name, hub address).
//!
//! Why rendezvous: every node computes its own order from its name and
//! the hub list alone, with no coordination; a fleet spreads evenly over
//! the hubs; and losing one hub moves only the nodes that had it first,
//! each to its own second choice, so they spread over the remaining hubs
//! instead of piling onto one. The order of `--hub` flags does not matter.
//!
//! The hash must be the same in every process and release (std's
//! `DefaultHasher` is keyed at random per process): FNV-1a over the name
//! and the address, then the splitmix64 finaliser, because FNV-1a alone
//! mixes the last bytes of similar names (`web-1`, `web-2`) into its high
//! bits poorly.

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Why a hub list was refused.
#[derive(Debug, thiserror::Error)]
pub enum HubListError {
    /// No address at all (an empty `--hub` or `BANMESH_HUB`).
    #[error(
        "no hub address given: pass --hub https://HOST:PORT (repeat it, or list several separated by commas or spaces)"
    )]
    Empty,
}

/// The hub addresses of `values` (each a `--hub` flag, a `BANMESH_HUB`
/// value or a config file entry), split on commas and white space, without
/// a trailing `/`, each once in the order first given.
pub fn parse(values: &[String]) -> Result<Vec<String>, HubListError> {
    let mut hubs: Vec<String> = Vec::new();
    for value in values {
        for part in value.split(|c: char| c == ',' || c.is_whitespace()) {
            let hub = part.trim_end_matches('/');
            if !hub.is_empty() && !hubs.iter().any(|h| h == hub) {
                hubs.push(hub.to_string());
            }
        }
    }
    if hubs.is_empty() {
        return Err(HubListError::Empty);
    }
    Ok(hubs)
}

/// The weight of `hub` for host `name`: the same on every machine.
pub fn weight(name: &str, hub: &str) -> u64 {
    let mut h = FNV_OFFSET;
    // A separator byte no name or address holds, so ("ab", "c") and
    // ("a", "bc") differ.
    for b in name.bytes().chain([0u8]).chain(hub.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    // splitmix64's finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// `hubs` in host `name`'s order of preference: highest weight first
/// (ties, which need equal 64-bit hashes, by address).
pub fn preference(name: &str, hubs: &[String]) -> Vec<String> {
    let mut ordered: Vec<(u64, &String)> = hubs.iter().map(|h| (weight(name, h), h)).collect();
    ordered.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ordered.into_iter().map(|(_, h)| h.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("https://hub{i}:7443")).collect()
    }

    fn first_choices(names: &[String], hubs: &[String]) -> Vec<String> {
        names
            .iter()
            .map(|n| preference(n, hubs)[0].clone())
            .collect()
    }

    #[test]
    fn a_list_splits_on_commas_and_spaces() {
        let got = parse(&[
            "https://a:1, https://b:2".into(),
            "https://c:3/ https://a:1".into(),
            "https://d:4".into(),
        ])
        .unwrap();
        assert_eq!(
            got,
            ["https://a:1", "https://b:2", "https://c:3", "https://d:4"]
        );
        // A single value is unchanged.
        assert_eq!(parse(&["https://a:1".into()]).unwrap(), ["https://a:1"]);
        assert!(matches!(parse(&[" , ".into()]), Err(HubListError::Empty)));
        assert!(matches!(parse(&[]), Err(HubListError::Empty)));
    }

    #[test]
    fn the_order_is_stable_and_ignores_the_listing_order() {
        let h = hubs(3);
        let reversed: Vec<String> = h.iter().rev().cloned().collect();
        for name in ["web-1", "db-7", "mail"] {
            assert_eq!(preference(name, &h), preference(name, &reversed));
        }
        // Fixed in code: a node's order survives restarts and upgrades
        // (the figure is FNV-1a and splitmix64 computed independently).
        assert_eq!(weight("web-1", "https://hub1:7443"), 0x5331_6ed1_0a77_9249);
    }

    #[test]
    fn three_thousand_names_spread_evenly_over_three_hubs() {
        let h = hubs(3);
        let names: Vec<String> = (0..3000).map(|i| format!("node-{i}")).collect();
        let first = first_choices(&names, &h);
        for hub in &h {
            let n = first.iter().filter(|f| *f == hub).count();
            // 1,000 each, within 5%.
            assert!((950..=1050).contains(&n), "{hub}: {n} of 3000");
        }
    }

    #[test]
    fn losing_a_hub_moves_only_its_nodes_spread_over_the_others() {
        let h = hubs(3);
        let names: Vec<String> = (0..3000).map(|i| format!("web{i}.example.net")).collect();
        let before = first_choices(&names, &h);
        let lost = &h[2];
        let left: Vec<String> = h[..2].to_vec();
        let after = first_choices(&names, &left);
        let mut moved_to = [0usize; 2];
        for (b, a) in before.iter().zip(&after) {
            if b == lost {
                moved_to[left.iter().position(|l| l == a).unwrap()] += 1;
            } else {
                assert_eq!(a, b, "a node not on the lost hub moved");
            }
        }
        let moved = moved_to[0] + moved_to[1];
        assert!(
            (950..=1050).contains(&moved),
            "{moved} nodes were on the lost hub"
        );
        for n in moved_to {
            // Half each, within 10% of the moved nodes.
            assert!(n * 10 >= moved * 4 && n * 10 <= moved * 6, "{moved_to:?}");
        }
        // A node's second choice is where it goes: its order without the
        // lost hub is its full order without that hub.
        for name in names.iter().take(100) {
            let full: Vec<String> = preference(name, &h)
                .into_iter()
                .filter(|x| x != lost)
                .collect();
            assert_eq!(full, preference(name, &left));
        }
    }
}
