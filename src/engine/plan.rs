//! Batch planning: what a row costs in a batch ([`cost`]) and how rows are grouped into batches
//! under a token budget ([`plan`]). The server's queue sizes its turns with the same [`cost`], so
//! what it hands the model is what the planner expects.

/// Limits of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchLimits {
    /// Token budget: the sum over a batch of its longest row's [`cost`], rows x that cost.
    pub tokens: usize,
    /// Most rows.
    pub rows: usize,
}

impl BatchLimits {
    /// A budget of `tokens` (rows x padded length) and at most `rows` rows (both at least 1).
    pub fn new(tokens: usize, rows: usize) -> BatchLimits {
        BatchLimits {
            tokens: tokens.max(1),
            rows: rows.max(1),
        }
    }

    /// 512 tokens on the CPU, 16384 on a GPU; 64 rows. On the CPU a 512-token batch already keeps
    /// the GEMMs busy: slice7b and smollm2 embed as fast as with 4096, and the activations, which
    /// grow with the batch, take less memory (slice7b int8 documents: peak RSS 977 -> 705 MiB,
    /// with [`crate::backend::runtime::session`]'s memory pattern off; BENCHMARKS.md).
    pub fn default_for(device: crate::Device) -> BatchLimits {
        BatchLimits::new(if device.is_gpu() { 16384 } else { 512 }, 64)
    }
}

/// What one more batch costs beyond its padded tokens, in tokens: every run reads all the weights
/// once and pays the graph's fixed overhead, so a batch is split only where that saves more padding.
pub const BATCH_OVERHEAD: usize = 64;

/// The cost of a row in a batch: its length, or for a row that continues `prefix` its new tokens
/// weighted by how many keys each attends to (prefix included), relative to a 512-token document.
/// Attention over a long prefix is what makes a few-shot query dearer than its new tokens.
pub fn cost(ids: &[u32], prefix: Option<&[u32]>) -> usize {
    match prefix {
        Some(p) if continues(ids, p) => {
            let new = ids.len() - p.len();
            new.max(new * ids.len() / 512)
        }
        _ => ids.len(),
    }
}

/// Whether a row runs on top of `prefix`: it starts with it and has tokens after it (the last
/// token is pooled, so a row that is all prefix needs its own run).
pub fn continues(ids: &[u32], prefix: &[u32]) -> bool {
    ids.len() > prefix.len() && ids.starts_with(prefix)
}

/// Groups the rows `ids` into batches, by input index, each row costed by [`cost`] on top of
/// `prefix`: costliest first (ties keep input order), each batch at most `limits.rows` rows and
/// rows x costliest <= `limits.tokens` (a single costlier row gets a batch alone). Within those
/// limits the cut points minimise padded cost plus [`BATCH_OVERHEAD`] per batch, so a few long rows
/// do not pad a batch of short ones (few-shot queries on a cached prefix vary several-fold in
/// their new tokens).
pub fn plan(ids: &[Vec<u32>], prefix: Option<&[u32]>, limits: BatchLimits) -> Vec<Vec<usize>> {
    let costs: Vec<usize> = ids.iter().map(|r| cost(r, prefix)).collect();
    cut(&costs, limits.tokens, limits.rows)
}

/// The planner over costs (see [`plan`]): a dynamic programme over the rows sorted costliest
/// first.
fn cut(costs: &[usize], budget: usize, max_rows: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].cmp(&costs[a]));
    let n = order.len();
    // best[i]: least cost of batching order[i..]; end[i]: where the first of those batches ends.
    let mut best = vec![usize::MAX; n + 1];
    let mut end = vec![n; n + 1];
    best[n] = 0;
    for i in (0..n).rev() {
        let longest = costs[order[i]].max(1);
        for j in i + 1..=n {
            let rows = j - i;
            if rows > max_rows.max(1) || (rows > 1 && rows * longest > budget) {
                break;
            }
            let total = rows * longest + BATCH_OVERHEAD + best[j];
            if total <= best[i] {
                best[i] = total;
                end[i] = j;
            }
        }
    }
    let mut batches = Vec::new();
    let mut i = 0;
    while i < n {
        batches.push(order[i..end[i]].to_vec());
        i = end[i];
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of the given lengths, all distinct from any prefix.
    fn rows(lengths: &[usize]) -> Vec<Vec<u32>> {
        lengths.iter().map(|&n| vec![7; n]).collect()
    }

    fn limits(tokens: usize, rows: usize) -> BatchLimits {
        BatchLimits::new(tokens, rows)
    }

    #[test]
    fn plan_sorts_longest_first_and_respects_budget() {
        let lengths = [3, 10, 5, 10, 1];
        let batches = plan(&rows(&lengths), None, limits(20, 8));
        assert_eq!(batches, vec![vec![1, 3], vec![2, 0, 4]]);
        for b in &batches {
            assert!(b.len() * lengths[b[0]] <= 20);
        }
    }

    #[test]
    fn plan_covers_every_input_once_and_caps_rows() {
        let lengths: Vec<usize> = (0..50).map(|i| (i * 7) % 13 + 1).collect();
        let batches = plan(&rows(&lengths), None, limits(1000, 4));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        assert!(batches.iter().all(|b| b.len() <= 4));
        seen.sort();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn plan_splits_off_long_rows_when_padding_costs_more_than_a_batch() {
        let mut lengths = vec![200];
        lengths.extend([10; 20]);
        let batches = plan(&rows(&lengths), None, limits(8192, 64));
        assert_eq!(batches, vec![vec![0], (1..21).collect::<Vec<_>>()]);
        // A few tokens of padding are cheaper than another batch.
        assert_eq!(
            plan(&rows(&[12, 10, 10, 9]), None, limits(8192, 64)),
            vec![vec![0, 1, 2, 3]]
        );
    }

    #[test]
    fn a_row_over_budget_gets_its_own_batch() {
        assert_eq!(
            plan(&rows(&[100, 2, 2]), None, limits(10, 8)),
            vec![vec![0], vec![1, 2]]
        );
    }

    #[test]
    fn rows_on_a_prefix_cost_their_new_tokens_weighted_by_length() {
        let prefix = [1, 2, 3];
        assert_eq!(cost(&[1, 2, 3, 4, 5], Some(&prefix)), 2);
        assert_eq!(cost(&[9, 2, 3, 4, 5], Some(&prefix)), 5);
        assert_eq!(
            cost(&[1, 2, 3], Some(&prefix)),
            3,
            "nothing after the prefix"
        );
        let long: Vec<u32> = (0..1024).collect();
        assert_eq!(cost(&long, Some(&long[..512])), 1024);
    }

    #[test]
    fn the_planner_costs_rows_on_the_prefix_by_cost() {
        // Two 600-token queries on a 590-token prefix cost 11 each: they share a 64-token batch,
        // which their lengths alone would never fit.
        let prefix: Vec<u32> = (0..590).collect();
        let mut a = prefix.clone();
        a.extend(1000..1010);
        let ids = vec![a.clone(), a];
        assert_eq!(cost(&ids[0], Some(&prefix)), 11);
        assert_eq!(plan(&ids, Some(&prefix), limits(64, 8)), vec![vec![0, 1]]);
        assert_eq!(plan(&ids, None, limits(64, 8)), vec![vec![0], vec![1]]);
    }
}
