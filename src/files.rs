//! Files loaded once: the log of files a file source finished loading
//! (`_idemload_files`), and how a later run tells an unchanged file.
//!
//! A file source marks a file finished with [`Item::FileLoaded`] right after
//! its last record; the mark travels in the batch that holds that record
//! and commits in the same transaction, so a file is in the log only when
//! every one of its records (and rejects) is stored. In `merge` and
//! `insert_new` a later run skips a file whose size, modification time and
//! content digest equal a logged one, without parsing it
//! ([`Item::FileSkipped`], counted in `files_skipped`). The log is only
//! trusted while the run's table exists and holds rows: a table dropped or
//! emptied since is filled again from every file.
//!
//! [`Item::FileLoaded`]: crate::record::Item::FileLoaded
//! [`Item::FileSkipped`]: crate::record::Item::FileSkipped

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;

use chrono::{DateTime, Utc};
use xxhash_rust::xxh3::Xxh3;

/// The bookkeeping table of files loaded.
pub const FILES_TABLE: &str = "_idemload_files";

/// A file (or object) loaded completely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedFile {
    /// The file's absolute path, or the object's URL.
    pub path: String,
    pub size: u64,
    /// Modification time, RFC 3339 with nanoseconds (UTC).
    pub modified: String,
    /// `xxh3:` and the 128-bit XXH3 of the bytes as stored (compressed
    /// files: of the compressed bytes); for objects `etag:` and the ETag.
    pub digest: String,
    /// Lines (or elements, rows) read from it: records, rejects and lines
    /// below the cursor window.
    pub rows: u64,
}

/// What a file is, before reading it: enough to find it in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    pub path: String,
    pub size: u64,
    pub modified: String,
}

impl FileId {
    /// A local file: its absolute path, size and modification time.
    pub fn of_local(path: &Path) -> io::Result<FileId> {
        let meta = std::fs::metadata(path)?;
        let absolute = std::fs::canonicalize(path)?;
        Ok(FileId {
            path: absolute.to_string_lossy().into_owned(),
            size: meta.len(),
            modified: format_modified(meta.modified()?.into()),
        })
    }
}

impl FileId {
    /// The log entry of this file, read whole: `rows` items, `digest`.
    pub fn loaded(self, digest: String, rows: u64) -> LoadedFile {
        LoadedFile {
            path: self.path,
            size: self.size,
            modified: self.modified,
            digest,
            rows,
        }
    }
}

/// A modification time as the log writes it.
pub fn format_modified(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// The files earlier runs of a pipeline loaded into its table.
#[derive(Debug, Clone, Default)]
pub struct FileLog {
    files: HashMap<String, LoadedFile>,
}

impl FileLog {
    pub fn new(files: impl IntoIterator<Item = LoadedFile>) -> FileLog {
        FileLog {
            files: files.into_iter().map(|f| (f.path.clone(), f)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The logged load of a file whose path, size and modification time
    /// are `id`'s: only its digest is left to compare.
    pub fn candidate(&self, id: &FileId) -> Option<&LoadedFile> {
        self.files
            .get(&id.path)
            .filter(|f| f.size == id.size && f.modified == id.modified)
    }
}

/// XXH3-128 over bytes as they stream by.
#[derive(Clone, Default)]
pub struct Digest(Xxh3);

impl Digest {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest as the log writes it.
    pub fn text(&self) -> String {
        format!("xxh3:{:032x}", self.0.digest128())
    }

    /// The digest of a whole file, read in large blocks.
    pub fn of_file(path: &Path) -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let mut digest = Digest::default();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(digest.text());
            }
            digest.update(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_file_is_a_candidate_only_with_its_size_and_time() {
        let file = LoadedFile {
            path: "/data/a.jsonl".into(),
            size: 10,
            modified: "2026-01-01T00:00:00.000000001Z".into(),
            digest: "xxh3:0".into(),
            rows: 2,
        };
        let log = FileLog::new([file.clone()]);
        let id = FileId {
            path: file.path.clone(),
            size: 10,
            modified: file.modified.clone(),
        };
        assert_eq!(log.candidate(&id), Some(&file));
        let grown = FileId {
            size: 11,
            ..id.clone()
        };
        assert_eq!(log.candidate(&grown), None);
        let touched = FileId {
            modified: "2026-01-01T00:00:00.000000002Z".into(),
            ..id
        };
        assert_eq!(log.candidate(&touched), None);
    }

    #[test]
    fn the_digest_of_a_file_equals_the_streamed_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let text = b"{\"id\":1}\n{\"id\":2}\n";
        std::fs::write(&path, text).unwrap();
        let mut streamed = Digest::default();
        streamed.update(&text[..5]);
        streamed.update(&text[5..]);
        assert_eq!(Digest::of_file(&path).unwrap(), streamed.text());
        std::fs::write(&path, b"{\"id\":1}\n{\"id\":3}\n").unwrap();
        assert_ne!(Digest::of_file(&path).unwrap(), streamed.text());
    }
}
