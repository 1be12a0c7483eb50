//! DeepSeek Sparse Attention (DeepSeek-V3.2) on the CPU: the indexer key's LayerNorm, the lightning
//! indexer's selection and the gather of each query's selected rows (the attention itself is
//! `attention_decode` over them). All three are scf loops in the reference's order
//! ([`v3c_models::interp::kernels::layer_norm`], `index_scores`, `select_top_keys`): a selection is
//! a sequence of data-dependent picks, and the sums run in the reference's order so that equal
//! inputs give equal scores, hence equal picks.

use super::*;

/// An f32 constant's exact spelling (MLIR's hexadecimal float literal).
fn f32_bits(v: f32) -> String {
    format!("0x{:08X}", v.to_bits())
}

impl Emitter {
    /// A prefix for one op's SSA names, unique in the kernel (`%v<n>_`).
    fn scope(&mut self) -> String {
        format!("{}_", self.fresh())
    }

    /// `torch.nn.LayerNorm` over the rows of x `[N, D]`: the mean, then the biased variance, each
    /// summed in order; `((x - mean) * inv) * w + b`.
    pub(super) fn layer_norm(
        &mut self,
        [x, w, b]: [&(String, Shape); 3],
        eps: &str,
        dest: &str,
        out: &Shape,
    ) -> Result<(), String> {
        let Some(d) = x.1.dims.get(1).copied().flatten().filter(|_| x.1.dims.len() == 2) else {
            return Err(format!("layer_norm of {}: expected rows of a static width", x.1));
        };
        let p = self.scope();
        let (x_ty, w_ty, b_ty, o_ty) = (memref(&x.1), memref(&w.1), memref(&b.1), memref(out));
        self.line(&format!(
            "scf.execute_region {{
      {p}c0 = arith.constant 0 : index
      {p}c1 = arith.constant 1 : index
      {p}cd = arith.constant {d} : index
      {p}width = arith.constant {d}.0 : f32
      {p}eps = arith.constant {eps} : f32
      {p}n = memref.dim {x}, {p}c0 : {x_ty}
      scf.for {p}t = {p}c0 to {p}n step {p}c1 {{
        {p}sum = scf.for {p}i = {p}c0 to {p}cd step {p}c1 iter_args({p}a = %zero) -> (f32) {{
          {p}v = memref.load {x}[{p}t, {p}i] : {x_ty}
          {p}a2 = arith.addf {p}a, {p}v : f32
          scf.yield {p}a2 : f32
        }}
        {p}mean = arith.divf {p}sum, {p}width : f32
        {p}sq = scf.for {p}i = {p}c0 to {p}cd step {p}c1 iter_args({p}a = %zero) -> (f32) {{
          {p}v = memref.load {x}[{p}t, {p}i] : {x_ty}
          {p}c = arith.subf {p}v, {p}mean : f32
          {p}c2 = arith.mulf {p}c, {p}c : f32
          {p}a2 = arith.addf {p}a, {p}c2 : f32
          scf.yield {p}a2 : f32
        }}
        {p}var = arith.divf {p}sq, {p}width : f32
        {p}ve = arith.addf {p}var, {p}eps : f32
        {p}root = math.sqrt {p}ve : f32
        {p}inv = arith.divf %one, {p}root : f32
        scf.for {p}i = {p}c0 to {p}cd step {p}c1 {{
          {p}v = memref.load {x}[{p}t, {p}i] : {x_ty}
          {p}c = arith.subf {p}v, {p}mean : f32
          {p}xn = arith.mulf {p}c, {p}inv : f32
          {p}wv = memref.load {w}[{p}i] : {w_ty}
          {wf}
          {p}y = arith.mulf {p}xn, {p}wf : f32
          {p}bv = memref.load {b}[{p}i] : {b_ty}
          {bf}
          {p}r = arith.addf {p}y, {p}bf : f32
          memref.store {p}r, {dest}[{p}t, {p}i] : {o_ty}
        }}
      }}
      scf.yield
    }}",
            x = x.0,
            w = w.0,
            b = b.0,
            wf = load_f32(&w.1.element, &format!("{p}wv"), &format!("{p}wf")),
            bf = load_f32(&b.1.element, &format!("{p}bv"), &format!("{p}bf")),
        ));
        Ok(())
    }

    /// The indexer's selection (`v3.sparse_index`): per query, every visible key's score (heads
    /// summed in order, each `w[h] / sqrt(H) * relu(q[h] . key / sqrt(D))`), then, when more keys
    /// are visible than `top_k`, `top_k` picks of the best free key (strictly greater wins: the
    /// earlier of equal keys) written out in key order; else every visible key, then -1s.
    /// Prefill: cache rows `[S, C]`, query t at row S - T + t; decode (`positions`): `[B, S, C]`; a
    /// row's key is its last D columns.
    pub(super) fn sparse_index(
        &mut self,
        [q, w, keys]: [&(String, Shape); 3],
        positions: Option<&(String, Shape)>,
        top_k: usize,
        dest: &str,
        out: &Shape,
    ) -> Result<(), String> {
        let (Some(h), Some(d)) = (q.1.dims.get(1).copied().flatten(), q.1.dims.get(2).copied().flatten()) else {
            return Err(format!("sparse_index of queries {}: expected static heads and width", q.1));
        };
        let p = self.scope();
        let (q_ty, w_ty, k_ty, o_ty) = (memref(&q.1), memref(&w.1), memref(&keys.1), memref(out));
        let (qk_scale, w_scale) = (f32_bits((d as f32).powf(-0.5)), f32_bits((h as f32).powf(-0.5)));
        let Some(key_col) = keys.1.dims.last().copied().flatten().and_then(|c| c.checked_sub(d)) else {
            return Err(format!("sparse_index of rows {}: expected static rows at least {d} wide", keys.1));
        };
        let (keys_dim, visible, key_at) = match positions {
            None => (
                "0",
                format!("{p}off = arith.subi {p}ns, {p}nt : index\n        {p}last = arith.addi {p}off, {p}t : index"),
                format!("{}[{p}j, {p}kc]", keys.0),
            ),
            Some(pos) => (
                "1",
                format!(
                    "{p}p = memref.load {}[{p}t] : {}\n        {p}last = arith.index_cast {p}p : {} to index",
                    pos.0,
                    memref(&pos.1),
                    pos.1.element
                ),
                format!("{}[{p}t, {p}j, {p}kc]", keys.0),
            ),
        };
        self.line(&format!(
            "scf.execute_region {{
      {p}c0 = arith.constant 0 : index
      {p}c1 = arith.constant 1 : index
      {p}ckd = arith.constant {keys_dim} : index
      {p}ch = arith.constant {h} : index
      {p}cd = arith.constant {d} : index
      {p}koff = arith.constant {key_col} : index
      {p}ck = arith.constant {top_k} : index
      {p}qks = arith.constant {qk_scale} : f32
      {p}ws = arith.constant {w_scale} : f32
      {p}ninf = arith.constant 0xFF800000 : f32
      {p}none = arith.constant -1 : i32
      {p}false = arith.constant false
      {p}true = arith.constant true
      {p}nt = memref.dim {qv}, {p}c0 : {q_ty}
      {p}ns = memref.dim {kv}, {p}ckd : {k_ty}
      {p}sc = memref.alloc({p}ns) : memref<?xf32>
      {p}tk = memref.alloc({p}ns) : memref<?xi1>
      scf.for {p}t = {p}c0 to {p}nt step {p}c1 {{
        {visible}
        {p}n = arith.addi {p}last, {p}c1 : index
        scf.for {p}j = {p}c0 to {p}n step {p}c1 {{
          {p}s = scf.for {p}h = {p}c0 to {p}ch step {p}c1 iter_args({p}acc = %zero) -> (f32) {{
            {p}dot = scf.for {p}d = {p}c0 to {p}cd step {p}c1 iter_args({p}a = %zero) -> (f32) {{
              {p}qe = memref.load {qv}[{p}t, {p}h, {p}d] : {q_ty}
              {p}kc = arith.addi {p}d, {p}koff : index
              {p}ke = memref.load {key_at} : {k_ty}
              {p}m = arith.mulf {p}qe, {p}ke : f32
              {p}a2 = arith.addf {p}a, {p}m : f32
              scf.yield {p}a2 : f32
            }}
            {p}sd = arith.mulf {p}dot, {p}qks : f32
            {p}pos = arith.cmpf ogt, {p}sd, %zero : f32
            {p}relu = arith.select {p}pos, {p}sd, %zero : f32
            {p}wv = memref.load {wv}[{p}t, {p}h] : {w_ty}
            {p}ww = arith.mulf {p}wv, {p}ws : f32
            {p}term = arith.mulf {p}ww, {p}relu : f32
            {p}acc2 = arith.addf {p}acc, {p}term : f32
            scf.yield {p}acc2 : f32
          }}
          memref.store {p}s, {p}sc[{p}j] : memref<?xf32>
          memref.store {p}false, {p}tk[{p}j] : memref<?xi1>
        }}
        {p}few = arith.cmpi ule, {p}n, {p}ck : index
        scf.if {p}few {{
          scf.for {p}k = {p}c0 to {p}ck step {p}c1 {{
            {p}seen = arith.cmpi ult, {p}k, {p}n : index
            {p}ki = arith.index_cast {p}k : index to i32
            {p}o = arith.select {p}seen, {p}ki, {p}none : i32
            memref.store {p}o, {dest}[{p}t, {p}k] : {o_ty}
          }}
        }} else {{
          scf.for {p}pick = {p}c0 to {p}ck step {p}c1 {{
            {p}best:3 = scf.for {p}j = {p}c0 to {p}n step {p}c1 iter_args({p}bv = {p}ninf, {p}bi = {p}c0, {p}f = {p}false) -> (f32, index, i1) {{
              {p}v = memref.load {p}sc[{p}j] : memref<?xf32>
              {p}used = memref.load {p}tk[{p}j] : memref<?xi1>
              {p}free = arith.xori {p}used, {p}true : i1
              {p}gt = arith.cmpf ogt, {p}v, {p}bv : f32
              {p}unset = arith.xori {p}f, {p}true : i1
              {p}better = arith.ori {p}gt, {p}unset : i1
              {p}take = arith.andi {p}free, {p}better : i1
              {p}nv = arith.select {p}take, {p}v, {p}bv : f32
              {p}ni = arith.select {p}take, {p}j, {p}bi : index
              {p}f2 = arith.ori {p}f, {p}take : i1
              scf.yield {p}nv, {p}ni, {p}f2 : f32, index, i1
            }}
            memref.store {p}true, {p}tk[{p}best#1] : memref<?xi1>
          }}
          {p}end = scf.for {p}j = {p}c0 to {p}n step {p}c1 iter_args({p}at = {p}c0) -> (index) {{
            {p}kept = memref.load {p}tk[{p}j] : memref<?xi1>
            {p}at2 = scf.if {p}kept -> (index) {{
              {p}ji = arith.index_cast {p}j : index to i32
              memref.store {p}ji, {dest}[{p}t, {p}at] : {o_ty}
              {p}at3 = arith.addi {p}at, {p}c1 : index
              scf.yield {p}at3 : index
            }} else {{
              scf.yield {p}at : index
            }}
            scf.yield {p}at2 : index
          }}
        }}
      }}
      memref.dealloc {p}sc : memref<?xf32>
      memref.dealloc {p}tk : memref<?xi1>
      scf.yield
    }}",
            qv = q.0,
            kv = keys.0,
            wv = w.0,
        ));
        Ok(())
    }

    /// Each query's selected rows (`v3.gather_rows`): row k of query t is the first `width` columns
    /// of `latent[selected[t, k]]` (of the query's own rows when the latent is `[T, S, C]`), zeros
    /// for -1; `last[t]` the count of selected rows minus one.
    pub(super) fn gather_rows(
        &mut self,
        latent: &(String, Shape),
        selected: &(String, Shape),
        (rows, rows_shape): (&str, &Shape),
        (last, last_shape): (&str, &Shape),
    ) -> Result<(), String> {
        let (Some(k), Some(c)) = (selected.1.dims.get(1).copied().flatten(), rows_shape.dims.get(2).copied().flatten())
        else {
            return Err(format!("gather_rows of {} by {}: expected static widths", latent.1, selected.1));
        };
        let p = self.scope();
        let (l_ty, s_ty, r_ty, n_ty) = (memref(&latent.1), memref(&selected.1), memref(rows_shape), memref(last_shape));
        let row_at = if latent.1.dims.len() == 3 { format!("{p}t, {p}ji, {p}c") } else { format!("{p}ji, {p}c") };
        self.line(&format!(
            "scf.execute_region {{
      {p}c0 = arith.constant 0 : index
      {p}c1 = arith.constant 1 : index
      {p}ck = arith.constant {k} : index
      {p}cc = arith.constant {c} : index
      {p}zi = arith.constant 0 : i32
      {p}one = arith.constant 1 : i64
      {p}nt = memref.dim {sel}, {p}c0 : {s_ty}
      scf.for {p}t = {p}c0 to {p}nt step {p}c1 {{
        {p}count = scf.for {p}k = {p}c0 to {p}ck step {p}c1 iter_args({p}a = {p}c0) -> (index) {{
          {p}j = memref.load {sel}[{p}t, {p}k] : {s_ty}
          {p}ok = arith.cmpi sge, {p}j, {p}zi : i32
          {p}a2 = scf.if {p}ok -> (index) {{
            {p}ji = arith.index_cast {p}j : i32 to index
            scf.for {p}c = {p}c0 to {p}cc step {p}c1 {{
              {p}lv = memref.load {lat}[{row_at}] : {l_ty}
              {lf}
              memref.store {p}lf, {rows}[{p}t, {p}k, {p}c] : {r_ty}
            }}
            {p}a3 = arith.addi {p}a, {p}c1 : index
            scf.yield {p}a3 : index
          }} else {{
            scf.for {p}c = {p}c0 to {p}cc step {p}c1 {{
              memref.store %zero, {rows}[{p}t, {p}k, {p}c] : {r_ty}
            }}
            scf.yield {p}a : index
          }}
          scf.yield {p}a2 : index
        }}
        {p}count64 = arith.index_cast {p}count : index to i64
        {p}last = arith.subi {p}count64, {p}one : i64
        memref.store {p}last, {last}[{p}t] : {n_ty}
      }}
      scf.yield
    }}",
            sel = selected.0,
            lat = latent.0,
            lf = load_f32(&latent.1.element, &format!("{p}lv"), &format!("{p}lf")),
        ));
        Ok(())
    }
}
