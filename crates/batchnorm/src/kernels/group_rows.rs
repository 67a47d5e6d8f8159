//! Ghost batch norm's small groups in the rows plan (`inner` = 1): a group whose rows are one
//! block of its own rows plan (its moments one shifted pass, [`super::moments::rows_moments`])
//! takes its statistics, constants and y in one pass per tile of channels, all of a tile's
//! per-channel state (shift, sums, constants) in arrays of the tile's width while the tile's
//! rows are in cache.
//!
//! Every value is computed by the same operations, in the same order, as the plain kernels do it
//! over the group alone: per channel, the sums of d = x − k (k the group's first row) and d² over
//! the rows in order, mean = k + Σd/n and M2 = Σd² − (Σd)²/n (clamped at 0), the constants from
//! the caller, then y as [`super::elementwise::normalize_rows`] writes it (in `f32` with the
//! two-piece mean where the constants fit, in `f64` where they do not). What changes is that
//! the per-channel work of a group, done once per channel of every group (a group of v rows has
//! v values per channel), runs on arrays that stay in L1 instead of vectors as wide as the rows.

use super::elementwise::{NarrowAffine, WideAffine};
use super::scratch::Scratch;
use super::simd::{Scalar, Simd};
use crate::stats::exact_reciprocal;
use crate::Element;

/// Channels of one tile (a multiple of 8): its per-channel arrays take 8 KiB of `f64` and
/// 3 KiB of `f32`.
const TILE: usize = 256;
/// Rows added per visit of a tile's sums.
const ROW_GROUP: usize = 4;

/// Where a group's pass writes its per-channel statistics (one entry per channel).
pub(crate) struct GroupOut<'a> {
    /// The group's means.
    pub mean: &'a mut [f64],
    /// The group's M2.
    pub m2: &'a mut [f64],
    /// When given, the group's 1/√(σ² + ε) as `constants` left them.
    pub inv_std: Option<&'a mut [f64]>,
}

/// Ghost training forward of one group `x` (whole rows of `out.mean.len()` channels, at least
/// one row, at most a block of its rows plan) into `y` (not streamed): the group's moments into
/// `out`, then `constants(first, count, m2, scale, shift, inv_std)` turns the M2 of channels
/// `first..` into their (scale, shift) (and their 1/√(σ² + ε) into `inv_std` when given), and y
/// is written with them. The bits of [`super::moments::rows_moments`] and
/// [`super::elementwise::normalize_rows`] with the same constants. For element types that take
/// the `f32` path (not `f64`).
pub(crate) fn group_forward<T: Element, C>(x: &[T], y: &mut [T], out: GroupOut<'_>, constants: C)
where
    C: Fn(usize, f64, &[f64], &mut [f64], &mut [f64], Option<&mut [f64]>),
{
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        return super::with_simd(
            #[inline(always)]
            || {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked just above), and `with_simd`
                // runs this closure (inlined) in a function compiled with them.
                let s = unsafe { super::simd::Avx2::new_unchecked() };
                group_forward_impl(s, x, y, out, &constants)
            },
        );
    }
    group_forward_impl(Scalar, x, y, out, &constants)
}

#[inline(always)]
fn group_forward_impl<S: Simd, T: Element, C>(s: S, x: &[T], y: &mut [T], out: GroupOut<'_>, constants: &C)
where
    C: Fn(usize, f64, &[f64], &mut [f64], &mut [f64], Option<&mut [f64]>),
{
    let GroupOut { mean, m2, mut inv_std } = out;
    let channels = mean.len();
    assert!(channels > 0 && x.len() >= channels && x.len() % channels == 0 && y.len() == x.len());
    assert!(m2.len() == channels && inv_std.as_ref().is_none_or(|v| v.len() == channels));
    let width = channels.min(TILE);
    // Per tile: shift, Σd, Σd², scale, shift of the affine map (f64); mean_hi, scale, shift (f32).
    // Every entry a tile reads was written for that tile first.
    let mut wide = Scratch::any(5 * width);
    let mut narrow = Scratch::<f32>::any(3 * width);
    let mut t = 0;
    while t < channels {
        let te = (t + TILE).min(channels);
        let inv = inv_std.as_deref_mut().map(|v| &mut v[t..te]);
        let tile = Tile { s, channels, first: t };
        tile.forward(x, y, (&mut mean[t..te], &mut m2[t..te], inv), &mut wide, &mut narrow, constants);
        t = te;
    }
}

/// Channels `first..first + w` of a group of whole rows of `channels`.
#[derive(Clone, Copy)]
struct Tile<S> {
    s: S,
    channels: usize,
    first: usize,
}

impl<S: Simd> Tile<S> {
    /// See [`group_forward`]; `out` holds the tile's means, M2 and 1/√(σ² + ε).
    #[inline(always)]
    fn forward<T: Element, C>(
        self,
        x: &[T],
        y: &mut [T],
        out: (&mut [f64], &mut [f64], Option<&mut [f64]>),
        wide: &mut [f64],
        narrow: &mut [f32],
        constants: &C,
    ) where
        C: Fn(usize, f64, &[f64], &mut [f64], &mut [f64], Option<&mut [f64]>),
    {
        let (mean, m2, inv) = out;
        let (s, channels, first) = (self.s, self.channels, self.first);
        let w = mean.len();
        let rows = x.len() / channels;
        let w8 = w - w % 8;
        assert!(first + w <= channels && w <= TILE && wide.len() >= 5 * w && narrow.len() >= 3 * w);
        let (k, rest) = wide.split_at_mut(w);
        let (s1, rest) = rest.split_at_mut(w);
        let (s2, rest) = rest.split_at_mut(w);
        let (scale, rest) = rest.split_at_mut(w);
        let shift = &mut rest[..w];
        for (k, v) in k.iter_mut().zip(&x[first..first + w]) {
            *k = v.to_f64();
        }
        let xp = x.as_ptr();
        // The sums, row after row per channel, as `rows_moments` adds them (from +0.0, four
        // rows at a time across the tile, the tile's sums in L1 between them).
        s1.fill(0.0);
        s2.fill(0.0);
        let mut r0 = 0;
        while r0 < rows {
            let group = ROW_GROUP.min(rows - r0);
            let mut j = 0;
            while j < w8 {
                // SAFETY: r < rows and first + j + 8 <= first + w <= channels, so every read is
                // in x (rows × channels elements); j + 8 <= w8 <= w, the length of k, s1, s2.
                unsafe {
                    let kv = s.load(k.as_ptr().add(j));
                    let (mut a, mut b) = (s.load(s1.as_ptr().add(j)), s.load(s2.as_ptr().add(j)));
                    // A constant trip count for whole groups: unrolled.
                    let rows = if group == ROW_GROUP { r0..r0 + ROW_GROUP } else { r0..r0 + group };
                    for r in rows {
                        let d = s.sub(s.load(xp.add(r * channels + first + j)), kv);
                        (a, b) = (s.add(a, d), s.mul_add(d, d, b));
                    }
                    s.store(s1.as_mut_ptr().add(j), a);
                    s.store(s2.as_mut_ptr().add(j), b);
                }
                j += 8;
            }
            r0 += group;
        }
        for j in w8..w {
            let (mut a, mut b) = (0.0, 0.0);
            for r in 0..rows {
                let d = x[r * channels + first + j].to_f64() - k[j];
                (a, b) = (a + d, d.mul_add(d, b));
            }
            (s1[j], s2[j]) = (a, b);
        }
        let n = rows as f64;
        // Divided by n, or multiplied by its exact reciprocal (the same bits, no division).
        match exact_reciprocal(n) {
            Some(r) => finish(k, s1, s2, mean, m2, #[inline(always)] |v| v * r),
            None => finish(k, s1, s2, mean, m2, #[inline(always)] |v| v / n),
        }
        constants(first, n, m2, scale, shift, inv);
        let (mh, rest) = narrow.split_at_mut(w);
        let (sc, sh) = rest.split_at_mut(w);
        let sh = &mut sh[..w];
        let mut all_fit = true;
        for j in 0..w {
            let (a, ok) = NarrowAffine::checked(WideAffine {
                mean: mean[j],
                scale: scale[j],
                shift: shift[j],
            });
            all_fit &= ok;
            (mh[j], sc[j], sh[j]) = (a.mean_hi, a.scale, a.shift);
        }
        let yp = y.as_mut_ptr();
        for r in 0..rows {
            let row = r * channels + first;
            let mut j = 0;
            while j < w8 {
                // SAFETY: row + j + 8 <= r·channels + first + w <= x.len() = y.len(), and
                // j + 8 <= w, the length of mh, sc, sh.
                unsafe {
                    let d = s.fsub(s.fload(xp.add(row + j)), s.fload(mh.as_ptr().add(j)));
                    let v = s.fmadd(d, s.fload(sc.as_ptr().add(j)), s.fload(sh.as_ptr().add(j)));
                    s.fstore(yp.add(row + j), v);
                }
                j += 8;
            }
            for j in w8..w {
                let a = NarrowAffine {
                    mean_hi: mh[j],
                    scale: sc[j],
                    shift: sh[j],
                };
                y[row + j] = T::from_f32(a.apply(x[row + j].to_f32()));
            }
        }
        if all_fit {
            return;
        }
        // The channels whose constants do not fit `f32`, again in `f64`.
        for j in 0..w {
            let a = WideAffine {
                mean: mean[j],
                scale: scale[j],
                shift: shift[j],
            };
            if !NarrowAffine::checked(a).1 {
                for r in 0..rows {
                    let i = r * channels + first + j;
                    y[i] = T::from_f64(a.apply(x[i].to_f64()));
                }
            }
        }
    }
}

/// mean = k + Σd/n and M2 = Σd² − (Σd)²/n (clamped at 0), per channel, with `div(v)` = v/n.
#[inline(always)]
fn finish(k: &[f64], s1: &[f64], s2: &[f64], mean: &mut [f64], m2: &mut [f64], div: impl Fn(f64) -> f64) {
    for j in 0..mean.len() {
        let a = s1[j];
        mean[j] = k[j] + div(a);
        let v = s2[j] - div(a * a);
        m2[j] = if v < 0.0 { 0.0 } else { v };
    }
}
