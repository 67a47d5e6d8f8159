//! Masks over positions (masked batch norm: one `bool` per value of a channel, shared by all
//! channels) as the passes walk them: cut into segments (the planes of a channels-first tensor,
//! or the rows of a rows-plan unit) and each segment into [`Span`]s, once per pass, for every
//! channel.

/// Runs of fewer than this many entries that are off, between entries that are on, are taken
/// into the span around them: a reduction selects lane by lane there and an element-wise pass
/// computes them with their neighbours and then overwrites them with +0.0, rather than
/// splitting its work around them (a split costs more than a few elements, and a random mask is
/// mostly such runs).
pub(crate) const MIN_SKIPPED_RUN: usize = 32;

/// The number of leading entries of `mask` equal to its first one (0 for an empty mask), compared
/// 8 at a time.
#[inline]
pub(crate) fn leading_run(mask: &[bool]) -> usize {
    let Some(&first) = mask.first() else {
        return 0;
    };
    // SAFETY: a `bool` is one byte holding 0 or 1, a valid `u8`.
    let bytes = unsafe { std::slice::from_raw_parts(mask.as_ptr().cast::<u8>(), mask.len()) };
    let word = u64::from_ne_bytes([first as u8; 8]);
    let whole = bytes
        .chunks_exact(8)
        .take_while(|c| u64::from_ne_bytes((*c).try_into().expect("8 bytes")) == word)
        .count();
    let rest = &bytes[whole * 8..];
    whole * 8 + rest.iter().position(|&b| b != first as u8).unwrap_or(rest.len())
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
/// segment into its [`Span`]s.
pub(crate) struct MaskSpans<'a> {
    mask: &'a [bool],
    len: usize,
    spans: Vec<Span>,
    /// Segment i's spans are `spans[at[i]..at[i + 1]]`.
    at: Vec<usize>,
}

impl<'a> MaskSpans<'a> {
    /// The spans of `mask` (`None`: no mask, no spans) in segments of `len` ≥ 1 entries.
    pub fn new(mask: Option<&'a [bool]>, len: usize) -> Option<Self> {
        let mask = mask?;
        let (mut spans, mut at) = (Vec::new(), vec![0]);
        for segment in mask.chunks(len) {
            let mut k = 0;
            while k < segment.len() {
                let (start, on) = (k, segment[k]);
                k += leading_run(&segment[k..]);
                let mut gaps = false;
                while on && k < segment.len() {
                    let off = leading_run(&segment[k..]);
                    if off >= MIN_SKIPPED_RUN || k + off == segment.len() {
                        break;
                    }
                    gaps = true;
                    k += off;
                    k += leading_run(&segment[k..]);
                }
                spans.push(Span {
                    start,
                    end: k,
                    on,
                    gaps,
                });
            }
            at.push(spans.len());
        }
        Some(MaskSpans { mask, len, spans, at })
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
}

/// Segment `i` of `spans` (`None`: no mask).
#[inline(always)]
pub(crate) fn segment<'s>(spans: &'s Option<MaskSpans>, i: usize) -> Option<(&'s [bool], &'s [Span])> {
    spans.as_ref().map(|s| s.segment(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_runs_and_spans() {
        let mut mask = vec![true; 40];
        mask.extend([false; 3]);
        mask.extend([true; 2]);
        mask.extend([false; 40]);
        mask.push(true);
        assert_eq!(leading_run(&mask), 40);
        assert_eq!(leading_run(&mask[40..]), 3);
        assert_eq!(leading_run(&mask[45..]), 40);
        assert_eq!(leading_run(&[]), 0);
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
}
