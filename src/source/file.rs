//! The file source: JSONL/NDJSON, CSV, JSON array and Parquet files, each
//! optionally `.gz` or `.zst` (not Parquet), several files or globs in one
//! run, local or in object storage (`s3://`, `gs://`, `az://`), `-` for
//! stdin.
//!
//! Parsing runs on its own thread and feeds batches through a bounded
//! channel: memory stays flat whatever the file size, and a slow destination
//! slows the reader (back-pressure). Every record carries `file:line`; a line
//! that is not a JSON object, or not UTF-8, or that holds a value over
//! `max_value_bytes` (measured before it is built, see [`super::oversize`]),
//! becomes a reject and reading goes on.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use rayon::prelude::*;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::mpsc;

use super::compression::Compression;
use super::object::{is_object_url, Bucket, Listing, ObjectChunks, ObjectInfo, ObjectUrl};
use super::sink::{ReadError, Sink, Stopped};
use super::{Source, SourceProgress, SourceQuery};
use crate::error::{Error, Result};
use crate::fields::ShapedFields;
use crate::files::{format_modified, Digest, FileId, FileLog};
use crate::key::Cursor;
use crate::record::{Item, Name, Record, Reject, SourceRef};

thread_local! {
    /// The field names of the last record a thread read (see [`ShapedFields`]).
    static SHAPE: std::cell::RefCell<Vec<Name>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `[source] type = "file"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// A path, a glob (`exports/usage-*.jsonl`) or a list of them; `-` is stdin.
    pub path: OneOrMany,
    /// Overrides the format guessed from the extension (needed for stdin).
    #[serde(default)]
    pub format: Option<FileFormat>,
    /// The endpoint of an S3-compatible store (MinIO, a local test server)
    /// or an Azure emulator for `s3://` / `az://` paths, e.g.
    /// `http://127.0.0.1:9000`; default `AWS_ENDPOINT_URL`. An `http://`
    /// endpoint is used without TLS.
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// One path or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(p) => vec![p.clone()],
            OneOrMany::Many(ps) => ps.clone(),
        }
    }
}

/// File formats, by extension: `.jsonl`/`.ndjson`, `.csv`, `.json`,
/// `.parquet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Jsonl,
    Csv,
    Json,
    Parquet,
}

impl FileFormat {
    fn of(name: &str) -> Option<FileFormat> {
        let (_, extension) = name.rsplit_once('.')?;
        match extension.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Some(FileFormat::Jsonl),
            "csv" => Some(FileFormat::Csv),
            "json" => Some(FileFormat::Json),
            "parquet" => Some(FileFormat::Parquet),
            _ => None,
        }
    }

    /// The format and compression of a file or object by its name
    /// (`a.jsonl.gz`), `format` overriding the format part.
    pub fn detect(name: &str, format: Option<FileFormat>) -> Result<(FileFormat, Compression)> {
        let (inner, compression) = Compression::split(name);
        let format = match format {
            Some(f) => f,
            None => FileFormat::of(inner).ok_or_else(|| {
                Error::config(format!(
                    "{name}: cannot tell the format from the extension: use .jsonl, .ndjson, .csv, .json or .parquet (each but .parquet optionally .gz or .zst), or set `format`"
                ))
            })?,
        };
        if format == FileFormat::Parquet && compression != Compression::None {
            return Err(Error::config(format!(
                "{name}: a Parquet file is compressed inside (its column chunks), not as a whole {} file: load it uncompressed",
                compression.extension()
            )));
        }
        Ok((format, compression))
    }
}

/// One thing to read: stdin, a local file, or the objects of an URL.
enum Input {
    Stdin(FileFormat),
    Local {
        path: PathBuf,
        format: FileFormat,
        compression: Compression,
    },
    Objects {
        listing: Listing,
        format: Option<FileFormat>,
    },
}

/// Expands paths and globs into files in a stable order; a pattern that
/// matches nothing is a configuration error. Object URLs (`s3://…`) are
/// kept as they are: their objects are listed as they are read.
pub fn expand_paths(patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for pattern in patterns {
        if pattern == "-" || is_object_url(pattern) {
            files.push(PathBuf::from(pattern));
            continue;
        }
        if !pattern.contains(['*', '?', '[']) {
            let path = PathBuf::from(pattern);
            if !path.is_file() {
                return Err(Error::config(format!("{pattern}: no such file")));
            }
            files.push(path);
            continue;
        }
        let mut matched: Vec<PathBuf> = glob::glob(pattern)
            .map_err(|e| Error::config(format!("{pattern}: bad glob: {e}")))?
            .filter_map(|entry| entry.ok())
            .filter(|p| p.is_file())
            .collect();
        if matched.is_empty() {
            return Err(Error::config(format!("{pattern}: no file matches")));
        }
        matched.sort();
        files.extend(matched);
    }
    Ok(files)
}

/// Records the reader thread sends at a time.
const CHUNK: usize = 1024;

/// JSON lines parsed together, in parallel: at most this many lines or
/// bytes (a block always takes at least one line).
const BLOCK_LINES: usize = 1024;
const BLOCK_BYTES: usize = 4 << 20;

/// Lines read and not yet parsed: their text, and each line's number and
/// place in it.
#[derive(Default)]
struct LineBlock {
    text: Vec<u8>,
    lines: Vec<(u64, Range<usize>)>,
}

/// Reads files on a thread of its own.
pub struct FileSource {
    rx: mpsc::Receiver<Result<Vec<Item>>>,
    /// Items received and not yet handed out.
    pending: Vec<Item>,
    batch_size: usize,
    bytes_read: Arc<AtomicU64>,
    bytes_total: Option<u64>,
}

impl FileSource {
    /// Checks the files (and the object URLs' clients) and starts the
    /// reader thread. Object URLs need a tokio runtime: the reader thread
    /// waits on its requests.
    pub fn open(config: &FileSourceConfig, query: &SourceQuery) -> Result<FileSource> {
        let files = expand_paths(&config.path.to_vec())?;
        let mut inputs = Vec::with_capacity(files.len());
        let mut total = Some(0u64);
        let mut rt = None;
        for path in files {
            let text = path.to_string_lossy().into_owned();
            if path.as_os_str() == "-" {
                if config.format == Some(FileFormat::Parquet) {
                    return Err(Error::config(
                        "-: Parquet cannot be read from stdin (its footer comes last): name the file",
                    ));
                }
                total = None;
                inputs.push(Input::Stdin(config.format.unwrap_or(FileFormat::Jsonl)));
            } else if is_object_url(&text) {
                let url = ObjectUrl::parse(&text)?;
                let extension = url.key().rsplit_once('.').map(|(_, e)| e);
                if extension.is_some_and(|e| !e.contains(['*', '?', '[', '/'])) {
                    // Each object's name says its format; a glob's own
                    // extension tells now whether any could be read.
                    FileFormat::detect(url.key(), config.format)?;
                }
                let bucket = Bucket::connect(&url, config.endpoint.as_deref())?;
                if rt.is_none() {
                    rt = Some(tokio::runtime::Handle::try_current().map_err(|_| {
                        Error::config(format!(
                            "{text}: object storage is read from within a tokio runtime"
                        ))
                    })?);
                }
                total = None;
                inputs.push(Input::Objects {
                    listing: bucket.list()?,
                    format: config.format,
                });
            } else {
                let (format, compression) = FileFormat::detect(&text, config.format)?;
                if let (Some(t), Ok(meta)) = (total, std::fs::metadata(&path)) {
                    total = Some(t + meta.len());
                }
                inputs.push(Input::Local {
                    path,
                    format,
                    compression,
                });
            }
        }
        // The reader hands over small chunks, two waiting at most: memory
        // holds the batch being written, the one being read and a few
        // thousand records more, whatever the batch size.
        let (tx, rx) = mpsc::channel(2);
        let bytes_read = Arc::new(AtomicU64::new(0));
        let batch_size = query.batch_size.max(1);
        let chunk = batch_size.min(CHUNK);
        let mut reader = Reader {
            tx,
            batch: Vec::with_capacity(chunk),
            chunk_size: chunk,
            max_record_bytes: query.max_record_bytes.max(1 << 16),
            max_value_bytes: query.max_value_bytes,
            bytes_read: bytes_read.clone(),
            window: query.cursor.clone().zip(query.low.clone()),
            prefilter: true,
            blocks: 0,
            rt,
            object: None,
            loaded_files: query.loaded_files.clone(),
            items: 0,
        };
        std::thread::Builder::new()
            .name("idemload-file-source".into())
            .spawn(move || reader.read_all(inputs))
            .map_err(|e| Error::Source {
                location: "file source".into(),
                message: format!("cannot start reader thread: {e}"),
            })?;
        Ok(FileSource {
            rx,
            pending: Vec::new(),
            batch_size,
            bytes_read,
            bytes_total: total,
        })
    }
}

#[async_trait]
impl Source for FileSource {
    async fn next_batch(&mut self) -> Result<Option<Vec<Item>>> {
        let mut batch = std::mem::take(&mut self.pending);
        while batch.len() < self.batch_size {
            match self.rx.recv().await.transpose()? {
                Some(chunk) if batch.is_empty() => batch = chunk,
                Some(chunk) => batch.extend(chunk),
                None => break,
            }
        }
        if batch.len() > self.batch_size {
            self.pending = batch.split_off(self.batch_size);
        }
        Ok((!batch.is_empty()).then_some(batch))
    }

    async fn at_end(&mut self) -> Result<Option<bool>> {
        if self.pending.is_empty() {
            match self.rx.recv().await.transpose()? {
                Some(chunk) => self.pending = chunk,
                None => return Ok(Some(true)),
            }
        }
        Ok(Some(false))
    }

    fn progress(&self) -> SourceProgress {
        SourceProgress {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_total: self.bytes_total,
        }
    }
}

/// The reader thread's state: the batch being filled and where it goes.
pub(super) struct Reader {
    tx: mpsc::Sender<Result<Vec<Item>>>,
    batch: Vec<Item>,
    chunk_size: usize,
    pub(super) max_record_bytes: usize,
    /// Records with a value larger than this are rejected while reading,
    /// before the value is built (see [`super::oversize`]).
    max_value_bytes: Option<usize>,
    bytes_read: Arc<AtomicU64>,
    /// The cursor field and the run's low bound: JSON records below it are
    /// recognised from that one field and skipped without being built.
    window: Option<(String, Cursor)>,
    /// The last block checked was mostly below the window: check this one
    /// too (blocks of records kept are then parsed once, not twice).
    prefilter: bool,
    blocks: u64,
    /// The runtime that object requests run on, when objects are read.
    rt: Option<tokio::runtime::Handle>,
    /// The object being read: its URL, size, ETag and last-modified time.
    pub(super) object: Option<ObjectInfo>,
    /// Files earlier runs loaded completely: skipped when unchanged.
    loaded_files: Option<Arc<FileLog>>,
    /// Items pushed so far (a file's rows are the difference).
    items: u64,
}

impl Sink for Reader {
    fn push(&mut self, item: Item) -> std::result::Result<(), Stopped> {
        Reader::push(self, item)
    }

    fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    fn max_value_bytes(&self) -> Option<usize> {
        self.max_value_bytes
    }
}

impl Reader {
    fn read_all(&mut self, inputs: Vec<Input>) {
        for input in inputs {
            let result = match input {
                Input::Stdin(format) => self
                    .read_one(
                        "-".into(),
                        format,
                        Compression::None,
                        Box::new(io::stdin().lock()),
                        None,
                    )
                    .map_err(|e| failed("-", e)),
                Input::Local {
                    path,
                    format,
                    compression,
                } => self.read_local(&path, format, compression),
                Input::Objects { listing, format } => self.read_objects(listing, format),
            };
            if let Err(e) = result {
                if let Some(e) = e {
                    let _ = self.tx.blocking_send(Err(e));
                }
                return;
            }
        }
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            let _ = self.tx.blocking_send(Ok(batch));
        }
    }

    /// Reads a local file; `Err(None)` when the run stopped.
    fn read_local(
        &mut self,
        path: &Path,
        format: FileFormat,
        compression: Compression,
    ) -> std::result::Result<(), Option<Error>> {
        let name: Arc<str> = path.display().to_string().into();
        let io_error = |source| {
            Some(Error::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        // What the file is before it is read, and its digest: the log
        // entry, written only when the file has not changed while read.
        let before = FileId::of_local(path).map_err(io_error)?;
        let digest = Digest::of_file(path).map_err(io_error)?;
        let logged = self
            .loaded_files
            .as_ref()
            .and_then(|l| l.candidate(&before));
        if logged.is_some_and(|f| f.digest == digest) {
            tracing::info!(file = %name, "File unchanged since an earlier run loaded it: not read.");
            return self.push(Item::FileSkipped).map_err(|Stopped| None);
        }
        let items = self.items;
        let file = File::open(path).map_err(io_error)?;
        let result = if format == FileFormat::Parquet {
            super::parquet::read_parquet(self, name.clone(), |_| file.try_clone())
        } else {
            let len = file.metadata().map(|m| m.len()).ok();
            self.read_one(name.clone(), format, compression, Box::new(file), len)
        };
        match result {
            Ok(()) => {}
            Err(ReadError::Stopped) => return Err(None),
            Err(ReadError::Io(source)) => return Err(io_error(source)),
        }
        match FileId::of_local(path) {
            Ok(after) if after == before => {
                let loaded = before.loaded(digest, self.items - items);
                self.push(Item::FileLoaded(loaded)).map_err(|Stopped| None)
            }
            _ => {
                tracing::warn!(file = %name, "File changed while it was read: not logged as loaded, so the next run reads it again.");
                Ok(())
            }
        }
    }

    /// Reads the objects of an URL as the listing yields them; `Err(None)`
    /// when the run stopped.
    fn read_objects(
        &mut self,
        mut listing: Listing,
        format: Option<FileFormat>,
    ) -> std::result::Result<(), Option<Error>> {
        let Some(rt) = self.rt.clone() else {
            return Err(Some(Error::config("object storage needs a tokio runtime")));
        };
        while let Some(meta) = listing.next(&rt).map_err(Some)? {
            let bucket = listing.bucket();
            let url = bucket.object_url(&meta);
            let (format, compression) = FileFormat::detect(&url, format).map_err(Some)?;
            let name: Arc<str> = url.as_str().into();
            let listed = bucket.info(&meta);
            let logged = self
                .loaded_files
                .as_ref()
                .zip(object_entry(&listed))
                .and_then(|(log, (id, digest))| log.candidate(&id).filter(|f| f.digest == digest));
            if logged.is_some() {
                tracing::info!(object = %url, "Object unchanged since an earlier run loaded it: not read.");
                self.push(Item::FileSkipped).map_err(|Stopped| None)?;
                continue;
            }
            let items = self.items;
            self.object = Some(listed);
            let result = if format == FileFormat::Parquet {
                let chunks = ObjectChunks::new(bucket.clone(), meta.clone(), rt.clone());
                super::parquet::read_parquet(self, name, |ranges| chunks.prefetch(ranges))
            } else {
                match bucket.open(&meta, &rt) {
                    Ok(read) => {
                        self.object = Some(read.info().clone());
                        self.read_one(name, format, compression, Box::new(read), Some(meta.size))
                    }
                    Err(e) => Err(ReadError::Io(e)),
                }
            };
            result.map_err(|e| failed(&url, e))?;
            if let Some(object) = &self.object {
                tracing::debug!(object = %object.url, size = object.size, e_tag = ?object.e_tag, version = ?object.version, last_modified = %object.last_modified, "Object read.");
                if let Some((id, digest)) = object_entry(object) {
                    let loaded = id.loaded(digest, self.items - items);
                    self.push(Item::FileLoaded(loaded))
                        .map_err(|Stopped| None)?;
                }
            }
        }
        Ok(())
    }

    fn read_one(
        &mut self,
        name: Arc<str>,
        format: FileFormat,
        compression: Compression,
        input: Box<dyn Read + '_>,
        len: Option<u64>,
    ) -> std::result::Result<(), ReadError> {
        if len == Some(0) {
            let at = SourceRef::Line {
                path: name,
                line: 0,
            };
            return Ok(self.push(Item::Reject(Reject::new(
                at,
                "file is empty (0 bytes): no records; a CSV with only its header row is the way to say \"no rows\"",
                "",
            )))?);
        }
        let counted = Counted {
            inner: input,
            bytes: self.bytes_read.clone(),
        };
        let decoded = compression.decoder(Box::new(counted))?;
        let reader = BufReader::with_capacity(1 << 18, decoded);
        match format {
            FileFormat::Jsonl => self.read_jsonl(name, reader),
            FileFormat::Json => self.read_json_array(name, reader),
            FileFormat::Csv => super::csv::read_csv(self, name, reader),
            FileFormat::Parquet => Err(ReadError::Io(io::Error::other(
                "Parquet is read from a file or an object, not a stream",
            ))),
        }
    }

    /// Adds an item to the chunk, sending the chunk when it is full.
    pub(super) fn push(&mut self, item: Item) -> std::result::Result<(), Stopped> {
        if !matches!(item, Item::FileLoaded(_) | Item::FileSkipped) {
            self.items += 1;
        }
        self.batch.push(item);
        if self.batch.len() >= self.chunk_size {
            let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(self.chunk_size));
            self.tx.blocking_send(Ok(batch)).map_err(|_| Stopped)?;
        }
        Ok(())
    }

    fn read_jsonl(
        &mut self,
        name: Arc<str>,
        mut reader: impl BufRead,
    ) -> std::result::Result<(), ReadError> {
        let mut number = 0u64;
        let mut block = LineBlock::default();
        loop {
            number += 1;
            // Lines are read straight into the block they are parsed from.
            let start = block.text.len();
            let limit = self.max_record_bytes as u64 + 1;
            let first = limit.min(BLOCK_BYTES as u64);
            let mut n = (&mut reader)
                .take(first)
                .read_until(b'\n', &mut block.text)?;
            if n as u64 == first && block.text.last() != Some(&b'\n') && limit > first {
                // A long line: room for the longest one at once (pages are
                // only used as they are written) instead of doubling the
                // buffer step by step, every step's old buffer adding to the
                // peak memory.
                block.text.reserve((limit - first) as usize);
                n += (&mut reader)
                    .take(limit - first)
                    .read_until(b'\n', &mut block.text)?;
            }
            if n == 0 {
                return Ok(self.parse_block(&name, &mut block)?);
            }
            let at = || SourceRef::Line {
                path: name.clone(),
                line: number,
            };
            let line = &block.text[start..];
            if line.last() != Some(&b'\n') && line.len() > self.max_record_bytes {
                // Too long to hold: skip to the end of the line, keep a prefix.
                let len = line.len() as u64;
                let prefix = String::from_utf8_lossy(&line[..1024.min(line.len())]).into_owned();
                block.text.truncate(start);
                let mut skipped = 0u64;
                loop {
                    let buf = reader.fill_buf()?;
                    if buf.is_empty() {
                        break;
                    }
                    match buf.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            reader.consume(i + 1);
                            skipped += i as u64;
                            break;
                        }
                        None => {
                            let len = buf.len();
                            reader.consume(len);
                            skipped += len as u64;
                        }
                    }
                }
                self.parse_block(&name, &mut block)?;
                self.push(Item::Reject(Reject::new(
                    at(),
                    format!(
                        "line is {} bytes, more than the {} a record may have; the raw column holds its first 1024 bytes",
                        len + skipped,
                        self.max_record_bytes
                    ),
                    prefix,
                )))?;
                continue;
            }
            let text = trim_line_end(line);
            if text.iter().all(u8::is_ascii_whitespace) {
                block.text.truncate(start);
                continue;
            }
            let end = start + text.len();
            block.text.truncate(end);
            block.lines.push((number, start..end));
            if block.lines.len() >= BLOCK_LINES || block.text.len() >= BLOCK_BYTES {
                self.parse_block(&name, &mut block)?;
            }
        }
    }

    /// Parses a block of lines on every core, keeping their order, and
    /// empties it.
    fn parse_block(
        &mut self,
        name: &Arc<str>,
        block: &mut LineBlock,
    ) -> std::result::Result<(), Stopped> {
        // With a low bound, a block is first checked by its cursor field
        // alone while most records fall below the window, and every
        // eighth block otherwise, to notice when they start to.
        self.blocks += 1;
        let window = self
            .window
            .as_ref()
            .filter(|_| self.prefilter || self.blocks % 8 == 0);
        let any_window = self.window.as_ref();
        let max_value = self.max_value_bytes;
        let items: Vec<Item> = block
            .lines
            .par_iter()
            .map(|(number, range)| {
                let text = &block.text[range.clone()];
                if let Some((field, low)) = window {
                    if below_window(text, field, low) {
                        return Item::Skipped;
                    }
                }
                let at = SourceRef::Line {
                    path: name.clone(),
                    line: *number,
                };
                let item =
                    SHAPE.with_borrow_mut(|shape| parse_json_record(text, at, shape, max_value));
                match (item, any_window) {
                    // Whichever way the line was read, a readable cursor
                    // below the window makes it skipped.
                    (Item::Reject(_), Some((field, low))) if below_window(text, field, low) => {
                        Item::Skipped
                    }
                    (item, _) => item,
                }
            })
            .collect();
        if window.is_some() && !items.is_empty() {
            let skipped = items.iter().filter(|i| matches!(i, Item::Skipped)).count();
            self.prefilter = skipped * 4 >= items.len();
        }
        block.text.clear();
        block.lines.clear();
        for item in items {
            self.push(item)?;
        }
        Ok(())
    }

    fn read_json_array(
        &mut self,
        name: Arc<str>,
        reader: impl BufRead,
    ) -> std::result::Result<(), ReadError> {
        let lines = Arc::new(AtomicU64::new(1));
        let element_line = Arc::new(AtomicU64::new(1));
        let counting = LineCounter {
            inner: reader,
            lines: lines.clone(),
            element_line: element_line.clone(),
        };
        let mut de = serde_json::Deserializer::from_reader(counting);
        let seed = ArraySeed {
            reader: self,
            name: name.clone(),
            lines: lines.clone(),
            element_line,
            shape: Vec::new(),
            stopped: false,
        };
        match de.deserialize_seq(seed) {
            Ok(()) => Ok(()),
            Err(_) if lines.load(Ordering::Relaxed) == u64::MAX => Err(ReadError::Stopped),
            Err(e) if e.is_io() => Err(ReadError::Io(io::Error::other(e.to_string()))),
            Err(e) => {
                let at = SourceRef::Line {
                    path: name,
                    line: e.line() as u64,
                };
                self.push(Item::Reject(Reject::new(
                    at,
                    format!("malformed JSON array: {e}; records after this point were not read"),
                    "",
                )))?;
                Ok(())
            }
        }
    }
}

/// The error a read ended with, naming the file or object; `None` when
/// the run stopped.
fn failed(name: &str, e: ReadError) -> Option<Error> {
    match e {
        ReadError::Stopped => None,
        ReadError::Io(source) => Some(Error::Io {
            path: PathBuf::from(name),
            source,
        }),
    }
}

/// True when `text` is a JSON object whose field `field` holds a cursor
/// below `low`: the record would be skipped, so it need not be built. Any
/// doubt (not an object, malformed, no such field, not a cursor) says
/// false, and the record is parsed in full.
///
/// The other values are passed over, not checked as a full parse checks
/// them: a line below the window is skipped even when one of its other
/// values holds a number beyond a double's range, a lone surrogate escape
/// or more than 128 levels of nesting (the reader then skips it too when
/// the full parse rejects it, so the count never depends on which way a
/// line was read). Invalid UTF-8 anywhere in the line, or JSON that does
/// not parse, makes it a reject.
fn below_window(text: &[u8], field: &str, low: &Cursor) -> bool {
    if std::str::from_utf8(text).is_err() {
        return false;
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    match CursorField(field).deserialize(&mut de) {
        Ok(Some(value)) if de.end().is_ok() => Cursor::from_json(&value).is_some_and(|c| c < *low),
        _ => false,
    }
}

/// The value of one top-level field of a JSON object (the last one, as a
/// map keeps it), every other value passed over without being built.
struct CursorField<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for CursorField<'_> {
    type Value = Option<Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CursorField<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_field) = map.next_key_seed(KeyIs(self.0))? {
            if is_field {
                found = Some(map.next_value::<Value>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Whether an object key is `.0`, compared without allocating.
struct KeyIs<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> std::result::Result<bool, E> {
        Ok(key == self.0)
    }
}

/// Parses one JSON text into a record, or a reject that says why not.
///
/// `shape` holds the field names of the previous record read on this
/// thread, which the next record of the same shape shares. A text longer
/// than `max_value_bytes` is first measured unbuilt, so that a value over
/// the limit is rejected before it takes memory many times its size.
pub(crate) fn parse_json_record(
    text: &[u8],
    at: SourceRef,
    shape: &mut Vec<Name>,
    max_value_bytes: Option<usize>,
) -> Item {
    let raw_len = text.len();
    if let Some(max) = max_value_bytes.filter(|&max| raw_len > max) {
        if let Some(reject) = super::oversize::oversized_json(text, &at, max) {
            return reject;
        }
    }
    // A line checked as UTF-8 once is parsed without checking each string.
    let object = match std::str::from_utf8(text) {
        Ok(s) if s.trim_ascii_start().starts_with('{') => Some(s),
        _ => None,
    };
    if let Some(object) = object {
        let mut de = serde_json::Deserializer::from_str(object);
        let parsed = ShapedFields { shape }
            .deserialize(&mut de)
            .and_then(|fields| de.end().map(|()| fields));
        if let Ok(fields) = parsed {
            return Item::Record(Record {
                fields,
                source: at,
                raw_len,
            });
        }
        // Malformed: the general path below says why.
    }
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            let reason = match std::str::from_utf8(text) {
                Err(u) => format!("invalid UTF-8 at byte {}", u.valid_up_to()),
                Ok(_) => format!("malformed JSON: {e}"),
            };
            return Item::Reject(Reject::new(at, reason, String::from_utf8_lossy(text)));
        }
    };
    into_record(value, at, raw_len)
}

pub(crate) fn into_record(value: Value, at: SourceRef, raw_len: usize) -> Item {
    match value {
        Value::Object(fields) => Item::Record(Record {
            fields: fields.into(),
            source: at,
            raw_len,
        }),
        other => {
            let kind = match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            };
            Item::Reject(Reject::new(
                at,
                format!("expected a JSON object, got {kind}"),
                other.to_string(),
            ))
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &line[..end]
}

/// Counts bytes read, for progress.
/// An object as the files log knows it: its URL, size, last-modified and
/// `etag:` (or `version:`) digest; `None` when the store gives neither.
///
/// The ETag is kept without its quotes (and weak `W/` mark): Azure lists it
/// bare and answers a read with it quoted, and the two must compare equal.
fn object_entry(object: &ObjectInfo) -> Option<(FileId, String)> {
    let digest = match (&object.e_tag, &object.version) {
        (Some(tag), _) => format!("etag:{}", tag.trim_start_matches("W/").trim_matches('"')),
        (None, Some(version)) => format!("version:{version}"),
        (None, None) => return None,
    };
    let id = FileId {
        path: object.url.clone(),
        size: object.size,
        modified: format_modified(object.last_modified),
    };
    Some((id, digest))
}

struct Counted<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Counts newlines as serde_json reads (byte by byte), so array elements
/// know their line.
struct LineCounter<R> {
    inner: R,
    lines: Arc<AtomicU64>,
    /// The line of the first byte of the element being read; 0 while the
    /// next element has not begun (whitespace and commas come before it).
    element_line: Arc<AtomicU64>,
}

impl<R: BufRead> Read for LineCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.lines.fetch_add(1, Ordering::Relaxed);
            } else if !b.is_ascii_whitespace()
                && b != b','
                && self.element_line.load(Ordering::Relaxed) == 0
            {
                self.element_line
                    .store(self.lines.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        Ok(n)
    }
}

/// Visits the elements of a top-level JSON array one at a time.
struct ArraySeed<'a> {
    reader: &'a mut Reader,
    name: Arc<str>,
    lines: Arc<AtomicU64>,
    element_line: Arc<AtomicU64>,
    /// The field names of the previous element (see [`ShapedFields`]).
    shape: Vec<Name>,
    stopped: bool,
}

impl<'de> DeserializeSeed<'de> for ArraySeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ArraySeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> std::result::Result<(), A::Error> {
        loop {
            // The line where the element begins, not where the previous
            // one ended: the newlines between them are read with it.
            self.element_line.store(0, Ordering::Relaxed);
            // Each element is read as its text first and parsed as a JSONL
            // line is: its size is known, and a value over max_value_bytes
            // is rejected before it is built.
            let Some(element) = seq.next_element::<Box<RawValue>>()? else {
                return Ok(());
            };
            let line = match self.element_line.load(Ordering::Relaxed) {
                0 => self.lines.load(Ordering::Relaxed),
                line => line,
            };
            let at = SourceRef::Line {
                path: self.name.clone(),
                line,
            };
            let item = parse_json_record(
                element.get().as_bytes(),
                at,
                &mut self.shape,
                self.reader.max_value_bytes,
            );
            drop(element);
            if self.reader.push(item).is_err() {
                self.stopped = true;
                self.lines.store(u64::MAX, Ordering::Relaxed);
                return Err(serde::de::Error::custom("stopped"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line longer than a record may be is rejected with its length and
    /// a prefix; the lines around it, blank lines skipped, keep their
    /// numbers and their order.
    #[tokio::test]
    async fn an_overlong_line_is_rejected_and_the_lines_around_it_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let long = format!("{{\"id\":2,\"pad\":\"{}\"}}", "x".repeat(70_000));
        std::fs::write(
            &path,
            format!("{{\"id\":1}}\r\n\n  \n{long}\n{{\"id\":3}}\n{{\"id\":4}}"),
        )
        .unwrap();
        let config = FileSourceConfig {
            path: OneOrMany::One(path.display().to_string()),
            format: None,
            endpoint: None,
        };
        let query = SourceQuery {
            batch_size: 10,
            max_record_bytes: 1 << 16,
            ..Default::default()
        };
        let mut source = FileSource::open(&config, &query).unwrap();
        let mut seen = Vec::new();
        while let Some(batch) = source.next_batch().await.unwrap() {
            for item in batch {
                seen.push(match item {
                    Item::Record(r) => format!("{} {}", r.source, r.fields["id"]),
                    Item::Reject(r) => format!("{} {}", r.source, r.reason),
                    Item::Skipped => "skipped".into(),
                    Item::FileLoaded(_) | Item::FileSkipped => continue,
                });
            }
        }
        let name = path.display();
        assert_eq!(
            seen,
            [
                format!("{name}:1 1"),
                format!(
                    "{name}:4 line is {} bytes, more than the 65536 a record may have; the raw column holds its first 1024 bytes",
                    long.len()
                ),
                format!("{name}:5 3"),
                format!("{name}:6 4"),
            ]
        );
    }

    #[test]
    fn only_a_clear_cursor_below_the_window_skips_a_line_unparsed() {
        let low = Cursor::from_text("2024-05-01T00:00:00Z");
        let below = |text: &str| below_window(text.as_bytes(), "at", &low);
        assert!(below(
            r#"{"id":1,"nested":{"at":"2030-01-01T00:00:00Z"},"at":"2024-04-30T23:59:59Z"}"#
        ));
        // Offsets are compared as instants.
        assert!(below(r#"{"at":"2024-05-01T01:00:00+02:00"}"#));
        assert!(!below(r#"{"at":"2024-05-01T00:00:00Z"}"#));
        // The last of repeated fields counts, as in the record itself.
        assert!(!below(
            r#"{"at":"2020-01-01T00:00:00Z","at":"2025-01-01T00:00:00Z"}"#
        ));
        assert!(below(
            r#"{"at":"2025-01-01T00:00:00Z","\u0061t":"2020-01-01T00:00:00Z"}"#
        ));
        // Any doubt: parsed in full, where a reject says why.
        assert!(!below(r#"{"id":1}"#));
        assert!(!below(r#"{"at":null}"#));
        assert!(!below(r#"{"at":"2020-01-01T00:00:00Z","id":}"#));
        assert!(!below(r#"{"at":"2020-01-01T00:00:00Z"} trailing"#));
        assert!(!below(r#"["at","2020-01-01T00:00:00Z"]"#));
        assert!(!below_window(
            b"{\"at\":\"2020-01-01T00:00:00Z\",\"x\":\"\xff\"}",
            "at",
            &low
        ));
        let low = Cursor::Int(100);
        assert!(below_window(br#"{"v":99}"#, "v", &low));
        assert!(!below_window(br#"{"v":100}"#, "v", &low));
    }
}
