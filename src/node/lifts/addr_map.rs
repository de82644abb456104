//! A map keyed by address that holds an IPv4 address in 4 bytes: the
//! node's per-address state (the lift schedule, recent lines) with
//! 100,000 active bans, nearly all IPv4 in practice.
//!
//! Why: a hash table's slot is its key and value side by side, rounded up
//! to their alignment, and a table of 100,000 entries has 131,072 slots
//! (plus a control byte each). An [`AddrKey`] is 16 bytes; an IPv4
//! address needs 4. Two tables, one keyed by `u32` for IPv4 and one by
//! [`AddrKey`] for the rest, make the recent-lines map 9 bytes a slot
//! instead of 25 and the lift schedule 21 instead of 33 (issue 19: node
//! RSS <= 15 MiB idle with 100,000 bans).
//!
//! Contract: the same address is always in the same table (an [`AddrKey`]
//! keys IPv4 as its mapped form, which is what [`AddrKey::v4`] reads), so
//! the pair behaves as one map; iteration order is unspecified.
use std::collections::HashMap;

use super::AddrKey;

/// A map from addresses to `V`, IPv4 keyed by 4 bytes.
#[derive(Debug)]
pub struct AddrMap<V> {
    v4: HashMap<u32, V>,
    v6: HashMap<AddrKey, V>,
}

impl<V> Default for AddrMap<V> {
    fn default() -> Self {
        AddrMap {
            v4: HashMap::new(),
            v6: HashMap::new(),
        }
    }
}

impl<V> AddrMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many addresses it holds.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// `ip`'s value.
    pub fn get(&self, ip: &AddrKey) -> Option<&V> {
        match ip.v4() {
            Some(v4) => self.v4.get(&v4),
            None => self.v6.get(ip),
        }
    }

    /// Sets `ip`'s value; the one it replaced.
    pub fn insert(&mut self, ip: AddrKey, value: V) -> Option<V> {
        match ip.v4() {
            Some(v4) => self.v4.insert(v4, value),
            None => self.v6.insert(ip, value),
        }
    }

    /// Removes `ip`; its value.
    pub fn remove(&mut self, ip: &AddrKey) -> Option<V> {
        match ip.v4() {
            Some(v4) => self.v4.remove(&v4),
            None => self.v6.remove(ip),
        }
    }

    /// Every address and its value.
    pub fn iter(&self) -> impl Iterator<Item = (AddrKey, &V)> {
        let v4 = self.v4.iter().map(|(k, v)| (AddrKey::from_v4(*k), v));
        v4.chain(self.v6.iter().map(|(k, v)| (*k, v)))
    }

    /// Every value.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.v4.values().chain(self.v6.values())
    }

    /// Keeps the entries `keep` says to keep.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.v4.retain(|_, v| keep(v));
        self.v6.retain(|_, v| keep(v));
    }

    /// Gives back the slots of entries gone once a table holds far more
    /// slots than entries (a wave of bans ended): a table never shrinks by
    /// itself, and a rehash costs a pass over its entries, so not on every
    /// removal.
    pub fn shrink_if_sparse(&mut self) {
        fn sparse<K, V>(m: &HashMap<K, V>) -> bool {
            m.capacity() > 4 * m.len().max(1024)
        }
        if sparse(&self.v4) {
            self.v4.shrink_to_fit();
        }
        if sparse(&self.v6) {
            self.v6.shrink_to_fit();
        }
    }

    /// Gives back every slot not in use.
    pub fn shrink_to_fit(&mut self) {
        self.v4.shrink_to_fit();
        self.v6.shrink_to_fit();
    }
}

impl<V> Extend<(AddrKey, V)> for AddrMap<V> {
    fn extend<I: IntoIterator<Item = (AddrKey, V)>>(&mut self, items: I) {
        for (k, v) in items {
            self.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(ip: &str) -> AddrKey {
        AddrKey::parse(ip).unwrap()
    }

    #[test]
    fn both_families_behave_as_one_map() {
        let mut m = AddrMap::new();
        let ips = [
            "192.0.2.1",
            "2001:db8::1",
            "::ffff:192.0.2.2",
            "::",
            "0.0.0.0",
        ];
        for (i, ip) in ips.iter().enumerate() {
            assert_eq!(m.insert(k(ip), i), None);
        }
        assert_eq!(m.len(), 5);
        assert_eq!(m.get(&k("192.0.2.2")), Some(&2), "the mapped form is IPv4");
        assert_eq!(m.insert(k("192.0.2.1"), 9), Some(0));
        let mut all: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
        all.sort();
        assert_eq!(
            all,
            [
                "0.0.0.0=4",
                "192.0.2.1=9",
                "192.0.2.2=2",
                "2001:db8::1=1",
                "::=3"
            ]
        );
        m.retain(|v| *v % 2 == 1);
        assert_eq!(m.remove(&k("192.0.2.1")), Some(9));
        assert_eq!(m.remove(&k("192.0.2.1")), None);
        let mut left: Vec<usize> = m.values().copied().collect();
        left.sort();
        assert_eq!(left, [1, 3]);
        assert_eq!(m.len(), 2);
        assert!(!m.is_empty());
    }
}
