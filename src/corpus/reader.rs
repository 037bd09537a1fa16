//! The records of a corpus run's input: lines read one at a time ([`RecordReader`]), this shard's
//! records gathered into fixed-size chunks with invalid lines and duplicate ids handled
//! ([`Chunks`]), and the pass that fingerprints the input and counts its records ([`scan_input`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::corpus::input::{is_blank, parse_json_record, InputFormat};
use crate::error::{Error, Result};

/// `--shard K/N`: this run takes the records whose index is K modulo N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = Error;

    fn from_str(s: &str) -> Result<Shard> {
        let bad = || Error::input("--shard", format!("{s:?} is not K/N with 0 <= K < N"));
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

/// One record of the input.
#[derive(Debug, Clone)]
pub struct Record {
    /// 1-based line number in the input.
    pub line: usize,
    /// 0-based record index in the whole input (before sharding).
    pub index: usize,
    pub text: String,
    pub id: Option<String>,
}

/// A line that is not a usable record.
#[derive(Debug, Clone)]
pub struct Invalid {
    pub line: usize,
    pub index: usize,
    pub reason: String,
}

/// Reads records one line at a time: plain text lines, or JSON lines with a text field (blank
/// lines skipped) and optionally an id field.
pub struct RecordReader<R: BufRead> {
    reader: R,
    name: String,
    format: InputFormat,
    field: String,
    id_field: Option<String>,
    line: usize,
    index: usize,
    buf: Vec<u8>,
}

impl<R: BufRead> RecordReader<R> {
    pub fn new(
        reader: R,
        name: &str,
        format: InputFormat,
        field: &str,
        id_field: Option<&str>,
    ) -> Self {
        RecordReader {
            reader,
            name: name.to_string(),
            format,
            field: field.to_string(),
            id_field: id_field.map(str::to_string),
            line: 0,
            index: 0,
            buf: Vec::new(),
        }
    }

    /// The next record, an invalid line (`Ok(Some(Err(..)))`), or the end.
    pub fn next_record(&mut self) -> Result<Option<std::result::Result<Record, Invalid>>> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| Error::io(&self.name, "cannot read the input", e))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            let mut raw: &[u8] = &self.buf;
            raw = raw.strip_suffix(b"\n").unwrap_or(raw);
            raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if self.format == InputFormat::Jsonl && is_blank(raw) {
                continue;
            }
            let index = self.index;
            self.index += 1;
            let line = self.line;
            let invalid = |reason: String| {
                Ok(Some(Err(Invalid {
                    line,
                    index,
                    reason,
                })))
            };
            let text = match std::str::from_utf8(raw) {
                Ok(t) => t,
                Err(e) => return invalid(format!("invalid UTF-8 at byte {}", e.valid_up_to())),
            };
            if self.format != InputFormat::Jsonl {
                return Ok(Some(Ok(Record {
                    line,
                    index,
                    text: text.to_string(),
                    id: None,
                })));
            }
            return match parse_json_record(text, &self.field, self.id_field.as_deref()) {
                Ok((text, id)) => Ok(Some(Ok(Record {
                    line,
                    index,
                    text,
                    id,
                }))),
                Err(reason) => invalid(reason),
            };
        }
    }
}

/// The records of one chunk: this shard's records that no earlier run committed, the invalid
/// lines among them (with `--skip-invalid`), and the input's records consumed after it.
#[derive(Debug, Default)]
pub struct Chunk {
    pub records: Vec<Record>,
    pub skipped: Vec<Invalid>,
    /// Records of the whole input (every shard, valid or not) read up to the chunk's end.
    pub records_after: usize,
}

/// How [`Chunks`] cuts and filters: the run's settings that concern records.
pub struct ChunkRules {
    pub shard: Shard,
    /// Records per chunk (at least one).
    pub chunk_records: usize,
    pub skip_invalid: bool,
    /// Records an earlier run already committed: read again, but not returned.
    pub committed_records: usize,
}

/// This shard's records in chunks of `chunk_records`, cut at the same records on every run so that
/// a resumed run's batches are an uninterrupted run's.
pub struct Chunks<R: BufRead> {
    reader: RecordReader<R>,
    rules: ChunkRules,
    ids_seen: HashMap<String, usize>,
    consumed: usize,
}

impl<R: BufRead> Chunks<R> {
    pub fn new(reader: RecordReader<R>, rules: ChunkRules) -> Self {
        Chunks {
            reader,
            rules,
            ids_seen: HashMap::new(),
            consumed: 0,
        }
    }

    /// The next chunk, or `None` at the end of the input. An invalid line is an error naming it,
    /// unless invalid lines are skipped.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>> {
        let mut chunk = Chunk::default();
        let mut eof = false;
        while chunk.records.len() < self.rules.chunk_records.max(1) {
            let Some(item) = self.reader.next_record()? else {
                eof = true;
                break;
            };
            self.consumed += 1;
            let item = item.and_then(|r| check_id(&mut self.ids_seen, r));
            let index = match &item {
                Ok(r) => r.index,
                Err(inv) => inv.index,
            };
            let shard = self.rules.shard;
            if index % shard.count != shard.index || self.consumed <= self.rules.committed_records {
                continue; // another shard's record, or one an earlier run committed
            }
            match item {
                Ok(r) => chunk.records.push(r),
                Err(inv) if self.rules.skip_invalid => chunk.skipped.push(inv),
                Err(inv) => return Err(self.invalid_line(&inv)),
            }
        }
        chunk.records_after = self.consumed;
        if eof && chunk.records.is_empty() && chunk.skipped.is_empty() {
            return Ok(None);
        }
        Ok(Some(chunk))
    }

    fn invalid_line(&self, inv: &Invalid) -> Error {
        Error::input(
            format!("{}, line {}", self.reader.name, inv.line),
            format!(
                "{} (pass --skip-invalid to skip such lines; the run can be resumed)",
                inv.reason
            ),
        )
    }
}

/// Refuses a record whose id an earlier record has; `seen` maps each id to its first line.
fn check_id(seen: &mut HashMap<String, usize>, r: Record) -> std::result::Result<Record, Invalid> {
    if let Some(id) = &r.id {
        if let Some(&first) = seen.get(id) {
            return Err(Invalid {
                line: r.line,
                index: r.index,
                reason: format!("duplicate id {id:?} (first on line {first})"),
            });
        }
        seen.insert(id.clone(), r.line);
    }
    Ok(r)
}

/// What [`scan_input`] learns of an input file.
pub struct InputScan {
    pub size: u64,
    pub sha256: String,
    /// Records in this shard (for the progress bar's total).
    pub records: usize,
}

/// Fingerprints the input file and counts the records of `shard` in it, in one pass. An empty
/// input is no error: like an empty shard, it makes an output of no rows.
pub fn scan_input(path: &Path, format: InputFormat, shard: Shard) -> Result<InputScan> {
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open the input", e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let (mut size, mut records) = (0u64, 0usize);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, "cannot read the input", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&line);
        size += n as u64;
        let mut raw: &[u8] = &line;
        raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if format != InputFormat::Jsonl || !is_blank(raw) {
            records += 1;
        }
    }
    let s = shard;
    Ok(InputScan {
        size,
        sha256: hex(&hasher.finalize()),
        records: records / s.count + usize::from(records % s.count > s.index),
    })
}

/// Lowercase hexadecimal, as fingerprints are written.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parsing() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reader_reports_invalid_lines_and_skips_blank_json_lines() {
        let data =
            b"{\"text\":\"a\",\"id\":\"x\"}\n\n{\"text\":3}\n{\"text\":\"b\",\"id\":7}\n\xff\n";
        let mut r = RecordReader::new(
            &data[..],
            "in.jsonl",
            InputFormat::Jsonl,
            "text",
            Some("id"),
        );
        let a = r.next_record().unwrap().unwrap().unwrap();
        assert_eq!(
            (a.line, a.index, a.text.as_str(), a.id.as_deref()),
            (1, 0, "a", Some("x"))
        );
        let bad = r.next_record().unwrap().unwrap().unwrap_err();
        assert_eq!(bad.line, 3);
        let b = r.next_record().unwrap().unwrap().unwrap();
        assert_eq!((b.line, b.index, b.id.as_deref()), (4, 2, Some("7")));
        assert!(r
            .next_record()
            .unwrap()
            .unwrap()
            .unwrap_err()
            .reason
            .contains("UTF-8"));
        assert!(r.next_record().unwrap().is_none());
    }

    #[test]
    fn duplicate_ids_name_the_first_line() {
        let mut seen = HashMap::new();
        let rec = |line, id: &str| Record {
            line,
            index: line,
            text: String::new(),
            id: Some(id.into()),
        };
        assert!(check_id(&mut seen, rec(1, "a")).is_ok());
        assert!(check_id(&mut seen, rec(2, "b")).is_ok());
        let err = check_id(&mut seen, rec(3, "a")).unwrap_err();
        assert!(err.reason.contains("first on line 1"), "{}", err.reason);
    }
}
