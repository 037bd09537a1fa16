//! `icl-embed tokenize`: the final token ids of each input as JSON lines.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use icl_embed::Encoder;

use super::text::TextArgs;

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    text: TextArgs,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let args = args.text;
    let encoder = Encoder::open(&args.model)?;
    let examples = args.examples()?;
    let texts = args.read_texts()?;
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = if args.queries {
        let prompt = encoder.query_prompt(args.task.as_deref(), &examples, args.max_length)?;
        encoder.queries(&prompt, &texts)?
    } else {
        encoder.documents(&texts, args.max_length)?
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (index, ids) in ids.iter().enumerate() {
        serde_json::to_writer(&mut out, &serde_json::json!({"index": index, "ids": ids}))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
