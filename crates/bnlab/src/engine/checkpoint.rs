//! Checkpoints of a training run in the safetensors format.
//!
//! A [`Checkpoint`] holds everything needed to continue training a [`Sequential`] network bit for
//! bit: every parameter, every layer's non-learnable [`super::State`] (batch norm's running
//! statistics and Algorithm 2's accumulators, dropout's generator position), the optimizer's
//! momentum buffers, and the run's [`Progress`] (step, seed, experiment counters). The data order
//! needs no generator state: [`crate::data::EpochShuffler`] computes the batch of any step from
//! the seed and the step alone, so a resumed run (with any number of processes) draws the same
//! batches. The run's settings travel as JSON in the file's metadata.
//!
//! Tensor names (all 1-D, little-endian):
//! - `layers.{i}.{kind}.{param}`: parameter `param` (`weight`, `bias`, `gamma`, `beta`) of layer
//!   `i`, whose kind is the alphabetic start of its name (`linear`, `batchnorm`, …), `F32`;
//! - `layers.{i}.{kind}.{state}`: layer state (`running_mean` `F32`, `population_mean` `F64`,
//!   `num_batches_tracked` `U64`, …);
//! - `optimizer.velocity.layers.{i}.{kind}.{param}`: SGD momentum buffers, `F32` (present when the
//!   metadata `optimizer` is `sgd-velocity`);
//! - `progress.step`, `progress.seed` (`U64`, one element) and `progress.values.{key}` (`F64`).
//!
//! Metadata: `format` = `bnlab-checkpoint`, `format_version` = `1`, `experiment`, `variant`,
//! `architecture` (layer names with parameter and state sizes: a checkpoint of another network is
//! rejected before any tensor is read), `optimizer`, `settings` (JSON).
//!
//! Saving refuses non-finite values, so a diverged run can never overwrite a good checkpoint; and
//! [`Checkpoint::restore`] checks every tensor before it changes anything.

use super::{Sequential, Sgd, StateValue};
use crate::atomic::write_atomic;
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The `format` metadata value of a bnlab checkpoint.
pub const FORMAT: &str = "bnlab-checkpoint";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest checkpoint file read (4 GiB); the paper MLP's is about 1 MB.
pub const MAX_CHECKPOINT_BYTES: u64 = 1 << 32;

const OPT_VELOCITY: &str = "sgd-velocity";
const OPT_NONE: &str = "sgd-none";

/// Why a checkpoint could not be written, read or applied. Every message is one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("{}: cannot write: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_CHECKPOINT_BYTES`].
    #[error("{}: too large: {size} bytes exceeds the limit of {MAX_CHECKPOINT_BYTES}", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The bytes are not a well-formed safetensors file (truncated, corrupt header, bad offsets).
    #[error("not a valid safetensors file (truncated or corrupt): {0}")]
    NotSafetensors(String),
    /// A safetensors file, but not one written by bnlab.
    #[error("not a bnlab checkpoint: {0}")]
    NotACheckpoint(String),
    /// Written by another version of the format.
    #[error("checkpoint format version `{found}` is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: String,
    },
    /// A metadata entry is missing or malformed.
    #[error("checkpoint metadata `{key}` is missing or invalid: {detail}")]
    BadMetadata {
        /// The metadata key.
        key: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The checkpoint is of another network.
    #[error("checkpoint is of another architecture: it holds `{found}` but this network is `{expected}`")]
    Architecture {
        /// This network's description.
        expected: String,
        /// The checkpoint's.
        found: String,
    },
    /// A tensor the network needs is absent.
    #[error("checkpoint lacks tensor `{name}`")]
    MissingTensor {
        /// The tensor name.
        name: String,
    },
    /// A tensor the network does not have.
    #[error("checkpoint has unexpected tensor `{name}`")]
    UnexpectedTensor {
        /// The tensor name.
        name: String,
    },
    /// A tensor of the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        /// The tensor name.
        name: String,
        /// The shape the network needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor of the wrong element type.
    #[error("tensor `{name}` has dtype {found}, expected {expected}")]
    WrongDtype {
        /// The tensor name.
        name: String,
        /// The dtype the network needs.
        expected: String,
        /// The dtype in the file.
        found: String,
    },
    /// NaN or infinity in a tensor (refused when saving and when loading).
    #[error("tensor `{name}` holds a non-finite value (NaN or infinity)")]
    NonFinite {
        /// The tensor name.
        name: String,
    },
    /// The optimizer's state does not match the network's parameters.
    #[error("optimizer state does not match the parameters: {0}")]
    Optimizer(String),
    /// A layer refused a state tensor.
    #[error("cannot restore layer state: {0}")]
    LayerState(String),
    /// The safetensors encoder failed.
    #[error("cannot encode the checkpoint: {0}")]
    Encode(String),
}

/// Where a run stands: the step reached, the seed, and experiment-specific counters (loss sums,
/// best accuracy, seconds spent) that the loop needs to continue its metrics exactly.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// Training steps completed.
    pub step: u64,
    /// Seed of initialization and data order.
    pub seed: u64,
    /// Named counters, each a finite `f64` (names: ASCII letters, digits, `_`).
    pub values: BTreeMap<String, f64>,
}

/// One tensor as stored: element type, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_tensor(v: &[f32]) -> Tensor {
    Tensor {
        dtype: Dtype::F32,
        shape: vec![v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn f64_tensor(v: &[f64]) -> Tensor {
    Tensor {
        dtype: Dtype::F64,
        shape: vec![v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn u64_tensor(v: &[u64]) -> Tensor {
    Tensor {
        dtype: Dtype::U64,
        shape: vec![v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn state_tensor(v: &StateValue) -> Tensor {
    match v {
        StateValue::F32(v) => f32_tensor(v),
        StateValue::F64(v) => f64_tensor(v),
        StateValue::U64(v) => u64_tensor(v),
    }
}

impl Tensor {
    fn f32s(&self) -> Vec<f32> {
        self.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    }
    fn f64s(&self) -> Vec<f64> {
        self.data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }
    fn u64s(&self) -> Vec<u64> {
        self.data
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }
    /// Whether every float is finite (integers always are).
    fn finite(&self) -> bool {
        match self.dtype {
            Dtype::F32 => self.f32s().iter().all(|v| v.is_finite()),
            Dtype::F64 => self.f64s().iter().all(|v| v.is_finite()),
            _ => true,
        }
    }
    fn state_value(&self) -> Option<StateValue> {
        match self.dtype {
            Dtype::F32 => Some(StateValue::F32(self.f32s())),
            Dtype::F64 => Some(StateValue::F64(self.f64s())),
            Dtype::U64 => Some(StateValue::U64(self.u64s())),
            _ => None,
        }
    }
}

fn dtype_of(v: &StateValue) -> Dtype {
    match v {
        StateValue::F32(_) => Dtype::F32,
        StateValue::F64(_) => Dtype::F64,
        StateValue::U64(_) => Dtype::U64,
    }
}

/// What a tensor of the network is, for restoring it.
enum Slot {
    /// Parameter number `index` of the network (in [`Sequential::params`] order).
    Param { index: usize },
    /// State `name` of layer `layer`.
    State { layer: usize, name: &'static str },
    /// Momentum buffer of parameter `index`.
    Velocity { index: usize },
}

/// A tensor the network has: name, element type, length, and what it restores.
struct Entry {
    name: String,
    dtype: Dtype,
    len: usize,
    slot: Slot,
}

/// The alphabetic start of a layer name (`linear784x100` → `linear`).
fn kind(name: &str) -> String {
    let k: String = name
        .chars()
        .take_while(|c| c.is_ascii_alphabetic() || *c == '_')
        .collect();
    if k.is_empty() {
        "layer".into()
    } else {
        k
    }
}

/// The tensors of `net` (and of an optimizer holding velocity, when `velocity`) in a fixed order,
/// plus the architecture description.
fn entries(net: &mut Sequential, velocity: bool) -> (Vec<Entry>, String) {
    let mut out = Vec::new();
    let mut arch = Vec::new();
    let mut index = 0;
    for (i, layer) in net.layers.iter_mut().enumerate() {
        let (name, state) = (layer.name(), layer.state());
        let prefix = format!("layers.{i}.{}", kind(&name));
        let mut parts = Vec::new();
        for p in layer.params() {
            parts.push(format!("{}[{}]", p.name, p.value.len()));
            out.push(Entry {
                name: format!("{prefix}.{}", p.name),
                dtype: Dtype::F32,
                len: p.value.len(),
                slot: Slot::Param { index },
            });
            index += 1;
        }
        for s in state {
            parts.push(format!("{}:{}[{}]", s.name, s.value.dtype_name(), s.value.len()));
            out.push(Entry {
                name: format!("{prefix}.{}", s.name),
                dtype: dtype_of(&s.value),
                len: s.value.len(),
                slot: Slot::State { layer: i, name: s.name },
            });
        }
        arch.push(format!("{i}:{name}({})", parts.join(",")));
    }
    if velocity {
        let params: Vec<(String, usize, usize)> = out
            .iter()
            .filter_map(|e| match e.slot {
                Slot::Param { index } => Some((e.name.clone(), e.len, index)),
                _ => None,
            })
            .collect();
        for (name, len, index) in params {
            out.push(Entry {
                name: format!("optimizer.velocity.{name}"),
                dtype: Dtype::F32,
                len,
                slot: Slot::Velocity { index },
            });
        }
    }
    (out, arch.join(" "))
}

/// The architecture description of `net` as stored in a checkpoint's `architecture` metadata:
/// each layer's index, name, parameter sizes and state sizes.
pub fn architecture(net: &mut Sequential) -> String {
    entries(net, false).1
}

/// A training run's state, ready to be saved, or read back from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The experiment that wrote it (e.g. `paper-mlp`).
    pub experiment: String,
    /// Which network of the experiment (e.g. `bn`).
    pub variant: String,
    /// The network's description (see [`architecture`]).
    pub architecture: String,
    /// The run's settings.
    pub settings: serde_json::Value,
    /// Step, seed and counters.
    pub progress: Progress,
    /// Whether momentum buffers are stored.
    velocity: bool,
    tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Captures `net`, `opt`'s momentum buffers and `progress`.
    ///
    /// Rejects ([`CheckpointError::NonFinite`]) any NaN or infinite parameter, state, momentum
    /// or progress value, so a diverged state is never saved; and an optimizer whose buffers do not
    /// match the parameters ([`CheckpointError::Optimizer`]).
    pub fn capture(
        net: &mut Sequential,
        opt: &Sgd,
        progress: &Progress,
        experiment: &str,
        variant: &str,
        settings: serde_json::Value,
    ) -> Result<Checkpoint, CheckpointError> {
        let velocity = !opt.velocity.is_empty();
        let (entries, architecture) = entries(net, velocity);
        let mut params: Vec<Vec<f32>> = net.params().iter().map(|p| p.value.to_vec()).collect();
        let mut states: Vec<Vec<super::State>> = net.layers.iter().map(|l| l.state()).collect();
        if velocity {
            if opt.velocity.len() != params.len() {
                return Err(CheckpointError::Optimizer(format!(
                    "{} momentum buffers for {} parameters",
                    opt.velocity.len(),
                    params.len()
                )));
            }
            for (v, p) in opt.velocity.iter().zip(&params) {
                if v.len() != p.len() {
                    return Err(CheckpointError::Optimizer(format!(
                        "a momentum buffer of {} values for a parameter of {}",
                        v.len(),
                        p.len()
                    )));
                }
            }
        }
        let mut tensors = BTreeMap::new();
        for e in entries {
            let t = match e.slot {
                Slot::Param { index } => f32_tensor(&std::mem::take(&mut params[index])),
                Slot::Velocity { index } => f32_tensor(&opt.velocity[index]),
                Slot::State { layer, name } => {
                    let s = states[layer]
                        .iter_mut()
                        .find(|s| s.name == name)
                        .expect("state names come from the same layer");
                    state_tensor(&s.value)
                }
            };
            tensors.insert(e.name, t);
        }
        tensors.insert("progress.step".into(), u64_tensor(&[progress.step]));
        tensors.insert("progress.seed".into(), u64_tensor(&[progress.seed]));
        for (k, v) in &progress.values {
            tensors.insert(format!("progress.values.{k}"), f64_tensor(&[*v]));
        }
        if let Some((name, _)) = tensors.iter().find(|(_, t)| !t.finite()) {
            return Err(CheckpointError::NonFinite { name: name.clone() });
        }
        Ok(Checkpoint {
            experiment: experiment.into(),
            variant: variant.into(),
            architecture,
            settings,
            progress: progress.clone(),
            velocity,
            tensors,
        })
    }

    /// Loads the saved state into `net` and `opt`.
    ///
    /// Rejects, before changing anything: another architecture ([`CheckpointError::Architecture`]),
    /// a missing tensor, an unexpected one, a wrong dtype or shape, a non-finite value, or a state
    /// tensor a layer refuses.
    pub fn restore(&self, net: &mut Sequential, opt: &mut Sgd) -> Result<(), CheckpointError> {
        let (entries, expected) = entries(net, self.velocity);
        if expected != self.architecture {
            return Err(CheckpointError::Architecture {
                expected,
                found: self.architecture.clone(),
            });
        }
        for e in &entries {
            let t = self
                .tensors
                .get(&e.name)
                .ok_or_else(|| CheckpointError::MissingTensor { name: e.name.clone() })?;
            if t.dtype != e.dtype {
                return Err(CheckpointError::WrongDtype {
                    name: e.name.clone(),
                    expected: e.dtype.to_string(),
                    found: t.dtype.to_string(),
                });
            }
            if t.shape != [e.len] {
                return Err(CheckpointError::WrongShape {
                    name: e.name.clone(),
                    expected: vec![e.len],
                    found: t.shape.clone(),
                });
            }
            if !t.finite() {
                return Err(CheckpointError::NonFinite { name: e.name.clone() });
            }
        }
        let known = |n: &str| n.starts_with("progress.") || entries.iter().any(|e| e.name == n);
        if let Some(name) = self.tensors.keys().find(|n| !known(n)) {
            return Err(CheckpointError::UnexpectedTensor { name: name.clone() });
        }
        let mut velocity = Vec::new();
        for e in &entries {
            let t = &self.tensors[&e.name];
            match e.slot {
                Slot::Param { .. } | Slot::Velocity { .. } => {}
                Slot::State { layer, name } => {
                    let value = t.state_value().expect("dtype checked against the layer's");
                    net.layers[layer]
                        .set_state(name, value)
                        .map_err(|err| CheckpointError::LayerState(format!("{}: {err:#}", e.name)))?;
                }
            }
            if let Slot::Velocity { .. } = e.slot {
                velocity.push(t.f32s());
            }
        }
        let params = entries.iter().filter(|e| matches!(e.slot, Slot::Param { .. }));
        for (p, e) in net.params().into_iter().zip(params) {
            p.value.copy_from_slice(&self.tensors[&e.name].f32s());
        }
        opt.velocity = velocity;
        Ok(())
    }

    /// The file contents: safetensors with the metadata described in the module docs.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CheckpointError> {
        let settings = serde_json::to_string(&self.settings).map_err(|e| CheckpointError::Encode(e.to_string()))?;
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("experiment", self.experiment.clone()),
            ("variant", self.variant.clone()),
            ("architecture", self.architecture.clone()),
            (
                "optimizer",
                if self.velocity { OPT_VELOCITY } else { OPT_NONE }.to_string(),
            ),
            ("settings", settings),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(self.tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| CheckpointError::Encode(e.to_string()))
    }

    /// Parses a checkpoint file's contents.
    ///
    /// Rejects: bytes that are not a complete safetensors file ([`CheckpointError::NotSafetensors`]:
    /// truncated, header too large, offsets outside the data), a safetensors file without bnlab's
    /// metadata ([`CheckpointError::NotACheckpoint`]), another format version, missing or invalid
    /// metadata (settings that are not JSON), tensors of a dtype other than F32, F64 and U64, and
    /// missing or malformed `progress.*` tensors. Tensors are checked against a network only by
    /// [`Checkpoint::restore`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        let not_st = |e: safetensors::SafeTensorError| CheckpointError::NotSafetensors(e.to_string());
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_st)?;
        let st = SafeTensors::deserialize(bytes).map_err(not_st)?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| CheckpointError::NotACheckpoint("the file has no metadata".into()))?;
        let get = |key: &'static str| {
            meta.get(key).ok_or(CheckpointError::BadMetadata {
                key,
                detail: "missing".into(),
            })
        };
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => {
                return Err(CheckpointError::NotACheckpoint(format!(
                    "metadata `format` is `{f}`, expected `{FORMAT}`"
                )))
            }
            None => return Err(CheckpointError::NotACheckpoint("no `format` metadata".into())),
        }
        let version = get("format_version")?;
        if version.parse::<u32>() != Ok(FORMAT_VERSION) {
            return Err(CheckpointError::UnsupportedVersion { found: version.clone() });
        }
        let settings = serde_json::from_str(get("settings")?).map_err(|e| CheckpointError::BadMetadata {
            key: "settings",
            detail: e.to_string(),
        })?;
        let velocity = match get("optimizer")?.as_str() {
            OPT_VELOCITY => true,
            OPT_NONE => false,
            other => {
                return Err(CheckpointError::BadMetadata {
                    key: "optimizer",
                    detail: format!("`{other}` is neither `{OPT_VELOCITY}` nor `{OPT_NONE}`"),
                })
            }
        };
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let dtype = view.dtype();
            if !matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::U64) {
                return Err(CheckpointError::WrongDtype {
                    name: name.into(),
                    expected: "F32, F64 or U64".into(),
                    found: dtype.to_string(),
                });
            }
            let elements = view.shape().iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bytes = elements.and_then(|n| n.checked_mul(dtype.bitsize() / 8));
            if bytes != Some(view.data().len()) {
                return Err(CheckpointError::NotSafetensors(format!(
                    "tensor `{name}` of shape {:?} has {} bytes",
                    view.shape(),
                    view.data().len()
                )));
            }
            tensors.insert(
                name.to_string(),
                Tensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            );
        }
        let scalar = |name: &str, dtype: Dtype| -> Result<&Tensor, CheckpointError> {
            let t = tensors
                .get(name)
                .ok_or_else(|| CheckpointError::MissingTensor { name: name.into() })?;
            if t.dtype != dtype {
                return Err(CheckpointError::WrongDtype {
                    name: name.into(),
                    expected: dtype.to_string(),
                    found: t.dtype.to_string(),
                });
            }
            if t.shape != [1] {
                return Err(CheckpointError::WrongShape {
                    name: name.into(),
                    expected: vec![1],
                    found: t.shape.clone(),
                });
            }
            Ok(t)
        };
        let mut progress = Progress {
            step: scalar("progress.step", Dtype::U64)?.u64s()[0],
            seed: scalar("progress.seed", Dtype::U64)?.u64s()[0],
            values: BTreeMap::new(),
        };
        for name in tensors.keys() {
            if let Some(key) = name.strip_prefix("progress.values.") {
                let v = scalar(name, Dtype::F64)?.f64s()[0];
                if !v.is_finite() {
                    return Err(CheckpointError::NonFinite { name: name.clone() });
                }
                progress.values.insert(key.to_string(), v);
            }
        }
        Ok(Checkpoint {
            experiment: get("experiment")?.clone(),
            variant: get("variant")?.clone(),
            architecture: get("architecture")?.clone(),
            settings,
            progress,
            velocity,
            tensors,
        })
    }

    /// Writes the checkpoint to `path` atomically (see [`write_atomic`]): a crash leaves the
    /// previous checkpoint intact. Fails when the directory cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let bytes = self.to_bytes()?;
        write_atomic(path, &bytes).map_err(|source| CheckpointError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads and parses a checkpoint file (see [`Checkpoint::from_bytes`] for what it rejects);
    /// also rejects an unreadable file and one over [`MAX_CHECKPOINT_BYTES`].
    pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let read_err = |source| CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        if size > MAX_CHECKPOINT_BYTES {
            return Err(CheckpointError::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        file.take(MAX_CHECKPOINT_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        Checkpoint::from_bytes(&bytes)
    }

    /// Names of the stored tensors, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The stored bytes (little-endian), dtype name and shape of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<(&[u8], String, &[usize])> {
        self.tensors
            .get(name)
            .map(|t| (t.data.as_slice(), t.dtype.to_string(), t.shape.as_slice()))
    }
}
