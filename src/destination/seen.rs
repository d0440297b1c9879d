//! The keys a run has written, kept in memory when the key is one integer:
//! whether a row's key is new to the run (else the row is a `duplicate`)
//! is then known without asking the database.

use roaring::RoaringTreemap;

/// The integer keys a run has written, exact, in a compressed bitmap: a
/// few bits a key for the dense ids exports mostly have, at most about
/// eight bytes for scattered ones.
#[derive(Debug, Default)]
pub(crate) struct SeenKeys(RoaringTreemap);

impl SeenKeys {
    pub(crate) fn contains(&self, key: i64) -> bool {
        self.0.contains(key as u64)
    }

    /// Adds a committed batch's keys.
    pub(crate) fn extend(&mut self, keys: Vec<i64>) {
        self.0.extend(keys.into_iter().map(|k| k as u64));
    }

    #[cfg(test)]
    fn all(&self) -> Vec<i64> {
        let mut all: Vec<i64> = self.0.iter().map(|k| k as i64).collect();
        all.sort_unstable();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::SeenKeys;

    #[test]
    fn seen_keys_are_exact_and_small_when_dense() {
        let mut seen = SeenKeys::default();
        seen.extend(vec![5, -3, 9]);
        seen.extend(vec![7, 5, i64::MAX, i64::MIN]);
        assert_eq!(seen.all(), [i64::MIN, -3, 5, 7, 9, i64::MAX]);
        assert!(seen.contains(7) && !seen.contains(6));
        for i in 0..1000 {
            seen.extend((i * 10..i * 10 + 10).collect());
        }
        assert!((0..10_000).all(|k| seen.contains(k)) && !seen.contains(10_000));
        // A million dense ids take about a bit each.
        seen.extend((0..1_000_000).collect());
        assert!(
            seen.0.serialized_size() < 200_000,
            "{} bytes",
            seen.0.serialized_size()
        );
    }
}
