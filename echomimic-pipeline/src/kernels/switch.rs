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

/// Whether the CPU kernels apply to `xs` (enabled, CPU device, f32).
pub(crate) fn use_cpu_kernel(xs: &Tensor) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && matches!(xs.device(), Device::Cpu)
        && xs.dtype() == DType::F32
}
