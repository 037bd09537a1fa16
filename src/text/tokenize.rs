//! Token ids exactly as the reference produces them (export/REFERENCE.md section 2). Documents: the text with
//! the tokenizer's special tokens, truncated. Queries: the instruction-wrapped text is truncated,
//! decoded back to a string (special tokens kept, transformers' clean-up applied when the tokenizer
//! asks for it), then prefix + decoded + suffix is tokenized again with special tokens. That
//! decode/re-encode round trip is not an identity for every tokenizer; it is replicated, not fixed,
//! because the model was trained on it.

use std::path::Path;

use crate::error::{Error, Result};
use crate::package::{PromptTemplate, SpecialTokens};
use crate::text::cut::{Added, CutRule};
use crate::text::prompt::Example;

/// The package's tokenizer plus the special-token and clean-up conventions transformers applies.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    prepend: Vec<u32>,
    append: Vec<u32>,
    clean_up: bool,
    cut: CutRule,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; truncation and padding stored in the file are ignored (this module
    /// applies the reference's own).
    pub fn from_file(
        path: &Path,
        specials: &SpecialTokens,
        clean_up: bool,
    ) -> Result<TextTokenizer> {
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(Error::tokenizer(format!("cannot load {}", path.display())))?;
        inner
            .with_truncation(None)
            .map_err(Error::tokenizer("cannot disable truncation"))?;
        inner.with_padding(None);
        let cut = cut_rule(&inner)?;
        Ok(TextTokenizer {
            inner,
            prepend: specials.prepend.clone(),
            append: specials.append.clone(),
            clean_up,
            cut,
        })
    }

    /// Which rule cuts long texts before tokenizing ("pairs", "whitespace", or "none" when texts
    /// are always tokenized whole); see [`TextTokenizer::encode_plain_head`].
    #[doc(hidden)]
    pub fn cut_rule(&self) -> &'static str {
        self.cut.name()
    }

    /// The last byte at or before `limit` where `text` may be cut without changing the ids before
    /// the cut (the ids of `text[..cut]` are a prefix of those of `text`), if any.
    #[doc(hidden)]
    pub fn safe_cut(&self, text: &str, limit: usize) -> Option<usize> {
        self.cut.cut_before(text, limit)
    }

    /// The first `keep` ids of each text without special tokens (all of them when it has fewer):
    /// exactly the leading ids of [`TextTokenizer::encode_plain_batch`], at a cost that follows
    /// `keep` rather than the text's length. A long text is cut before tokenizing at a point that
    /// provably leaves every token before it unchanged (the tokenizer's cut rule, see
    /// `text/cut.rs`), first a few bytes per kept token past the start, twice as far each time
    /// the piece yields too few ids, up to the whole text; a tokenizer without a provable rule
    /// tokenizes every text whole.
    pub fn encode_plain_head(&self, texts: &[&str], keep: usize) -> Result<Vec<Vec<u32>>> {
        let start = keep
            .saturating_mul(HEAD_BYTES_PER_TOKEN)
            .max(HEAD_MIN_BYTES);
        let mut limits = vec![start; texts.len()];
        let mut out: Vec<Option<Vec<u32>>> = vec![None; texts.len()];
        loop {
            // Each unfinished text's next piece: (index, piece, whether it is the whole text).
            let mut pieces: Vec<(usize, &str, bool)> = Vec::new();
            for (i, text) in texts.iter().enumerate() {
                if out[i].is_some() {
                    continue;
                }
                loop {
                    if limits[i] >= text.len() {
                        pieces.push((i, text, true));
                        break;
                    }
                    match self.cut.cut_before(text, limits[i]) {
                        Some(cut) => {
                            pieces.push((i, &text[..cut], false));
                            break;
                        }
                        // No safe cut yet: look further.
                        None => limits[i] = limits[i].saturating_mul(2),
                    }
                }
            }
            if pieces.is_empty() {
                break;
            }
            let refs: Vec<&str> = pieces.iter().map(|p| p.1).collect();
            for ((i, _, whole), mut ids) in pieces.into_iter().zip(self.encode_plain_batch(&refs)?)
            {
                if whole || ids.len() > keep {
                    ids.truncate(keep);
                    out[i] = Some(ids);
                } else {
                    limits[i] = limits[i].saturating_mul(2);
                }
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Ids of `text` without special tokens added around it (special tokens written literally in the
    /// text are still recognised, as in transformers).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(Error::tokenizer("cannot encode text"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids of many texts without special tokens, in parallel.
    pub fn encode_plain_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(Error::tokenizer("cannot encode text"))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Text of `ids`, special tokens kept, clean-up applied as transformers' `decode` does.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .inner
            .decode(ids, false)
            .map_err(Error::tokenizer("cannot decode ids"))?;
        Ok(if self.clean_up {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// How many ids [`TextTokenizer::wrap`] adds.
    pub fn special_count(&self) -> usize {
        self.prepend.len() + self.append.len()
    }

    /// `content` truncated so that it fits `max_length` together with the special tokens, then
    /// wrapped in them: what transformers' `truncation=True, max_length=...` produces.
    pub fn wrap(&self, content: &[u32], max_length: usize) -> Vec<u32> {
        let keep = content
            .len()
            .min(max_length.saturating_sub(self.special_count()));
        let mut ids = Vec::with_capacity(keep + self.special_count());
        ids.extend_from_slice(&self.prepend);
        ids.extend_from_slice(&content[..keep]);
        ids.extend_from_slice(&self.append);
        ids
    }

    /// Final ids of documents (raw text with special tokens, truncated to `max_length`).
    pub fn documents(&self, texts: &[&str], max_length: usize) -> Result<Vec<Vec<u32>>> {
        check_max_length(max_length, self.special_count() + 1)?;
        let plain = self.encode_plain_head(texts, max_length - self.special_count())?;
        Ok(plain.iter().map(|ids| self.wrap(ids, max_length)).collect())
    }
}

/// Bytes of text first tokenized per id kept ([`TextTokenizer::encode_plain_head`]): English runs
/// about 4 to 5 bytes a token; text that needs more is tokenized again twice as long.
const HEAD_BYTES_PER_TOKEN: usize = 8;
/// The least text first tokenized.
const HEAD_MIN_BYTES: usize = 4096;

/// The tokenizer's cut rule (text/cut.rs), from its configuration.
fn cut_rule(inner: &tokenizers::Tokenizer) -> Result<CutRule> {
    let json = |v: Result<serde_json::Value, serde_json::Error>| {
        v.map_err(|e| Error::tokenizer("cannot inspect the tokenizer")(e.into()))
    };
    let normalizer = json(serde_json::to_value(inner.get_normalizer()))?;
    let pre_tokenizer = json(serde_json::to_value(inner.get_pre_tokenizer()))?;
    let (plain_bpe, vocab) = match inner.get_model() {
        tokenizers::models::ModelWrapper::BPE(bpe) => (
            Some(
                bpe.dropout.is_none()
                    && bpe.continuing_subword_prefix.is_none()
                    && bpe.end_of_word_suffix.is_none()
                    && !bpe.ignore_merges,
            ),
            bpe.get_vocab(),
        ),
        _ => (None, Default::default()),
    };
    let added_tokens = inner.get_added_tokens_decoder();
    let added: Vec<Added> = added_tokens
        .values()
        .map(|t| Added {
            content: &t.content,
            strips_or_whole_word: t.single_word || t.lstrip || t.rstrip,
        })
        .collect();
    Ok(CutRule::decide(
        &normalizer,
        &pre_tokenizer,
        plain_bpe,
        vocab.keys().map(String::as_str),
        &added,
    ))
}

/// transformers' `clean_up_tokenization`: the same replacements, in the same order.
pub fn clean_up_tokenization(text: &str) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    RULES
        .iter()
        .fold(text.to_string(), |s, (from, to)| s.replace(from, to))
}

fn check_max_length(max_length: usize, at_least: usize) -> Result<()> {
    if max_length < at_least {
        return Err(Error::input(
            "--max-length",
            format!("{max_length} is too small (at least {at_least} tokens here)"),
        ));
    }
    Ok(())
}

/// Everything about a query prompt that does not depend on the query: the few-shot prefix and
/// the suffix, with the two length limits the reference derives from them.
#[derive(Debug, Clone)]
pub struct QueryPrompt {
    task: Option<String>,
    template: PromptTemplate,
    /// Few-shot prefix text ("" without examples).
    pub prefix: String,
    /// Ids of the prefix alone, without special tokens.
    pub prefix_ids: Vec<u32>,
    /// Limit on the query text's own ids (before the decode step).
    pub text_max: usize,
    /// Limit on the whole prompt's ids, special tokens included.
    pub total_max: usize,
    /// The leading ids every query of this prompt shares (see [`QueryPrompt::shared_prefix`]).
    shared: Option<Vec<u32>>,
}

impl QueryPrompt {
    /// Prepares the prompt for `task` and `examples` with the reference's `max_length`.
    pub fn new(
        tokenizer: &TextTokenizer,
        template: &PromptTemplate,
        task: Option<&str>,
        examples: &[Example],
        max_length: usize,
    ) -> Result<QueryPrompt> {
        let prefix = template.prefix(task, examples)?;
        let prefix_ids = tokenizer.encode_plain(&prefix)?;
        let suffix_len = tokenizer.encode_plain(&template.suffix)?.len();
        // FlagEmbedding measures these two literal strings, whatever the tokenizer's own specials are.
        let len_1 = tokenizer.encode_plain("<s>")?.len();
        let len_2 = tokenizer
            .encode_plain(&format!("{}</s>", template.suffix))?
            .len();
        check_max_length(max_length, len_1 + len_2 + 1)?;
        let total_max = (prefix_ids.len() + suffix_len + max_length + 8) / 8 * 8 + 8;
        let mut prompt = QueryPrompt {
            task: task.map(str::to_string),
            template: template.clone(),
            prefix,
            prefix_ids,
            text_max: max_length - len_1 - len_2,
            total_max,
            shared: None,
        };
        prompt.shared = prompt.find_shared_prefix(tokenizer)?;
        Ok(prompt)
    }

    /// The leading ids that every query of this prompt starts with and that a prefix cache may
    /// compute once, or `None` without few-shot examples (or when they would cover only the special
    /// tokens). Decided once, when the prompt is made.
    pub fn shared_prefix(&self) -> Option<&[u32]> {
        self.shared.as_deref()
    }

    /// Each candidate ([`QueryPrompt::candidate_prefixes`]) is cut to what a probe query's ids
    /// share with it (a tokenizer may merge the prefix's last tokens with the query's first:
    /// smollm2's byte-level BPE splits a closing "\n\n" differently when text follows it), and the
    /// longest cut wins. The probe, not the input, decides, so the choice is the same for every
    /// chunk of a run, for a resumed one and for every request of a server.
    fn find_shared_prefix(&self, tokenizer: &TextTokenizer) -> Result<Option<Vec<u32>>> {
        let candidates = self.candidate_prefixes(tokenizer)?;
        if candidates.is_empty() {
            return Ok(None);
        }
        let probe = self.ids(tokenizer, &["probe"])?.remove(0);
        let shared = |c: &Vec<u32>| {
            c.iter()
                .zip(&probe)
                .take_while(|(a, b)| a == b)
                .count()
                .min(probe.len() - 1)
        };
        let best = candidates.iter().map(shared).max().unwrap_or(0);
        Ok((best > tokenizer.prepend.len()).then(|| probe[..best].to_vec()))
    }

    /// Query-independent leading ids worth computing once (the prefix cache), longest first: the
    /// wrapped prefix plus the instruction part of the query text, then the wrapped prefix alone.
    /// Empty without few-shot examples. A caller must still check that a query's ids start with the
    /// one it uses: a tokenizer may merge tokens across the boundary.
    fn candidate_prefixes(&self, tokenizer: &TextTokenizer) -> Result<Vec<Vec<u32>>> {
        if self.prefix_ids.is_empty() {
            return Ok(Vec::new());
        }
        let head = self.template.query_text(self.task.as_deref(), "");
        let mut out = Vec::new();
        for text in [format!("{}{head}", self.prefix), self.prefix.clone()] {
            let mut ids = tokenizer.prepend.clone();
            ids.extend(tokenizer.encode_plain(&text)?);
            if !out.contains(&ids) {
                out.push(ids);
            }
        }
        Ok(out)
    }

    /// Final ids of each query.
    pub fn ids(&self, tokenizer: &TextTokenizer, queries: &[&str]) -> Result<Vec<Vec<u32>>> {
        let texts: Vec<String> = queries
            .iter()
            .map(|q| self.template.query_text(self.task.as_deref(), q))
            .collect();
        let plain = tokenizer.encode_plain_head(
            &texts.iter().map(String::as_str).collect::<Vec<_>>(),
            self.text_max,
        )?;
        let mut prompts = Vec::with_capacity(plain.len());
        for ids in &plain {
            let decoded = tokenizer.decode(ids)?;
            prompts.push(format!(
                "{}{}{}",
                self.prefix, decoded, self.template.suffix
            ));
        }
        let full = tokenizer
            .encode_plain_batch(&prompts.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(full
            .iter()
            .map(|ids| tokenizer.wrap(ids, self.total_max))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_up_follows_transformers_order() {
        assert_eq!(
            clean_up_tokenization("a . b ? c ! d , e ' f"),
            "a. b? c! d, e'f"
        );
        assert_eq!(
            clean_up_tokenization("do n't I 'm it 's we 've they 're"),
            "don't I'm it's we've they're"
        );
    }
}
