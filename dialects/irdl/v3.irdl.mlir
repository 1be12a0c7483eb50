// The `v3` dialect: DeepSeek-V3 graph ops at the level kernels are written for. One op per op of the
// v3c DSL (models/src/graph.rs), with the same attribute names. Loaded by v3c at context creation and
// accepted by stock tools: `mlir-opt --irdl-file=dialects/irdl/v3.irdl.mlir file.mlir`.
//
// Operands and results are ranked tensors. Each operand has its own constraint value: one IRDL
// constraint used twice would force equal types. Relations between shapes (e.g. linear's K) are
// checked by v3c's shape verifier (compiler/src/import.rs, `verify_shapes`), which IRDL cannot express.
// Parameters are function arguments carrying `v3.param = "<checkpoint name>"`; fp8 weights come with
// their block scales as optional `*_scale` operands (operandSegmentSizes where an op has several).

irdl.dialect @v3 {
  // (table [V, D], ids [N]) -> [N, D]
  irdl.operation @embed {
    %table = irdl.base "!builtin.tensor"
    %ids = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    irdl.operands(table: %table, ids: %ids)
    irdl.results(out: %out)
  }

  // y = x @ w^T. fp8: x (e4m3) with x_scale [.., K/128], w (e4m3) with w_scale [N/128, K/128].
  irdl.operation @linear {
    %x = irdl.base "!builtin.tensor"
    %x_scale = irdl.base "!builtin.tensor"
    %w = irdl.base "!builtin.tensor"
    %w_scale = irdl.base "!builtin.tensor"
    %y = irdl.base "!builtin.tensor"
    irdl.operands(x: %x, x_scale: optional %x_scale, w: %w, w_scale: optional %w_scale)
    irdl.results(y: %y)
  }

  // w * x / sqrt(mean(x^2) + eps) over the last axis, in f32.
  irdl.operation @rms_norm {
    %x = irdl.base "!builtin.tensor"
    %w = irdl.base "!builtin.tensor"
    %y = irdl.base "!builtin.tensor"
    %eps = irdl.base "#builtin.float"
    irdl.operands(x: %x, w: %w)
    irdl.results(y: %y)
    irdl.attributes { "eps" = %eps }
  }

  // Rotates the last `dim` values of x [N, (H,) dim] at absolute positions [N]:
  // angle_i = position * inv_freq[i]; cos/sin scaled by attention_factor (YaRN).
  irdl.operation @rope {
    %x = irdl.base "!builtin.tensor"
    %positions = irdl.base "!builtin.tensor"
    %y = irdl.base "!builtin.tensor"
    %dim = irdl.base "#builtin.integer"
    %theta = irdl.base "#builtin.float"
    %interleave = irdl.base "#builtin.integer"
    %inv_freq = irdl.base "#builtin.dense_array"
    %attention_factor = irdl.base "#builtin.float"
    irdl.operands(x: %x, positions: %positions)
    irdl.results(y: %y)
    irdl.attributes { "dim" = %dim, "theta" = %theta, "interleave" = %interleave, "inv_freq" = %inv_freq, "attention_factor" = %attention_factor }
  }

  // Causal MLA over one sequence: q_nope [T, H, dn], q_pe [T, H, dr], latent [S, kv + dr],
  // kv_b [H (dn + dv), kv] (+ block scales when fp8) -> [T, H, dv]. form: "naive" | "absorbed".
  irdl.operation @attention {
    %q_nope = irdl.base "!builtin.tensor"
    %q_pe = irdl.base "!builtin.tensor"
    %latent = irdl.base "!builtin.tensor"
    %kv_b = irdl.base "!builtin.tensor"
    %kv_b_scale = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    %form = irdl.base "#builtin.string"
    %scale = irdl.base "#builtin.float"
    %kv_lora_rank = irdl.base "#builtin.integer"
    irdl.operands(q_nope: %q_nope, q_pe: %q_pe, latent: %latent, kv_b: %kv_b, kv_b_scale: optional %kv_b_scale)
    irdl.results(out: %out)
    irdl.attributes { "form" = %form, "scale" = %scale, "kv_lora_rank" = %kv_lora_rank }
  }

  // MLA decode, one token per sequence: latent [B, S, kv + dr]; sequence b sees rows 0..=positions[b].
  irdl.operation @attention_decode {
    %q_nope = irdl.base "!builtin.tensor"
    %q_pe = irdl.base "!builtin.tensor"
    %latent = irdl.base "!builtin.tensor"
    %positions = irdl.base "!builtin.tensor"
    %kv_b = irdl.base "!builtin.tensor"
    %kv_b_scale = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    %form = irdl.base "#builtin.string"
    %scale = irdl.base "#builtin.float"
    %kv_lora_rank = irdl.base "#builtin.integer"
    irdl.operands(q_nope: %q_nope, q_pe: %q_pe, latent: %latent, positions: %positions, kv_b: %kv_b, kv_b_scale: optional %kv_b_scale)
    irdl.results(out: %out)
    irdl.attributes { "form" = %form, "scale" = %scale, "kv_lora_rank" = %kv_lora_rank }
  }

  // cache [B, S, C] with row positions[b] of sequence b replaced by entries[b].
  irdl.operation @cache_write {
    %cache = irdl.base "!builtin.tensor"
    %entries = irdl.base "!builtin.tensor"
    %positions = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    irdl.operands(cache: %cache, entries: %entries, positions: %positions)
    irdl.results(out: %out)
  }

  // DeepSeek Sparse Attention (DeepSeek-V3.2).
  // torch.nn.LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * w + b (biased variance).
  irdl.operation @layer_norm {
    %x = irdl.base "!builtin.tensor"
    %w = irdl.base "!builtin.tensor"
    %b = irdl.base "!builtin.tensor"
    %y = irdl.base "!builtin.tensor"
    %eps = irdl.base "#builtin.float"
    irdl.operands(x: %x, w: %w, b: %b)
    irdl.results(y: %y)
    irdl.attributes { "eps" = %eps }
  }

  // The lightning indexer's selection: (q [T, H, D], w [T, H], rows [S, C]) -> selected [T, top_k] i32,
  // a row's key its last D columns, query t at row S - T + t; with positions [B] (decode): rows
  // [B, S, C], query b at positions[b].
  // score = sum_h w[h] / sqrt(H) * relu(q[h] . key / sqrt(D)); the top_k best keys at or before the
  // query (all while there are at most top_k; ties: the earlier key), ascending, then -1s.
  irdl.operation @sparse_index {
    %q = irdl.base "!builtin.tensor"
    %w = irdl.base "!builtin.tensor"
    %keys = irdl.base "!builtin.tensor"
    %positions = irdl.base "!builtin.tensor"
    %selected = irdl.base "!builtin.tensor"
    %top_k = irdl.base "#builtin.integer"
    irdl.operands(q: %q, w: %w, keys: %keys, positions: optional %positions)
    irdl.results(selected: %selected)
    irdl.attributes { "top_k" = %top_k }
  }

  // (cache [S, C] or [T, S, C], selected [T, K] i32) -> (rows [T, K, width], last [T] i64): the first
  // width columns of each query's selected rows gathered (zeros past them), last = their count - 1.
  irdl.operation @gather_rows {
    %latent = irdl.base "!builtin.tensor"
    %selected = irdl.base "!builtin.tensor"
    %rows = irdl.base "!builtin.tensor"
    %last = irdl.base "!builtin.tensor"
    %width = irdl.base "#builtin.integer"
    irdl.operands(latent: %latent, selected: %selected)
    irdl.results(rows: %rows, last: %last)
    irdl.attributes { "width" = %width }
  }

  // sigmoid(x @ gate^T) + bias -> group-limited top-k -> (indices [T, K] i32, weights [T, K] f32).
  // With the attribute scoring = "softmax" (DeepSeek-V2) and no bias: softmax(x @ gate^T), groups
  // scored by their best expert, the picks' scores as weights.
  irdl.operation @moe_route {
    %x = irdl.base "!builtin.tensor"
    %gate = irdl.base "!builtin.tensor"
    %bias = irdl.base "!builtin.tensor"
    %indices = irdl.base "!builtin.tensor"
    %weights = irdl.base "!builtin.tensor"
    %top_k = irdl.base "#builtin.integer"
    %n_group = irdl.base "#builtin.integer"
    %topk_group = irdl.base "#builtin.integer"
    %norm_topk_prob = irdl.base "#builtin.integer"
    %routed_scaling_factor = irdl.base "#builtin.float"
    irdl.operands(x: %x, gate: %gate, bias: optional %bias)
    irdl.results(indices: %indices, weights: %weights)
    irdl.attributes { "top_k" = %top_k, "n_group" = %n_group, "topk_group" = %topk_group, "norm_topk_prob" = %norm_topk_prob, "routed_scaling_factor" = %routed_scaling_factor }
  }

  // Routed SwiGLU experts; weights stacked over experts: gate/up [E, I, D], down [E, D, I]
  // (+ block scales [E, ., .] when fp8).
  irdl.operation @moe_experts {
    %x = irdl.base "!builtin.tensor"
    %indices = irdl.base "!builtin.tensor"
    %weights = irdl.base "!builtin.tensor"
    %gate = irdl.base "!builtin.tensor"
    %up = irdl.base "!builtin.tensor"
    %down = irdl.base "!builtin.tensor"
    %gate_scale = irdl.base "!builtin.tensor"
    %up_scale = irdl.base "!builtin.tensor"
    %down_scale = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    %num_experts = irdl.base "#builtin.integer"
    %fp8_activations = irdl.base "#builtin.integer"
    irdl.operands(x: %x, indices: %indices, weights: %weights, gate: %gate, up: %up, down: %down, gate_scale: optional %gate_scale, up_scale: optional %up_scale, down_scale: optional %down_scale)
    irdl.results(out: %out)
    irdl.attributes { "num_experts" = %num_experts, "fp8_activations" = %fp8_activations }
  }

  // Routing that also builds the permutation for grouped GEMMs (the `fuse-moe` pass makes it):
  // experts 0..E-1 routed, E..E+S-1 the shared experts (every token, weight 1). Results:
  // offsets [E+S+1] i32 (rows of expert e: offsets[e]..offsets[e+1]), rows [T, K+S] i32 and
  // row_weights [T, K+S] f32, both read flat: row r of the permuted activations is token rows[r].
  // Routing as moe_route's (no bias with scoring = "softmax").
  irdl.operation @moe_dispatch {
    %x = irdl.base "!builtin.tensor"
    %gate = irdl.base "!builtin.tensor"
    %bias = irdl.base "!builtin.tensor"
    %offsets = irdl.base "!builtin.tensor"
    %rows = irdl.base "!builtin.tensor"
    %row_weights = irdl.base "!builtin.tensor"
    %top_k = irdl.base "#builtin.integer"
    %n_group = irdl.base "#builtin.integer"
    %topk_group = irdl.base "#builtin.integer"
    %norm_topk_prob = irdl.base "#builtin.integer"
    %routed_scaling_factor = irdl.base "#builtin.float"
    %num_shared = irdl.base "#builtin.integer"
    irdl.operands(x: %x, gate: %gate, bias: optional %bias)
    irdl.results(offsets: %offsets, rows: %rows, row_weights: %row_weights)
    irdl.attributes { "top_k" = %top_k, "n_group" = %n_group, "topk_group" = %topk_group, "norm_topk_prob" = %norm_topk_prob, "routed_scaling_factor" = %routed_scaling_factor, "num_shared" = %num_shared }
  }

  // Grouped gate/up GEMM with SwiGLU: permuted row r (flat over [T, K+S]) of the result is
  // silu(x[rows[r]] gate_e^T) * (x[rows[r]] up_e^T) for the expert e owning r; the shared experts'
  // weights are row blocks of shared_gate/shared_up [S*I, D]. fp8: x and weights block-scaled.
  irdl.operation @moe_gate_up {
    %x = irdl.base "!builtin.tensor"
    %x_scale = irdl.base "!builtin.tensor"
    %offsets = irdl.base "!builtin.tensor"
    %rows = irdl.base "!builtin.tensor"
    %gate = irdl.base "!builtin.tensor"
    %up = irdl.base "!builtin.tensor"
    %gate_scale = irdl.base "!builtin.tensor"
    %up_scale = irdl.base "!builtin.tensor"
    %shared_gate = irdl.base "!builtin.tensor"
    %shared_up = irdl.base "!builtin.tensor"
    %shared_gate_scale = irdl.base "!builtin.tensor"
    %shared_up_scale = irdl.base "!builtin.tensor"
    %h = irdl.base "!builtin.tensor"
    %num_experts = irdl.base "#builtin.integer"
    %num_shared = irdl.base "#builtin.integer"
    irdl.operands(x: %x, x_scale: optional %x_scale, offsets: %offsets, rows: %rows, gate: %gate, up: %up, gate_scale: optional %gate_scale, up_scale: optional %up_scale, shared_gate: optional %shared_gate, shared_up: optional %shared_up, shared_gate_scale: optional %shared_gate_scale, shared_up_scale: optional %shared_up_scale)
    irdl.results(h: %h)
    irdl.attributes { "num_experts" = %num_experts, "num_shared" = %num_shared }
  }

  // Grouped down GEMM with the combine: out[t] = residual[t] + sum over rows r of token t of
  // row_weights[r] * (h[r] down_e^T) (a scatter into the token's row); shared_down [D, S*I].
  irdl.operation @moe_down {
    %h = irdl.base "!builtin.tensor"
    %h_scale = irdl.base "!builtin.tensor"
    %offsets = irdl.base "!builtin.tensor"
    %rows = irdl.base "!builtin.tensor"
    %row_weights = irdl.base "!builtin.tensor"
    %down = irdl.base "!builtin.tensor"
    %down_scale = irdl.base "!builtin.tensor"
    %shared_down = irdl.base "!builtin.tensor"
    %shared_down_scale = irdl.base "!builtin.tensor"
    %residual = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    %num_experts = irdl.base "#builtin.integer"
    %num_shared = irdl.base "#builtin.integer"
    irdl.operands(h: %h, h_scale: optional %h_scale, offsets: %offsets, rows: %rows, row_weights: %row_weights, down: %down, down_scale: optional %down_scale, shared_down: optional %shared_down, shared_down_scale: optional %shared_down_scale, residual: optional %residual)
    irdl.results(out: %out)
    irdl.attributes { "num_experts" = %num_experts, "num_shared" = %num_shared }
  }

  // silu(gate) * up
  irdl.operation @silu_mul {
    %gate = irdl.base "!builtin.tensor"
    %up = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    irdl.operands(gate: %gate, up: %up)
    irdl.results(out: %out)
  }

  irdl.operation @add {
    %lhs = irdl.base "!builtin.tensor"
    %rhs = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    irdl.operands(lhs: %lhs, rhs: %rhs)
    irdl.results(out: %out)
  }

  // Two pieces of `sizes` = [head, tail] along `axis`. (IRDL variadics are homogeneous, so split
  // and concat are binary; an N-way DSL split/concat is imported as a chain.)
  irdl.operation @split {
    %x = irdl.base "!builtin.tensor"
    %head = irdl.base "!builtin.tensor"
    %tail = irdl.base "!builtin.tensor"
    %axis = irdl.base "#builtin.integer"
    %sizes = irdl.base "#builtin.dense_array"
    irdl.operands(x: %x)
    irdl.results(head: %head, tail: %tail)
    irdl.attributes { "axis" = %axis, "sizes" = %sizes }
  }

  irdl.operation @concat {
    %lhs = irdl.base "!builtin.tensor"
    %rhs = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    %axis = irdl.base "#builtin.integer"
    irdl.operands(lhs: %lhs, rhs: %rhs)
    irdl.results(out: %out)
    irdl.attributes { "axis" = %axis }
  }

  // Same elements, the shape of the result type.
  irdl.operation @reshape {
    %x = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    irdl.operands(x: %x)
    irdl.results(out: %out)
  }

  // Per row per `group` channels: s = max(amax, 1e-4) / 448, xq = e4m3(x / s).
  irdl.operation @quantize_fp8 {
    %x = irdl.base "!builtin.tensor"
    %xq = irdl.base "!builtin.tensor"
    %scales = irdl.base "!builtin.tensor"
    %group = irdl.base "#builtin.integer"
    irdl.operands(x: %x)
    irdl.results(xq: %xq, scales: %scales)
    irdl.attributes { "group" = %group }
  }

  // logits [N, V] f32 = x [N, D] @ w [V, D]^T
  irdl.operation @lm_head {
    %x = irdl.base "!builtin.tensor"
    %w = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    irdl.operands(x: %x, w: %w)
    irdl.results(out: %out)
  }

  // --- Training: losses and the vector-Jacobian products of autodiff (models/src/autodiff.rs).

  // (logits [N, V] f32, targets [N] i64) -> [1]: `weight` x the mean over rows of
  // -log softmax(logits)[target] (sums in f64).
  irdl.operation @cross_entropy {
    %logits = irdl.base "!builtin.tensor"
    %targets = irdl.base "!builtin.tensor"
    %loss = irdl.base "!builtin.tensor"
    %weight = irdl.base "#builtin.float"
    irdl.operands(logits: %logits, targets: %targets)
    irdl.results(loss: %loss)
    irdl.attributes { "weight" = %weight }
  }

  // d (weighted mean cross-entropy) / d logits [N, V]: weight x (softmax - onehot) / N.
  irdl.operation @cross_entropy_grad {
    %logits = irdl.base "!builtin.tensor"
    %targets = irdl.base "!builtin.tensor"
    %grad = irdl.base "!builtin.tensor"
    %weight = irdl.base "#builtin.float"
    irdl.operands(logits: %logits, targets: %targets)
    irdl.results(grad: %grad)
    irdl.attributes { "weight" = %weight }
  }

  // a' @ b' of 2-D tensors, ' the transposes asked for (the VJPs of linear layers and the head).
  irdl.operation @matmul {
    %a = irdl.base "!builtin.tensor"
    %b = irdl.base "!builtin.tensor"
    %out = irdl.base "!builtin.tensor"
    %transpose_a = irdl.base "#builtin.integer"
    %transpose_b = irdl.base "#builtin.integer"
    irdl.operands(a: %a, b: %b)
    irdl.results(out: %out)
    irdl.attributes { "transpose_a" = %transpose_a, "transpose_b" = %transpose_b }
  }

  // (x [N, D], w [D], dy [N, D]) -> (dx [N, D], dw [D]) of rms_norm.
  irdl.operation @rms_norm_grad {
    %x = irdl.base "!builtin.tensor"
    %w = irdl.base "!builtin.tensor"
    %dy = irdl.base "!builtin.tensor"
    %dx = irdl.base "!builtin.tensor"
    %dw = irdl.base "!builtin.tensor"
    %eps = irdl.base "#builtin.float"
    irdl.operands(x: %x, w: %w, dy: %dy)
    irdl.results(dx: %dx, dw: %dw)
    irdl.attributes { "eps" = %eps }
  }

  // (gate, up, dy) -> (d gate, d up) of silu(gate) * up.
  irdl.operation @silu_mul_grad {
    %gate = irdl.base "!builtin.tensor"
    %up = irdl.base "!builtin.tensor"
    %dy = irdl.base "!builtin.tensor"
    %dgate = irdl.base "!builtin.tensor"
    %dup = irdl.base "!builtin.tensor"
    irdl.operands(gate: %gate, up: %up, dy: %dy)
    irdl.results(dgate: %dgate, dup: %dup)
  }

  // (ids [N], dy [N, D]) -> d table [vocab, D]: the rows of dy summed into their ids' rows.
  irdl.operation @embed_grad {
    %ids = irdl.base "!builtin.tensor"
    %dy = irdl.base "!builtin.tensor"
    %dtable = irdl.base "!builtin.tensor"
    %vocab = irdl.base "#builtin.integer"
    irdl.operands(ids: %ids, dy: %dy)
    irdl.results(dtable: %dtable)
    irdl.attributes { "vocab" = %vocab }
  }

  // dx of rope: the inverse rotation (the same angles, sine negated); attributes as rope's.
  irdl.operation @rope_grad {
    %dy = irdl.base "!builtin.tensor"
    %positions = irdl.base "!builtin.tensor"
    %dx = irdl.base "!builtin.tensor"
    %dim = irdl.base "#builtin.integer"
    %theta = irdl.base "#builtin.float"
    %interleave = irdl.base "#builtin.integer"
    %inv_freq = irdl.base "#builtin.dense_array"
    %attention_factor = irdl.base "#builtin.float"
    irdl.operands(dy: %dy, positions: %positions)
    irdl.results(dx: %dx)
    irdl.attributes { "dim" = %dim, "theta" = %theta, "interleave" = %interleave, "inv_freq" = %inv_freq, "attention_factor" = %attention_factor }
  }

  // Naive-form causal MLA over one sequence, forward recomputed: (q_nope, q_pe, latent, kv_b,
  // d out) -> (d q_nope, d q_pe, d latent, d kv_b).
  irdl.operation @attention_grad {
    %q_nope = irdl.base "!builtin.tensor"
    %q_pe = irdl.base "!builtin.tensor"
    %latent = irdl.base "!builtin.tensor"
    %kv_b = irdl.base "!builtin.tensor"
    %dout = irdl.base "!builtin.tensor"
    %dq_nope = irdl.base "!builtin.tensor"
    %dq_pe = irdl.base "!builtin.tensor"
    %dlatent = irdl.base "!builtin.tensor"
    %dkv_b = irdl.base "!builtin.tensor"
    %scale = irdl.base "#builtin.float"
    %kv_lora_rank = irdl.base "#builtin.integer"
    irdl.operands(q_nope: %q_nope, q_pe: %q_pe, latent: %latent, kv_b: %kv_b, dout: %dout)
    irdl.results(dq_nope: %dq_nope, dq_pe: %dq_pe, dlatent: %dlatent, dkv_b: %dkv_b)
    irdl.attributes { "scale" = %scale, "kv_lora_rank" = %kv_lora_rank }
  }

  // (dy, lhs, rhs) -> (d lhs, d rhs) of concat(lhs, rhs) along `axis`: dy's two pieces, sizes
  // taken from lhs and rhs at run time.
  irdl.operation @concat_grad {
    %dy = irdl.base "!builtin.tensor"
    %lhs = irdl.base "!builtin.tensor"
    %rhs = irdl.base "!builtin.tensor"
    %dlhs = irdl.base "!builtin.tensor"
    %drhs = irdl.base "!builtin.tensor"
    %axis = irdl.base "#builtin.integer"
    irdl.operands(dy: %dy, lhs: %lhs, rhs: %rhs)
    irdl.results(dlhs: %dlhs, drhs: %drhs)
    irdl.attributes { "axis" = %axis }
  }

  // dx [x's shape] of split(x) = [head, tail] (`sizes`) along `axis`: the pieces' gradients that
  // exist, zeros for a piece without one.
  irdl.operation @split_grad {
    %x = irdl.base "!builtin.tensor"
    %dhead = irdl.base "!builtin.tensor"
    %dtail = irdl.base "!builtin.tensor"
    %dx = irdl.base "!builtin.tensor"
    %axis = irdl.base "#builtin.integer"
    %sizes = irdl.base "#builtin.dense_array"
    irdl.operands(x: %x, dhead: optional %dhead, dtail: optional %dtail)
    irdl.results(dx: %dx)
    irdl.attributes { "axis" = %axis, "sizes" = %sizes }
  }

  // The routing's gradient to its logits (x gate^T) [T, E] from the routing weights' gradient
  // d weights [T, K]: through the selected experts' sigmoid scores and their normalization (the
  // selection passes none). Routing attributes as moe_route's.
  irdl.operation @route_logits_grad {
    %logits = irdl.base "!builtin.tensor"
    %indices = irdl.base "!builtin.tensor"
    %dweights = irdl.base "!builtin.tensor"
    %dlogits = irdl.base "!builtin.tensor"
    %top_k = irdl.base "#builtin.integer"
    %n_group = irdl.base "#builtin.integer"
    %topk_group = irdl.base "#builtin.integer"
    %norm_topk_prob = irdl.base "#builtin.integer"
    %routed_scaling_factor = irdl.base "#builtin.float"
    irdl.operands(logits: %logits, indices: %indices, dweights: %dweights)
    irdl.results(dlogits: %dlogits)
    irdl.attributes { "top_k" = %top_k, "n_group" = %n_group, "topk_group" = %topk_group, "norm_topk_prob" = %norm_topk_prob, "routed_scaling_factor" = %routed_scaling_factor }
  }

  // DeepSeek-V3's sequence-wise balance loss of one MoE layer from its router logits [T, E] and
  // expert indices [T, K] -> [1] (alpha * sum_i f_i P_i; sums in f64).
  irdl.operation @balance_loss {
    %logits = irdl.base "!builtin.tensor"
    %indices = irdl.base "!builtin.tensor"
    %loss = irdl.base "!builtin.tensor"
    %alpha = irdl.base "#builtin.float"
    irdl.operands(logits: %logits, indices: %indices)
    irdl.results(loss: %loss)
    irdl.attributes { "alpha" = %alpha }
  }

  // The balance loss's gradient to the router logits [T, E] (through P; f is a count).
  irdl.operation @balance_loss_grad {
    %logits = irdl.base "!builtin.tensor"
    %indices = irdl.base "!builtin.tensor"
    %dlogits = irdl.base "!builtin.tensor"
    %alpha = irdl.base "#builtin.float"
    irdl.operands(logits: %logits, indices: %indices)
    irdl.results(dlogits: %dlogits)
    irdl.attributes { "alpha" = %alpha }
  }

  // The routed SwiGLU experts' gradient, forward recomputed: (x, indices, weights, dy, gate
  // [E, I, D], up [E, I, D], down [E, D, I]) -> (dx, d weights, d gate, d up, d down), the weight
  // gradients stacked like the weights. fp8: the recipe's e4m3 GEMMs on the f32 masters (Fprop,
  // Dgrad and Wgrad per expert over its tokens); else f32.
  irdl.operation @moe_experts_grad {
    %x = irdl.base "!builtin.tensor"
    %indices = irdl.base "!builtin.tensor"
    %weights = irdl.base "!builtin.tensor"
    %dy = irdl.base "!builtin.tensor"
    %gate = irdl.base "!builtin.tensor"
    %up = irdl.base "!builtin.tensor"
    %down = irdl.base "!builtin.tensor"
    %dx = irdl.base "!builtin.tensor"
    %dweights = irdl.base "!builtin.tensor"
    %dgate = irdl.base "!builtin.tensor"
    %dup = irdl.base "!builtin.tensor"
    %ddown = irdl.base "!builtin.tensor"
    %num_experts = irdl.base "#builtin.integer"
    %fp8 = irdl.base "#builtin.integer"
    irdl.operands(x: %x, indices: %indices, weights: %weights, dy: %dy, gate: %gate, up: %up, down: %down)
    irdl.results(dx: %dx, dweights: %dweights, dgate: %dgate, dup: %dup, ddown: %ddown)
    irdl.attributes { "num_experts" = %num_experts, "fp8" = %fp8 }
  }

  // DeepSeek-V3's FP8 training GEMMs on f32 operands (quantized inside, as the recipe says):
  // fp8_linear (x [M, K], w [N, K] master) -> x w^T, x 1x128 and w 128x128;
  // fp8_linear_dgrad (dy [M, N], w [N, K]) -> dy w, dy 1x128 along N, w's blocks transposed;
  // fp8_linear_wgrad (dy [M, N], x [M, K]) -> dy^T x [N, K], both 128x1 over the M tokens.
  irdl.operation @fp8_linear {
    %x = irdl.base "!builtin.tensor"
    %w = irdl.base "!builtin.tensor"
    %y = irdl.base "!builtin.tensor"
    irdl.operands(x: %x, w: %w)
    irdl.results(y: %y)
  }

  irdl.operation @fp8_linear_dgrad {
    %dy = irdl.base "!builtin.tensor"
    %w = irdl.base "!builtin.tensor"
    %dx = irdl.base "!builtin.tensor"
    irdl.operands(dy: %dy, w: %w)
    irdl.results(dx: %dx)
  }

  irdl.operation @fp8_linear_wgrad {
    %dy = irdl.base "!builtin.tensor"
    %x = irdl.base "!builtin.tensor"
    %dw = irdl.base "!builtin.tensor"
    irdl.operands(dy: %dy, x: %x)
    irdl.results(dw: %dw)
  }
}
