//! Token ids exactly as the reference produces them (export/REFERENCE.md section 2). Documents: the text with
//! the tokenizer's special tokens, truncated. Queries, by the package's prompt procedure:
//! `flagembedding-icl` (bge-en-icl) truncates the instruction-wrapped text, decodes it back to a
//! string (special tokens kept, transformers' clean-up applied when the tokenizer asks for it),
//! then tokenizes prefix + decoded + suffix again with special tokens. That decode/re-encode round
//! trip is not an identity for every tokenizer; it is replicated, not fixed, because the model was
//! trained on it. `instruct` (Qwen3-Embedding, e5-mistral) tokenizes the instruction-wrapped text
//! once, as documents are.

use std::path::Path;

use crate::error::{Error, Result};
use crate::package::{Procedure, PromptTemplate, SpecialTokens};
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

/// Everything about a query prompt that does not depend on the query: the task in effect (the
/// caller's, else the package's default), and for `flagembedding-icl` the few-shot prefix and the
/// suffix with the two length limits the reference derives from them.
#[derive(Debug, Clone)]
pub struct QueryPrompt {
    task: Option<String>,
    template: PromptTemplate,
    /// Few-shot prefix text ("" without examples, and always for `instruct`).
    pub prefix: String,
    /// Ids of the prefix alone, without special tokens.
    pub prefix_ids: Vec<u32>,
    /// Limit on the query text's own ids (before the decode step of `flagembedding-icl`).
    pub text_max: usize,
    /// Limit on the whole prompt's ids, special tokens included.
    pub total_max: usize,
    /// The leading ids every query of this prompt shares (see [`QueryPrompt::shared_prefix`]).
    shared: Option<Vec<u32>>,
}

impl QueryPrompt {
    /// Prepares the prompt for `task` (the template's `default_task` when `None`) and `examples`
    /// with the reference's `max_length`, by the template's procedure. The `instruct` procedure
    /// refuses examples.
    pub fn new(
        tokenizer: &TextTokenizer,
        template: &PromptTemplate,
        task: Option<&str>,
        examples: &[Example],
        max_length: usize,
    ) -> Result<QueryPrompt> {
        let task = task.or(template.default_task.as_deref());
        let mut prompt = match template.procedure {
            Procedure::FlagEmbeddingIcl => {
                QueryPrompt::few_shot(tokenizer, template, task, examples, max_length)?
            }
            Procedure::Instruct => {
                QueryPrompt::instruct(tokenizer, template, task, examples, max_length)?
            }
        };
        prompt.shared = prompt.find_shared_prefix(tokenizer)?;
        Ok(prompt)
    }

    /// FlagEmbedding's few-shot prompt: the prefix of the examples, and its two limits.
    fn few_shot(
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
        Ok(QueryPrompt {
            task: task.map(str::to_string),
            template: template.clone(),
            prefix,
            prefix_ids,
            text_max: max_length - len_1 - len_2,
            total_max,
            shared: None,
        })
    }

    /// The instruction prompt: the filled template with the special tokens, at most `max_length`
    /// ids in all (transformers' `truncation=True, max_length=N`).
    fn instruct(
        tokenizer: &TextTokenizer,
        template: &PromptTemplate,
        task: Option<&str>,
        examples: &[Example],
        max_length: usize,
    ) -> Result<QueryPrompt> {
        if !examples.is_empty() {
            return Err(Error::input(
                "examples",
                "this package's prompt procedure `instruct` takes no few-shot examples; leave them out",
            ));
        }
        check_max_length(max_length, tokenizer.special_count() + 1)?;
        Ok(QueryPrompt {
            task: task.map(str::to_string),
            template: template.clone(),
            prefix: String::new(),
            prefix_ids: Vec::new(),
            text_max: max_length - tokenizer.special_count(),
            total_max: max_length,
            shared: None,
        })
    }

    /// The task in effect: the one the prompt was made with, else the package's default task.
    pub fn task(&self) -> Option<&str> {
        self.task.as_deref()
    }

    /// The query texts before truncation: each query in the instruction template when a task is
    /// in effect, else the query itself.
    pub fn query_texts(&self, queries: &[&str]) -> Vec<String> {
        queries
            .iter()
            .map(|q| self.template.query_text(self.task(), q))
            .collect()
    }

    /// The leading ids that every query of this prompt starts with and that a prefix cache may
    /// compute once, or `None` when nothing but special tokens is shared: `flagembedding-icl`
    /// without few-shot examples, `instruct` without a task. Decided once, when the prompt is
    /// made.
    pub fn shared_prefix(&self) -> Option<&[u32]> {
        self.shared.as_deref()
    }

    /// Each candidate ([`QueryPrompt::candidate_prefixes`]) is cut to what a probe query's ids
    /// share with it (a tokenizer may merge the prefix's last tokens with the query's first:
    /// smollm2's byte-level BPE splits a closing "\n\n" differently when text follows it, Qwen's
    /// pre-tokenizer keeps "Query:" apart from "Query" only when a letter follows), and the
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

    /// Query-independent leading ids worth computing once (the prefix cache), longest first. For
    /// `flagembedding-icl`: the wrapped prefix plus the instruction part of the query text, then
    /// the wrapped prefix alone; none without few-shot examples. For `instruct`: the special
    /// tokens and the template filled with the task and an empty query; none without a task. A
    /// caller must still check that a query's ids start with the one it uses: a tokenizer may
    /// merge tokens across the boundary.
    fn candidate_prefixes(&self, tokenizer: &TextTokenizer) -> Result<Vec<Vec<u32>>> {
        let head = self.template.query_text(self.task(), "");
        let texts = match self.template.procedure {
            Procedure::Instruct if self.task.is_some() => vec![head],
            Procedure::FlagEmbeddingIcl if !self.prefix_ids.is_empty() => {
                vec![format!("{}{head}", self.prefix), self.prefix.clone()]
            }
            _ => Vec::new(),
        };
        let mut out = Vec::new();
        for text in texts {
            let mut ids = tokenizer.prepend.clone();
            ids.extend(tokenizer.encode_plain(&text)?);
            if !out.contains(&ids) {
                out.push(ids);
            }
        }
        Ok(out)
    }

    /// Final ids of each query. `instruct`: the query text truncated, wrapped in the special
    /// tokens. `flagembedding-icl`: the query text truncated, decoded, put between the prefix and
    /// the suffix and tokenized again.
    pub fn ids(&self, tokenizer: &TextTokenizer, queries: &[&str]) -> Result<Vec<Vec<u32>>> {
        let texts = self.query_texts(queries);
        let plain = tokenizer.encode_plain_head(
            &texts.iter().map(String::as_str).collect::<Vec<_>>(),
            self.text_max,
        )?;
        let full = match self.template.procedure {
            Procedure::Instruct => plain,
            Procedure::FlagEmbeddingIcl => self.decode_and_encode(tokenizer, &plain)?,
        };
        Ok(full
            .iter()
            .map(|ids| tokenizer.wrap(ids, self.total_max))
            .collect())
    }

    /// FlagEmbedding's round trip: each truncated query decoded, between prefix and suffix, and
    /// tokenized again (without special tokens).
    fn decode_and_encode(
        &self,
        tokenizer: &TextTokenizer,
        plain: &[Vec<u32>],
    ) -> Result<Vec<Vec<u32>>> {
        let mut prompts = Vec::with_capacity(plain.len());
        for ids in plain {
            let decoded = tokenizer.decode(ids)?;
            prompts.push(format!(
                "{}{}{}",
                self.prefix, decoded, self.template.suffix
            ));
        }
        tokenizer.encode_plain_batch(&prompts.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::Procedure;

    /// A word-level tokenizer (whitespace and punctuation split, unknown words id 0) with `<s>` 1
    /// and `</s>` 2 around every text, in a file of its own.
    fn word_tokenizer(name: &str) -> TextTokenizer {
        let words = [
            "[UNK]", "<s>", "</s>", "Instruct", ":", "Query", "find", "it", "what", "is", "a", "b",
            "c", "d", "e", "f", "default", "task",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i.into()))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
        });
        let dir = std::env::temp_dir().join(format!("icl-tok-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let specials = SpecialTokens {
            prepend: vec![1],
            append: vec![2],
            pad_id: 0,
            added: Default::default(),
        };
        let tokenizer = TextTokenizer::from_file(&path, &specials, false).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        tokenizer
    }

    fn instruct_template(default_task: Option<&str>) -> PromptTemplate {
        PromptTemplate {
            procedure: Procedure::Instruct,
            query: "Instruct: {task}\nQuery: {query}".into(),
            default_task: default_task.map(str::to_string),
            example: String::new(),
            example_separator: String::new(),
            suffix: String::new(),
        }
    }

    #[test]
    fn instruct_ids_are_one_encoding_with_special_tokens() {
        let tok = word_tokenizer("one");
        let prompt =
            QueryPrompt::new(&tok, &instruct_template(None), Some("find it"), &[], 64).unwrap();
        let ids = prompt.ids(&tok, &["what is a", "b"]).unwrap();
        for (row, q) in ids.iter().zip(["what is a", "b"]) {
            let mut want = vec![1];
            want.extend(
                tok.encode_plain(&format!("Instruct: find it\nQuery: {q}"))
                    .unwrap(),
            );
            want.push(2);
            assert_eq!(row, &want);
        }
        // The instruction is shared by every query, and computed once by a prefix cache.
        let shared = prompt.shared_prefix().expect("an instruction prefix");
        assert_eq!(shared, &[1, 3, 4, 6, 7, 5, 4]);
        assert!(ids.iter().all(|r| r.starts_with(shared)));
    }

    #[test]
    fn instruct_truncation_keeps_the_end_token() {
        let tok = word_tokenizer("cut");
        let prompt =
            QueryPrompt::new(&tok, &instruct_template(None), Some("find it"), &[], 10).unwrap();
        let ids = prompt.ids(&tok, &["a b c d e f"]).unwrap().remove(0);
        assert_eq!(ids, [1, 3, 4, 6, 7, 5, 4, 10, 11, 2]);
        assert_eq!((prompt.text_max, prompt.total_max), (8, 10));
        let err = QueryPrompt::new(&tok, &instruct_template(None), None, &[], 2).unwrap_err();
        assert!(err.to_string().contains("--max-length"), "{err}");
    }

    #[test]
    fn instruct_refuses_examples_and_applies_the_default_task() {
        let tok = word_tokenizer("default");
        let template = instruct_template(Some("default task"));
        let err =
            QueryPrompt::new(&tok, &template, None, &[Example::new("q", "r")], 64).unwrap_err();
        assert!(err.is_input(), "{err}");
        assert!(
            err.to_string()
                .contains("`instruct` takes no few-shot examples"),
            "{err}"
        );
        let by_default = QueryPrompt::new(&tok, &template, None, &[], 64).unwrap();
        let given = QueryPrompt::new(&tok, &template, Some("default task"), &[], 64).unwrap();
        assert_eq!(by_default.task(), Some("default task"));
        assert_eq!(
            by_default.ids(&tok, &["what"]).unwrap(),
            given.ids(&tok, &["what"]).unwrap()
        );
        // Without any task a query is its raw text, and nothing but `<s>` is shared.
        let raw = QueryPrompt::new(&tok, &instruct_template(None), None, &[], 64).unwrap();
        assert_eq!(raw.ids(&tok, &["what is"]).unwrap(), [vec![1, 8, 9, 2]]);
        assert_eq!(raw.shared_prefix(), None);
    }

    #[test]
    fn few_shot_prompt_takes_the_default_task_and_shares_nothing_without_examples() {
        let tok = word_tokenizer("fewshot");
        let template = PromptTemplate {
            procedure: Procedure::FlagEmbeddingIcl,
            query: "Instruct: {task}\nQuery: {query}".into(),
            default_task: Some("default task".into()),
            example: "{instruct} {query} {response}".into(),
            example_separator: "\n".into(),
            suffix: "\n".into(),
        };
        let prompt = QueryPrompt::new(&tok, &template, None, &[], 64).unwrap();
        assert_eq!(prompt.task(), Some("default task"));
        assert_eq!(prompt.shared_prefix(), None);
    }

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
