//! Host tensors for the reference interpreter and checkpoint I/O: row-major, one of a few element
//! representations. Kept deliberately plain: this is oracle code.

use crate::dtype::{f8e4m3_to_f32, DType};

/// Element storage.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    /// e4m3 bits (quantized activations; their scales travel as a separate f32 tensor).
    F8(Vec<u8>),
    /// A block-scaled fp8 weight [rows, cols]: bits, one f32 scale per `block` (ragged at the
    /// edges, `scale_cols` per row of blocks), and the dequantized values `f32(bits) * scale`.
    F8Block {
        bits: Vec<u8>,
        scale: Vec<f32>,
        block: [usize; 2],
        scale_cols: usize,
        dequantized: Vec<f32>,
    },
}

/// A shaped host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data: TensorData::F32(data) }
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data: TensorData::I64(data) }
    }

    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape, vec![0.0; n])
    }

    /// Builds a block-scaled fp8 weight from its bits and `weight_scale_inv`.
    pub fn f8_block(shape: [usize; 2], bits: Vec<u8>, scale: Vec<f32>, block: [usize; 2]) -> Tensor {
        let scale_cols = shape[1].div_ceil(block[1]);
        let dequantized = (0..shape[0] * shape[1])
            .map(|i| {
                let (r, c) = (i / shape[1], i % shape[1]);
                f8e4m3_to_f32(bits[i]) * scale[(r / block[0]) * scale_cols + c / block[1]]
            })
            .collect();
        Tensor { shape: shape.to_vec(), data: TensorData::F8Block { bits, scale, block, scale_cols, dequantized } }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::F8(_) | TensorData::F8Block { .. } => DType::F8E4M3,
        }
    }

    /// f32 values; block-scaled fp8 weights give their dequantized values. None for ids and raw fp8.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            TensorData::F8Block { dequantized, .. } => Some(dequantized),
            _ => None,
        }
    }

    /// Integer values widened to i64 (ids, positions).
    pub fn as_ids(&self) -> Option<Vec<i64>> {
        match &self.data {
            TensorData::I64(v) => Some(v.clone()),
            TensorData::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            _ => None,
        }
    }

    /// A short description for errors: `[3, 4] f32`.
    pub fn describe(&self) -> String {
        format!("{:?} {}", self.shape, self.dtype())
    }
}
