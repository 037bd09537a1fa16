//! Last-token pooling and L2 normalisation, in f32 whatever the graph's output dtype. Rows are
//! right-padded, so a row's last real token sits at `length - 1`.

/// The hidden state at `length - 1` of each row of a `[rows, seq, hidden]` tensor, as f32.
pub fn last_token<T: Copy + Into<f32>>(
    data: &[T],
    seq: usize,
    hidden: usize,
    lengths: &[usize],
) -> Vec<Vec<f32>> {
    lengths
        .iter()
        .enumerate()
        .map(|(row, &len)| {
            let at = (row * seq + len.max(1) - 1) * hidden;
            data[at..at + hidden].iter().map(|&x| x.into()).collect()
        })
        .collect()
}

/// Scales `v` to unit length (as torch's `normalize`, eps 1e-12); the sum is taken in f64.
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    for x in v.iter_mut() {
        *x = (f64::from(*x) / norm) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_last_real_token_of_each_right_padded_row() {
        // rows=2, seq=3, hidden=2; row 0 has 3 tokens, row 1 has 1.
        let data: Vec<f32> = vec![0., 0., 0., 0., 1., 2., 3., 4., 9., 9., 9., 9.];
        assert_eq!(
            last_token(&data, 3, 2, &[3, 1]),
            vec![vec![1., 2.], vec![3., 4.]]
        );
    }

    #[test]
    fn half_precision_rows_come_back_as_f32() {
        let data: Vec<half::f16> = [0.5f32, -2.0]
            .iter()
            .map(|&x| half::f16::from_f32(x))
            .collect();
        assert_eq!(last_token(&data, 1, 2, &[1]), vec![vec![0.5, -2.0]]);
    }

    #[test]
    fn normalize_gives_unit_length_and_keeps_zero_finite() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0, 0.0];
        normalize(&mut z);
        assert_eq!(z, vec![0.0, 0.0]);
    }
}
