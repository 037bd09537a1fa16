//! Prompt text for queries, exactly as FlagEmbedding's `ICLLLMEmbedder` builds it (export/REFERENCE.md
//! section 2): the task instruction wraps each query, the few-shot examples form a prefix ending in
//! the example separator, and a fixed suffix follows. The `instruct` procedure uses the first part
//! only (the instruction template). Pure string functions, byte-for-byte.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::package::PromptTemplate;

/// One few-shot example: a query and the response the model should imitate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// Instruction for this example; the task's instruction when absent.
    #[serde(default)]
    pub instruct: Option<String>,
    pub query: String,
    pub response: String,
}

impl Example {
    /// An example without its own instruction (it takes the task's).
    pub fn new(query: impl Into<String>, response: impl Into<String>) -> Example {
        Example {
            instruct: None,
            query: query.into(),
            response: response.into(),
        }
    }
}

/// Replaces `{name}` placeholders in one pass: text substituted in is never expanded again.
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            values
                .iter()
                .find(|(name, _)| *name == &after[..close])
                .map(|(_, v)| (close, *v))
        });
        match value {
            Some((close, v)) => {
                out.push_str(v);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

impl PromptTemplate {
    /// The query text before truncation: the instruction template when a task is set, else the
    /// query itself.
    pub fn query_text(&self, task: Option<&str>, query: &str) -> String {
        match task {
            Some(task) => fill(&self.query, &[("task", task), ("query", query)]),
            None => query.to_string(),
        }
    }

    /// The few-shot prefix: each example rendered, joined by the separator, with one more separator
    /// at the end; empty without examples. An example without its own instruction takes the task's;
    /// with neither, FlagEmbedding would render the literal text "None", so that is refused.
    pub fn prefix(&self, task: Option<&str>, examples: &[Example]) -> Result<String> {
        if examples.is_empty() {
            return Ok(String::new());
        }
        let mut parts = Vec::with_capacity(examples.len());
        for (i, e) in examples.iter().enumerate() {
            let instruct = e.instruct.as_deref().or(task).ok_or_else(|| {
                Error::input(
                    format!("example {}", i + 1),
                    "has no \"instruct\" and no task was given (set --task)",
                )
            })?;
            parts.push(fill(
                &self.example,
                &[
                    ("instruct", instruct),
                    ("query", &e.query),
                    ("response", &e.response),
                ],
            ));
        }
        let mut prefix = parts.join(&self.example_separator);
        prefix.push_str(&self.example_separator);
        Ok(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> PromptTemplate {
        PromptTemplate {
            procedure: crate::package::Procedure::FlagEmbeddingIcl,
            query: "<instruct>{task}\n<query>{query}".into(),
            default_task: None,
            example: "<instruct>{instruct}\n<query>{query}\n<response>{response}".into(),
            example_separator: "\n\n".into(),
            suffix: "\n<response>".into(),
        }
    }

    fn example(instruct: Option<&str>, q: &str, r: &str) -> Example {
        Example {
            instruct: instruct.map(str::to_string),
            query: q.into(),
            response: r.into(),
        }
    }

    #[test]
    fn query_with_and_without_task() {
        let t = template();
        assert_eq!(
            t.query_text(Some("Find it"), "what?"),
            "<instruct>Find it\n<query>what?"
        );
        assert_eq!(t.query_text(None, "what?"), "what?");
    }

    #[test]
    fn prefix_matches_flagembedding_layout() {
        let t = template();
        let ex = [
            example(None, "q1", "r1"),
            example(Some("Other"), "q2", "r2"),
        ];
        assert_eq!(
            t.prefix(Some("Task"), &ex).unwrap(),
            "<instruct>Task\n<query>q1\n<response>r1\n\n<instruct>Other\n<query>q2\n<response>r2\n\n"
        );
        assert_eq!(t.prefix(Some("Task"), &[]).unwrap(), "");
    }

    #[test]
    fn empty_instruct_is_kept_as_given() {
        // FlagEmbedding uses dict.get('instruct', task): a present empty string stays empty.
        let t = template();
        assert_eq!(
            t.prefix(Some("Task"), &[example(Some(""), "q", "r")])
                .unwrap(),
            "<instruct>\n<query>q\n<response>r\n\n"
        );
    }

    #[test]
    fn example_without_any_instruction_is_refused() {
        let err = template()
            .prefix(None, &[example(None, "q", "r")])
            .unwrap_err();
        assert!(err.to_string().contains("example 1"), "{err}");
    }

    #[test]
    fn placeholders_in_user_text_are_not_expanded() {
        let t = template();
        assert_eq!(
            t.query_text(Some("{query}"), "{task}"),
            "<instruct>{query}\n<query>{task}"
        );
        assert_eq!(fill("{a}{b}{", &[("a", "{b}")]), "{b}{b}{");
    }
}
