//! The engine loop: runs the batches of a plan ([`crate::engine::plan`]), on top of a prefix's
//! states for the rows that continue it and in full for the others ([`run_rows`]), and hands back
//! each batch as it finishes ([`Batches`]). A batch that fails or panics fails its own rows only
//! ([`Failed`]); the other batches still run. `embed_documents`, `embed_queries`, the corpus
//! runner and the server all go through here.

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use ndarray::{Array2, Axis};

use crate::backend::{Model, Prefix};
use crate::engine::batch;
use crate::engine::plan::{self, continues, BatchLimits};
use crate::error::{Error, Result};

/// One batch, run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Finished {
    /// Position of the batch in the plan.
    pub index: usize,
    /// Input index of each row of `vectors`.
    pub rows: Vec<usize>,
    /// Real tokens of its rows (prefix included).
    pub tokens: usize,
    /// Tokens the model ran: those after the prefix for the rows on it.
    pub run_tokens: usize,
    /// Rows computed on top of the prefix (the others were computed in full).
    pub on_prefix: usize,
    /// Pooled, normalised rows: `[rows.len(), hidden]`.
    pub vectors: Array2<f32>,
    /// Whether the vectors came from [`Batches::resume`] rather than the model.
    pub resumed: bool,
    /// Time the batch took.
    pub elapsed: Duration,
}

/// A batch that failed (an error, or a panic: [`Error::Internal`]): its rows have no vectors. The
/// other batches are not affected. Converts into its [`Error`], so `?` works where one failed batch
/// fails the whole call.
#[derive(Debug)]
#[non_exhaustive]
pub struct Failed {
    /// Position of the batch in the plan.
    pub index: usize,
    /// Input indices of its rows.
    pub rows: Vec<usize>,
    /// Tokens the model would have run.
    pub run_tokens: usize,
    pub elapsed: Duration,
    pub error: Error,
}

impl From<Failed> for Error {
    fn from(failed: Failed) -> Error {
        failed.error
    }
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
        place(&mut out, &on, &v);
    }
    if !full.is_empty() {
        let members: Vec<usize> = full.iter().map(|&i| rows[i]).collect();
        let v = model.forward(&batch::pad(ids, &members, pad_id), None)?;
        place(&mut out, &full, &v);
    }
    Ok((out, on.len()))
}

/// Puts row `k` of `v` at row `at[k]` of `out`.
fn place(out: &mut Array2<f32>, at: &[usize], v: &Array2<f32>) {
    for (k, &i) in at.iter().enumerate() {
        out.row_mut(i).assign(&v.row(k));
    }
}

/// Runs one planned batch (its input indices): the vectors in that order and how many rows ran on
/// the prefix. The model's side of the loop, so that the loop is tested without a model.
pub(crate) type RunBatch<'a> = dyn FnMut(&[usize]) -> Result<(Array2<f32>, usize)> + 'a;

/// The engine loop: yields each batch of a plan once it has run, in plan order, as
/// `Ok(`[`Finished`]`)` or `Err(`[`Failed`]`)`; a failed batch does not stop the ones after it.
///
/// Batches given to [`Batches::resume`] (a resumed corpus run's finished batches) are yielded with
/// their stored vectors instead of being run again.
pub struct Batches<'a> {
    ids: &'a [Vec<u32>],
    /// Length of the prefix the plan was made on (0 without one).
    prefix_len: usize,
    hidden: usize,
    plan: Vec<Vec<usize>>,
    next: usize,
    done: HashMap<usize, Array2<f32>>,
    run: Box<RunBatch<'a>>,
}

impl<'a> Batches<'a> {
    /// Plans `ids` under `limits` and runs them on `model`; the rows that continue `prefix` run on
    /// its states. (An [`crate::Embedder`] also keeps the prefix's states and counts the rows:
    /// [`crate::Embedder::batches`].)
    pub fn new(
        model: &'a mut Model,
        ids: &'a [Vec<u32>],
        prefix: Option<&'a Prefix>,
        pad_id: u32,
        limits: BatchLimits,
    ) -> Batches<'a> {
        let hidden = model.hidden();
        let run = move |rows: &[usize]| run_rows(model, ids, rows, prefix, pad_id);
        Batches::with_runner(ids, prefix.map(Prefix::ids), limits, hidden, Box::new(run))
    }

    /// Plans `ids` (on top of `prefix`) under `limits`; `run` runs each batch.
    pub(crate) fn with_runner(
        ids: &'a [Vec<u32>],
        prefix: Option<&[u32]>,
        limits: BatchLimits,
        hidden: usize,
        run: Box<RunBatch<'a>>,
    ) -> Batches<'a> {
        Batches {
            ids,
            prefix_len: prefix.map_or(0, <[u32]>::len),
            hidden,
            plan: plan::plan(ids, prefix, limits),
            next: 0,
            done: HashMap::new(),
            run,
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
    /// `each` hears every finished batch first (a progress bar). The first failed batch ends the
    /// call with its error.
    pub fn collect_rows(mut self, each: &mut dyn FnMut(&Finished)) -> Result<Array2<f32>> {
        let mut out = Array2::zeros((self.ids.len(), self.hidden));
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

    /// Runs batch `rows`, a panic or a wrong number of rows becoming an error of this batch only.
    fn run_guarded(&mut self, rows: &[usize]) -> Result<(Array2<f32>, usize)> {
        let run = &mut self.run;
        let (vectors, on_prefix) = catch_unwind(AssertUnwindSafe(|| run(rows)))
            .unwrap_or_else(|panic| Err(panicked(rows.len(), panic)))?;
        if vectors.nrows() != rows.len() {
            return Err(Error::internal(format!(
                "{} rows back for a batch of {}",
                vectors.nrows(),
                rows.len()
            )));
        }
        Ok((vectors, on_prefix))
    }
}

/// The error of a batch whose run panicked.
fn panicked(rows: usize, panic: Box<dyn Any + Send>) -> Error {
    let why = panic_message(panic.as_ref());
    Error::internal(format!("a batch of {rows} rows panicked: {why}"))
}

/// The message a caught panic carries (`panic!`'s text), or "no message".
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

impl Iterator for Batches<'_> {
    type Item = Result<Finished, Failed>;

    fn next(&mut self) -> Option<Result<Finished, Failed>> {
        let index = self.next;
        let rows = self.plan.get(index)?.clone();
        self.next += 1;
        let started = Instant::now();
        let tokens: usize = rows.iter().map(|&r| self.ids[r].len()).sum();
        let resumed = self.done.remove(&index);
        let was_resumed = resumed.is_some();
        let ran = match resumed {
            Some(vectors) => Ok((vectors, 0)),
            None => self.run_guarded(&rows),
        };
        let elapsed = started.elapsed();
        Some(match ran {
            Ok((vectors, on_prefix)) => Ok(Finished {
                index,
                run_tokens: tokens - on_prefix * self.prefix_len,
                tokens,
                rows,
                on_prefix,
                vectors,
                resumed: was_resumed,
                elapsed,
            }),
            Err(error) => Err(Failed {
                index,
                run_tokens: self.run_tokens(&rows),
                rows,
                elapsed,
                error,
            }),
        })
    }
}

impl Batches<'_> {
    /// Tokens the model runs for `rows`: after the prefix for those that continue it.
    fn run_tokens(&self, rows: &[usize]) -> usize {
        rows.iter()
            .map(|&r| {
                let len = self.ids[r].len();
                match self.prefix_len > 0 && len > self.prefix_len {
                    true => len - self.prefix_len,
                    false => len,
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake model: each row's vector is [first id, length]; a batch holding id 13 fails and one
    /// holding id 66 panics.
    fn fake(ids: &[Vec<u32>]) -> impl FnMut(&[usize]) -> Result<(Array2<f32>, usize)> + '_ {
        move |which: &[usize]| {
            let rows: Vec<&[u32]> = which.iter().map(|&r| ids[r].as_slice()).collect();
            if rows.iter().any(|r| r.contains(&66)) {
                panic!("boom");
            }
            if rows.iter().any(|r| r.contains(&13)) {
                return Err(Error::input("row", "bad batch"));
            }
            let flat: Vec<f32> = rows
                .iter()
                .flat_map(|r| [r[0] as f32, r.len() as f32])
                .collect();
            Ok((Array2::from_shape_vec((rows.len(), 2), flat).unwrap(), 0))
        }
    }

    fn batches<'a>(ids: &'a [Vec<u32>], limits: BatchLimits) -> Batches<'a> {
        Batches::with_runner(ids, None, limits, 2, Box::new(fake(ids)))
    }

    /// Each row's vector, or the error of its batch.
    fn by_row(ids: &[Vec<u32>], limits: BatchLimits) -> Vec<Result<Vec<f32>, String>> {
        let mut out = vec![Err("not run".to_string()); ids.len()];
        for item in batches(ids, limits) {
            match item {
                Ok(f) => {
                    for (&r, v) in f.rows.iter().zip(f.vectors.rows()) {
                        out[r] = Ok(v.to_vec());
                    }
                }
                Err(failed) => {
                    for &r in &failed.rows {
                        out[r] = Err(failed.error.to_string());
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rows_come_back_in_order_and_a_failed_batch_fails_only_its_rows() {
        // Lengths 30, 2, 2, 30, 3: planned longest first in batches of at most 2 rows.
        let ids = vec![
            vec![1; 30],
            vec![2; 2],
            vec![13, 3],
            vec![4; 30],
            vec![5; 3],
        ];
        let out = by_row(&ids, BatchLimits::new(4096, 2));
        assert_eq!(out[0], Ok(vec![1.0, 30.0]));
        assert_eq!(out[3], Ok(vec![4.0, 30.0]));
        // 13 shares its batch (rows of length 2) with row 1; row 4 (length 3) is elsewhere.
        assert!(out[1].is_err() && out[2].is_err(), "{out:?}");
        assert_eq!(out[4], Ok(vec![5.0, 3.0]));
    }

    #[test]
    fn a_panicking_batch_is_an_internal_error_of_its_rows_only() {
        let ids = vec![vec![66; 4], vec![7; 40]];
        let mut seen = Vec::new();
        for item in batches(&ids, BatchLimits::new(4096, 1)) {
            seen.push(item.map(|f| f.rows).map_err(|f| (f.rows, f.error)));
        }
        assert_eq!(seen.len(), 2, "the batch after the panic still runs");
        assert_eq!(seen[0].as_ref().unwrap(), &vec![1]);
        let (rows, error) = seen[1].as_ref().unwrap_err();
        assert_eq!(rows, &vec![0]);
        assert!(
            matches!(error, Error::Internal(m) if m.contains("panicked: boom")),
            "{error}"
        );
    }

    #[test]
    fn collect_rows_fails_with_the_first_failed_batch() {
        let ids = vec![vec![13; 4], vec![7; 40]];
        let got = batches(&ids, BatchLimits::new(4096, 1)).collect_rows(&mut |_| {});
        assert!(got.unwrap_err().is_input());
        let ids = vec![vec![3; 4], vec![7; 40]];
        let mut heard = 0;
        let got = batches(&ids, BatchLimits::new(4096, 1))
            .collect_rows(&mut |_| heard += 1)
            .unwrap();
        assert_eq!(heard, 2);
        assert_eq!(got.row(0).to_vec(), vec![3.0, 4.0]);
    }

    #[test]
    fn resumed_batches_are_not_run_again() {
        let ids = vec![vec![66; 4], vec![7; 40]];
        // Batch 1 (row 0, which would panic) is given; only batch 0 runs.
        let done = HashMap::from([(1, Array2::from_elem((1, 2), 9.0))]);
        let items: Vec<Finished> = batches(&ids, BatchLimits::new(4096, 1))
            .resume(done)
            .map(|item| item.unwrap())
            .collect();
        assert_eq!((items[0].resumed, items[1].resumed), (false, true));
        assert_eq!(items[1].vectors[[0, 0]], 9.0);
    }
}
