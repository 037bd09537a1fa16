//! Reading what the user gives: texts (plain lines, or JSON lines with a text field) and few-shot
//! examples (a JSON list, or JSON lines, of `{instruct?, query, response}`). Errors name the file
//! and the line or entry, so a bad line in a large file can be found.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::text::prompt::Example;

/// How an input file is laid out (`auto`, `text` or `jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// `.jsonl` and `.ndjson` files are JSON lines; anything else (and stdin) is plain text lines.
    Auto,
    /// One text per line; every line is a text, empty lines included (a final newline ends the last
    /// line, it does not start another).
    Text,
    /// One JSON object per line, the text in a string field; blank lines are skipped.
    Jsonl,
}

impl std::str::FromStr for InputFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<InputFormat> {
        match s {
            "auto" => Ok(InputFormat::Auto),
            "text" => Ok(InputFormat::Text),
            "jsonl" => Ok(InputFormat::Jsonl),
            _ => Err(Error::input(
                "--input-format",
                format!("{s:?} is not one of auto, text, jsonl"),
            )),
        }
    }
}

/// The one definition of a blank line: valid UTF-8 holding only (Unicode) white space. Blank lines
/// are not records in JSON lines (in plain text every line is a text, blank ones included); the
/// reader, the record count of a corpus run and `tokenize` all use this, so they number records
/// alike.
pub fn is_blank(raw: &[u8]) -> bool {
    std::str::from_utf8(raw).is_ok_and(|s| s.trim().is_empty())
}

impl InputFormat {
    /// The concrete format of `path` (`-` is stdin).
    pub fn resolve(self, path: &str) -> InputFormat {
        match self {
            InputFormat::Auto => {
                let ext = Path::new(path)
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase);
                match ext.as_deref() {
                    Some("jsonl" | "ndjson") => InputFormat::Jsonl,
                    _ => InputFormat::Text,
                }
            }
            f => f,
        }
    }
}

/// Reads all of `path` (`-` for stdin).
pub fn read_bytes(path: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if path == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("<stdin>", "cannot read", e))?;
    } else {
        bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read the input", e))?;
    }
    Ok(bytes)
}

/// The texts of an input file, in order.
pub fn read_texts(path: &str, format: InputFormat, field: &str) -> Result<Vec<String>> {
    let bytes = read_bytes(path)?;
    let name = if path == "-" { "<stdin>" } else { path };
    let texts = parse_texts(&bytes, name, format.resolve(path), field)?;
    if texts.is_empty() {
        return Err(Error::input(name, "holds no texts (the input is empty)"));
    }
    Ok(texts)
}

/// Splits `bytes` into lines (`\n`, an optional `\r` before it dropped) and takes one text per line.
pub fn parse_texts(
    bytes: &[u8],
    name: &str,
    format: InputFormat,
    field: &str,
) -> Result<Vec<String>> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut texts = Vec::new();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            Error::input(
                format!("{name}, line {line_no}"),
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            )
        })?;
        match format {
            InputFormat::Jsonl if is_blank(raw) => {}
            InputFormat::Jsonl => texts.push(
                parse_json_record(line, field, None)
                    .map(|(text, _)| text)
                    .map_err(|reason| Error::input(format!("{name}, line {line_no}"), reason))?,
            ),
            _ => texts.push(line.to_string()),
        }
    }
    Ok(texts)
}

/// The text (and, when `id_field` is set, the id) of one JSON line; the error says what is wrong.
pub(crate) fn parse_json_record(
    line: &str,
    field: &str,
    id_field: Option<&str>,
) -> std::result::Result<(String, Option<String>), String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let text = match object.get(field) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(format!(
                "field {field:?} is not a string (it is {})",
                json_kind(other)
            ))
        }
        None => return Err(format!("no field {field:?} (set --field)")),
    };
    let id = match id_field {
        None => None,
        Some(f) => match object.get(f) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v @ serde_json::Value::Number(_)) => Some(v.to_string()),
            Some(_) => return Err(format!("id field {f:?} is not a string or number")),
            None => return Err(format!("no id field {f:?}")),
        },
    };
    Ok((text, id))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Few-shot examples: a JSON list of objects, or JSON lines of objects, each with string `query`
/// and `response` and an optional string `instruct`.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(path, "cannot read the examples", e))?;
    let what = |at: String| format!("examples {}{at}", path.display());
    let entries: Vec<(String, serde_json::Value)> =
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!(", entry {}", i + 1), v))
                .collect(),
            Ok(serde_json::Value::Object(o)) => {
                vec![(", entry 1".into(), serde_json::Value::Object(o))]
            }
            Ok(other) => {
                return Err(Error::input(
                    what(String::new()),
                    format!(
                        "expected a JSON list of examples, found {}",
                        json_kind(&other)
                    ),
                ))
            }
            Err(_) => {
                let mut entries = Vec::new();
                for (i, line) in text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                {
                    let v = serde_json::from_str(line).map_err(|e| {
                        Error::input(
                            what(format!(", line {}", i + 1)),
                            format!("neither a JSON list nor JSON lines: {e}"),
                        )
                    })?;
                    entries.push((format!(", line {}", i + 1), v));
                }
                entries
            }
        };
    if entries.is_empty() {
        return Err(Error::input(what(String::new()), "holds no examples"));
    }
    entries
        .into_iter()
        .map(|(at, v)| {
            if !v.is_object() {
                return Err(Error::input(
                    what(at),
                    format!(
                        "expected an object with \"query\" and \"response\", found {}",
                        json_kind(&v)
                    ),
                ));
            }
            serde_json::from_value::<Example>(v).map_err(|e| Error::input(what(at), e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_keep_empty_lines_and_drop_the_final_newline() {
        let t = parse_texts(b"a\r\n\nb\n", "f", InputFormat::Text, "text").unwrap();
        assert_eq!(t, vec!["a", "", "b"]);
        assert_eq!(
            parse_texts(b"a", "f", InputFormat::Text, "text").unwrap(),
            vec!["a"]
        );
        assert!(parse_texts(b"", "f", InputFormat::Text, "text")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let err = parse_texts(b"ok\n\xff\xfe\n", "in.txt", InputFormat::Text, "text")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("in.txt, line 2") && err.contains("UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn json_lines_report_line_numbers_and_fields() {
        let ok = parse_texts(
            b"{\"text\":\"x\"}\n\n{\"body\":\"y\",\"text\":\"z\"}\n \n",
            "f",
            InputFormat::Jsonl,
            "text",
        )
        .unwrap();
        assert_eq!(ok, vec!["x", "z"]);
        let bad = parse_texts(
            b"{\"text\":\"x\"}\n{\"text\":\n",
            "f.jsonl",
            InputFormat::Jsonl,
            "text",
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("line 2") && bad.contains("malformed JSON"),
            "{bad}"
        );
        let missing = parse_texts(b"{\"body\":\"x\"}\n", "f", InputFormat::Jsonl, "text")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("no field \"text\""), "{missing}");
        let wrong = parse_texts(b"{\"text\":3}\n", "f", InputFormat::Jsonl, "text")
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("not a string"), "{wrong}");
    }

    #[test]
    fn blank_is_unicode_white_space_in_valid_utf8() {
        assert!(is_blank(b""));
        assert!(is_blank(b" \t\r"));
        assert!(
            is_blank("\u{a0}\u{2003}".as_bytes()),
            "no-break and em spaces"
        );
        assert!(!is_blank(b"x"));
        assert!(
            !is_blank(b"\xff"),
            "invalid UTF-8 is a (bad) record, not a blank line"
        );
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(InputFormat::Auto.resolve("a.jsonl"), InputFormat::Jsonl);
        assert_eq!(InputFormat::Auto.resolve("a.NDJSON"), InputFormat::Jsonl);
        assert_eq!(InputFormat::Auto.resolve("a.txt"), InputFormat::Text);
        assert_eq!(InputFormat::Auto.resolve("-"), InputFormat::Text);
    }
}
