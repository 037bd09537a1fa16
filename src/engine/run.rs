//! The one way through for token ids: plan batches under a token budget ([`plan`]), pad each
//! ([`crate::engine::batch::pad`]), run it on the model, on top of a prefix's states for the rows that
//! start with the prefix and in full for the others ([`run_rows`]), and hand back each finished
//! batch ([`Batches`]). `embed_documents`, `embed_queries`, the corpus runner and a server all go
//! through here.

use std::collections::HashMap;

use ndarray::{Array2, Axis};

use crate::backend::{Model, Prefix};
use crate::engine::batch;
use crate::error::Result;

/// Limits of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Token budget: rows x padded length (a row's cost is [`plan_cost`]).
    pub tokens: usize,
    /// Most rows.
    pub rows: usize,
}

impl BatchLimits {
    /// 512 tokens on the CPU, 16384 on a GPU; 64 rows. On the CPU a 512-token batch already keeps
    /// the GEMMs busy: slice7b and smollm2 embed as fast as with 4096, and the activations, which
    /// grow with the batch, take less memory (slice7b int8 documents: peak RSS 977 -> 705 MiB,
    /// with [`crate::backend::runtime::session`]'s memory pattern off; BENCHMARKS.md).
    pub fn default_for(device: crate::Device) -> BatchLimits {
        BatchLimits {
            tokens: if device.is_gpu() { 16384 } else { 512 },
            rows: 64,
        }
    }
}

/// The cost of a row in batch planning: its length, or for a row that continues `prefix` its new
/// tokens weighted by how many keys each attends to (prefix included), relative to a 512-token
/// document.
pub fn plan_cost(ids: &[u32], prefix: Option<&[u32]>) -> usize {
    match prefix {
        Some(p) if continues(ids, p) => {
            let new = ids.len() - p.len();
            new.max(new * ids.len() / 512)
        }
        _ => ids.len(),
    }
}

/// Whether a row runs on top of `prefix`: it starts with it and has tokens after it.
pub fn continues(ids: &[u32], prefix: &[u32]) -> bool {
    ids.len() > prefix.len() && ids.starts_with(prefix)
}

/// Input indices grouped into batches ([`batch::plan`] over [`plan_cost`]).
pub fn plan(ids: &[Vec<u32>], prefix: Option<&[u32]>, limits: BatchLimits) -> Vec<Vec<usize>> {
    let costs: Vec<usize> = ids.iter().map(|r| plan_cost(r, prefix)).collect();
    batch::plan(&costs, limits.tokens, limits.rows)
}

/// One batch, run.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Position of the batch in the plan.
    pub index: usize,
    /// Input index of each row of `vectors`.
    pub rows: Vec<usize>,
    /// Real tokens of its rows (prefix included).
    pub tokens: usize,
    /// Rows computed on top of the prefix (the others were computed in full).
    pub on_prefix: usize,
    /// Pooled, normalised rows: `[rows.len(), hidden]`.
    pub vectors: Array2<f32>,
    /// Whether the vectors came from [`Batches::resume`] rather than the model.
    pub resumed: bool,
}

/// The rows `rows` of `ids` as one batch: those that continue `prefix` on top of its states, the
/// others in full. Returns the vectors in the order of `rows` and how many ran on the prefix.
pub fn run_rows(
    model: &mut Model,
    ids: &[Vec<u32>],
    rows: &[usize],
    prefix: Option<&Prefix>,
    pad_id: u32,
) -> Result<(Array2<f32>, usize)> {
    let Some(prefix) = prefix else {
        return Ok((model.forward(&batch::pad(ids, rows, pad_id), None)?, 0));
    };
    let (on, full): (Vec<usize>, Vec<usize>) =
        (0..rows.len()).partition(|&i| continues(&ids[rows[i]], prefix.ids()));
    let mut out = Array2::zeros((rows.len(), model.hidden()));
    if !on.is_empty() {
        let skip = prefix.ids().len();
        let suffixes: Vec<Vec<u32>> = on.iter().map(|&i| ids[rows[i]][skip..].to_vec()).collect();
        let mut b = batch::pad(&suffixes, &(0..on.len()).collect::<Vec<_>>(), pad_id);
        b.offset_positions(skip);
        let v = model.forward(&b, Some(prefix))?;
        for (k, &i) in on.iter().enumerate() {
            out.row_mut(i).assign(&v.row(k));
        }
    }
    if !full.is_empty() {
        let members: Vec<usize> = full.iter().map(|&i| rows[i]).collect();
        let v = model.forward(&batch::pad(ids, &members, pad_id), None)?;
        for (k, &i) in full.iter().enumerate() {
            out.row_mut(i).assign(&v.row(k));
        }
    }
    Ok((out, on.len()))
}

/// The batch driver: yields each batch of a plan once it has run, in plan order.
///
/// Batches given to [`Batches::resume`] (a resumed corpus run's finished batches) are yielded with
/// their stored vectors instead of being run again.
pub struct Batches<'a> {
    model: &'a mut Model,
    ids: &'a [Vec<u32>],
    prefix: Option<&'a Prefix>,
    pad_id: u32,
    plan: Vec<Vec<usize>>,
    next: usize,
    done: HashMap<usize, Array2<f32>>,
}

impl<'a> Batches<'a> {
    /// Plans `ids` under `limits`; the rows that continue `prefix` will run on its states.
    pub fn new(
        model: &'a mut Model,
        ids: &'a [Vec<u32>],
        prefix: Option<&'a Prefix>,
        pad_id: u32,
        limits: BatchLimits,
    ) -> Batches<'a> {
        let plan = plan(ids, prefix.map(Prefix::ids), limits);
        Batches {
            model,
            ids,
            prefix,
            pad_id,
            plan,
            next: 0,
            done: HashMap::new(),
        }
    }

    /// Batches already computed, by plan position; the others run.
    pub fn resume(mut self, done: HashMap<usize, Array2<f32>>) -> Batches<'a> {
        self.done = done;
        self
    }

    /// The plan: input indices of each batch.
    pub fn plan(&self) -> &[Vec<usize>] {
        &self.plan
    }

    /// Runs every remaining batch and puts the rows back in input order: `[ids.len(), hidden]`.
    /// `each` hears every finished batch first.
    pub fn collect_rows(mut self, each: &mut dyn FnMut(&Finished)) -> Result<Array2<f32>> {
        let mut out = Array2::zeros((self.ids.len(), self.model.hidden()));
        for finished in self.by_ref() {
            let finished = finished?;
            each(&finished);
            for (&r, v) in finished
                .rows
                .iter()
                .zip(finished.vectors.axis_iter(Axis(0)))
            {
                out.row_mut(r).assign(&v);
            }
        }
        Ok(out)
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<Finished>;

    fn next(&mut self) -> Option<Result<Finished>> {
        let index = self.next;
        let rows = self.plan.get(index)?.clone();
        self.next += 1;
        let tokens = rows.iter().map(|&r| self.ids[r].len()).sum();
        if let Some(vectors) = self.done.remove(&index) {
            return Some(Ok(Finished {
                index,
                rows,
                tokens,
                on_prefix: 0,
                vectors,
                resumed: true,
            }));
        }
        Some(
            run_rows(self.model, self.ids, &rows, self.prefix, self.pad_id).map(
                |(vectors, on_prefix)| Finished {
                    index,
                    rows,
                    tokens,
                    on_prefix,
                    vectors,
                    resumed: false,
                },
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_on_a_prefix_cost_their_new_tokens_weighted_by_length() {
        let prefix = [1, 2, 3];
        assert_eq!(plan_cost(&[1, 2, 3, 4, 5], Some(&prefix)), 2);
        assert_eq!(plan_cost(&[9, 2, 3, 4, 5], Some(&prefix)), 5);
        assert_eq!(
            plan_cost(&[1, 2, 3], Some(&prefix)),
            3,
            "nothing after the prefix"
        );
        let long: Vec<u32> = (0..1024).collect();
        assert_eq!(plan_cost(&long, Some(&long[..512])), 1024);
    }
}
