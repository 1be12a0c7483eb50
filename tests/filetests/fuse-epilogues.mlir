// pipeline: fuse-epilogues,form-kernels
// SwiGLU dual GEMMs and residual/combine adds fold into GEMM epilogues.

module {
  func.func @prefill(%arg0: tensor<?x96xf32> {v3.input = "x"}, %arg1: tensor<8x96xbf16> {v3.param = "model.layers.1.mlp.gate.weight"}, %arg2: tensor<8xf32> {v3.param = "model.layers.1.mlp.gate.e_score_correction_bias"}, %arg3: tensor<48x96xbf16> {v3.param = "model.layers.1.mlp.shared_experts.gate_proj.weight"}, %arg4: tensor<48x96xbf16> {v3.param = "model.layers.1.mlp.shared_experts.up_proj.weight"}, %arg5: tensor<96x48xbf16> {v3.param = "model.layers.1.mlp.shared_experts.down_proj.weight"}, %arg6: tensor<8x48x96xbf16> {v3.param = "model.layers.1.mlp.experts.*.gate_proj.weight"}, %arg7: tensor<8x48x96xbf16> {v3.param = "model.layers.1.mlp.experts.*.up_proj.weight"}, %arg8: tensor<8x96x48xbf16> {v3.param = "model.layers.1.mlp.experts.*.down_proj.weight"}) -> (tensor<?x96xf32> {v3.output = "y"}) {
    %0:2 = "v3.moe_route"(%arg0, %arg1, %arg2) {n_group = 4 : i64, norm_topk_prob = true, routed_scaling_factor = 2.500000e+00 : f32, top_k = 3 : i64, topk_group = 2 : i64} : (tensor<?x96xf32>, tensor<8x96xbf16>, tensor<8xf32>) -> (tensor<?x3xi32>, tensor<?x3xf32>)
    %1 = "v3.moe_experts"(%arg0, %0#0, %0#1, %arg6, %arg7, %arg8) {fp8_activations = false, num_experts = 8 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 0, 0, 0>} : (tensor<?x96xf32>, tensor<?x3xi32>, tensor<?x3xf32>, tensor<8x48x96xbf16>, tensor<8x48x96xbf16>, tensor<8x96x48xbf16>) -> tensor<?x96xf32>
    %2 = "v3.linear"(%arg0, %arg3) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<48x96xbf16>) -> tensor<?x48xf32>
    %3 = "v3.linear"(%arg0, %arg4) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<48x96xbf16>) -> tensor<?x48xf32>
    %4 = "v3.silu_mul"(%2, %3) : (tensor<?x48xf32>, tensor<?x48xf32>) -> tensor<?x48xf32>
    %5 = "v3.linear"(%4, %arg5) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x48xf32>, tensor<96x48xbf16>) -> tensor<?x96xf32>
    %6 = "v3.add"(%1, %5) : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
    return %6 : tensor<?x96xf32>
  }
}

// -----
module {
  func.func @prefill(%arg0: tensor<?x96xf32> {v3.input = "x"}, %arg1: tensor<160x96xbf16> {v3.param = "model.layers.0.mlp.gate_proj.weight"}, %arg2: tensor<160x96xbf16> {v3.param = "model.layers.0.mlp.up_proj.weight"}, %arg3: tensor<96x160xbf16> {v3.param = "model.layers.0.mlp.down_proj.weight"}) -> (tensor<?x96xf32> {v3.output = "y"}) {
    %0 = "v3.linear"(%arg0, %arg1) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<160x96xbf16>) -> tensor<?x160xf32>
    %1 = "v3.linear"(%arg0, %arg2) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<160x96xbf16>) -> tensor<?x160xf32>
    %2 = "v3.silu_mul"(%0, %1) : (tensor<?x160xf32>, tensor<?x160xf32>) -> tensor<?x160xf32>
    %3 = "v3.linear"(%2, %arg3) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x160xf32>, tensor<96x160xbf16>) -> tensor<?x96xf32>
    return %3 : tensor<?x96xf32>
  }
}

// -----
// A residual add takes the projection into its epilogue; a norm feeding fp8 GEMMs quantizes in its own.
func.func @residual(%h: tensor<?x64xf32>, %a: tensor<?x32xf32>, %w: tensor<64x32xbf16> {v3.param = "o_proj.weight"}, %n: tensor<64xbf16> {v3.param = "norm.weight"}) -> (tensor<?x64xf8E4M3FN>, tensor<?x1xf32>) {
  %o = "v3.linear"(%a, %w) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x32xf32>, tensor<64x32xbf16>) -> tensor<?x64xf32>
  %r = "v3.add"(%h, %o) : (tensor<?x64xf32>, tensor<?x64xf32>) -> tensor<?x64xf32>
  %x = "v3.rms_norm"(%r, %n) {eps = 1.0e-6 : f32} : (tensor<?x64xf32>, tensor<64xbf16>) -> tensor<?x64xf32>
  %q, %s = "v3.quantize_fp8"(%x) {group = 128 : i64} : (tensor<?x64xf32>) -> (tensor<?x64xf8E4M3FN>, tensor<?x1xf32>)
  return %q, %s : tensor<?x64xf8E4M3FN>, tensor<?x1xf32>
}

// -----
// DeepSeek-V3.2: the selected rows' gather joins the attention that alone reads them (its output
// quantized in the same kernel); a gather whose rows something else reads too stays a kernel.
func.func @sparse(%lat: tensor<?x48xf32>, %sel: tensor<?x4xi32>, %qn: tensor<?x2x16xf32>, %qp: tensor<?x2x8xf32>, %kvb: tensor<64x32xf8E4M3FN> {v3.param = "kv_b_proj.weight"}, %kvs: tensor<1x1xf32> {v3.param = "kv_b_proj.weight_scale_inv"}) -> (tensor<?x32xf8E4M3FN>, tensor<?x1xf32>) {
  %rows, %last = "v3.gather_rows"(%lat, %sel) {width = 40 : i64} : (tensor<?x48xf32>, tensor<?x4xi32>) -> (tensor<?x4x40xf32>, tensor<?xi64>)
  %o = "v3.attention_decode"(%qn, %qp, %rows, %last, %kvb, %kvs) {form = "absorbed", kv_lora_rank = 32 : i64, scale = 0.25 : f32} : (tensor<?x2x16xf32>, tensor<?x2x8xf32>, tensor<?x4x40xf32>, tensor<?xi64>, tensor<64x32xf8E4M3FN>, tensor<1x1xf32>) -> tensor<?x2x16xf32>
  %f = "v3.reshape"(%o) : (tensor<?x2x16xf32>) -> tensor<?x32xf32>
  %q, %s = "v3.quantize_fp8"(%f) {group = 128 : i64} : (tensor<?x32xf32>) -> (tensor<?x32xf8E4M3FN>, tensor<?x1xf32>)
  return %q, %s : tensor<?x32xf8E4M3FN>, tensor<?x1xf32>
}

// -----
func.func @sparse_rows_kept(%lat: tensor<?x48xf32>, %sel: tensor<?x4xi32>, %qn: tensor<?x2x16xf32>, %qp: tensor<?x2x8xf32>, %kvb: tensor<64x32xbf16> {v3.param = "kv_b_proj.weight"}) -> (tensor<?x2x16xf32>, tensor<?x4x40xf32>) {
  %rows, %last = "v3.gather_rows"(%lat, %sel) {width = 40 : i64} : (tensor<?x48xf32>, tensor<?x4xi32>) -> (tensor<?x4x40xf32>, tensor<?xi64>)
  %o = "v3.attention_decode"(%qn, %qp, %rows, %last, %kvb) {form = "absorbed", kv_lora_rank = 32 : i64, scale = 0.25 : f32} : (tensor<?x2x16xf32>, tensor<?x2x8xf32>, tensor<?x4x40xf32>, tensor<?xi64>, tensor<64x32xbf16>) -> tensor<?x2x16xf32>
  return %o, %rows : tensor<?x2x16xf32>, tensor<?x4x40xf32>
}
