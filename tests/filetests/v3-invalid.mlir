// pipeline: v3
// Broken ops: each case must be rejected with a diagnostic that says what is wrong.

// Wrong operand count: rms_norm takes (x, w).
func.func @operand_count(%x: tensor<?x32xf32>) -> tensor<?x32xf32> {
  %y = "v3.rms_norm"(%x) {eps = 1.0e-6 : f32} : (tensor<?x32xf32>) -> tensor<?x32xf32>
  return %y : tensor<?x32xf32>
}

// -----

// Missing attribute: rms_norm needs eps.
func.func @missing_attribute(%x: tensor<?x32xf32>, %w: tensor<32xf32>) -> tensor<?x32xf32> {
  %y = "v3.rms_norm"(%x, %w) : (tensor<?x32xf32>, tensor<32xf32>) -> tensor<?x32xf32>
  return %y : tensor<?x32xf32>
}

// -----

// Wrong attribute kind: eps must be a float.
func.func @attribute_kind(%x: tensor<?x32xf32>, %w: tensor<32xf32>) -> tensor<?x32xf32> {
  %y = "v3.rms_norm"(%x, %w) {eps = "small"} : (tensor<?x32xf32>, tensor<32xf32>) -> tensor<?x32xf32>
  return %y : tensor<?x32xf32>
}

// -----

// Not a tensor.
func.func @not_a_tensor(%x: f32, %w: tensor<32xf32>) -> tensor<?x32xf32> {
  %y = "v3.rms_norm"(%x, %w) {eps = 1.0e-6 : f32} : (f32, tensor<32xf32>) -> tensor<?x32xf32>
  return %y : tensor<?x32xf32>
}

// -----

// Mismatched shape: linear's K (64) does not match the weight's in-features (48).
func.func @linear_k(%x: tensor<?x64xf32>, %w: tensor<32x48xbf16>) -> tensor<?x32xf32> {
  %y = "v3.linear"(%x, %w) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x64xf32>, tensor<32x48xbf16>) -> tensor<?x32xf32>
  return %y : tensor<?x32xf32>
}

// -----

// Mismatched shape: add of different widths.
func.func @add_shapes(%a: tensor<?x32xf32>, %b: tensor<?x16xf32>) -> tensor<?x32xf32> {
  %y = "v3.add"(%a, %b) : (tensor<?x32xf32>, tensor<?x16xf32>) -> tensor<?x32xf32>
  return %y : tensor<?x32xf32>
}

// -----

// Mismatched shape: attention heads x (nope + v) must equal kv_b_proj rows.
func.func @mla_heads(%qn: tensor<?x4x24xf32>, %qp: tensor<?x4x16xf32>, %lat: tensor<?x48xf32>, %kvb: tensor<100x32xbf16>) -> tensor<?x4x24xf32> {
  %o = "v3.attention"(%qn, %qp, %lat, %kvb) {form = "naive", kv_lora_rank = 32 : i64, scale = 0.23 : f32} : (tensor<?x4x24xf32>, tensor<?x4x16xf32>, tensor<?x48xf32>, tensor<100x32xbf16>) -> tensor<?x4x24xf32>
  return %o : tensor<?x4x24xf32>
}

// -----

// Unknown op of the dialect.
func.func @unknown(%x: tensor<?x32xf32>) -> tensor<?x32xf32> {
  %y = "v3.gelu"(%x) : (tensor<?x32xf32>) -> tensor<?x32xf32>
  return %y : tensor<?x32xf32>
}
