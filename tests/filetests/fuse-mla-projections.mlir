// pipeline: fuse-mla-projections,form-kernels
// The MLA block of deepseek-v3-tiny (decode, absorbed): q_a + kv_a as one GEMM, q_b with the q latent
// norm as prologue and RoPE as epilogue, the latent row (norm, RoPE, cache write) as one kernel.

module {
  func.func @decode(%arg0: tensor<?x96xf32> {v3.input = "x"}, %arg1: tensor<?xi64> {v3.input = "positions"}, %arg2: tensor<?x?x48xf32> {v3.input = "kv_cache"}, %arg3: tensor<48x96xbf16> {v3.param = "model.layers.0.self_attn.q_a_proj.weight"}, %arg4: tensor<48xbf16> {v3.param = "model.layers.0.self_attn.q_a_layernorm.weight"}, %arg5: tensor<160x48xbf16> {v3.param = "model.layers.0.self_attn.q_b_proj.weight"}, %arg6: tensor<48x96xbf16> {v3.param = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"}, %arg7: tensor<32xbf16> {v3.param = "model.layers.0.self_attn.kv_a_layernorm.weight"}, %arg8: tensor<192x32xbf16> {v3.param = "model.layers.0.self_attn.kv_b_proj.weight"}, %arg9: tensor<96x96xbf16> {v3.param = "model.layers.0.self_attn.o_proj.weight"}) -> (tensor<?x96xf32> {v3.output = "y"}, tensor<?x?x48xf32> {v3.output = "kv_cache"}) {
    %0 = "v3.linear"(%arg0, %arg3) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<48x96xbf16>) -> tensor<?x48xf32>
    %1 = "v3.rms_norm"(%0, %arg4) {eps = 9.99999997E-7 : f32} : (tensor<?x48xf32>, tensor<48xbf16>) -> tensor<?x48xf32>
    %2 = "v3.linear"(%1, %arg5) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x48xf32>, tensor<160x48xbf16>) -> tensor<?x160xf32>
    %3 = "v3.reshape"(%2) : (tensor<?x160xf32>) -> tensor<?x4x40xf32>
    %4:2 = "v3.split"(%3) {axis = 2 : i64, sizes = array<i64: 24, 16>} : (tensor<?x4x40xf32>) -> (tensor<?x4x24xf32>, tensor<?x4x16xf32>)
    %5 = "v3.rope"(%4#1, %arg1) {attention_factor = 1.000000e+00 : f32, dim = 16 : i64, interleave = true, inv_freq = array<f32: 1.000000e+00, 0.247052938, 0.0562500022, 0.01087033, 1.250000e-03, 3.95284733E-4, 1.250000e-04, 3.95284733E-5>, theta = 1.000000e+04 : f64} : (tensor<?x4x16xf32>, tensor<?xi64>) -> tensor<?x4x16xf32>
    %6 = "v3.linear"(%arg0, %arg6) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<48x96xbf16>) -> tensor<?x48xf32>
    %7:2 = "v3.split"(%6) {axis = 1 : i64, sizes = array<i64: 32, 16>} : (tensor<?x48xf32>) -> (tensor<?x32xf32>, tensor<?x16xf32>)
    %8 = "v3.rms_norm"(%7#0, %arg7) {eps = 9.99999997E-7 : f32} : (tensor<?x32xf32>, tensor<32xbf16>) -> tensor<?x32xf32>
    %9 = "v3.rope"(%7#1, %arg1) {attention_factor = 1.000000e+00 : f32, dim = 16 : i64, interleave = true, inv_freq = array<f32: 1.000000e+00, 0.247052938, 0.0562500022, 0.01087033, 1.250000e-03, 3.95284733E-4, 1.250000e-04, 3.95284733E-5>, theta = 1.000000e+04 : f64} : (tensor<?x16xf32>, tensor<?xi64>) -> tensor<?x16xf32>
    %10 = "v3.concat"(%8, %9) {axis = 1 : i64} : (tensor<?x32xf32>, tensor<?x16xf32>) -> tensor<?x48xf32>
    %11 = "v3.cache_write"(%arg2, %10, %arg1) : (tensor<?x?x48xf32>, tensor<?x48xf32>, tensor<?xi64>) -> tensor<?x?x48xf32>
    %12 = "v3.attention_decode"(%4#0, %5, %11, %arg1, %arg8) {form = "absorbed", kv_lora_rank = 32 : i64, scale = 0.230708569 : f32} : (tensor<?x4x24xf32>, tensor<?x4x16xf32>, tensor<?x?x48xf32>, tensor<?xi64>, tensor<192x32xbf16>) -> tensor<?x4x24xf32>
    %13 = "v3.reshape"(%12) : (tensor<?x4x24xf32>) -> tensor<?x96xf32>
    %14 = "v3.linear"(%13, %arg9) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<96x96xbf16>) -> tensor<?x96xf32>
    return %14, %11 : tensor<?x96xf32>, tensor<?x?x48xf32>
  }
}
// -----
// The same block in prefill (naive form, the cache grows by concatenation).

module {
  func.func @prefill(%arg0: tensor<?x96xf32> {v3.input = "x"}, %arg1: tensor<?xi64> {v3.input = "positions"}, %arg2: tensor<?x48xf32> {v3.input = "kv_cache"}, %arg3: tensor<48x96xbf16> {v3.param = "model.layers.0.self_attn.q_a_proj.weight"}, %arg4: tensor<48xbf16> {v3.param = "model.layers.0.self_attn.q_a_layernorm.weight"}, %arg5: tensor<160x48xbf16> {v3.param = "model.layers.0.self_attn.q_b_proj.weight"}, %arg6: tensor<48x96xbf16> {v3.param = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"}, %arg7: tensor<32xbf16> {v3.param = "model.layers.0.self_attn.kv_a_layernorm.weight"}, %arg8: tensor<192x32xbf16> {v3.param = "model.layers.0.self_attn.kv_b_proj.weight"}, %arg9: tensor<96x96xbf16> {v3.param = "model.layers.0.self_attn.o_proj.weight"}) -> (tensor<?x96xf32> {v3.output = "y"}, tensor<?x48xf32> {v3.output = "kv_cache"}) {
    %0 = "v3.linear"(%arg0, %arg3) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<48x96xbf16>) -> tensor<?x48xf32>
    %1 = "v3.rms_norm"(%0, %arg4) {eps = 9.99999997E-7 : f32} : (tensor<?x48xf32>, tensor<48xbf16>) -> tensor<?x48xf32>
    %2 = "v3.linear"(%1, %arg5) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x48xf32>, tensor<160x48xbf16>) -> tensor<?x160xf32>
    %3 = "v3.reshape"(%2) : (tensor<?x160xf32>) -> tensor<?x4x40xf32>
    %4:2 = "v3.split"(%3) {axis = 2 : i64, sizes = array<i64: 24, 16>} : (tensor<?x4x40xf32>) -> (tensor<?x4x24xf32>, tensor<?x4x16xf32>)
    %5 = "v3.rope"(%4#1, %arg1) {attention_factor = 1.000000e+00 : f32, dim = 16 : i64, interleave = true, inv_freq = array<f32: 1.000000e+00, 0.247052938, 0.0562500022, 0.01087033, 1.250000e-03, 3.95284733E-4, 1.250000e-04, 3.95284733E-5>, theta = 1.000000e+04 : f64} : (tensor<?x4x16xf32>, tensor<?xi64>) -> tensor<?x4x16xf32>
    %6 = "v3.linear"(%arg0, %arg6) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<48x96xbf16>) -> tensor<?x48xf32>
    %7:2 = "v3.split"(%6) {axis = 1 : i64, sizes = array<i64: 32, 16>} : (tensor<?x48xf32>) -> (tensor<?x32xf32>, tensor<?x16xf32>)
    %8 = "v3.rms_norm"(%7#0, %arg7) {eps = 9.99999997E-7 : f32} : (tensor<?x32xf32>, tensor<32xbf16>) -> tensor<?x32xf32>
    %9 = "v3.rope"(%7#1, %arg1) {attention_factor = 1.000000e+00 : f32, dim = 16 : i64, interleave = true, inv_freq = array<f32: 1.000000e+00, 0.247052938, 0.0562500022, 0.01087033, 1.250000e-03, 3.95284733E-4, 1.250000e-04, 3.95284733E-5>, theta = 1.000000e+04 : f64} : (tensor<?x16xf32>, tensor<?xi64>) -> tensor<?x16xf32>
    %10 = "v3.concat"(%8, %9) {axis = 1 : i64} : (tensor<?x32xf32>, tensor<?x16xf32>) -> tensor<?x48xf32>
    %11 = "v3.concat"(%arg2, %10) {axis = 0 : i64} : (tensor<?x48xf32>, tensor<?x48xf32>) -> tensor<?x48xf32>
    %12 = "v3.attention"(%4#0, %5, %11, %arg8) {form = "naive", kv_lora_rank = 32 : i64, scale = 0.230708569 : f32} : (tensor<?x4x24xf32>, tensor<?x4x16xf32>, tensor<?x48xf32>, tensor<192x32xbf16>) -> tensor<?x4x24xf32>
    %13 = "v3.reshape"(%12) : (tensor<?x4x24xf32>) -> tensor<?x96xf32>
    %14 = "v3.linear"(%13, %arg9) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<96x96xbf16>) -> tensor<?x96xf32>
    return %14, %11 : tensor<?x96xf32>, tensor<?x48xf32>
  }
}
