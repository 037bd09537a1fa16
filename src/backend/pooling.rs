//! Last-token pooling and L2 normalisation, in f32 whatever the graph's output dtype, and shortened
//! vectors. Rows are right-padded, so a row's last real token sits at `length - 1`; a row of
//! length 0 has no token to pool and is refused before the graph runs ([`crate::Model::forward`]).

use ndarray::{s, Array2, ArrayViewMut1};

/// The hidden state at `length - 1` of each row of a `[rows, seq, hidden]` tensor, as f32:
/// `[rows, hidden]`. Every length must be at least 1.
pub(crate) fn last_token<T: Copy + Into<f32>>(
    data: &[T],
    seq: usize,
    hidden: usize,
    lengths: &[usize],
) -> Array2<f32> {
    let mut out = Array2::zeros((lengths.len(), hidden));
    for (row, (&len, mut dst)) in lengths.iter().zip(out.rows_mut()).enumerate() {
        debug_assert!(len >= 1, "a row of length 0 reached pooling");
        let at = (row * seq + len.max(1) - 1) * hidden;
        for (d, &x) in dst.iter_mut().zip(&data[at..at + hidden]) {
            *d = x.into();
        }
    }
    out
}

/// Scales each row to unit length ([`unit_length`]).
pub(crate) fn normalize_rows(rows: &mut Array2<f32>) {
    rows.rows_mut().into_iter().for_each(unit_length);
}

/// Scales a vector to unit length (as torch's `normalize`, eps 1e-12); sums are taken in f64.
fn unit_length(mut v: ArrayViewMut1<f32>) {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    v.mapv_inplace(|x| (f64::from(x) / norm) as f32);
}

/// Shortened vectors (Matryoshka): the first `n` components of each pooled row, scaled to unit
/// length again; `n` at or over the row length keeps the row whole, normalised. Normalising before
/// or not changes nothing, as scaling a row scales its first `n` components alike. Check `n`
/// against the package first ([`crate::Manifest::check_dimensions`]).
pub fn shorten(rows: &Array2<f32>, n: usize) -> Array2<f32> {
    let n = n.min(rows.ncols());
    let mut out = rows.slice(s![.., ..n]).to_owned();
    normalize_rows(&mut out);
    out
}

/// [`shorten`] for one row held in a `Vec` (the server's rows), in place.
pub fn shorten_row(row: &mut Vec<f32>, n: usize) {
    row.truncate(n);
    unit_length(ArrayViewMut1::from(row.as_mut_slice()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn picks_last_real_token_of_each_right_padded_row() {
        // rows=2, seq=3, hidden=2; row 0 has 3 tokens, row 1 has 1.
        let data: Vec<f32> = vec![0., 0., 0., 0., 1., 2., 3., 4., 9., 9., 9., 9.];
        assert_eq!(last_token(&data, 3, 2, &[3, 1]), array![[1., 2.], [3., 4.]]);
    }

    #[test]
    fn half_precision_rows_come_back_as_f32() {
        let data: Vec<half::f16> = [0.5f32, -2.0]
            .iter()
            .map(|&x| half::f16::from_f32(x))
            .collect();
        assert_eq!(last_token(&data, 1, 2, &[1]), array![[0.5, -2.0]]);
    }

    #[test]
    fn shorten_keeps_the_first_components_renormalised() {
        let close = |a: &Array2<f32>, b: &Array2<f32>| {
            a.dim() == b.dim() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
        };
        let full = array![[0.6f32, 0.0, 0.8, 0.0], [0.5, 0.5, 0.5, 0.5]];
        assert!(close(&shorten(&full, 1), &array![[1.0], [1.0]]));
        let half = 0.5f32.sqrt();
        assert!(close(&shorten(&full, 2), &array![[1.0, 0.0], [half, half]]));
        assert!(close(
            &shorten(&(full.clone() * 5.0), 3),
            &shorten(&full, 3)
        ));
        assert!(close(&shorten(&full, 4), &full));
        assert_eq!(shorten(&full, 9).ncols(), 4);
    }

    #[test]
    fn normalize_gives_unit_length_and_keeps_zero_finite() {
        let mut v = array![[3.0f32, 4.0], [0.0, 0.0]];
        normalize_rows(&mut v);
        assert_eq!(v, array![[0.6, 0.8], [0.0, 0.0]]);
    }

    #[test]
    fn a_shortened_row_is_the_shortened_matrix_row() {
        let rows = array![[3.0f32, 4.0, 12.0], [1.0, 0.0, 5.0]];
        for (i, row) in rows.outer_iter().enumerate() {
            let mut v = row.to_vec();
            shorten_row(&mut v, 2);
            assert_eq!(v, shorten(&rows, 2).row(i).to_vec());
        }
        let mut v = vec![3.0f32, 4.0];
        shorten_row(&mut v, 5);
        assert_eq!(v, vec![0.6, 0.8]);
    }
}
