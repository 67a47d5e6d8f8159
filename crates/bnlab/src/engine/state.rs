//! Non-learnable layer state that a checkpoint keeps: running statistics, population-statistics
//! accumulators, random-generator positions. Parameters travel as [`super::Param`]; everything
//! else a layer needs to continue training bit for bit travels as a [`State`].

/// The values of one state tensor, in the element type it is kept in.
#[derive(Debug, Clone, PartialEq)]
pub enum StateValue {
    /// 32-bit floats (e.g. running mean and variance).
    F32(Vec<f32>),
    /// 64-bit floats (e.g. population-statistics accumulators).
    F64(Vec<f64>),
    /// Unsigned counters (e.g. batches seen, generator word positions).
    U64(Vec<u64>),
}

impl StateValue {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            StateValue::F32(v) => v.len(),
            StateValue::F64(v) => v.len(),
            StateValue::U64(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name as safetensors spells it (`F32`, `F64`, `U64`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            StateValue::F32(_) => "F32",
            StateValue::F64(_) => "F64",
            StateValue::U64(_) => "U64",
        }
    }
}

/// One named state tensor of a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// Name within its layer (`running_mean`, `rng_word_pos`, …).
    pub name: &'static str,
    /// The values.
    pub value: StateValue,
}
