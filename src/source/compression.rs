//! Compressed inputs: `.gz` and `.zst` after a file's format extension
//! (`usage.jsonl.gz`, `contacts.csv.zst`).
//!
//! The file source names its format and compression from a file's (or an
//! object's) name; the bytes are decompressed as they stream past, between
//! the raw reader (counted for progress, in compressed bytes) and the line,
//! CSV or JSON reader, so a compressed file is never held whole. Line
//! numbers in `file:line` count decompressed lines.

use std::io::Read;

/// How a file's bytes are compressed, by its last extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// gzip, members concatenated as `cat a.gz b.gz` makes them.
    Gzip,
    /// Zstandard, frames concatenated.
    Zstd,
}

impl Compression {
    /// The compression a name's last extension says, and the name without
    /// that extension: `a.jsonl.gz` is gzip'd `a.jsonl`.
    pub fn split(name: &str) -> (&str, Compression) {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".gz") {
            (&name[..name.len() - 3], Compression::Gzip)
        } else if lower.ends_with(".zst") {
            (&name[..name.len() - 4], Compression::Zstd)
        } else {
            (name, Compression::None)
        }
    }

    /// The extension, for messages.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Zstd => ".zst",
        }
    }

    /// Wraps `input` so that reading it yields the decompressed bytes.
    pub fn decoder<'a>(self, input: Box<dyn Read + 'a>) -> std::io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => input,
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_last_extension_names_the_compression() {
        assert_eq!(
            Compression::split("a.jsonl.gz"),
            ("a.jsonl", Compression::Gzip)
        );
        assert_eq!(
            Compression::split("A.CSV.ZST"),
            ("A.CSV", Compression::Zstd)
        );
        assert_eq!(Compression::split("a.json"), ("a.json", Compression::None));
        assert_eq!(
            Compression::split("a.gz.json"),
            ("a.gz.json", Compression::None)
        );
    }

    #[test]
    fn concatenated_members_and_frames_read_as_one_stream() {
        let mut gz = Vec::new();
        for part in ["{\"id\":1}\n", "{\"id\":2}\n"] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part.as_bytes()).unwrap();
            gz.extend(e.finish().unwrap());
        }
        let mut zst = Vec::new();
        for part in ["{\"id\":1}\n", "{\"id\":2}\n"] {
            zst.extend(zstd::encode_all(part.as_bytes(), 1).unwrap());
        }
        for (bytes, compression) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
            let mut text = String::new();
            compression
                .decoder(Box::new(&bytes[..]))
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            assert_eq!(text, "{\"id\":1}\n{\"id\":2}\n", "{compression:?}");
        }
    }
}
