//! The measurement behind the saved state of the fused batch norm + ReLU (`ReluMask`): which
//! outputs were positive, recomputed in the backward from the saved output y (each backward pass
//! reads x, dy and y) or read from a mask of 1 bit per element that the forward wrote (x, dy and
//! 1/32 of a stream). Batch norm's plain backward (x and dy) is the floor of both; the forward
//! writes y alone, or y and the mask.
//!
//! The passes are written out here, both ways (the crate implements only the mask): the shape of
//! work of the kernels' rows plan (channels-last rows of 64 channels, per-channel constants,
//! `f32` lanes, `f64` sums, streaming stores of the outputs), on one thread, each timed on the
//! thread's CPU clock (time other processes take is not counted) as the minimum of many runs,
//! for a tensor in the last-level cache, one about its size and one well beyond it.
//!
//! ```text
//! cargo run --release -p batchnorm --example relu_saved_state
//! ```

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return passes::run();
        }
    }
    println!("this measurement needs an x86_64 CPU with AVX2 and FMA");
}

#[cfg(target_arch = "x86_64")]
mod passes {
    use std::arch::x86_64::*;

    /// Channels of a row.
    const C: usize = 64;

    /// Seconds of CPU time of the calling thread (wall-clock time off Linux).
    fn cpu_secs() -> f64 {
        #[cfg(target_os = "linux")]
        {
            #[repr(C)]
            struct Timespec {
                sec: i64,
                nsec: i64,
            }
            extern "C" {
                fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
            }
            const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
            let mut ts = Timespec { sec: 0, nsec: 0 };
            // SAFETY: `ts` is a valid timespec to write; the clock id is Linux's constant.
            unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.sec as f64 + ts.nsec as f64 * 1e-9
        }
        #[cfg(not(target_os = "linux"))]
        {
            use std::sync::OnceLock;
            static START: OnceLock<std::time::Instant> = OnceLock::new();
            START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64()
        }
    }

    /// Milliseconds of the fastest of at least 3 runs of `f` and 0.15 s of runs.
    fn best_ms(mut f: impl FnMut()) -> f64 {
        f();
        let (mut best, start, mut runs) = (f64::INFINITY, cpu_secs(), 0);
        while runs < 3 || cpu_secs() - start < 0.15 {
            let t = cpu_secs();
            f();
            best = best.min(cpu_secs() - t);
            runs += 1;
        }
        best * 1e3
    }

    /// A buffer of `n` `f32` starting at a 32-byte boundary (for streaming stores).
    struct Aligned {
        buf: Vec<f32>,
        at: usize,
        n: usize,
    }

    impl Aligned {
        fn new(n: usize) -> Aligned {
            let buf = vec![0.0f32; n + 8];
            let at = (32 - buf.as_ptr() as usize % 32) % 32 / 4;
            Aligned { buf, at, n }
        }
        fn get(&mut self) -> &mut [f32] {
            &mut self.buf[self.at..self.at + self.n]
        }
    }

    /// Where the upstream gradient comes from: dy itself, dy where y > 0, or dy where the mask's
    /// bit is set.
    #[derive(Clone, Copy)]
    enum Gate<'a> {
        Plain,
        Output(&'a [f32]),
        Mask(&'a [u8]),
    }

    /// The lanes whose bit is set in `bits`, all ones.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes_of(bits: u8) -> __m256 {
        let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(
            _mm256_and_si256(_mm256_set1_epi32(bits as i32), lanes),
            lanes,
        ))
    }

    /// The upstream gradient of elements i..i + 8.
    ///
    /// # Safety
    /// Elements i..i + 8 lie in `dy` (and in y, or the mask's bits).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn upstream(gate: Gate, dy: &[f32], i: usize) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe {
            let g = _mm256_loadu_ps(dy.as_ptr().add(i));
            match gate {
                Gate::Plain => g,
                Gate::Output(y) => {
                    let kept = _mm256_cmp_ps::<_CMP_NLE_UQ>(_mm256_loadu_ps(y.as_ptr().add(i)), _mm256_setzero_ps());
                    _mm256_and_ps(kept, g)
                }
                Gate::Mask(bits) => _mm256_and_ps(lanes_of(*bits.get_unchecked(i / 8)), g),
            }
        }
    }

    /// The forward's element-wise pass: y = relu((x − mean)·scale + shift), and the mask's bits
    /// when given (`x.len()` a multiple of 8 and of `C`; `y` 32-byte aligned).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward(x: &[f32], y: &mut [f32], mut bits: Option<&mut [u8]>, k: &[f32; 3 * C]) {
        let mut i = 0;
        while i < x.len() {
            let c = i % C;
            // SAFETY: i + 8 <= x.len() = y.len(), c + 8 <= C; y + i is 32-byte aligned.
            unsafe {
                let d = _mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(k.as_ptr().add(c)));
                let v = _mm256_fmadd_ps(
                    d,
                    _mm256_loadu_ps(k.as_ptr().add(C + c)),
                    _mm256_loadu_ps(k.as_ptr().add(2 * C + c)),
                );
                let kept = _mm256_cmp_ps::<_CMP_NLE_UQ>(v, _mm256_setzero_ps());
                _mm256_stream_ps(y.as_mut_ptr().add(i), _mm256_and_ps(kept, v));
                if let Some(b) = bits.as_deref_mut() {
                    b[i / 8] = _mm256_movemask_ps(kept) as u8;
                }
            }
            i += 8;
        }
        _mm_sfence();
    }

    /// The backward's first pass: Σ g and Σ g·(x − mean) per channel, in `f64`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sums(x: &[f32], dy: &[f32], gate: Gate, mean: &[f32; C], out: &mut [f64; 2 * C]) {
        let mut acc = [_mm256_setzero_pd(); C / 2];
        let mut i = 0;
        while i < x.len() {
            let c = i % C;
            // SAFETY: i + 8 <= x.len() = dy.len() (and y's, 8·the mask's), c + 8 <= C.
            unsafe {
                let g = upstream(gate, dy, i);
                let d = _mm256_sub_ps(
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    _mm256_loadu_ps(mean.as_ptr().add(c)),
                );
                for (h, (g, d)) in [
                    (_mm256_castps256_ps128(g), _mm256_castps256_ps128(d)),
                    (_mm256_extractf128_ps::<1>(g), _mm256_extractf128_ps::<1>(d)),
                ]
                .into_iter()
                .enumerate()
                {
                    let (g, d) = (_mm256_cvtps_pd(g), _mm256_cvtps_pd(d));
                    let j = c / 4 + h;
                    acc[j] = _mm256_add_pd(acc[j], g);
                    acc[C / 4 + j] = _mm256_fmadd_pd(g, d, acc[C / 4 + j]);
                }
            }
            i += 8;
        }
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: 4 lanes into out[4j..4j + 4], 4j + 4 <= 2C.
            unsafe { _mm256_storeu_pd(out.as_mut_ptr().add(4 * j), *a) };
        }
    }

    /// The backward's second pass: dx = k·(g − a − (x − mean)·b) per channel (`dx` 32-byte
    /// aligned).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn input_grad(x: &[f32], dy: &[f32], gate: Gate, k: &[f32; 4 * C], dx: &mut [f32]) {
        let mut i = 0;
        while i < x.len() {
            let c = i % C;
            // SAFETY: as in `sums`; dx + i is 32-byte aligned.
            unsafe {
                let g = upstream(gate, dy, i);
                let load = |j: usize| _mm256_loadu_ps(k.as_ptr().add(j * C + c));
                let d = _mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), load(0));
                let v = _mm256_fnmadd_ps(d, load(3), _mm256_fmadd_ps(g, load(1), load(2)));
                _mm256_stream_ps(dx.as_mut_ptr().add(i), v);
            }
            i += 8;
        }
        _mm_sfence();
    }

    pub fn run() {
        println!(
            "rows of {C} channels, f32, one thread, CPU time; forward = the element-wise pass, backward = both passes"
        );
        for rows in [6_272, 25_088, 200_704] {
            let n = rows * C;
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let dy: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 / 500.0 - 1.0).collect();
            let (mut y, mut dx, mut bits) = (Aligned::new(n), Aligned::new(n), vec![0u8; n / 8]);
            let (fk, bk, mean) = ([0.5f32; 3 * C], [0.1f32; 4 * C], [0.0f32; C]);
            // SAFETY (all blocks): the CPU has AVX2 and FMA (checked by `main`), n is a multiple
            // of 8 and of C, and the outputs are 32-byte aligned.
            let backward = |gate: Gate, dx: &mut [f32]| unsafe {
                let mut out = [0.0; 2 * C];
                sums(&x, &dy, gate, &mean, &mut out);
                std::hint::black_box(out);
                input_grad(&x, &dy, gate, &bk, dx);
            };
            unsafe { forward(&x, y.get(), Some(&mut bits), &fk) };
            let y = y.get().to_vec();
            let mut best = [f64::INFINITY; 5];
            // Rounds of all five, so that a change of load affects them alike.
            for _ in 0..12 {
                let mut yo = Aligned::new(n);
                let times = [
                    best_ms(|| unsafe { forward(&x, yo.get(), None, &fk) }),
                    best_ms(|| unsafe { forward(&x, yo.get(), Some(&mut bits), &fk) }),
                    best_ms(|| backward(Gate::Plain, dx.get())),
                    best_ms(|| backward(Gate::Output(&y), dx.get())),
                    best_ms(|| backward(Gate::Mask(&bits), dx.get())),
                ];
                for (b, t) in best.iter_mut().zip(times) {
                    *b = b.min(t);
                }
            }
            let [fwd_y, fwd_mask, bwd_plain, bwd_y, bwd_mask] = best;
            println!(
                "{:>6.1} MiB per tensor: forward y {fwd_y:.3} ms, y + mask {fwd_mask:.3} ms | backward plain {bwd_plain:.3} ms, \
                 from y {bwd_y:.3} ms, from the mask {bwd_mask:.3} ms | forward + backward from y {:.3} ms, with the mask {:.3} ms",
                (n * 4) as f64 / (1 << 20) as f64,
                fwd_y + bwd_y,
                fwd_mask + bwd_mask,
            );
        }
    }
}
