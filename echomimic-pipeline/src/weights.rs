//! Reading the official checkpoint files unchanged.
//!
//! * `.pth` / `.pt` / `.bin`: PyTorch zip pickles (`torch.save`, the default
//!   format since torch 1.6): Candle's pickle reader finds the tensors, and
//!   their data is read here in one pass over the archive. Legacy non-zip
//!   pickles are rejected with a clear error.
//! * `.safetensors`: read directly.
//!
//! A [`Checkpoint`] is a flat map of tensors that remembers which file each
//! tensor came from and which keys a network asked for. It plugs into
//! `candle_nn::VarBuilder` so that a missing or mis-shaped tensor fails with
//! the file *and* the key named, and the dtype is chosen at load time (tensors
//! are cast when fetched).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::error::{PipelineError, Result};

const ZIP_MAGIC: [u8; 4] = *b"PK\x03\x04";
/// Magic number at the start of a legacy (pre torch 1.6) pickle, after the
/// pickle protocol header.
const LEGACY_TORCH_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn weights_err(path: &Path, key: Option<&str>, message: impl Into<String>) -> PipelineError {
    PipelineError::Weights {
        path: path.to_path_buf(),
        key: key.map(str::to_owned),
        message: message.into(),
    }
}

/// The on-disk format of a weights file, decided from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// PyTorch zip pickle (`torch.save` default).
    TorchZip,
    /// safetensors.
    SafeTensors,
}

/// Sniffs the format of a weights file from its first bytes.
pub fn sniff_format(path: &Path) -> Result<FileFormat> {
    use std::io::Read;
    if !path.exists() {
        return Err(PipelineError::MissingFile(path.to_path_buf()));
    }
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let n = f.read(&mut head).map_err(|e| PipelineError::io(path, e))?;
    let head = &head[..n];
    if head.starts_with(&ZIP_MAGIC) {
        return Ok(FileFormat::TorchZip);
    }
    // Legacy torch pickles start with PROTO 2 (0x80 0x02) then the magic number as a long.
    if head.len() >= 2
        && head[0] == 0x80
        && head
            .windows(LEGACY_TORCH_MAGIC.len())
            .any(|w| w == LEGACY_TORCH_MAGIC)
    {
        return Err(weights_err(
            path,
            None,
            "legacy (non-zip) PyTorch pickle is not supported; re-save it with torch.save(obj, path) from torch >= 1.6",
        ));
    }
    // safetensors: u64 little-endian header length followed by '{'.
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(FileFormat::SafeTensors);
    }
    if head.first() == Some(&0x80) {
        return Err(weights_err(
            path,
            None,
            "plain pickle without the zip container is not supported; re-save it with torch.save from torch >= 1.6",
        ));
    }
    Err(weights_err(
        path,
        None,
        "not a PyTorch zip checkpoint nor a safetensors file (corrupt or truncated?)",
    ))
}

#[derive(Debug)]
struct Entry {
    tensor: Tensor,
    source: usize,
}

/// A set of named tensors read from one or more checkpoint files.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    entries: HashMap<String, Entry>,
    files: Vec<PathBuf>,
    requested: Mutex<BTreeSet<String>>,
    missing: Mutex<BTreeSet<String>>,
}

impl Checkpoint {
    /// Reads every tensor of a `.pth`/`.pt`/`.bin` zip pickle or a `.safetensors` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with_state_key(path, None)
    }

    /// Like [`Checkpoint::load`], for pickles that wrap the state dict in an outer
    /// dict (OpenAI Whisper's `{"dims": .., "model_state_dict": ..}`).
    pub fn load_with_state_key(path: impl AsRef<Path>, key: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        let tensors = read_file(path, key)?;
        if tensors.is_empty() {
            return Err(weights_err(path, None, "the file holds no tensors"));
        }
        let entries = tensors
            .into_iter()
            .map(|(k, tensor)| (k, Entry { tensor, source: 0 }))
            .collect();
        Ok(Self::from_parts(entries, vec![path.to_path_buf()]))
    }

    /// Builds a checkpoint from tensors already in memory (tests, converters).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, origin: impl Into<PathBuf>) -> Self {
        let entries = tensors
            .into_iter()
            .map(|(k, tensor)| (k, Entry { tensor, source: 0 }))
            .collect();
        Self::from_parts(entries, vec![origin.into()])
    }

    fn from_parts(entries: HashMap<String, Entry>, files: Vec<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                entries,
                files,
                requested: Mutex::new(BTreeSet::new()),
                missing: Mutex::new(BTreeSet::new()),
            }),
        }
    }

    /// Layers checkpoints: for each key the first checkpoint in `layers` that
    /// holds it wins (so pass the highest-priority file first).
    pub fn layered(layers: &[&Checkpoint]) -> Self {
        let mut files = Vec::new();
        let mut entries: HashMap<String, Entry> = HashMap::new();
        for layer in layers {
            let offset = files.len();
            files.extend(layer.inner.files.iter().cloned());
            for (k, e) in &layer.inner.entries {
                entries.entry(k.clone()).or_insert_with(|| Entry {
                    tensor: e.tensor.clone(),
                    source: e.source + offset,
                });
            }
        }
        Self::from_parts(entries, files)
    }

    /// A new checkpoint holding only the keys for which `keep` is true.
    pub fn filtered(&self, keep: impl Fn(&str) -> bool) -> Self {
        let entries = self
            .inner
            .entries
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, e)| {
                (
                    k.clone(),
                    Entry {
                        tensor: e.tensor.clone(),
                        source: e.source,
                    },
                )
            })
            .collect();
        Self::from_parts(entries, self.inner.files.clone())
    }

    /// The files this checkpoint was read from.
    pub fn files(&self) -> &[PathBuf] {
        &self.inner.files
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.inner.entries.is_empty()
    }

    /// True when `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.inner.entries.contains_key(key)
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<_> = self.inner.entries.keys().cloned().collect();
        k.sort();
        k
    }

    /// The raw tensor stored under `key` (original dtype, CPU).
    pub fn tensor(&self, key: &str) -> Option<&Tensor> {
        self.inner.entries.get(key).map(|e| &e.tensor)
    }

    /// The file `key` was read from.
    pub fn source_of(&self, key: &str) -> Option<&Path> {
        self.inner
            .entries
            .get(key)
            .map(|e| self.inner.files[e.source].as_path())
    }

    /// Fetches `key` cast to `dtype` on `device`, with an error naming the
    /// file(s) and the key when it is absent.
    pub fn get(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.get_impl(key, None, dtype, device)
            .map_err(|e| self.to_pipeline_error(key, e))
    }

    fn get_impl(
        &self,
        key: &str,
        shape: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut r) = self.inner.requested.lock() {
            r.insert(key.to_owned());
        }
        let Some(entry) = self.inner.entries.get(key) else {
            if let Ok(mut m) = self.inner.missing.lock() {
                m.insert(key.to_owned());
            }
            candle_core::bail!("weights {}: key `{key}` not found", self.describe_files());
        };
        if let Some(shape) = shape {
            if entry.tensor.shape() != shape {
                candle_core::bail!(
                    "weights {}: key `{key}` has shape {:?}, the model expects {:?}",
                    self.inner.files[entry.source].display(),
                    entry.tensor.dims(),
                    shape.dims()
                );
            }
        }
        entry.tensor.to_dtype(dtype)?.to_device(device)
    }

    fn describe_files(&self) -> String {
        self.inner
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn to_pipeline_error(&self, key: &str, e: candle_core::Error) -> PipelineError {
        let path = self
            .source_of(key)
            .map(Path::to_path_buf)
            .or_else(|| self.inner.files.first().cloned())
            .unwrap_or_default();
        weights_err(&path, Some(key), e.to_string())
    }

    /// A `VarBuilder` over this checkpoint that casts to `dtype` on `device`.
    ///
    /// Missing keys and shape mismatches fail with messages that name the
    /// file(s) and the key. After building a network, call
    /// [`Checkpoint::check_complete`] (every requested key present) and, for
    /// strictly loaded files, [`Checkpoint::unused_keys`].
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Keys some network asked for that no file holds.
    pub fn missing_keys(&self) -> Vec<String> {
        self.inner
            .missing
            .lock()
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Fails with [`PipelineError::MissingKeys`] when a network asked for a key
    /// that no file holds.
    pub fn check_complete(&self) -> Result<()> {
        let keys = self.missing_keys();
        if keys.is_empty() {
            Ok(())
        } else {
            Err(PipelineError::MissingKeys {
                files: self.inner.files.clone(),
                keys,
            })
        }
    }

    /// Keys present in the files that no network asked for (sorted).
    pub fn unused_keys(&self) -> Vec<String> {
        let requested = self
            .inner
            .requested
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        let mut out: Vec<_> = self
            .inner
            .entries
            .keys()
            .filter(|k| !requested.contains(*k))
            .cloned()
            .collect();
        out.sort();
        out
    }
}

impl candle_nn::var_builder::SimpleBackend for Checkpoint {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.get_impl(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.get_impl(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

fn read_file(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    match sniff_format(path)? {
        FileFormat::TorchZip => read_torch_zip(path, key),
        FileFormat::SafeTensors => {
            let map = candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| weights_err(path, None, format!("cannot read safetensors: {e}")))?;
            Ok(map.into_iter().collect())
        }
    }
}

/// Every tensor of a PyTorch zip checkpoint, read through one open archive.
///
/// Candle's `read_all_with_key` opens the file again and parses the archive's whole central
/// directory for each tensor, which is quadratic in the tensor count: the denoising UNet holds
/// over a thousand, and with the golden (tiny) weights that parsing was four fifths of the
/// loading time. Candle's pickle reader still decodes `data.pkl` (names, dtypes, layouts).
fn read_torch_zip(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    let bad = |e: &dyn std::fmt::Display| {
        weights_err(path, None, format!("cannot read PyTorch checkpoint: {e}"))
    };
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, key).map_err(|e| bad(&e))?;
    let file = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(&e))?;
    infos
        .into_iter()
        .map(|info| {
            let tensor = read_stored_tensor(&mut archive, &info).map_err(|e| {
                weights_err(
                    path,
                    Some(&info.name),
                    format!("storage record {}: {e}", info.path),
                )
            })?;
            Ok((info.name, tensor))
        })
        .collect()
}

/// One tensor's data from its storage record in the archive (`archive/data/<n>`), in the
/// layout the pickle gave it: C-contiguous, or Fortran-contiguous (a transposed tensor,
/// returned as the same strided view torch holds).
fn read_stored_tensor<R: std::io::Read + std::io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    info: &candle_core::pickle::TensorInfo,
) -> std::result::Result<Tensor, String> {
    use std::io::Read;
    let layout = &info.layout;
    let fortran = layout.is_fortran_contiguous();
    if !layout.is_contiguous() && !fortran {
        return Err(format!(
            "the tensor is stored with strides {:?} (only contiguous or transposed tensors are read)",
            layout.stride()
        ));
    }
    let mut record = archive.by_name(&info.path).map_err(|e| e.to_string())?;
    // Where the view starts in its storage: candle's pickle reader gives it in bytes (the
    // layouts test checks views at element offsets 3 and 5).
    let skip = layout.start_offset() as u64;
    let skipped = std::io::copy(&mut record.by_ref().take(skip), &mut std::io::sink())
        .map_err(|e| e.to_string())?;
    if skipped != skip {
        return Err(format!("it ends before the tensor's offset ({skip} bytes)"));
    }
    let count = layout.shape().elem_count();
    let dims: Vec<usize> = if fortran {
        layout.dims().iter().rev().copied().collect()
    } else {
        layout.dims().to_vec()
    };
    let tensor = match info.dtype {
        DType::F32 => read_values::<f32>(&mut record, count, &dims),
        DType::F16 => read_values::<half::f16>(&mut record, count, &dims),
        DType::BF16 => read_values::<half::bf16>(&mut record, count, &dims),
        DType::F64 => read_values::<f64>(&mut record, count, &dims),
        DType::U8 => read_values::<u8>(&mut record, count, &dims),
        DType::I64 => read_values::<i64>(&mut record, count, &dims),
        other => Err(format!("storage dtype {other:?} is not read")),
    }
    .map_err(|e| format!("{e} (reading {count} {:?} values)", info.dtype))?;
    if fortran && dims.len() > 1 {
        let reversed: Vec<usize> = (0..dims.len()).rev().collect();
        return tensor.permute(reversed).map_err(|e| e.to_string());
    }
    Ok(tensor)
}

/// `count` little-endian values straight into the tensor's buffer (no second copy).
fn read_values<T: candle_core::WithDType + bytemuck::Pod>(
    reader: &mut impl std::io::Read,
    count: usize,
    dims: &[usize],
) -> std::result::Result<Tensor, String> {
    let mut values = vec![T::zeroed(); count];
    reader
        .read_exact(bytemuck::cast_slice_mut(&mut values))
        .map_err(|e| e.to_string())?;
    #[cfg(target_endian = "big")]
    for v in &mut values {
        bytemuck::bytes_of_mut(v).reverse();
    }
    Tensor::from_vec(values, dims, &Device::Cpu).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden_weights() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/golden/public/pretrained_weights")
    }

    #[test]
    fn reads_official_pth_and_names_missing_keys() -> Result<()> {
        let ck = Checkpoint::load(golden_weights().join("face_locator.pth"))?;
        assert_eq!(ck.len(), 16);
        let vb = ck.var_builder(DType::F32, &Device::Cpu);
        let w = vb.get((32, 32, 3, 3), "conv_out.weight");
        assert!(w.is_ok(), "{w:?}");
        let err = vb.get(3, "no.such.key").unwrap_err().to_string();
        assert!(
            err.contains("face_locator.pth") && err.contains("no.such.key"),
            "{err}"
        );
        let err = ck.check_complete().unwrap_err().to_string();
        assert!(err.contains("no.such.key"), "{err}");
        Ok(())
    }

    fn layouts_checkpoint(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/checkpoints")
            .join(name)
    }

    /// Every way `torch.save` stores a weight (each storage dtype, views that start inside a
    /// shared storage, transposed tensors with and without an offset) reads back as torch
    /// holds it (`scripts/make-checkpoint-layouts.py`).
    #[test]
    fn reads_every_stored_layout_as_torch_holds_it() -> Result<()> {
        let path = layouts_checkpoint("layouts.pth");
        let tensors: HashMap<String, Tensor> = read_file(&path, None)?.into_iter().collect();
        assert_eq!(tensors.len(), 11, "{:?}", tensors.keys());
        let f32s = |name: &str| -> Vec<f32> {
            let t = &tensors[name];
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let dims = |name: &str| tensors[name].dims().to_vec();
        assert_eq!(f32s("plain"), [0., 1., 2., 3., 4., 5.]);
        assert_eq!(dims("plain"), [2, 3]);
        assert_eq!(tensors["f16"].dtype(), DType::F16);
        assert_eq!(f32s("f16"), [0.5, -1.25]);
        assert_eq!(tensors["bf16"].dtype(), DType::BF16);
        assert_eq!(f32s("bf16"), [1.5, -2.0]);
        assert_eq!(tensors["f64"].dtype(), DType::F64);
        assert_eq!(f32s("f64"), [2.25, -8.0]);
        assert_eq!(tensors["i64"].to_vec1::<i64>()?, [-3, 7]);
        assert_eq!(tensors["u8"].to_vec1::<u8>()?, [1, 255]);
        let grid: Vec<f32> = (0..20).map(|v| v as f32).collect();
        assert_eq!(f32s("grid"), grid);
        // views: storage offsets 5 and 3 (elements)
        assert_eq!(dims("grid_rows"), [2, 5]);
        assert_eq!(f32s("grid_rows"), grid[5..15]);
        assert_eq!(f32s("line_slice"), [3., 4., 5., 6.]);
        // transposed: same shape and values as torch's `.t()`
        assert_eq!(dims("transposed"), [3, 2]);
        assert_eq!(f32s("transposed"), [0., 3., 1., 4., 2., 5.]);
        assert_eq!(dims("grid_rows_t"), [5, 2]);
        assert_eq!(
            f32s("grid_rows_t"),
            [5., 10., 6., 11., 7., 12., 8., 13., 9., 14.]
        );
        Ok(())
    }

    /// A tensor stored neither contiguous nor transposed fails with the file and key named.
    #[test]
    fn strided_storage_is_refused_with_its_key() {
        let path = layouts_checkpoint("strided.pth");
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("strided.pth")
                && err.contains("every_second_column")
                && err.contains("strides"),
            "{err}"
        );
    }

    #[test]
    fn shape_mismatch_names_key_and_shapes() -> Result<()> {
        let ck = Checkpoint::load(golden_weights().join("face_locator.pth"))?;
        let vb = ck.var_builder(DType::F32, &Device::Cpu);
        let err = vb.get((1, 2), "conv_out.bias").unwrap_err().to_string();
        assert!(
            err.contains("conv_out.bias") && err.contains("[32]"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn rejects_garbage_and_missing_files() {
        let dir = std::env::temp_dir().join(format!("emw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.pth");
        std::fs::write(&bad, b"this is not a checkpoint").unwrap();
        let err = Checkpoint::load(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.pth"), "{err}");
        let legacy = dir.join("legacy.pth");
        let mut bytes = vec![0x80, 0x02, 0x8a, 0x0a];
        bytes.extend_from_slice(&LEGACY_TORCH_MAGIC);
        std::fs::write(&legacy, bytes).unwrap();
        let err = Checkpoint::load(&legacy).unwrap_err().to_string();
        assert!(err.contains("legacy"), "{err}");
        assert!(matches!(
            Checkpoint::load(dir.join("absent.pth")),
            Err(PipelineError::MissingFile(_))
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn layered_prefers_first_and_tracks_sources() -> Result<()> {
        let a = Checkpoint::from_tensors(
            HashMap::from([("x".to_string(), Tensor::new(&[1f32], &Device::Cpu)?)]),
            "a.pth",
        );
        let b = Checkpoint::from_tensors(
            HashMap::from([
                ("x".to_string(), Tensor::new(&[2f32], &Device::Cpu)?),
                ("y".to_string(), Tensor::new(&[3f32], &Device::Cpu)?),
            ]),
            "b.pth",
        );
        let c = Checkpoint::layered(&[&a, &b]);
        assert_eq!(
            c.get("x", DType::F32, &Device::Cpu)?.to_vec1::<f32>()?,
            vec![1.0]
        );
        assert_eq!(c.source_of("y"), Some(Path::new("b.pth")));
        Ok(())
    }
}
