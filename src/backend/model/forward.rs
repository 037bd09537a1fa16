//! The forward pass of a [`Model`]: a prefix's states ([`Model::prefix`]), a padded batch to
//! pooled, normalised rows ([`Model::forward`]), and the rows' checks against the attention window.

use std::borrow::Cow;

use ndarray::Array2;
use ort::session::SessionInputValue;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::{Model, PastLayout, Prefix};
use crate::backend::pooling;
use crate::engine::batch::{self, Batch};
use crate::error::{Error, Result};

impl Model {
    /// Computes the key/value states of `ids` as a prefix for later batches.
    pub fn prefix(&mut self, ids: &[u32]) -> Result<Prefix> {
        let layout = self.past.as_ref().ok_or_else(|| {
            Error::input(
                "prefix cache",
                format!(
                    "the {} variant's graph takes no prefix states",
                    self.variant
                ),
            )
        })?;
        self.check_tokens(ids.len(), "the few-shot prefix")?;
        let single = batch::pad(&[ids.to_vec()], &[0], 0);
        let (single, states) = match &self.start {
            Some(start) if single.begins_with(&start.ids) => {
                (single.without_first(start.ids.len()), &start.states[..])
            }
            _ => (single, &layout.empty[..]),
        };
        let feed = feed_inputs(&self.inputs, &single, &layout.names, states)?;
        let mut outputs = self
            .session
            .run_with_options(feed, &self.all_outputs)
            .map_err(Error::runtime(format!(
                "inference failed on the {}-token prefix",
                ids.len()
            )))?;
        let mut states = Vec::with_capacity(layout.names.len());
        let mut bytes = 0;
        for (_, present) in &layout.names {
            let value = outputs
                .remove(present.as_str())
                .ok_or_else(|| Error::graph(&self.variant, format!("no output {present:?}")))?;
            bytes += value_bytes(&value);
            states.push(match self.shrink_arena {
                true => outside_arena(value)?,
                false => value,
            });
        }
        Ok(Prefix {
            ids: ids.to_vec(),
            states,
            bytes,
        })
    }

    /// Pooled (last token), normalised (when the package says so) rows of one padded batch, one
    /// row of the result per row of the batch. With `prefix`, every row continues it: the batch
    /// holds the rows' ids after the prefix, positions continuing from its length
    /// ([`Batch::without_first`], [`Batch::offset_positions`]).
    pub fn forward(&mut self, batch: &Batch, prefix: Option<&Prefix>) -> Result<Array2<f32>> {
        let shifted;
        let (batch, prefix) = match (prefix, &self.start) {
            (None, Some(start)) if batch.begins_with(&start.ids) => {
                shifted = batch.without_first(start.ids.len());
                (&shifted, Some(start))
            }
            _ => (batch, prefix),
        };
        self.check_rows(batch, prefix)?;
        let (names, states) = past_inputs(self.past.as_ref(), prefix, &self.variant)?;
        let (rows, seq) = (batch.rows.len(), batch.seq);
        let feed = feed_inputs(&self.inputs, batch, names, states)?;
        let outputs = self
            .session
            .run_with_options(feed, &self.pooled_only)
            .map_err(Error::runtime(format!(
                "inference failed on a batch of {rows} x {seq}"
            )))?;
        let value = &outputs[self.output.as_str()];
        let mut pooled = pool(value, batch, self.hidden, &self.variant)?;
        if pooled.iter().any(|x| !x.is_finite()) {
            return Err(Error::graph(
                &self.variant,
                "non-finite values in the embeddings",
            ));
        }
        if self.normalize {
            pooling::normalize_rows(&mut pooled);
        }
        Ok(pooled)
    }

    /// Refuses a batch with a row that has no tokens to pool, or one longer (with the prefix's
    /// `before` tokens) than the attention window.
    fn check_rows(&self, batch: &Batch, prefix: Option<&Prefix>) -> Result<()> {
        let before = prefix.map_or(0, |p| p.ids.len());
        for (i, &len) in batch.lengths.iter().enumerate() {
            if len == 0 {
                return Err(Error::input(
                    format!("row {i} of the batch"),
                    "has no tokens to pool (an empty text in a package whose tokenizer adds no special tokens)",
                ));
            }
            self.check_tokens(before + len, &format!("row {i} of the batch"))?;
        }
        Ok(())
    }

    /// An input error naming `what` when a row of `tokens` tokens (prefix included) is longer
    /// than the model's attention window ([`Model::max_tokens`]).
    pub fn check_tokens(&self, tokens: usize, what: &str) -> Result<()> {
        match self.sliding_window {
            Some(w) if tokens > w => Err(Error::input(
                what,
                format!(
                    "is {tokens} tokens, longer than the model's {w}-token attention window \
                     (architecture.sliding_window in {}): the exported graphs attend to every \
                     earlier token, so it would not be embedded as the reference embeds it; \
                     shorten it or lower --max-length",
                    self.dir.join(crate::package::MANIFEST_FILE).display()
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// `past.*` input names (with their `present.*` outputs) and the states fed to them.
type PastInputs<'a> = (&'a [(String, String)], &'a [DynValue]);

/// The `past.*` input names and the states fed to them: the prefix's, the empty states when there
/// is none, nothing for a graph without prefix states.
fn past_inputs<'a>(
    past: Option<&'a PastLayout>,
    prefix: Option<&'a Prefix>,
    variant: &str,
) -> Result<PastInputs<'a>> {
    match (past, prefix) {
        (Some(layout), Some(p)) => Ok((&layout.names, &p.states)),
        (Some(layout), None) => Ok((&layout.names, &layout.empty)),
        (None, Some(_)) => Err(Error::input(
            "prefix cache",
            format!("the {variant} variant's graph takes no prefix states"),
        )),
        (None, None) => Ok((&[], &[])),
    }
}

/// The last real token's hidden state of each row of the graph's output `value`, checked against
/// the contract (`[rows, seq, hidden]`, fp32 or fp16).
fn pool(value: &DynValue, batch: &Batch, hidden: usize, variant: &str) -> Result<Array2<f32>> {
    let expect = [batch.rows.len() as i64, batch.seq as i64, hidden as i64];
    let check = |got: &[i64]| match got == expect {
        true => Ok(()),
        false => Err(Error::graph(
            variant,
            format!("output shape {got:?}, expected {expect:?}"),
        )),
    };
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float32) => {
            let (s, data) = value
                .try_extract_tensor::<f32>()
                .map_err(Error::runtime("cannot read the output"))?;
            check(&s[..])?;
            Ok(pooling::last_token(data, batch.seq, hidden, &batch.lengths))
        }
        Some(TensorElementType::Float16) => {
            let (s, data) = value
                .try_extract_tensor::<half::f16>()
                .map_err(Error::runtime("cannot read the output"))?;
            check(&s[..])?;
            Ok(pooling::last_token(data, batch.seq, hidden, &batch.lengths))
        }
        other => Err(Error::graph(
            variant,
            format!("unsupported output element type {other:?}"),
        )),
    }
}

/// The session feed: the int64 inputs of `batch`, then each prefix-state input with its value.
fn feed_inputs<'v>(
    inputs: &[String],
    batch: &Batch,
    past: &[(String, String)],
    states: &'v [DynValue],
) -> Result<Vec<(Cow<'static, str>, SessionInputValue<'v>)>> {
    let shape = [batch.rows.len(), batch.seq];
    let mut feed: Vec<(Cow<'static, str>, SessionInputValue<'v>)> =
        Vec::with_capacity(inputs.len() + past.len());
    for name in inputs {
        let data = match name.as_str() {
            "input_ids" => &batch.input_ids,
            "attention_mask" => &batch.attention_mask,
            _ => &batch.position_ids,
        };
        let tensor = Tensor::from_array((shape, data.clone()))
            .map_err(Error::runtime(format!("cannot build input {name}")))?;
        feed.push((Cow::Owned(name.clone()), tensor.into()));
    }
    for ((name, _), value) in past.iter().zip(states) {
        feed.push((Cow::Owned(name.clone()), SessionInputValue::from(value)));
    }
    Ok(feed)
}

/// A copy of a prefix's state in memory of its own. The state lives on in the prefix store, and one
/// live tensor keeps the whole arena region it was allocated in from being handed back: after a
/// 3k-token few-shot prompt the smollm2 server (562 MiB before) stayed at 1,137 MiB without the
/// copy, at 727 MiB with it, the rest mostly the kept states (BENCHMARKS.md "Long inputs (issue 24)").
fn outside_arena(value: DynValue) -> Result<DynValue> {
    fn copy<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
        value: &DynValue,
    ) -> Result<DynValue> {
        let (shape, data) = value
            .try_extract_tensor::<T>()
            .map_err(Error::runtime("cannot read a prefix state"))?;
        Tensor::from_array((shape.clone(), data.to_vec()))
            .map(|t| t.into_dyn())
            .map_err(Error::runtime("cannot copy a prefix state"))
    }
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float32) => copy::<f32>(&value),
        Some(TensorElementType::Float16) => copy::<half::f16>(&value),
        _ => Ok(value),
    }
}

/// Bytes held by a tensor value.
pub(super) fn value_bytes(value: &DynValue) -> usize {
    match value.dtype() {
        ValueType::Tensor { ty, shape, .. } => {
            let n: i64 = shape.iter().product();
            n.max(0) as usize * ty.byte_size(1).unwrap_or(4)
        }
        _ => 0,
    }
}
