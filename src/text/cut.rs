//! Where a long text may be cut before tokenizing without changing its leading tokens (issue 24):
//! only the first `max_length` ids of a text are ever used, so tokenizing a 50 MB line in full
//! costs memory and time for nothing. A cut at byte `c` is *safe* when every token of the full
//! text lies entirely before `c` or entirely after it, and the tokens before `c` do not depend on
//! the text after it; then the ids of `text[..c]` are exactly the leading ids of `text`.
//!
//! The rule is decided once per tokenizer, from its configuration, and only for layouts where
//! that is provable; anything else is tokenized whole ([`CutRule::None`]).
//!
//! * [`CutRule::Pairs`], SentencePiece-style layouts (a BPE over each whole span between added
//!   tokens: normalizer made only of `Prepend` and one-character `Replace`s, no pre-tokenizer or
//!   `Metaspace`; both tiny fixture layouts, Mistral's files). Such a BPE may merge across the
//!   whole span, but every merge produces a vocabulary entry, so a token covering characters
//!   `a` (at `c - 1`) and `b` (at `c`) contains the string `ab`. When both characters are tokens
//!   of their own (no byte fallback, no unknown token) and no vocabulary entry contains `ab`, no
//!   merge ever joins the two sides; merges on one side never change the candidate pairs of the
//!   other, and the queue takes each side's merges in the same relative (rank, position) order,
//!   so the left side ends exactly as it does alone. Between words (`x▁`) this holds for the
//!   usual SentencePiece vocabularies, whose `▁` only starts a token or continues a run of `▁`.
//! * [`CutRule::Whitespace`], GPT-2 style byte-level layouts (`ByteLevel` with its regex,
//!   optionally after `Digits`; smollm2): the model only ever sees pre-tokens, and no match of the
//!   GPT-2 pattern contains a non-space followed by a space (`\s+(?!\S)` and `\s+` start in
//!   whitespace, every other branch holds no whitespace after its optional leading space), and
//!   the matches left of such a point never look past it. So a cut between a non-space and a
//!   space leaves every pre-token before it, hence every token, unchanged. The same holds between
//!   an ASCII letter and ASCII punctuation: the letter ends a `'s`-style or ` ?\p{L}+` match,
//!   which stops before any non-letter, and no branch that could span the two looks past them
//!   (text without whitespace, such as minified code or URLs, is cut there).
//!
//! For both, an added token (matched in the raw text first) must not straddle the cut: the cut's
//! character pair must not occur in any added token's content, and added tokens that strip
//! neighbouring whitespace or match only whole words make the layout fall back to `None`.

use std::collections::HashSet;

use serde_json::Value;

/// How a tokenizer's texts may be cut; see the module documentation.
#[derive(Debug, Clone)]
pub enum CutRule {
    /// No provably safe cut: texts are tokenized whole.
    None,
    /// Whole-span BPE: a cut between characters `a` and `b` (after `map`) is safe when both are
    /// single-character vocabulary entries and no entry contains `ab`.
    Pairs {
        /// Character replacements the normalizer and pre-tokenizer apply, in order.
        map: Vec<(char, char)>,
        /// Characters that are vocabulary entries on their own.
        singles: HashSet<char>,
        /// Adjacent character pairs occurring in some vocabulary entry.
        joined: HashSet<(char, char)>,
        /// Adjacent character pairs occurring in some added token (raw and mapped).
        added: HashSet<(char, char)>,
    },
    /// Byte-level pre-tokenized: a cut between a non-whitespace character and an ASCII space,
    /// tab or newline is safe, and one between an ASCII letter and ASCII punctuation.
    Whitespace {
        /// Adjacent character pairs occurring in some added token.
        added: HashSet<(char, char)>,
    },
}

/// One added token, as far as cutting is concerned.
pub struct Added<'a> {
    pub content: &'a str,
    pub strips_or_whole_word: bool,
}

fn pairs(s: &str) -> impl Iterator<Item = (char, char)> + '_ {
    s.chars().zip(s.chars().skip(1))
}

fn map_char(map: &[(char, char)], mut c: char) -> char {
    for &(from, to) in map {
        if c == from {
            c = to;
        }
    }
    c
}

/// The single-character replacements of a normalizer made only of `Prepend` and `Replace`
/// (possibly in a `Sequence`), or `None` for any other normalizer.
fn normalizer_map(n: &Value, map: &mut Vec<(char, char)>) -> Option<()> {
    match n.get("type")?.as_str()? {
        "Sequence" => {
            for inner in n.get("normalizers")?.as_array()? {
                normalizer_map(inner, map)?;
            }
            Some(())
        }
        "Prepend" => Some(()),
        "Replace" => {
            let from = single_char(n.get("pattern")?.get("String")?.as_str()?)?;
            let to = single_char(n.get("content")?.as_str()?)?;
            map.push((from, to));
            Some(())
        }
        _ => None,
    }
}

fn single_char(s: &str) -> Option<char> {
    let mut chars = s.chars();
    let c = chars.next()?;
    chars.next().is_none().then_some(c)
}

fn is_gpt2_byte_level(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some("ByteLevel")
        && p.get("use_regex").and_then(Value::as_bool) == Some(true)
}

impl CutRule {
    /// The rule for a tokenizer with this normalizer and pre-tokenizer (as serialized in
    /// tokenizer.json; `Value::Null` when absent), BPE model settings (`None` for another model)
    /// and vocabulary, and these added tokens.
    pub fn decide<'a>(
        normalizer: &Value,
        pre_tokenizer: &Value,
        bpe_whole_span_ok: Option<bool>,
        vocab: impl Iterator<Item = &'a str>,
        added: &[Added<'_>],
    ) -> CutRule {
        if added.iter().any(|a| a.strips_or_whole_word) {
            return CutRule::None;
        }
        let added_pairs = |map: &[(char, char)]| -> HashSet<(char, char)> {
            let mut set = HashSet::new();
            for a in added {
                set.extend(pairs(a.content));
                let mapped: String = a.content.chars().map(|c| map_char(map, c)).collect();
                set.extend(pairs(&mapped));
            }
            set
        };
        // Byte-level: the regex's pre-tokens bound every token, whatever the model.
        let byte_level = match pre_tokenizer.get("type").and_then(Value::as_str) {
            Some("ByteLevel") => is_gpt2_byte_level(pre_tokenizer),
            Some("Sequence") => pre_tokenizer
                .get("pretokenizers")
                .and_then(Value::as_array)
                .is_some_and(|ps| {
                    ps.last().is_some_and(is_gpt2_byte_level)
                        && ps[..ps.len() - 1]
                            .iter()
                            .all(|p| p.get("type").and_then(Value::as_str) == Some("Digits"))
                }),
            _ => false,
        };
        if byte_level {
            return if normalizer.is_null() {
                CutRule::Whitespace {
                    added: added_pairs(&[]),
                }
            } else {
                CutRule::None
            };
        }
        // Whole-span BPE: needs a plain BPE (no dropout, suffixes or whole-word lookups).
        if bpe_whole_span_ok != Some(true) {
            return CutRule::None;
        }
        let mut map = Vec::new();
        if !normalizer.is_null() && normalizer_map(normalizer, &mut map).is_none() {
            return CutRule::None;
        }
        match pre_tokenizer.get("type").and_then(Value::as_str) {
            None if pre_tokenizer.is_null() => {}
            Some("Metaspace") => {
                let Some(r) = pre_tokenizer
                    .get("replacement")
                    .and_then(Value::as_str)
                    .and_then(single_char)
                else {
                    return CutRule::None;
                };
                map.push((' ', r));
            }
            _ => return CutRule::None,
        }
        let mut singles = HashSet::new();
        let mut joined = HashSet::new();
        for token in vocab {
            match single_char(token) {
                Some(c) => {
                    singles.insert(c);
                }
                None => joined.extend(pairs(token)),
            }
        }
        let added = added_pairs(&map);
        CutRule::Pairs {
            map,
            singles,
            joined,
            added,
        }
    }

    /// Whether a cut between `a` and `b` (adjacent characters of the raw text) is safe.
    pub fn safe_between(&self, a: char, b: char) -> bool {
        match self {
            CutRule::None => false,
            CutRule::Pairs {
                map,
                singles,
                joined,
                added,
            } => {
                let (ma, mb) = (map_char(map, a), map_char(map, b));
                !added.contains(&(a, b))
                    && !added.contains(&(ma, mb))
                    && singles.contains(&ma)
                    && singles.contains(&mb)
                    && !joined.contains(&(ma, mb))
            }
            CutRule::Whitespace { added } => {
                ((matches!(b, ' ' | '\t' | '\n' | '\r') && !a.is_whitespace())
                    || (a.is_ascii_alphabetic() && b.is_ascii_punctuation()))
                    && !added.contains(&(a, b))
            }
        }
    }

    /// The last safe cut at or before byte `limit` of `text` (and after byte 0), if any.
    pub fn cut_before(&self, text: &str, limit: usize) -> Option<usize> {
        if matches!(self, CutRule::None) {
            return None;
        }
        let mut end = limit.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        // `b` is the character starting at the candidate cut, `a` the one before it.
        let mut b = text[end..].chars().next()?;
        for (i, a) in text[..end].char_indices().rev() {
            let cut = i + a.len_utf8();
            if cut > 0 && self.safe_between(a, b) {
                return Some(cut);
            }
            b = a;
        }
        None
    }

    /// A short name of the rule, for tests and logs.
    pub fn name(&self) -> &'static str {
        match self {
            CutRule::None => "none",
            CutRule::Pairs { .. } => "pairs",
            CutRule::Whitespace { .. } => "whitespace",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sp(vocab: &[&str]) -> CutRule {
        CutRule::decide(
            &Value::Null,
            &json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}),
            Some(true),
            vocab.iter().copied(),
            &[Added {
                content: "<s>",
                strips_or_whole_word: false,
            }],
        )
    }

    #[test]
    fn pairs_rule_cuts_only_where_no_entry_joins_the_pair() {
        let rule = sp(&["a", "b", "▁", "c", "<", "s", ">", "▁a", "ab", "▁▁"]);
        assert_eq!(rule.name(), "pairs");
        // "b▁" occurs in no entry: the cut before the space is safe.
        assert_eq!(rule.cut_before("ab ab", 3), Some(2));
        // "ab" and "▁a" are entries; "▁▁" too: no cut inside "a b" runs of these.
        assert!(!rule.safe_between('a', 'b'));
        assert!(!rule.safe_between(' ', 'a'));
        assert!(!rule.safe_between(' ', ' '));
        // A character that is no entry of its own (byte fallback) is never cut next to.
        assert!(!rule.safe_between('b', 'x'));
        // Pairs inside an added token are never cut.
        assert!(!rule.safe_between('<', 's'));
        assert!(rule.safe_between('b', 'c'));
        assert_eq!(rule.cut_before("bbbb", 3), Some(3));
        assert_eq!(rule.cut_before("abab", 3), Some(2));
    }

    #[test]
    fn pairs_rule_needs_a_plain_layout() {
        let added = [Added {
            content: "<s>",
            strips_or_whole_word: true,
        }];
        let meta = json!({"type": "Metaspace", "replacement": "▁"});
        let rule = CutRule::decide(&Value::Null, &meta, Some(true), ["a"].into_iter(), &added);
        assert_eq!(rule.name(), "none");
        let rule = CutRule::decide(&Value::Null, &meta, Some(false), ["a"].into_iter(), &[]);
        assert_eq!(rule.name(), "none");
        let nfkc = json!({"type": "NFKC"});
        let rule = CutRule::decide(&nfkc, &Value::Null, Some(true), ["a"].into_iter(), &[]);
        assert_eq!(rule.name(), "none");
        let legacy = json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        let rule = CutRule::decide(
            &legacy,
            &Value::Null,
            Some(true),
            ["a", "▁"].into_iter(),
            &[],
        );
        assert_eq!(rule.name(), "pairs");
        assert!(rule.safe_between('a', ' '));
        assert!(rule.safe_between('a', '▁'));
    }

    #[test]
    fn whitespace_rule_cuts_between_a_word_and_a_space() {
        let pre = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]});
        let rule = CutRule::decide(&Value::Null, &pre, None, std::iter::empty(), &[]);
        assert_eq!(rule.name(), "whitespace");
        assert_eq!(rule.cut_before("ab  cd ef", 5), Some(2));
        assert_eq!(rule.cut_before("ab  cd ef", 8), Some(6));
        assert_eq!(rule.cut_before("abcdef", 5), None);
        assert_eq!(rule.cut_before("ab.cd'ef", 7), Some(5));
        assert_eq!(rule.cut_before("ab.cd'ef", 4), Some(2));
        assert!(!rule.safe_between('.', 'a'));
        assert!(!rule.safe_between('\'', 's'));
        assert!(!rule.safe_between('1', '.'));
        assert_eq!(rule.cut_before("é é", 1), None);
        assert_eq!(rule.cut_before("é é", 3), Some(2));
        let no_regex = json!({"type": "ByteLevel", "use_regex": false});
        let rule = CutRule::decide(&Value::Null, &no_regex, None, std::iter::empty(), &[]);
        assert_eq!(rule.name(), "none");
    }
}
