// pipeline: form-kernels
// Every v3 op lands in exactly one kernel function; views (reshape, split) join their producer's
// kernel; identical kernels are shared; the entry becomes a launch list.

// Two identical layers (same shapes, different weights): one set of kernels, launched twice each.
func.func @prefill(%x: tensor<?x64xf32>, %n0: tensor<64xbf16> {v3.param = "model.layers.0.input_layernorm.weight"},
                   %w0: tensor<64x64xbf16> {v3.param = "model.layers.0.mlp.down_proj.weight"},
                   %n1: tensor<64xbf16> {v3.param = "model.layers.1.input_layernorm.weight"},
                   %w1: tensor<64x64xbf16> {v3.param = "model.layers.1.mlp.down_proj.weight"}) -> tensor<?x64xf32> {
  %a = "v3.rms_norm"(%x, %n0) {eps = 1.0e-6 : f32} : (tensor<?x64xf32>, tensor<64xbf16>) -> tensor<?x64xf32>
  %b = "v3.linear"(%a, %w0) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x64xf32>, tensor<64x64xbf16>) -> tensor<?x64xf32>
  %c = "v3.add"(%x, %b) : (tensor<?x64xf32>, tensor<?x64xf32>) -> tensor<?x64xf32>
  %d = "v3.rms_norm"(%c, %n1) {eps = 1.0e-6 : f32} : (tensor<?x64xf32>, tensor<64xbf16>) -> tensor<?x64xf32>
  %e = "v3.linear"(%d, %w1) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x64xf32>, tensor<64x64xbf16>) -> tensor<?x64xf32>
  %f = "v3.add"(%c, %e) : (tensor<?x64xf32>, tensor<?x64xf32>) -> tensor<?x64xf32>
  return %f : tensor<?x64xf32>
}

// -----

// A GEMM whose output is viewed and split: one kernel with two results.
func.func @decode(%x: tensor<?x16xf32>, %w: tensor<40x16xbf16>, %p: tensor<?xi64>) -> (tensor<?x4x6xf32>, tensor<?x4x4xf32>) {
  %q = "v3.linear"(%x, %w) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x16xf32>, tensor<40x16xbf16>) -> tensor<?x40xf32>
  %r = "v3.reshape"(%q) : (tensor<?x40xf32>) -> tensor<?x4x10xf32>
  %n, %pe = "v3.split"(%r) {axis = 2 : i64, sizes = array<i64: 6, 4>} : (tensor<?x4x10xf32>) -> (tensor<?x4x6xf32>, tensor<?x4x4xf32>)
  %rot = "v3.rope"(%pe, %p) {dim = 4 : i64, theta = 1.0e4 : f64, interleave = true, inv_freq = array<f32: 1.0, 0.01>, attention_factor = 1.0 : f32} : (tensor<?x4x4xf32>, tensor<?xi64>) -> tensor<?x4x4xf32>
  return %n, %rot : tensor<?x4x6xf32>, tensor<?x4x4xf32>
}
