// pipeline: absorb-mla
// Decode attention built in the naive form becomes absorbed; prefill attention stays naive.

func.func @decode(%qn: tensor<?x4x24xf32>, %qp: tensor<?x4x16xf32>, %cache: tensor<?x?x48xf32>, %pos: tensor<?xi64>, %kvb: tensor<192x32xbf16>) -> tensor<?x4x24xf32> {
  %o = "v3.attention_decode"(%qn, %qp, %cache, %pos, %kvb) {form = "naive", kv_lora_rank = 32 : i64, scale = 0.23 : f32} : (tensor<?x4x24xf32>, tensor<?x4x16xf32>, tensor<?x?x48xf32>, tensor<?xi64>, tensor<192x32xbf16>) -> tensor<?x4x24xf32>
  return %o : tensor<?x4x24xf32>
}

// -----

func.func @prefill(%qn: tensor<?x4x24xf32>, %qp: tensor<?x4x16xf32>, %lat: tensor<?x48xf32>, %kvb: tensor<192x32xbf16>) -> tensor<?x4x24xf32> {
  %o = "v3.attention"(%qn, %qp, %lat, %kvb) {form = "naive", kv_lora_rank = 32 : i64, scale = 0.23 : f32} : (tensor<?x4x24xf32>, tensor<?x4x16xf32>, tensor<?x48xf32>, tensor<192x32xbf16>) -> tensor<?x4x24xf32>
  return %o : tensor<?x4x24xf32>
}
