//! Masks over positions (masked batch norm: one `bool` per value of a channel, shared by all
//! channels) as the passes walk them: cut into segments (the planes of a channels-first tensor,
//! or the rows of a rows-plan unit) and each segment into [`Span`]s, and packed one bit per entry,
//! once per pass, for every channel.

use super::relu::{BitLayout, BitsAt, MaskBits};

/// Runs of fewer than this many entries that are off, between entries that are on, are taken
/// into the span around them: a reduction selects lane by lane there and an element-wise pass
/// gates its outputs with the mask's bits (writing +0.0 at those entries in the same stores),
/// rather than splitting its work around them (a split costs more than a few elements, and a
/// random mask is mostly such runs).
pub(crate) const MIN_SKIPPED_RUN: usize = 32;

/// Spare bytes after the packed bits: [`read_bits`] takes 8 bytes at any bit.
const SPARE_BYTES: usize = 8;

/// 8 entries of a mask (entry k in byte k, 0 or 1) as the bits of one byte, entry k at bit k.
#[inline(always)]
fn pack8(entries: &[bool]) -> u8 {
    debug_assert!(entries.len() <= 8);
    let mut word = [0u8; 8];
    for (w, &on) in word.iter_mut().zip(entries) {
        *w = on as u8;
    }
    // Each byte is 0 or 1: the product gathers byte k's bit at bit 56 + k, without carries.
    (u64::from_le_bytes(word).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8
}

/// The 56 bits of `bytes` from bit `bit` on, bit `bit` as bit 0 (`bytes` has [`SPARE_BYTES`]
/// after its last bit that may be read).
#[inline(always)]
fn read_bits(bytes: &[u8], bit: usize) -> u64 {
    let at = bit / 8;
    let word = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    (word >> (bit % 8)) & ((1 << 56) - 1)
}

/// The number of entries of bits `start..end` of `bytes`, from `start` on, equal to entry
/// `start` (`on`): a run, counted 56 bits at a time.
#[inline(always)]
fn run_bits(bytes: &[u8], start: usize, end: usize, on: bool) -> usize {
    let mut k = start;
    while k < end {
        let word = read_bits(bytes, k) ^ if on { (1 << 56) - 1 } else { 0 };
        let same = (word.trailing_zeros() as usize).min(56);
        k += same;
        if same < 56 {
            break;
        }
    }
    k.min(end) - start
}

/// Entries of a 56-bit window from which [`next_long_off`] finds the runs that start there.
const LONG_OFF_STEP: usize = 57 - MIN_SKIPPED_RUN;

/// The first entry from `k` on, before `end`, that starts a run of [`MIN_SKIPPED_RUN`] or more
/// entries that are off (the bits from bit `base` on of `bytes`: a segment; entry `k` on, entry
/// `end − 1` on), or `end` if none does; and whether an entry before it, from `k` on, is off.
/// 56 bits a window: a run of that length starts at the bits p whose MIN_SKIPPED_RUN bits from
/// p on are all off, found for the first [`LONG_OFF_STEP`] bits of the window at once (a
/// scattered mask has hundreds of short runs for each long one). A run found before `end` lies
/// before it (entry `end − 1` is on), so no bit beyond the segment is taken into a run.
#[inline(always)]
fn next_long_off(bytes: &[u8], base: usize, mut k: usize, end: usize) -> (usize, bool) {
    const _: () = assert!(MIN_SKIPPED_RUN >= 1 && LONG_OFF_STEP >= 1);
    let mut gaps = false;
    while k < end {
        let step = LONG_OFF_STEP.min(end - k);
        let below = (1u64 << step) - 1;
        let off = !read_bits(bytes, base + k) & ((1 << 56) - 1);
        // Bit p of `starts`: bits p..p + have of `off` all set, `have` doubled up to the length.
        let (mut starts, mut have) = (off, 1);
        while have < MIN_SKIPPED_RUN {
            let shift = have.min(MIN_SKIPPED_RUN - have);
            starts &= starts >> shift;
            have += shift;
        }
        let starts = starts & below;
        if starts != 0 {
            let p = starts.trailing_zeros() as usize;
            return (k + p, gaps || off & ((1 << p) - 1) != 0);
        }
        gaps |= off & below != 0;
        k += step;
    }
    (end, gaps)
}

/// Entries `start..end` of a segment: all off (`on` false), or starting and ending with entries
/// that are on, with only runs of fewer than [`MIN_SKIPPED_RUN`] entries that are off between
/// them (`gaps`: whether there is one). A segment's spans cover it, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: usize,
    pub end: usize,
    pub on: bool,
    pub gaps: bool,
}

/// A mask cut into consecutive segments of `len` entries (the last one may be shorter), each
/// segment into its [`Span`]s, and packed one bit per entry ([`MaskSpans::bits`]), so that the
/// passes over every channel read 1/8 of the bytes and count entries 56 at a time.
pub(crate) struct MaskSpans<'a> {
    mask: &'a [bool],
    len: usize,
    spans: Vec<Span>,
    /// Segment i's spans are `spans[at[i]..at[i + 1]]`.
    at: Vec<usize>,
    /// Segment i's entries from bit `i·layout.bytes·8` on (entry k at bit k % 8 of byte k / 8),
    /// [`SPARE_BYTES`] after the last segment.
    bits: Vec<u8>,
    layout: BitLayout,
}

impl<'a> MaskSpans<'a> {
    /// The spans of `mask` (`None`: no mask, no spans) in segments of `len` ≥ 1 entries.
    pub fn new(mask: Option<&'a [bool]>, len: usize) -> Option<Self> {
        let mask = mask?;
        let layout = BitLayout {
            len,
            bytes: len.div_ceil(8),
            segments: mask.len().div_ceil(len),
        };
        let mut bits = vec![0u8; layout.segments * layout.bytes + SPARE_BYTES];
        for (segment, out) in mask.chunks(len).zip(bits.chunks_mut(layout.bytes)) {
            for (entries, byte) in segment.chunks(8).zip(out.iter_mut()) {
                *byte = pack8(entries);
            }
        }
        let (mut spans, mut at) = (Vec::new(), vec![0]);
        let span = |start, end, on, gaps| Span { start, end, on, gaps };
        for (i, segment) in mask.chunks(len).enumerate() {
            let (base, n) = (i * layout.bytes * 8, segment.len());
            let run = |k: usize, on: bool| run_bits(&bits, base + k, base + n, on);
            // After the last entry that is on, one span that is off (none if it is the last).
            let bytes = &bits[base / 8..base / 8 + n.div_ceil(8)];
            let end_on = bytes
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |b| 8 * b + 8 - bytes[b].leading_zeros() as usize);
            let mut k = 0;
            if end_on > 0 && !segment[0] {
                k = run(0, false);
                spans.push(span(0, k, false, false));
            }
            // Each span that is on ends where a run of MIN_SKIPPED_RUN or more entries that are
            // off starts (a span that is off), or at `end_on`.
            while k < end_on {
                let (off, gaps) = next_long_off(&bits, base, k, end_on);
                spans.push(span(k, off, true, gaps));
                if off == end_on {
                    break;
                }
                k = off + run(off, false);
                spans.push(span(off, k, false, false));
            }
            if end_on < n {
                spans.push(span(end_on, n, false, false));
            }
            at.push(spans.len());
        }
        Some(MaskSpans {
            mask,
            len,
            spans,
            at,
            bits,
            layout,
        })
    }

    /// Number of segments.
    #[inline(always)]
    pub fn segments(&self) -> usize {
        self.at.len() - 1
    }

    /// Segment `i`'s entries and spans.
    #[inline(always)]
    pub fn segment(&self, i: usize) -> (&'a [bool], &[Span]) {
        let start = i * self.len;
        let end = (start + self.len).min(self.mask.len());
        (&self.mask[start..end], &self.spans[self.at[i]..self.at[i + 1]])
    }

    /// The mask's bits: entry k of segment i is element `i·len + k` of [`MaskBits::at`].
    #[inline(always)]
    pub fn bits(&self) -> MaskBits<'_> {
        MaskBits {
            bytes: &self.bits,
            layout: self.layout,
        }
    }

    /// The bits of entries `start..end` of segment `i`, entry `start` first.
    #[inline(always)]
    pub fn bits_at(&self, i: usize, start: usize, end: usize) -> BitsAt<'_> {
        self.bits().at(i * self.len + start, end - start)
    }

    /// The bits of the entries of segment `i` from `start` on, entry `start` first.
    #[inline(always)]
    pub fn span_bits(&self, i: usize, start: usize) -> SpanBits<'_> {
        assert!(start < self.len);
        let first = i * self.layout.bytes * 8 + start;
        SpanBits {
            from: &self.bits[first / 8..],
            shift: first % 8,
        }
    }
}

/// The bits of consecutive entries of a segment of a [`MaskSpans`], read up to 56 at a time.
#[derive(Clone, Copy)]
pub(crate) struct SpanBits<'a> {
    /// The mask's bits from the byte of the first entry on.
    from: &'a [u8],
    /// The first entry's bit in `from[0]`.
    shift: usize,
}

impl SpanBits<'_> {
    /// The bits of entries `i..i + 56` (entry `i` as bit 0) in the low 56 bits; entry `i`'s
    /// alone is `get56(i) & 1`.
    ///
    /// # Safety
    /// Entry `i` must lie in the segment (the 8 bytes from its byte on then lie in the bits,
    /// which have [`SPARE_BYTES`] after the last segment).
    #[inline(always)]
    pub unsafe fn get56(self, i: usize) -> u64 {
        let (at, shift) = ((self.shift + i) / 8, (self.shift + i) % 8);
        // SAFETY: bytes at..at + 8 lie in the buffer (caller's contract).
        u64::from_le(unsafe { (self.from.as_ptr().add(at) as *const u64).read_unaligned() }) >> shift
    }
}

/// Segment `i` of `spans` (`None`: no mask).
#[inline(always)]
pub(crate) fn segment<'s>(spans: &'s Option<MaskSpans>, i: usize) -> Option<(&'s [bool], &'s [Span])> {
    spans.as_ref().map(|s| s.segment(i))
}

/// Bits of `rows` rows of `width` elements each, row r's bits set where `rows[r]` is on, into
/// `out` (cleared first; one bit per element, element e at bit e % 8 of byte e / 8, with a
/// spare byte): a mask over the rows of a rows-plan tensor as the bits of its elements.
pub(crate) fn row_bits(rows: &[bool], width: usize, out: &mut Vec<u8>) {
    let n = rows.len() * width;
    out.clear();
    out.resize(n.div_ceil(8) + 1, 0);
    if width.is_multiple_of(8) {
        // Each row is whole bytes, all set or all clear: 8 bytes a store.
        for (row, &on) in out.chunks_exact_mut(width / 8).zip(rows) {
            let byte = 0u8.wrapping_sub(on as u8);
            let mut words = row.chunks_exact_mut(8);
            for word in &mut words {
                word.copy_from_slice(&[byte; 8]);
            }
            words.into_remainder().fill(byte);
        }
        return;
    }
    for (r, &on) in rows.iter().enumerate() {
        if !on {
            continue;
        }
        let (mut e, end) = (r * width, (r + 1) * width);
        // Up to a byte boundary, whole bytes, then the rest.
        while e < end && !e.is_multiple_of(8) {
            out[e / 8] |= 1 << (e % 8);
            e += 1;
        }
        let whole = (end - e) / 8;
        out[e / 8..e / 8 + whole].fill(0xff);
        e += whole * 8;
        while e < end {
            out[e / 8] |= 1 << (e % 8);
            e += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_of_runs() {
        let mut mask = vec![true; 40];
        mask.extend([false; 3]);
        mask.extend([true; 2]);
        mask.extend([false; 40]);
        mask.push(true);
        let spans = MaskSpans::new(Some(&mask), 80).unwrap();
        assert_eq!(spans.segments(), 2);
        let span = |start, end, on, gaps| Span { start, end, on, gaps };
        let (entries, first) = spans.segment(0);
        assert_eq!(entries.len(), 80);
        assert_eq!(first, &[span(0, 45, true, true), span(45, 80, false, false)]);
        let (entries, last) = spans.segment(1);
        assert_eq!(entries, &[false, false, false, false, false, true]);
        assert_eq!(last, &[span(0, 5, false, false), span(5, 6, true, false)]);
        // A short run that is off at the end of a segment is not a gap.
        let spans = MaskSpans::new(Some(&[true, false, true, false]), 4).unwrap();
        assert_eq!(spans.segment(0).1, &[span(0, 3, true, true), span(3, 4, false, false)]);
        assert!(MaskSpans::new(None, 4).is_none());
    }

    /// Spans and bits of random masks and long runs against a scan entry by entry, for
    /// segment lengths around the 56-bit words and the bytes.
    #[test]
    fn bits_and_spans_match_the_entries() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9);
        let mut next = move || rng.gen::<u64>();
        for &len in &[1, 7, 8, 9, 55, 56, 57, 100, 333, 1000] {
            for (density, scattered) in [0u64, 1, 8, 15, 16].into_iter().flat_map(|d| [(d, false), (d, true)]) {
                // Runs of random lengths (up to 80), on with probability density/16; scattered:
                // mostly runs of 1 to 3, some of 31 to 33 (about the shortest a span skips).
                let mut mask = Vec::new();
                while mask.len() < 4 * len + 3 {
                    let run = match (scattered, next() % 8) {
                        (false, _) | (true, 0) => next() % 80 + 1,
                        (true, 1) => 31 + next() % 3,
                        (true, _) => next() % 3 + 1,
                    };
                    let on = next() % 16 < density;
                    mask.extend(std::iter::repeat_n(on, run as usize));
                }
                mask.truncate(4 * len + 3);
                let spans = MaskSpans::new(Some(&mask), len).unwrap();
                let bits = spans.bits();
                for (i, segment) in mask.chunks(len).enumerate() {
                    let (entries, got) = spans.segment(i);
                    assert_eq!(entries, segment);
                    // The spans by the definition, entry by entry.
                    let mut want = Vec::new();
                    let mut k = 0;
                    while k < segment.len() {
                        let (start, on) = (k, segment[k]);
                        let same = |k: usize, v: bool| segment[k..].iter().take_while(|&&e| e == v).count();
                        k += same(k, on);
                        let mut gaps = false;
                        while on && k < segment.len() {
                            let off = same(k, false);
                            if off >= MIN_SKIPPED_RUN || k + off == segment.len() {
                                break;
                            }
                            gaps = true;
                            k += off + same(k + off, true);
                        }
                        want.push(Span {
                            start,
                            end: k,
                            on,
                            gaps,
                        });
                    }
                    assert_eq!(got, &want[..], "len {len}, segment {i}");
                    for a in 0..segment.len() {
                        let at = spans.bits_at(i, a, segment.len());
                        for (e, &on) in segment[a..].iter().enumerate() {
                            // SAFETY: element e of the entries `at` was made for.
                            assert_eq!(unsafe { at.get1(e) }, on);
                        }
                        let from = spans.span_bits(i, a);
                        for (e, &on) in segment[a..].iter().enumerate() {
                            // SAFETY: entry a + e lies in the segment.
                            let word = unsafe { from.get56(e) };
                            assert_eq!(word & 1 == 1, on);
                            let eight = word as u8;
                            let want = (0..8).filter(|&b| segment.get(a + e + b) == Some(&true));
                            let want = want.fold(0u8, |acc, b| acc | 1 << b);
                            let beyond = (segment.len() - a - e).min(8);
                            let seen = (eight as u16 & ((1 << beyond) - 1)) as u8;
                            assert_eq!(seen, want, "len {len}, segment {i}, entry {}", a + e);
                        }
                    }
                    assert_eq!(bits.layout.len, len);
                }
            }
        }
    }

    #[test]
    fn row_bits_repeat_each_row() {
        let rows = [true, false, true, true, false, false, true];
        let mut out = vec![0xaa; 3];
        for width in [1, 3, 8, 13, 16, 24, 64, 72] {
            row_bits(&rows, width, &mut out);
            assert_eq!(out.len(), (rows.len() * width).div_ceil(8) + 1);
            for e in 0..rows.len() * width + 8 {
                let bit = out.get(e / 8).is_some_and(|b| b >> (e % 8) & 1 == 1);
                assert_eq!(
                    bit,
                    rows.get(e / width).copied().unwrap_or(false),
                    "width {width}, element {e}"
                );
            }
        }
    }
}
