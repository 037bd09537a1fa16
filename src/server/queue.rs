//! The queue between the HTTP handlers and the model: handlers push tokenized requests; one
//! batching task keeps them and, each time the worker asks for work, hands it the requests of one
//! prefix group (the oldest request's) up to the token budget. Requests of other groups wait for
//! the next turn, so a batch never mixes prefixes and the oldest request is always served next.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use icl_embed::engine::plan;
use icl_embed::Error;

use super::frontend::Prompt;
use super::metrics::Metrics;

/// Embeddings of one request's rows, in order, or why its batch failed (one error, shared by
/// every row and request of the batch, keeping its kind for the status the handler answers).
pub type Reply = Result<Vec<Vec<f32>>, Arc<Error>>;

/// One request's rows waiting for the model.
pub struct Entry {
    /// The few-shot prompt the rows were built with (`None`: documents or token ids). Prompts
    /// without examples share no prefix, so their queries batch with documents.
    pub prompt: Option<Arc<Prompt>>,
    /// Final token ids, one row per input.
    pub ids: Vec<Vec<u32>>,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Reply>,
}

impl Entry {
    fn group(&self) -> Option<&str> {
        self.prompt
            .as_ref()
            .filter(|p| p.shared_len > 0)
            .map(|p| p.key.as_str())
    }

    /// What the rows cost in a batch, as the engine's planner costs them ([`plan::cost`]): on a
    /// prompt whose prefix the model keeps, what follows the prefix weighted by the keys it
    /// attends to.
    fn cost(&self) -> usize {
        let prefix = self.prompt.as_deref().and_then(Prompt::cached_prefix);
        rows_cost(&self.ids, prefix)
    }
}

/// The cost of `rows` on top of `prefix`: the sum of the planner's row costs.
fn rows_cost(rows: &[Vec<u32>], prefix: Option<&[u32]>) -> usize {
    rows.iter().map(|r| plan::cost(r, prefix)).sum()
}

/// Requests of one prefix group, for one turn of the worker.
pub struct Work {
    pub prompt: Option<Arc<Prompt>>,
    pub entries: Vec<Entry>,
}

/// The worker's request for its next [`Work`].
pub type Ready = oneshot::Sender<Work>;

/// Which queued entries (group, cost), oldest first, go into the next turn: the oldest one's
/// group, in arrival order while the cost stays within `budget` (the first always goes).
fn pick(queue: &[(Option<&str>, usize)], budget: usize) -> Vec<usize> {
    let Some(&(group, mut cost)) = queue.first() else {
        return Vec::new();
    };
    let mut taken = vec![0];
    for (i, &(g, c)) in queue.iter().enumerate().skip(1) {
        if g == group {
            if cost + c > budget {
                break;
            }
            cost += c;
            taken.push(i);
        }
    }
    taken
}

/// Takes the next turn's entries out of `queue` (see [`pick`]).
fn take_group(queue: &mut VecDeque<Entry>, budget: usize) -> Work {
    let keys: Vec<(Option<&str>, usize)> = queue.iter().map(|e| (e.group(), e.cost())).collect();
    let taken = pick(&keys, budget);
    let mut entries = Vec::with_capacity(taken.len());
    for i in taken.into_iter().rev() {
        entries.extend(queue.remove(i));
    }
    entries.reverse();
    let prompt = entries
        .first()
        .and_then(|e| e.prompt.clone())
        .filter(|p| p.shared_len > 0);
    Work { prompt, entries }
}

/// The batching task: runs until the handlers are gone (every sender dropped) and the queue is
/// empty, or the worker is gone, in which case what waits is answered with an error and `healthy`
/// turns false.
pub async fn batcher(
    mut requests: mpsc::UnboundedReceiver<Entry>,
    mut ready: mpsc::Receiver<Ready>,
    budget: usize,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
) {
    let mut queue: VecDeque<Entry> = VecDeque::new();
    let mut waiting: Option<Ready> = None;
    let mut open = true;
    loop {
        while let Ok(entry) = requests.try_recv() {
            queue.push_back(entry);
        }
        // Entries whose client went away are dropped before they cost a batch.
        queue.retain(|e| !e.reply.is_closed());
        if !queue.is_empty() {
            if let Some(worker) = waiting.take() {
                let work = take_group(&mut queue, budget);
                if let Err(work) = worker.send(work) {
                    // The worker stopped between asking and receiving: put the work back.
                    for e in work.entries.into_iter().rev() {
                        queue.push_front(e);
                    }
                }
            }
        }
        metrics.queue_size(queue.len());
        if !open && queue.is_empty() {
            return;
        }
        tokio::select! {
            entry = requests.recv(), if open => match entry {
                Some(e) => queue.push_back(e),
                None => open = false,
            },
            worker = ready.recv(), if waiting.is_none() => match worker {
                Some(w) => waiting = Some(w),
                None => {
                    healthy.store(false, Ordering::SeqCst);
                    let stopped = Arc::new(Error::Internal("the inference worker stopped".into()));
                    for e in queue.drain(..) {
                        let _ = e.reply.send(Err(stopped.clone()));
                    }
                    metrics.queue_size(0);
                    // Keep answering whatever still arrives until the handlers are gone.
                    while let Some(e) = requests.recv().await {
                        let _ = e.reply.send(Err(stopped.clone()));
                    }
                    return;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_group_goes_first_within_the_budget() {
        let queue = [
            (None, 20),
            (Some("a"), 10),
            (None, 30),
            (None, 50),
            (Some("a"), 25),
            (None, 5),
        ];
        // Documents first (the oldest); 20 + 30 fit a budget of 60, 50 more does not, and the
        // turn stops there (5 waits behind 50 rather than overtaking it).
        assert_eq!(pick(&queue, 60), vec![0, 2]);
        assert_eq!(pick(&queue[1..], 60), vec![0, 3]);
        assert_eq!(pick(&[], 60), Vec::<usize>::new());
    }

    /// The queue sizes a turn with the planner's own cost function, so a turn the queue fills is
    /// what the planner fits in one batch.
    #[test]
    fn the_queue_costs_rows_as_the_planner_does() {
        let prefix: Vec<u32> = (0..590).collect();
        let mut query = prefix.clone();
        query.extend(1000..1010);
        let rows = vec![query.clone(), query, vec![5; 30]];
        let want: usize = rows.iter().map(|r| plan::cost(r, Some(&prefix))).sum();
        assert_eq!(rows_cost(&rows, Some(&prefix)), want);
        assert_eq!(
            want,
            11 + 11 + 30,
            "new tokens weighted by keys attended; others whole"
        );
        assert_eq!(rows_cost(&rows, None), 600 + 600 + 30);
        // Two such queries fill a turn of 22 and one batch of the planner under the same budget.
        let pair = &rows[..2];
        let limits = icl_embed::BatchLimits::new(rows_cost(pair, Some(&prefix)), 8);
        assert_eq!(plan::plan(pair, Some(&prefix), limits), vec![vec![0, 1]]);
    }

    #[test]
    fn a_request_over_the_budget_still_goes_alone() {
        assert_eq!(pick(&[(None, 500), (None, 1)], 100), vec![0]);
    }
}
