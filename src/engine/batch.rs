//! Padding: the rows of a planned batch ([`crate::engine::plan`]) right-padded into the graph's
//! inputs, every row remembering its input index so results go back in input order.

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
