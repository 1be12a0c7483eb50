// pipeline: fuse-moe
// Routing + routed experts + shared expert + residual add -> dispatch, grouped gate/up, grouped down.

func.func @moe(%h: tensor<?x96xf32>, %x: tensor<?x96xf32>, %gate: tensor<8x96xbf16> {v3.param = "gate.weight"}, %bias: tensor<8xf32> {v3.param = "gate.bias"}, %sg: tensor<48x96xbf16> {v3.param = "shared.gate"}, %su: tensor<48x96xbf16> {v3.param = "shared.up"}, %sd: tensor<96x48xbf16> {v3.param = "shared.down"}, %eg: tensor<8x48x96xbf16> {v3.param = "experts.gate"}, %eu: tensor<8x48x96xbf16> {v3.param = "experts.up"}, %ed: tensor<8x96x48xbf16> {v3.param = "experts.down"}) -> tensor<?x96xf32> {
  %i, %w = "v3.moe_route"(%x, %gate, %bias) {n_group = 4 : i64, norm_topk_prob = true, routed_scaling_factor = 2.5 : f32, top_k = 3 : i64, topk_group = 2 : i64} : (tensor<?x96xf32>, tensor<8x96xbf16>, tensor<8xf32>) -> (tensor<?x3xi32>, tensor<?x3xf32>)
  %r = "v3.moe_experts"(%x, %i, %w, %eg, %eu, %ed) {fp8_activations = false, num_experts = 8 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 0, 0, 0>} : (tensor<?x96xf32>, tensor<?x3xi32>, tensor<?x3xf32>, tensor<8x48x96xbf16>, tensor<8x48x96xbf16>, tensor<8x96x48xbf16>) -> tensor<?x96xf32>
  %g = "v3.linear"(%x, %sg) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<48x96xbf16>) -> tensor<?x48xf32>
  %u = "v3.linear"(%x, %su) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<48x96xbf16>) -> tensor<?x48xf32>
  %a = "v3.silu_mul"(%g, %u) : (tensor<?x48xf32>, tensor<?x48xf32>) -> tensor<?x48xf32>
  %s = "v3.linear"(%a, %sd) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x48xf32>, tensor<96x48xbf16>) -> tensor<?x96xf32>
  %m = "v3.add"(%r, %s) : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
  %y = "v3.add"(%h, %m) : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
  return %y : tensor<?x96xf32>
}

// -----
// No shared expert and no residual add: dispatch without shared rows, down without a residual.
func.func @routed_only(%x: tensor<?x96xf32>, %gate: tensor<8x96xbf16> {v3.param = "gate.weight"}, %bias: tensor<8xf32> {v3.param = "gate.bias"}, %eg: tensor<8x48x96xbf16> {v3.param = "experts.gate"}, %eu: tensor<8x48x96xbf16> {v3.param = "experts.up"}, %ed: tensor<8x96x48xbf16> {v3.param = "experts.down"}) -> tensor<?x96xf32> {
  %i, %w = "v3.moe_route"(%x, %gate, %bias) {n_group = 1 : i64, norm_topk_prob = false, routed_scaling_factor = 1.0 : f32, top_k = 2 : i64, topk_group = 1 : i64} : (tensor<?x96xf32>, tensor<8x96xbf16>, tensor<8xf32>) -> (tensor<?x2xi32>, tensor<?x2xf32>)
  %r = "v3.moe_experts"(%x, %i, %w, %eg, %eu, %ed) {fp8_activations = false, num_experts = 8 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 0, 0, 0>} : (tensor<?x96xf32>, tensor<?x2xi32>, tensor<?x2xf32>, tensor<8x48x96xbf16>, tensor<8x48x96xbf16>, tensor<8x96x48xbf16>) -> tensor<?x96xf32>
  return %r : tensor<?x96xf32>
}

// -----
// A shared expert twice as wide as a routed one is two shared experts (num_shared = 2).
func.func @two_shared(%x: tensor<?x96xf32>, %gate: tensor<8x96xbf16> {v3.param = "gate.weight"}, %bias: tensor<8xf32> {v3.param = "gate.bias"}, %sg: tensor<96x96xbf16> {v3.param = "shared.gate"}, %su: tensor<96x96xbf16> {v3.param = "shared.up"}, %sd: tensor<96x96xbf16> {v3.param = "shared.down"}, %eg: tensor<8x48x96xbf16> {v3.param = "experts.gate"}, %eu: tensor<8x48x96xbf16> {v3.param = "experts.up"}, %ed: tensor<8x96x48xbf16> {v3.param = "experts.down"}) -> tensor<?x96xf32> {
  %i, %w = "v3.moe_route"(%x, %gate, %bias) {n_group = 1 : i64, norm_topk_prob = true, routed_scaling_factor = 1.0 : f32, top_k = 2 : i64, topk_group = 1 : i64} : (tensor<?x96xf32>, tensor<8x96xbf16>, tensor<8xf32>) -> (tensor<?x2xi32>, tensor<?x2xf32>)
  %r = "v3.moe_experts"(%x, %i, %w, %eg, %eu, %ed) {fp8_activations = false, num_experts = 8 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 0, 0, 0>} : (tensor<?x96xf32>, tensor<?x2xi32>, tensor<?x2xf32>, tensor<8x48x96xbf16>, tensor<8x48x96xbf16>, tensor<8x96x48xbf16>) -> tensor<?x96xf32>
  %g = "v3.linear"(%x, %sg) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<96x96xbf16>) -> tensor<?x96xf32>
  %u = "v3.linear"(%x, %su) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<96x96xbf16>) -> tensor<?x96xf32>
  %a = "v3.silu_mul"(%g, %u) : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
  %s = "v3.linear"(%a, %sd) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<96x96xbf16>) -> tensor<?x96xf32>
  %m = "v3.add"(%r, %s) : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
  return %m : tensor<?x96xf32>
}

// -----
// fp8: the gathered rows are the shared expert's 1 x 128 quantization of x; the SwiGLU output is
// quantized for the down GEMM.
func.func @fp8(%h: tensor<?x256xf32>, %x: tensor<?x256xf32>, %gate: tensor<4x256xbf16> {v3.param = "gate.weight"}, %bias: tensor<4xf32> {v3.param = "gate.bias"}, %sg: tensor<128x256xf8E4M3FN> {v3.param = "shared.gate"}, %sgs: tensor<1x2xf32> {v3.param = "shared.gate_scale"}, %su: tensor<128x256xf8E4M3FN> {v3.param = "shared.up"}, %sus: tensor<1x2xf32> {v3.param = "shared.up_scale"}, %sd: tensor<256x128xf8E4M3FN> {v3.param = "shared.down"}, %sds: tensor<2x1xf32> {v3.param = "shared.down_scale"}, %eg: tensor<4x128x256xf8E4M3FN> {v3.param = "experts.gate"}, %eu: tensor<4x128x256xf8E4M3FN> {v3.param = "experts.up"}, %ed: tensor<4x256x128xf8E4M3FN> {v3.param = "experts.down"}, %egs: tensor<4x1x2xf32> {v3.param = "experts.gate_scale"}, %eus: tensor<4x1x2xf32> {v3.param = "experts.up_scale"}, %eds: tensor<4x2x1xf32> {v3.param = "experts.down_scale"}) -> tensor<?x256xf32> {
  %i, %w = "v3.moe_route"(%x, %gate, %bias) {n_group = 1 : i64, norm_topk_prob = true, routed_scaling_factor = 1.0 : f32, top_k = 2 : i64, topk_group = 1 : i64} : (tensor<?x256xf32>, tensor<4x256xbf16>, tensor<4xf32>) -> (tensor<?x2xi32>, tensor<?x2xf32>)
  %r = "v3.moe_experts"(%x, %i, %w, %eg, %eu, %ed, %egs, %eus, %eds) {fp8_activations = true, num_experts = 4 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 1, 1, 1>} : (tensor<?x256xf32>, tensor<?x2xi32>, tensor<?x2xf32>, tensor<4x128x256xf8E4M3FN>, tensor<4x128x256xf8E4M3FN>, tensor<4x256x128xf8E4M3FN>, tensor<4x1x2xf32>, tensor<4x1x2xf32>, tensor<4x2x1xf32>) -> tensor<?x256xf32>
  %xq, %xs = "v3.quantize_fp8"(%x) {group = 128 : i64} : (tensor<?x256xf32>) -> (tensor<?x256xf8E4M3FN>, tensor<?x2xf32>)
  %g = "v3.linear"(%xq, %xs, %sg, %sgs) {operandSegmentSizes = array<i32: 1, 1, 1, 1>} : (tensor<?x256xf8E4M3FN>, tensor<?x2xf32>, tensor<128x256xf8E4M3FN>, tensor<1x2xf32>) -> tensor<?x128xf32>
  %u = "v3.linear"(%xq, %xs, %su, %sus) {operandSegmentSizes = array<i32: 1, 1, 1, 1>} : (tensor<?x256xf8E4M3FN>, tensor<?x2xf32>, tensor<128x256xf8E4M3FN>, tensor<1x2xf32>) -> tensor<?x128xf32>
  %a = "v3.silu_mul"(%g, %u) : (tensor<?x128xf32>, tensor<?x128xf32>) -> tensor<?x128xf32>
  %aq, %as = "v3.quantize_fp8"(%a) {group = 128 : i64} : (tensor<?x128xf32>) -> (tensor<?x128xf8E4M3FN>, tensor<?x1xf32>)
  %s = "v3.linear"(%aq, %as, %sd, %sds) {operandSegmentSizes = array<i32: 1, 1, 1, 1>} : (tensor<?x128xf8E4M3FN>, tensor<?x1xf32>, tensor<256x128xf8E4M3FN>, tensor<2x1xf32>) -> tensor<?x256xf32>
  %m = "v3.add"(%r, %s) : (tensor<?x256xf32>, tensor<?x256xf32>) -> tensor<?x256xf32>
  %y = "v3.add"(%h, %m) : (tensor<?x256xf32>, tensor<?x256xf32>) -> tensor<?x256xf32>
  return %y : tensor<?x256xf32>
}

// -----
// fp8 expert weights on f32 activations (the f32 oracle precision): weights dequantized as read.
func.func @dequant(%x: tensor<?x256xf32>, %gate: tensor<4x256xbf16> {v3.param = "gate.weight"}, %bias: tensor<4xf32> {v3.param = "gate.bias"}, %eg: tensor<4x128x256xf8E4M3FN> {v3.param = "experts.gate"}, %eu: tensor<4x128x256xf8E4M3FN> {v3.param = "experts.up"}, %ed: tensor<4x256x128xf8E4M3FN> {v3.param = "experts.down"}, %egs: tensor<4x1x2xf32> {v3.param = "experts.gate_scale"}, %eus: tensor<4x1x2xf32> {v3.param = "experts.up_scale"}, %eds: tensor<4x2x1xf32> {v3.param = "experts.down_scale"}) -> tensor<?x256xf32> {
  %i, %w = "v3.moe_route"(%x, %gate, %bias) {n_group = 1 : i64, norm_topk_prob = true, routed_scaling_factor = 1.0 : f32, top_k = 2 : i64, topk_group = 1 : i64} : (tensor<?x256xf32>, tensor<4x256xbf16>, tensor<4xf32>) -> (tensor<?x2xi32>, tensor<?x2xf32>)
  %r = "v3.moe_experts"(%x, %i, %w, %eg, %eu, %ed, %egs, %eus, %eds) {fp8_activations = false, num_experts = 4 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 1, 1, 1>} : (tensor<?x256xf32>, tensor<?x2xi32>, tensor<?x2xf32>, tensor<4x128x256xf8E4M3FN>, tensor<4x128x256xf8E4M3FN>, tensor<4x256x128xf8E4M3FN>, tensor<4x1x2xf32>, tensor<4x1x2xf32>, tensor<4x2x1xf32>) -> tensor<?x256xf32>
  return %r : tensor<?x256xf32>
}

// -----
// A shared expert 1.5 routed experts wide keeps its own kernels; the combine add becomes the down
// GEMM's residual.
func.func @odd_shared(%x: tensor<?x96xf32>, %gate: tensor<8x96xbf16> {v3.param = "gate.weight"}, %bias: tensor<8xf32> {v3.param = "gate.bias"}, %sg: tensor<72x96xbf16> {v3.param = "shared.gate"}, %su: tensor<72x96xbf16> {v3.param = "shared.up"}, %sd: tensor<96x72xbf16> {v3.param = "shared.down"}, %eg: tensor<8x48x96xbf16> {v3.param = "experts.gate"}, %eu: tensor<8x48x96xbf16> {v3.param = "experts.up"}, %ed: tensor<8x96x48xbf16> {v3.param = "experts.down"}) -> tensor<?x96xf32> {
  %i, %w = "v3.moe_route"(%x, %gate, %bias) {n_group = 1 : i64, norm_topk_prob = true, routed_scaling_factor = 1.0 : f32, top_k = 2 : i64, topk_group = 1 : i64} : (tensor<?x96xf32>, tensor<8x96xbf16>, tensor<8xf32>) -> (tensor<?x2xi32>, tensor<?x2xf32>)
  %r = "v3.moe_experts"(%x, %i, %w, %eg, %eu, %ed) {fp8_activations = false, num_experts = 8 : i64, operandSegmentSizes = array<i32: 1, 1, 1, 1, 1, 1, 0, 0, 0>} : (tensor<?x96xf32>, tensor<?x2xi32>, tensor<?x2xf32>, tensor<8x48x96xbf16>, tensor<8x48x96xbf16>, tensor<8x96x48xbf16>) -> tensor<?x96xf32>
  %g = "v3.linear"(%x, %sg) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<72x96xbf16>) -> tensor<?x72xf32>
  %u = "v3.linear"(%x, %su) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x96xf32>, tensor<72x96xbf16>) -> tensor<?x72xf32>
  %a = "v3.silu_mul"(%g, %u) : (tensor<?x72xf32>, tensor<?x72xf32>) -> tensor<?x72xf32>
  %s = "v3.linear"(%a, %sd) {operandSegmentSizes = array<i32: 1, 0, 1, 0>} : (tensor<?x72xf32>, tensor<96x72xbf16>) -> tensor<?x96xf32>
  %m = "v3.add"(%r, %s) : (tensor<?x96xf32>, tensor<?x96xf32>) -> tensor<?x96xf32>
  return %m : tensor<?x96xf32>
}
