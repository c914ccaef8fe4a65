//! The process settings of a CPU run that the worker binary makes before its first tensor
//! operation (it also makes mimalloc its allocator: `#[global_allocator]` in `main.rs`). Public
//! so that the benchmarks measure the pipeline as the worker runs it.

/// Every setting below, in the order the worker binary makes them: call first in `main`,
/// before any tensor operation.
pub fn configure() {
    keep_freed_pages();
    small_pages();
    candle_elementwise_inline();
}

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_t`, which the bindings do not
/// name; the enum keeps retired options' places, and the test below checks the default).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the pages the allocator frees for reuse instead of returning them to the OS: a CPU
/// request allocates and frees tensors of a few MB per operation, and re-faulting (and the
/// kernel's zeroing of) returned pages took about a tenth of its time. The process keeps its
/// peak (one request's working set) mapped. An operator's `MIMALLOC_PURGE_DELAY` is kept.
#[allow(unsafe_code)]
pub fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: an FFI call with two integers, valid at any time (mimalloc reads the option at
    // each purge).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// mimalloc's switch for transparent huge pages, read when it starts (before `main`).
const MIMALLOC_ALLOW_THP: &str = "MIMALLOC_ALLOW_THP";

/// Backs the process's memory with 4 KiB pages instead of transparent huge pages, unless the
/// operator chose with `MIMALLOC_ALLOW_THP` (mimalloc applies that itself).
///
/// mimalloc asks for huge pages (`madvise`), and the kernel zeroes each 2 MiB page whole at
/// its first touch. Every tensor of a CPU request lands on fresh memory the first time, so a
/// one-shot `generate` (and a worker's first task) spends its start zeroing: on a virtual
/// machine that hands free memory back to its host, a profile of such a run showed a quarter
/// of its CPU time in the kernel's `clear_page_erms` under `do_huge_pmd_anonymous_page`, and
/// the face stage ran 5-7x slower than in a run straight after another. With small pages the
/// first touches cost the same cold or warm; once the pages are kept (`keep_freed_pages`),
/// later tasks fault nothing either way. Measured: benches/RESULTS.md. The setting is the
/// process's (`prctl(PR_SET_THP_DISABLE)`), inherited by the ffmpeg it starts.
pub fn small_pages() {
    if std::env::var_os(MIMALLOC_ALLOW_THP).is_some() {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(error = %e, "could not turn transparent huge pages off");
    }
}

/// The variable that sizes candle's own thread pool for its element-wise operations (read
/// once, at candle's first such operation).
const CANDLE_NUM_THREADS: &str = "CANDLE_NUM_THREADS";

/// Runs candle's element-wise operations on the calling thread unless the operator sized
/// candle's pool with `CANDLE_NUM_THREADS`. By default candle keeps one spinning thread per
/// rayon thread beside rayon's own pool; the pipeline already spreads its work over rayon
/// (whole UNet and VAE calls side by side, the kernels' rows), so on a CPU those extra
/// threads only competed for the same cores (about a twelfth of a small request's time:
/// spin-waits and the pool's lock). Must run before the first tensor operation.
pub fn candle_elementwise_inline() {
    if std::env::var_os(CANDLE_NUM_THREADS).is_none() {
        std::env::set_var(CANDLE_NUM_THREADS, "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's purge delay: its default (1000 ms in mimalloc 3, the
    /// version the bindings build) is what option 15 reads before `keep_freed_pages`, and -1
    /// after; with `MIMALLOC_PURGE_DELAY` set, the operator's value stays.
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: FFI reads of an integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            Err(_) => {
                assert_eq!(get(), 1000);
                keep_freed_pages();
                assert_eq!(get(), -1);
            }
            Ok(value) => {
                let before = get();
                keep_freed_pages();
                assert_eq!(get(), before, "MIMALLOC_PURGE_DELAY={value} was overridden");
            }
        }
    }

    /// Unless the operator set `MIMALLOC_ALLOW_THP`, the process's huge pages are off after
    /// `small_pages` (the kernel's own flag, read back).
    #[test]
    #[cfg(target_os = "linux")]
    fn small_pages_turns_the_process_flag_on() {
        let before = rustix::thread::transparent_huge_pages_are_disabled().unwrap();
        small_pages();
        let after = rustix::thread::transparent_huge_pages_are_disabled().unwrap();
        if std::env::var_os(MIMALLOC_ALLOW_THP).is_some() {
            assert_eq!(after, before, "MIMALLOC_ALLOW_THP is set: the flag stays");
        } else {
            assert!(after, "huge pages are still allowed after small_pages");
        }
    }

    /// Unset, candle's pool is made single-threaded; an operator's value is kept.
    #[test]
    fn candle_runs_inline_unless_the_operator_sized_its_pool() {
        std::env::remove_var(CANDLE_NUM_THREADS);
        candle_elementwise_inline();
        assert_eq!(std::env::var(CANDLE_NUM_THREADS).as_deref(), Ok("1"));
        std::env::set_var(CANDLE_NUM_THREADS, "3");
        candle_elementwise_inline();
        assert_eq!(std::env::var(CANDLE_NUM_THREADS).as_deref(), Ok("3"));
    }
}
