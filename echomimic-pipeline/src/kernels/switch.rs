//! The one switch of the CPU kernels and the rule that picks them (a leaf: every kernel
//! file asks it, and it asks none of them).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the CPU kernels on (the default) or off for the whole process; off,
/// every op takes the plain candle composition. For benchmarks that compare
/// both paths in one process, and for bisecting a numerical difference.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether attention scores of `q`'s dtype stay in it: half precision on a GPU (candle's
/// softmax kernel sums in f32; the f32 round trip made an H200's attention 40× slower than
/// torch's SDPA). On the CPU and in f32 the scores are soft-maxed in f32.
pub fn half_precision_scores(q: &Tensor) -> bool {
    matches!(q.dtype(), DType::F16 | DType::BF16) && !q.device().is_cpu()
}

/// Whether the CPU kernels are switched on ([`set_enabled`]).
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the CPU kernels apply to `xs` (enabled, CPU device, f32).
pub(crate) fn use_cpu_kernel(xs: &Tensor) -> bool {
    enabled() && matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32
}
