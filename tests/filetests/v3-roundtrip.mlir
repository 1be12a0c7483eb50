// pipeline: v3
// Every v3 op in a valid use; the printed form must parse back to itself.

func.func @dense(%x: tensor<?x64xf32>, %w: tensor<32x64xbf16>, %n: tensor<32xbf16>, %p: tensor<?xi64>) -> tensor<?x32xf32> {
  %y = "v3.linear"(%x, %w) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x64xf32>, tensor<32x64xbf16>) -> tensor<?x32xf32>
  %z = "v3.rms_norm"(%y, %n) {eps = 1.0e-6 : f32} : (tensor<?x32xf32>, tensor<32xbf16>) -> tensor<?x32xf32>
  %a, %b = "v3.split"(%z) {axis = 1 : i64, sizes = array<i64: 24, 8>} : (tensor<?x32xf32>) -> (tensor<?x24xf32>, tensor<?x8xf32>)
  %r = "v3.rope"(%b, %p) {dim = 8 : i64, theta = 1.0e4 : f64, interleave = true, inv_freq = array<f32: 1.0, 0.1, 0.01, 0.001>, attention_factor = 1.0 : f32} : (tensor<?x8xf32>, tensor<?xi64>) -> tensor<?x8xf32>
  %c = "v3.concat"(%a, %r) {axis = 1 : i64} : (tensor<?x24xf32>, tensor<?x8xf32>) -> tensor<?x32xf32>
  %s = "v3.silu_mul"(%c, %z) : (tensor<?x32xf32>, tensor<?x32xf32>) -> tensor<?x32xf32>
  %o = "v3.add"(%s, %y) : (tensor<?x32xf32>, tensor<?x32xf32>) -> tensor<?x32xf32>
  return %o : tensor<?x32xf32>
}

// -----

func.func @fp8(%x: tensor<?x256xf32>, %w: tensor<200x256xf8E4M3FN>, %ws: tensor<2x2xf32>) -> tensor<?x200xf32> {
  %q, %s = "v3.quantize_fp8"(%x) {group = 128 : i64} : (tensor<?x256xf32>) -> (tensor<?x256xf8E4M3FN>, tensor<?x2xf32>)
  %y = "v3.linear"(%q, %s, %w, %ws) {operandSegmentSizes = array<i32: 1, 1, 1, 1>} : (tensor<?x256xf8E4M3FN>, tensor<?x2xf32>, tensor<200x256xf8E4M3FN>, tensor<2x2xf32>) -> tensor<?x200xf32>
  return %y : tensor<?x200xf32>
}

// -----

func.func @mla(%qn: tensor<?x4x24xf32>, %qp: tensor<?x4x16xf32>, %lat: tensor<?x48xf32>, %kvb: tensor<192x32xbf16>,
               %cache: tensor<?x?x48xf32>, %entry: tensor<?x48xf32>, %pos: tensor<?xi64>) -> (tensor<?x4x24xf32>, tensor<?x4x24xf32>) {
  %o = "v3.attention"(%qn, %qp, %lat, %kvb) {form = "naive", kv_lora_rank = 32 : i64, scale = 0.23 : f32} : (tensor<?x4x24xf32>, tensor<?x4x16xf32>, tensor<?x48xf32>, tensor<192x32xbf16>) -> tensor<?x4x24xf32>
  %c = "v3.cache_write"(%cache, %entry, %pos) : (tensor<?x?x48xf32>, tensor<?x48xf32>, tensor<?xi64>) -> tensor<?x?x48xf32>
  %d = "v3.attention_decode"(%qn, %qp, %c, %pos, %kvb) {form = "absorbed", kv_lora_rank = 32 : i64, scale = 0.23 : f32} : (tensor<?x4x24xf32>, tensor<?x4x16xf32>, tensor<?x?x48xf32>, tensor<?xi64>, tensor<192x32xbf16>) -> tensor<?x4x24xf32>
  return %o, %d : tensor<?x4x24xf32>, tensor<?x4x24xf32>
}

// -----

func.func @moe(%x: tensor<?x96xf32>, %gate: tensor<8x96xbf16>, %bias: tensor<8xf32>, %g: tensor<8x48x96xbf16>, %u: tensor<8x48x96xbf16>, %d: tensor<8x96x48xbf16>,
               %table: tensor<320x96xbf16>, %ids: tensor<?xi64>) -> (tensor<?x96xf32>, tensor<?x320xf32>) {
  %e = "v3.embed"(%table, %ids) : (tensor<320x96xbf16>, tensor<?xi64>) -> tensor<?x96xf32>
  %i, %w = "v3.moe_route"(%x, %gate, %bias) {n_group = 4 : i64, norm_topk_prob = true, routed_scaling_factor = 2.5 : f32, top_k = 3 : i64, topk_group = 2 : i64} : (tensor<?x96xf32>, tensor<8x96xbf16>, tensor<8xf32>) -> (tensor<?x3xi32>, tensor<?x3xf32>)
  %y = "v3.moe_experts"(%e, %i, %w, %g, %u, %d) {fp8_activations = false, num_experts = 8 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 0, 0, 0>} : (tensor<?x96xf32>, tensor<?x3xi32>, tensor<?x3xf32>, tensor<8x48x96xbf16>, tensor<8x48x96xbf16>, tensor<8x96x48xbf16>) -> tensor<?x96xf32>
  %r = "v3.reshape"(%y) : (tensor<?x96xf32>) -> tensor<?x4x24xf32>
  %f = "v3.reshape"(%r) : (tensor<?x4x24xf32>) -> tensor<?x96xf32>
  %l = "v3.lm_head"(%f, %table) : (tensor<?x96xf32>, tensor<320x96xbf16>) -> tensor<?x320xf32>
  return %f, %l : tensor<?x96xf32>, tensor<?x320xf32>
}
