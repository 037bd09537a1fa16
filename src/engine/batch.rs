//! Batching: inputs are sorted longest first so that rows of similar length share a batch, batches
//! are cut within a token budget (rows x padded length) where padding plus a per-batch overhead is
//! least, padded on the right, and every row remembers its input index so results go back in input
//! order.

/// One padded batch, ready for the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Input index of each row.
    pub rows: Vec<usize>,
    /// Real (unpadded) length of each row.
    pub lengths: Vec<usize>,
    /// Padded length.
    pub seq: usize,
    /// `[rows, seq]`, right-padded with the pad id.
    pub input_ids: Vec<i64>,
    /// `[rows, seq]`, 1 on real tokens.
    pub attention_mask: Vec<i64>,
    /// `[rows, seq]`, `0..len` on real tokens, 0 on padding.
    pub position_ids: Vec<i64>,
}

impl Batch {
    /// Real tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Moves the positions of real tokens on by `by`: the rows continue a prefix of `by` tokens
    /// computed elsewhere.
    pub fn offset_positions(&mut self, by: usize) {
        for (p, m) in self.position_ids.iter_mut().zip(&self.attention_mask) {
            if *m == 1 {
                *p += by as i64;
            }
        }
    }

    /// Whether every row begins with `ids` and has a token after them.
    pub fn begins_with(&self, ids: &[u32]) -> bool {
        !ids.is_empty()
            && self.lengths.iter().enumerate().all(|(r, &len)| {
                len > ids.len()
                    && self.input_ids[r * self.seq..r * self.seq + ids.len()]
                        .iter()
                        .zip(ids)
                        .all(|(&a, &b)| a == b as i64)
            })
    }

    /// The batch without its first `k` columns, positions kept: the rows as they run on top of the
    /// states of the `k` ids they all begin with ([`Batch::begins_with`]).
    pub fn without_first(&self, k: usize) -> Batch {
        let seq = self.seq - k;
        let cut = |v: &[i64]| -> Vec<i64> {
            v.chunks(self.seq)
                .flat_map(|row| row[k..].iter().copied())
                .collect()
        };
        Batch {
            rows: self.rows.clone(),
            lengths: self.lengths.iter().map(|l| l - k).collect(),
            seq,
            input_ids: cut(&self.input_ids),
            attention_mask: cut(&self.attention_mask),
            position_ids: cut(&self.position_ids),
        }
    }
}

/// What one more batch costs beyond its padded tokens, in tokens: every run reads all the weights
/// once and pays the graph's fixed overhead, so a batch is split only where that saves more padding.
pub const BATCH_OVERHEAD: usize = 64;

/// Groups input indices into batches: longest first (ties keep input order), each batch at most
/// `max_rows` rows and `rows x longest <= budget` tokens (a single longer row gets a batch alone).
/// Within those limits the cut points minimise padded tokens plus [`BATCH_OVERHEAD`] per batch, so
/// a few long rows do not pad a batch of short ones (few-shot queries on a cached prefix vary
/// several-fold in their new tokens).
pub fn plan(lengths: &[usize], budget: usize, max_rows: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    let n = order.len();
    // best[i]: least cost of batching order[i..]; end[i]: where the first of those batches ends.
    let mut best = vec![usize::MAX; n + 1];
    let mut end = vec![n; n + 1];
    best[n] = 0;
    for i in (0..n).rev() {
        let longest = lengths[order[i]].max(1);
        for j in i + 1..=n {
            let rows = j - i;
            if rows > max_rows.max(1) || (rows > 1 && rows * longest > budget) {
                break;
            }
            let cost = rows * longest + BATCH_OVERHEAD + best[j];
            if cost <= best[i] {
                best[i] = cost;
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

/// Right-pads the rows `rows` of `ids` into one batch.
pub fn pad(ids: &[Vec<u32>], rows: &[usize], pad_id: u32) -> Batch {
    let lengths: Vec<usize> = rows.iter().map(|&r| ids[r].len()).collect();
    let seq = lengths.iter().copied().max().unwrap_or(0).max(1);
    let n = rows.len() * seq;
    let (mut input_ids, mut attention_mask, mut position_ids) =
        (vec![pad_id as i64; n], vec![0i64; n], vec![0i64; n]);
    for (row, &r) in rows.iter().enumerate() {
        for (pos, &id) in ids[r].iter().enumerate() {
            let at = row * seq + pos;
            input_ids[at] = id as i64;
            attention_mask[at] = 1;
            position_ids[at] = pos as i64;
        }
    }
    Batch {
        rows: rows.to_vec(),
        lengths,
        seq,
        input_ids,
        attention_mask,
        position_ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_sorts_longest_first_and_respects_budget() {
        let lengths = [3, 10, 5, 10, 1];
        let batches = plan(&lengths, 20, 8);
        assert_eq!(batches, vec![vec![1, 3], vec![2, 0, 4]]);
        for b in &batches {
            assert!(b.len() * lengths[b[0]] <= 20);
        }
    }

    #[test]
    fn plan_covers_every_input_once_and_caps_rows() {
        let lengths: Vec<usize> = (0..50).map(|i| (i * 7) % 13 + 1).collect();
        let batches = plan(&lengths, 1000, 4);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        assert!(batches.iter().all(|b| b.len() <= 4));
        seen.sort();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn plan_splits_off_long_rows_when_padding_costs_more_than_a_batch() {
        let mut lengths = vec![200];
        lengths.extend([10; 20]);
        let batches = plan(&lengths, 8192, 64);
        assert_eq!(batches, vec![vec![0], (1..21).collect::<Vec<_>>()]);
        // A few tokens of padding are cheaper than another batch.
        assert_eq!(plan(&[12, 10, 10, 9], 8192, 64), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn without_first_drops_the_shared_start_and_keeps_positions() {
        let ids = vec![vec![1, 5, 6, 7], vec![1, 8]];
        let b = pad(&ids, &[0, 1], 0);
        assert!(b.begins_with(&[1]));
        assert!(!b.begins_with(&[1, 5]));
        assert!(!pad(&[vec![1]], &[0], 0).begins_with(&[1]));
        let c = b.without_first(1);
        assert_eq!((c.seq, c.lengths.clone()), (3, vec![3, 1]));
        assert_eq!(c.input_ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(c.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(c.position_ids, vec![1, 2, 3, 1, 0, 0]);
    }

    #[test]
    fn a_row_over_budget_gets_its_own_batch() {
        assert_eq!(plan(&[100, 2, 2], 10, 8), vec![vec![0], vec![1, 2]]);
    }

    #[test]
    fn offset_positions_moves_real_tokens_only() {
        let ids = vec![vec![3, 4], vec![9]];
        let mut b = pad(&ids, &[0, 1], 0);
        b.offset_positions(2);
        assert_eq!(b.input_ids, vec![3, 4, 9, 0]);
        assert_eq!(b.position_ids, vec![2, 3, 2, 0]);
    }

    #[test]
    fn pad_is_right_sided_with_positions() {
        let ids = vec![vec![5, 6, 7], vec![8]];
        let b = pad(&ids, &[0, 1], 0);
        assert_eq!(b.seq, 3);
        assert_eq!(b.input_ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(b.position_ids, vec![0, 1, 2, 0, 0, 0]);
        assert_eq!(b.tokens(), 4);
    }
}
