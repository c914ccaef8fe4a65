//! Choosing the compute device and the working dtype.
//!
//! The device is named by a short string (`cpu`, `cuda`, `cuda:1`, `auto`), as
//! it comes from a command line flag or an environment variable, and turned
//! into a candle [`Device`] by [`select_device`]:
//!
//! * `cpu` always works;
//! * `cuda` / `cuda:N` must work: a build without the `cuda` feature, or a
//!   machine where the GPU cannot be opened, is an error ([`PipelineError::Device`]);
//! * `auto` takes the default CUDA device when the build has CUDA support and
//!   the device opens, and otherwise runs on the CPU, saying why in the
//!   returned note.
//!
//! "The default CUDA device" (bare `cuda`, and `auto`) is device 0 for
//! [`select_device`]; a caller that owns a GPU index (the worker's `--gpu-id`)
//! passes it to [`select_device_for`]. This is the one place where `auto` and
//! bare `cuda` are resolved.
//!
//! A binary built with the `cuda` feature links the CUDA driver library
//! (`libcuda.so.1`) and the CUDA 13 runtime libraries at load time (candle
//! 0.11 fixes cudarc's `dynamic-linking` mode): on a machine without them it
//! does not start at all, so the `auto` fallback covers "driver present, GPU
//! absent or broken" but not "no driver installed". See `docs/cuda.md`.
//!
//! The default dtype follows the reference implementation: float32 on the
//! CPU, float16 on CUDA (`weight_dtype: fp16`); bfloat16 can be asked for.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, DeviceLocation};

use crate::error::{PipelineError, Result};

/// Which device to run on, as asked for by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// `cuda` without an ordinal: the caller's default CUDA device (see
    /// [`select_device_for`]); failing to open it is an error.
    DefaultCuda,
    /// The CUDA device with this ordinal; failing to open it is an error.
    Cuda(usize),
    /// The default CUDA device when this build and this machine can use it,
    /// else the CPU.
    #[default]
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = PipelineError;

    /// Parses `cpu`, `cuda` (the default CUDA device), `cuda:N` and `auto`, ignoring case
    /// and surrounding blanks.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let bad = |why: &str| {
            PipelineError::InvalidInput(format!(
                "device `{s}`: {why} (expected `cpu`, `cuda`, `cuda:N` or `auto`)"
            ))
        };
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::DefaultCuda),
            _ => match t.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n
                    .parse::<usize>()
                    .map(Self::Cuda)
                    .map_err(|_| bad("ordinal out of range")),
                Some(_) => Err(bad("the CUDA ordinal must be a non-negative integer")),
                None => Err(bad("unknown device")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::DefaultCuda => f.write_str("cuda"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// True when this build was compiled with the `cuda` feature.
pub const fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Opens the device `choice` names, with CUDA device 0 as the default CUDA
/// device ([`select_device_for`] with `0`).
pub fn select_device(choice: DeviceChoice) -> Result<(Device, String)> {
    select_device_for(choice, 0)
}

/// Opens the device `choice` names; bare `cuda` and `auto` mean CUDA device
/// `default_cuda`.
///
/// Returns the device and a one-line note for the log saying what was chosen
/// and, for [`DeviceChoice::Auto`], why the CPU was used when it was. An
/// explicit CUDA choice that cannot be honoured is an error, never a silent
/// fallback.
pub fn select_device_for(choice: DeviceChoice, default_cuda: usize) -> Result<(Device, String)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, "running on the CPU".to_string())),
        DeviceChoice::DefaultCuda => open_cuda(default_cuda),
        DeviceChoice::Cuda(ordinal) => open_cuda(ordinal),
        DeviceChoice::Auto => {
            if !cuda_compiled() {
                return Ok((
                    Device::Cpu,
                    "running on the CPU (this build has no CUDA support)".to_string(),
                ));
            }
            match Device::new_cuda(default_cuda) {
                Ok(device) => Ok((device, format!("running on CUDA device {default_cuda}"))),
                Err(e) => Ok((
                    Device::Cpu,
                    format!("no usable CUDA device {default_cuda} ({e}); falling back to the CPU"),
                )),
            }
        }
    }
}

fn open_cuda(ordinal: usize) -> Result<(Device, String)> {
    if !cuda_compiled() {
        return Err(PipelineError::Device {
            requested: format!("cuda:{ordinal}"),
            reason: "this build has no CUDA support (build with `--features cuda`)".to_string(),
            source: None,
        });
    }
    let device = Device::new_cuda(ordinal).map_err(|e| PipelineError::Device {
        requested: format!("cuda:{ordinal}"),
        reason: "the CUDA device could not be opened".to_string(),
        source: Some(Box::new(e)),
    })?;
    Ok((device, format!("running on CUDA device {ordinal}")))
}

/// Short name of a device for logs and reports: `cpu`, `cuda:0`, `metal:0`.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Bytes of the device's memory in use, over all processes (total minus free, as the driver
/// reports it), for a CUDA device; `None` on other devices or when the driver cannot say.
/// Cheap (one driver call); safe to call from any thread.
pub fn memory_in_use(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return u64::try_from(total.saturating_sub(free)).ok();
    }
    let _ = device;
    None
}

/// The working dtype when none is asked for: float16 on CUDA, as the
/// reference runs (`weight_dtype: fp16`), float32 elsewhere (candle's CPU
/// half-precision kernels are slow and the CPU path is the parity baseline).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    }
}

/// Parses a working dtype: `f32`/`fp32`/`float32`, `f16`/`fp16`/`float16`/`half`
/// or `bf16`/`bfloat16` (case-insensitive). Other dtypes are not valid
/// working dtypes for the networks.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(PipelineError::InvalidInput(format!(
            "dtype `{s}`: expected `f32`, `f16` or `bf16`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        let cases = [
            ("cpu", DeviceChoice::Cpu),
            (" CPU ", DeviceChoice::Cpu),
            ("auto", DeviceChoice::Auto),
            ("cuda", DeviceChoice::DefaultCuda),
            ("CUDA:0", DeviceChoice::Cuda(0)),
            ("cuda:1", DeviceChoice::Cuda(1)),
            ("cuda:12", DeviceChoice::Cuda(12)),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), want, "{s:?}");
        }
    }

    #[test]
    fn rejects_bad_device_names() {
        for s in [
            "",
            "gpu",
            "cuda:",
            "cuda:-1",
            "cuda:x",
            "cuda:1.0",
            "cuda 1",
            "cuda:+1",
            "metal",
            "cuda:99999999999999999999999",
        ] {
            let err = s.parse::<DeviceChoice>().unwrap_err();
            assert!(
                matches!(err, PipelineError::InvalidInput(_)),
                "{s:?}: {err}"
            );
            assert!(err.to_string().contains("expected `cpu`"), "{s:?}: {err}");
            assert!(err.is_bad_input());
        }
    }

    #[test]
    fn device_choice_display_round_trips() {
        for c in [
            DeviceChoice::Cpu,
            DeviceChoice::DefaultCuda,
            DeviceChoice::Cuda(3),
            DeviceChoice::Auto,
        ] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
        assert_eq!(DeviceChoice::default(), DeviceChoice::Auto);
    }

    #[test]
    fn cpu_is_always_available() {
        let (dev, note) = select_device(DeviceChoice::Cpu).unwrap();
        assert!(dev.is_cpu());
        assert_eq!(device_label(&dev), "cpu");
        assert!(note.contains("CPU"), "{note}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn explicit_cuda_without_the_feature_is_an_error() {
        let err = select_device(DeviceChoice::Cuda(0)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PipelineError::Device { .. }), "{msg}");
        assert!(msg.contains("cuda:0"), "{msg}");
        assert!(msg.contains("--features cuda"), "{msg}");
        assert!(!err.is_bad_input());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn auto_without_the_feature_falls_back_to_cpu() {
        let (dev, note) = select_device(DeviceChoice::Auto).unwrap();
        assert!(dev.is_cpu());
        assert!(note.contains("no CUDA support"), "{note}");
    }

    /// With the feature: `auto` either gets a GPU or says why it fell back,
    /// and an ordinal that cannot exist is an error, never a fallback.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_build_selects_or_reports() {
        let (dev, note) = select_device(DeviceChoice::Auto).unwrap();
        if dev.is_cuda() {
            assert_eq!(device_label(&dev), "cuda:0");
            assert_eq!(default_dtype(&dev), DType::F16);
            let (explicit, _) = select_device(DeviceChoice::Cuda(0)).unwrap();
            assert!(explicit.is_cuda());
        } else {
            assert!(note.contains("falling back to the CPU"), "{note}");
            assert!(select_device(DeviceChoice::Cuda(0)).is_err());
        }
        let err = select_device(DeviceChoice::Cuda(4096)).unwrap_err();
        assert!(
            matches!(
                err,
                PipelineError::Device {
                    source: Some(_),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn default_dtype_on_cpu_is_f32() {
        assert_eq!(default_dtype(&Device::Cpu), DType::F32);
    }

    #[test]
    fn parses_dtypes() {
        let cases = [
            ("f32", DType::F32),
            ("FP32", DType::F32),
            ("float32", DType::F32),
            ("f16", DType::F16),
            ("fp16", DType::F16),
            ("half", DType::F16),
            (" float16", DType::F16),
            ("bf16", DType::BF16),
            ("BFloat16", DType::BF16),
        ];
        for (s, want) in cases {
            assert_eq!(parse_dtype(s).unwrap(), want, "{s:?}");
        }
        for s in ["", "f64", "u8", "int8", "bf32", "fp8"] {
            let err = parse_dtype(s).unwrap_err();
            assert!(err.to_string().contains("expected `f32`"), "{s:?}: {err}");
        }
    }
}
