//! Property: random histories of record versions, split at random into runs
//! and batches (random key orders, duplicates), always end in the table
//! that keeps the latest version of each key: the greatest cursor, ties to
//! the later record in input order across the runs (without a cursor, the
//! last version loaded). Every run's stats balance. Driven through the
//! library's `Pipeline` with an in-memory source against real SQLite files,
//! so hundreds of runs stay fast.

use std::collections::BTreeMap;

use async_trait::async_trait;
use idemload::{Item, NoProgress, Pipeline, PipelineConfig, Record, RunOptions, Source, SourceRef};
use proptest::prelude::*;
use serde_json::json;

use crate::common::{assert_balanced, Report};

/// Batches handed over one by one.
struct Batches(std::vec::IntoIter<Vec<Item>>);

#[async_trait]
impl Source for Batches {
    async fn next_batch(&mut self) -> idemload::Result<Option<Vec<Item>>> {
        Ok(self.0.next())
    }
}

type Version = (u8, u8, u16);

/// Runs one pipeline run over `versions` in batches of `batch_size`.
fn run(
    db: &std::path::Path,
    cursor: bool,
    versions: &[Version],
    first_line: usize,
    batch_size: usize,
) -> Report {
    let toml = format!(
        "name = \"prop\"\n[source]\ntype = \"file\"\npath = \"unused.jsonl\"\n[destination]\nurl = \"sqlite://{}\"\ntable = \"t\"\n[load]\nbatch_size = {batch_size}\n{}",
        db.display(),
        if cursor { "cursor = \"c\"\n" } else { "" }
    );
    let pipeline =
        Pipeline::new(PipelineConfig::from_toml(&toml).expect("config")).expect("pipeline");
    let items: Vec<Item> = versions
        .iter()
        .enumerate()
        .map(|(i, &(k, c, x))| {
            let fields = json!({"id": k, "c": c, "x": x}).try_into().unwrap();
            Item::Record(Record::new(
                fields,
                SourceRef::Other(format!("history:{}", first_line + i).into()),
            ))
        })
        .collect();
    let batches: Vec<Vec<Item>> = items.chunks(batch_size).map(<[Item]>::to_vec).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let options = RunOptions {
        full_refresh: true,
        ..RunOptions::default()
    };
    let report = rt
        .block_on(
            pipeline.run_with(&options, &NoProgress, move |_query| async move {
                Ok(Box::new(Batches(batches.into_iter())) as Box<dyn Source>)
            }),
        )
        .expect("run");
    let report = Report::from_value(serde_json::to_value(&report).expect("report json"));
    assert_balanced(&report);
    assert_eq!(report.read, versions.len() as u64);
    report
}

fn table(db: &std::path::Path) -> Vec<(i64, i64, i64)> {
    let conn = rusqlite::Connection::open(db).expect("open");
    let mut stmt = conn
        .prepare("SELECT id, c, x FROM t ORDER BY id")
        .expect("select");
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("rows")
        .collect::<rusqlite::Result<Vec<_>>>()
        .expect("rows");
    rows
}

/// The latest version of each key over the whole history.
fn fold(versions: &[Version], cursor: bool) -> Vec<(i64, i64, i64)> {
    let mut latest: BTreeMap<u8, (u8, u16)> = BTreeMap::new();
    for &(k, c, x) in versions {
        match latest.get(&k) {
            Some(&(old, _)) if cursor && c < old => {}
            _ => {
                latest.insert(k, (c, x));
            }
        }
    }
    latest
        .into_iter()
        .map(|(k, (c, x))| (k as i64, c as i64, x as i64))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_end_in_the_latest_version_of_each_key(
        versions in proptest::collection::vec((0u8..12, 0u8..6, any::<u16>()), 1..150),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
        batch_sizes in proptest::collection::vec(1usize..9, 5),
        cursor in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("p.db");
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(versions.len() + 1)).collect();
        cuts.push(0);
        cuts.push(versions.len());
        cuts.sort_unstable();
        cuts.dedup();
        for (n, pair) in cuts.windows(2).enumerate() {
            run(&db, cursor, &versions[pair[0]..pair[1]], pair[0], batch_sizes[n % batch_sizes.len()]);
        }
        let expected = fold(&versions, cursor);
        prop_assert_eq!(table(&db), expected.clone());

        // The whole history again, in one run and another batch split,
        // leaves the same table and adds no row.
        let again = run(&db, cursor, &versions, 0, batch_sizes[4]);
        prop_assert_eq!(again.inserted, 0);
        prop_assert_eq!(table(&db), expected);
    }
}
