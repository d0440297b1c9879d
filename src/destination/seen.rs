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

/// How a batch's integer keys are looked up in a table.
pub(crate) enum KeyFilter {
    /// The keys are dense (at most half the range unused): one range scan.
    Range(i64, i64),
    /// Scattered keys, comma-separated: one probe each.
    List(String),
}

impl KeyFilter {
    /// `None` for no keys.
    pub(crate) fn of(keys: &[i64]) -> Option<KeyFilter> {
        let (lo, hi) = (*keys.iter().min()?, *keys.iter().max()?);
        Some(if (hi as i128 - lo as i128) < 2 * keys.len() as i128 {
            KeyFilter::Range(lo, hi)
        } else {
            KeyFilter::List(
                keys.iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            )
        })
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

    #[test]
    fn dense_keys_are_one_range_scattered_ones_a_list() {
        use super::KeyFilter;
        assert!(KeyFilter::of(&[]).is_none());
        assert!(matches!(
            KeyFilter::of(&[5, 3, 4]),
            Some(KeyFilter::Range(3, 5))
        ));
        assert!(matches!(
            KeyFilter::of(&[1, 1000]),
            Some(KeyFilter::List(l)) if l == "1,1000"
        ));
        // No overflow at the ends of the range.
        assert!(matches!(
            KeyFilter::of(&[i64::MIN, i64::MAX]),
            Some(KeyFilter::List(_))
        ));
    }
}
