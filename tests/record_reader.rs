//! Property tests of the corpus record reader (issue 24): whatever bytes an input holds, the reader
//! never panics or fails, every line is either a record or an `Invalid` with a reason, and line
//! numbers and record indices are right. Bounded (a few hundred cases per property) so that it
//! runs in the normal `cargo test` in well under a second.

use std::io::BufReader;

use icl_embed::corpus::input::{is_blank, InputFormat};
use icl_embed::corpus::run::RecordReader;
use proptest::prelude::*;

/// The input's lines as the reader must see them: split after each `\n`, a final newline ending
/// the last line rather than starting another, and one `\n` then one `\r` stripped from each.
fn lines(bytes: &[u8]) -> Vec<&[u8]> {
    bytes
        .split_inclusive(|&b| b == b'\n')
        .map(|l| {
            let l = l.strip_suffix(b"\n").unwrap_or(l);
            l.strip_suffix(b"\r").unwrap_or(l)
        })
        .collect()
}

/// What a JSON line holds when it is a valid record: its text and id (a string, or a number
/// written as JSON writes it); `None` when it is not a valid record.
fn json_record(line: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(line).ok()?;
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let object = v.as_object()?;
    let text = object.get("text")?.as_str()?.to_string();
    let id = match object.get("id")? {
        serde_json::Value::String(s) => s.clone(),
        n @ serde_json::Value::Number(_) => n.to_string(),
        _ => return None,
    };
    Some((text, id))
}

/// Reads `bytes` through a buffer of `capacity` bytes (so lines cross buffer ends) and checks
/// every item against the lines.
fn check(bytes: &[u8], format: InputFormat, capacity: usize) -> Result<(), TestCaseError> {
    let input = BufReader::with_capacity(capacity, bytes);
    let mut reader = RecordReader::new(input, "in", format, "text", Some("id"));
    // (1-based line number, line) of each line that must give an item.
    let expected: Vec<(usize, &[u8])> = lines(bytes)
        .into_iter()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| format != InputFormat::Jsonl || !is_blank(l))
        .collect();
    let mut index = 0;
    loop {
        let item = match reader.next_record() {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(e) => return Err(TestCaseError::fail(format!("read error: {e}"))),
        };
        prop_assert!(index < expected.len(), "more items than lines");
        let (line, raw) = expected[index];
        match item {
            Ok(r) => {
                prop_assert_eq!((r.line, r.index), (line, index));
                if format == InputFormat::Jsonl {
                    let (text, id) = json_record(raw).expect("a record from an invalid line");
                    prop_assert_eq!(&r.text, &text);
                    prop_assert_eq!(r.id.as_deref(), Some(id.as_str()));
                } else {
                    prop_assert_eq!(r.text.as_bytes(), raw);
                    prop_assert!(r.id.is_none());
                }
            }
            Err(inv) => {
                prop_assert_eq!((inv.line, inv.index), (line, index));
                prop_assert!(!inv.reason.trim().is_empty(), "an Invalid without a reason");
                if format == InputFormat::Jsonl {
                    prop_assert!(
                        json_record(raw).is_none(),
                        "valid line refused: {}",
                        inv.reason
                    );
                } else {
                    prop_assert!(std::str::from_utf8(raw).is_err(), "{}", inv.reason);
                }
            }
        }
        index += 1;
    }
    prop_assert_eq!(index, expected.len(), "fewer items than lines");
    Ok(())
}

/// Bytes built from pieces that matter to the reader: newlines, carriage returns, blank lines
/// (Unicode white space included), invalid UTF-8, valid and broken JSON records, and arbitrary
/// text.
fn line_soup() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b" \t".to_vec()),
        Just("\u{3000}\u{a0}".as_bytes().to_vec()),
        Just(b"\xff\xfe".to_vec()),
        Just(b"\xe3\x80".to_vec()), // a truncated 3-byte sequence
        Just(br#"{"text": "a", "id": "x"}"#.to_vec()),
        Just(br#"{"id": 7, "text": "b\n\u00e9"}"#.to_vec()),
        Just(br#"{"text": 3, "id": "y"}"#.to_vec()),
        Just(br#"{"text": "no id"}"#.to_vec()),
        Just(br#"{"text": "c", "id": null}"#.to_vec()),
        Just(br#"["text", "id"]"#.to_vec()),
        Just(b"{\"text\": \"".to_vec()),
        Just(b"{".to_vec()),
        Just(b"\"".to_vec()),
        any::<String>().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..8),
    ];
    prop::collection::vec(piece, 0..48).prop_map(|pieces| pieces.concat())
}

fn formats() -> impl Strategy<Value = InputFormat> {
    prop_oneof![Just(InputFormat::Text), Just(InputFormat::Jsonl)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        format in formats(),
        capacity in 1usize..64,
    ) {
        check(&bytes, format, capacity)?;
    }

    #[test]
    fn lines_of_json_records_text_and_broken_bytes(
        bytes in line_soup(),
        format in formats(),
        capacity in 1usize..64,
    ) {
        check(&bytes, format, capacity)?;
    }
}

/// The checker itself: a known input gives the known items.
#[test]
fn the_checker_agrees_with_a_worked_example() {
    let bytes = b"{\"text\":\"a\",\"id\":\"x\"}\r\n\n{\"text\":3}\n\xff";
    assert_eq!(lines(bytes).len(), 4);
    check(bytes, InputFormat::Jsonl, 3).unwrap();
    check(bytes, InputFormat::Text, 3).unwrap();
}
