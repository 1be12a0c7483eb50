//! Row templates: elementwise ops (`add`, `silu_mul`), RMSNorm, RoPE, the embedding gather and the
//! views that copy (`reshape`, `split`, `concat`), as `linalg.generic` on tensors that the kernel's
//! transform script tiles and vectorizes.
//!
//! Every op reads its operands as tensors (one `bufferization.to_tensor` per buffer) and writes its
//! result with `bufferization.materialize_in_destination` into its buffer (or a subview of it), so
//! that once the script has eliminated the empty tensors each tile is computed straight into place.
//! Each generic carries `{v3c.rows = "<kind>_<tile sizes>"}`: the script ([`RowTile::script`])
//! tiles it by 1 along every leading dim and by a vector of lanes along the last one, then
//! vectorizes the tile (`tensor.extract`s become vector loads or gathers). RMSNorm's sum of squares
//! is a reduction tiled the same way: each tile's lanes are added to the row's sum in order
//! (`vector.reduction` with an accumulator, no reassociation), so the sum is the reference's
//! sequential one bit for bit — fp8 quantization follows the norm, and a last-bit difference
//! there moves values across e4m3 rounding boundaries.

use super::*;

/// How the transform script treats the row ops carrying one tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RowTile {
    /// Tile size per loop dim (every one tiled: the tile is static, so vectorizable as is).
    pub sizes: Vec<usize>,
    /// A reduction over the last dim whose initial value is a `linalg.fill`, operand
    /// `fill_operand` of the op (it is the reduction loops' carried value, so it cannot be fused
    /// into them: it is tiled element by element on its own).
    pub fill_operand: Option<usize>,
    /// Tile the (two) loops in the other order: the last dim's tiles outside (a transpose's
    /// reads then walk a few source rows at a time instead of one source column).
    pub interchange: bool,
    /// Trailing loop dims a reduction reduces (1 but for a row kept as `[tiles, 16]`).
    pub reduced: usize,
}

impl RowTile {
    /// The op's tag: `map_1x16`, `reduce1_1x16`, ...
    pub(super) fn tag(&self) -> String {
        let sizes: Vec<String> = self.sizes.iter().map(ToString::to_string).collect();
        let order = match (self.interchange, self.reduced) {
            (false, 1) => String::new(),
            (true, 1) => "_t".to_string(),
            (t, r) => format!("{}_r{r}", if t { "_t" } else { "" }),
        };
        match self.fill_operand {
            None => format!("map_{}{order}", sizes.join("x")),
            Some(i) => format!("reduce{i}_{}{order}", sizes.join("x")),
        }
    }

    /// The transform-script block that tiles and vectorizes every op with this tag.
    pub(super) fn script(&self) -> String {
        let tag = self.tag();
        let handles = vec!["!transform.any_op"; self.sizes.len() + 1].join(", ");
        let loops: Vec<String> = (0..self.sizes.len()).map(|i| format!("%l{i}")).collect();
        let sizes: Vec<String> = self.sizes.iter().map(ToString::to_string).collect();
        // A reduction runs over the last dim: its result (and initial value) has the others.
        let fill_rank = self.sizes.len().saturating_sub(self.reduced).max(1);
        let (fill, fuse) = match self.fill_operand {
            None => (String::new(), String::new()),
            Some(i) => (
                format!(
                    "      %fill = transform.get_producer_of_operand %op[{i}] : (!transform.any_op) -> !transform.any_op\n"
                ),
                format!(
                    "      %tfill, {fill_loops} = transform.structured.tile_using_for %fill tile_sizes [{fill_sizes}] : (!transform.any_op) -> ({fill_handles})
      transform.structured.vectorize %tfill : !transform.any_op\n",
                    fill_loops = (0..fill_rank).map(|i| format!("%fl{i}")).collect::<Vec<_>>().join(", "),
                    fill_sizes = vec!["1"; fill_rank].join(", "),
                    fill_handles = vec!["!transform.any_op"; fill_rank + 1].join(", "),
                ),
            ),
        };
        format!(
            "    %rows_{tag} = transform.structured.match ops{{[\"linalg.generic\"]}} attributes {{v3c.rows = \"{tag}\"}} in %root : (!transform.any_op) -> !transform.any_op
    transform.foreach %rows_{tag} : !transform.any_op {{
    ^bb0(%op: !transform.any_op):
{fill}      %tiled, {loops} = transform.structured.tile_using_for %op tile_sizes [{sizes}]{order} : (!transform.any_op) -> ({handles})
{fuse}      transform.structured.vectorize %tiled {{vectorize_nd_extract}} : !transform.any_op
    }}
",
            loops = loops.join(", "),
            sizes = sizes.join(", "),
            // The first two loops swapped.
            order = if self.interchange {
                let rest: Vec<String> = (2..self.sizes.len()).map(|i| i.to_string()).collect();
                format!(" interchange = [{}]", [vec!["1".to_string(), "0".to_string()], rest].concat().join(", "))
            } else {
                String::new()
            },
        )
    }
}

/// Lanes along the last dim of a row op: the largest of 16, 8, 4, 2 dividing it (1 when none
/// does or it is dynamic).
pub(super) fn lanes(last: Option<usize>) -> usize {
    last.and_then(|n| [16, 8, 4, 2].into_iter().find(|l| n.is_multiple_of(*l))).unwrap_or(1)
}

/// The tensor type of the values a buffer of `shape` holds.
pub(super) fn tensor_type(shape: &Shape) -> String {
    memref(shape).replacen("memref", "tensor", 1)
}

/// The type of a subview of sizes `sizes` (None: dynamic) at a dynamic offset of an identity-layout
/// buffer of `shape`.
pub(super) fn subview_type(shape: &Shape, sizes: &[Option<usize>]) -> String {
    let strides: Vec<String> = (0..shape.dims.len())
        .map(|i| {
            shape.dims[i + 1..]
                .iter()
                .try_fold(1usize, |acc, d| d.map(|d| acc * d))
                .map_or("?".to_string(), |s| s.to_string())
        })
        .collect();
    let dims: Vec<String> = sizes.iter().map(|d| d.map_or("?".into(), |n| n.to_string())).collect();
    format!("memref<{}x{}, strided<[{}], offset: ?>>", dims.join("x"), storage(&shape.element), strides.join(", "))
}

/// One input of a row op: a tensor value, its type, and its indexing map.
pub(super) struct RowInput {
    tensor: String,
    ty: String,
    map: String,
}

impl Emitter {
    /// The buffer `v` as a tensor: one `to_tensor` per buffer, emitted at its first use. Only for
    /// uses at the kernel's top level (after the buffer's producer); inside a loop a template
    /// writes its own `to_tensor`.
    pub(super) fn tensor_of(&mut self, v: &(String, Shape)) -> String {
        if let Some(t) = self.tensors.get(&v.0) {
            return t.clone();
        }
        let t = self.fresh();
        self.line(&format!(
            "{t} = bufferization.to_tensor {} restrict : {} to {}",
            v.0,
            memref(&v.1),
            tensor_type(&v.1)
        ));
        self.tensors.insert(v.0.clone(), t.clone());
        t
    }

    /// An input read at the same index as the output (identity map over `rank` dims).
    pub(super) fn same_index(&mut self, v: &(String, Shape)) -> RowInput {
        let tensor = self.tensor_of(v);
        RowInput { tensor, ty: tensor_type(&v.1), map: identity(v.1.dims.len()) }
    }

    /// An input of rank `v`'s rank indexed by the listed dims of the op's `rank` loop dims.
    pub(super) fn indexed_by(&mut self, v: &(String, Shape), rank: usize, dims: &[usize]) -> RowInput {
        let tensor = self.tensor_of(v);
        let names: Vec<String> = (0..rank).map(|i| format!("d{i}")).collect();
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        let picked: Vec<&str> = dims.iter().map(|&i| all[i]).collect();
        RowInput { tensor, ty: tensor_type(&v.1), map: affine(&all, &picked) }
    }

    /// `dest` (name, memref type) of `shape` := the generic over `shape`'s index space reading
    /// `ins` (block arguments `args`, then the output's `%c`), whose `body` leaves the element in
    /// `result`; tagged for the transform script to tile by 1 along the leading dims and by
    /// [`lanes`] along the last one, and vectorize.
    pub(super) fn row_generic(
        &mut self,
        (dest, dest_ty): (&str, &str),
        shape: &Shape,
        ins: &[RowInput],
        (args, body, result): (&str, &str, &str),
    ) {
        let rank = shape.dims.len();
        let mut dyn_sizes = Vec::new();
        for (i, d) in shape.dims.iter().enumerate() {
            if d.is_none() {
                let c = self.constant_index(i);
                let s = self.fresh();
                self.line(&format!("{s} = memref.dim {dest}, {c} : {dest_ty}"));
                dyn_sizes.push(s);
            }
        }
        let ty = tensor_type(shape);
        let el = storage(&shape.element).to_string();
        let (empty, res) = (self.fresh(), self.fresh());
        self.line(&format!("{empty} = tensor.empty({}) : {ty}", dyn_sizes.join(", ")));
        let tile = RowTile {
            sizes: [vec![1; rank.saturating_sub(1)], vec![lanes(shape.dims.last().copied().flatten())]].concat(),
            fill_operand: None,
            interchange: false,
            reduced: 1,
        };
        let maps: Vec<&str> = ins.iter().map(|i| i.map.as_str()).collect();
        let tensors: Vec<&str> = ins.iter().map(|i| i.tensor.as_str()).collect();
        let types: Vec<&str> = ins.iter().map(|i| i.ty.as_str()).collect();
        let sep = if args.is_empty() { "" } else { ", " };
        self.line(&format!(
            "{res} = linalg.generic {{indexing_maps = [{maps}{msep}{out}], iterator_types = [{iters}]}} {ins}outs({empty} : {ty}) attrs = {{v3c.rows = \"{tag}\"}} {{\n    ^bb0({args}{sep}%c: {el}):\n{body}      linalg.yield {result} : {el}\n    }} -> {ty}",
            maps = maps.join(", "),
            msep = if maps.is_empty() { "" } else { ", " },
            out = identity(rank),
            iters = vec!["\"parallel\""; rank].join(", "),
            ins = if ins.is_empty() {
                String::new()
            } else {
                format!("ins({} : {}) ", tensors.join(", "), types.join(", "))
            },
            tag = tile.tag(),
            body = indent_body(body),
        ));
        self.use_tile(tile);
        self.line(&format!(
            "bufferization.materialize_in_destination {res} in restrict writable {dest} : ({ty}, {dest_ty}) -> ()"
        ));
    }

    pub(super) fn use_tile(&mut self, tile: RowTile) {
        if !self.row_tiles.contains(&tile) {
            self.row_tiles.push(tile);
        }
    }

    /// `dest = a + b` or `silu(a) * b`, elementwise.
    pub(super) fn elementwise(
        &mut self,
        kind: &str,
        a: &(String, Shape),
        b: &(String, Shape),
        dest: &str,
        out: &Shape,
    ) {
        let ins = [self.same_index(a), self.same_index(b)];
        let body = if kind == "add" {
            "%r = arith.addf %a, %b : f32"
        } else {
            "%n = arith.negf %a : f32\n%x = math.exp %n : f32\n%den = arith.addf %one, %x : f32\n%s = arith.divf %a, %den : f32\n%r = arith.mulf %s, %b : f32"
        };
        self.row_generic((dest, &memref(out)), out, &ins, ("%a: f32, %b: f32", body, "%r"));
    }

    /// `dest = w * x / sqrt(mean(x^2) + eps)` over rows of x [M, d]: the sums of squares into a
    /// scratch buffer (a tiled reduction in the reference's order), then the scaling.
    pub(super) fn rms_norm(&mut self, x: &(String, Shape), w: &(String, Shape), eps: &str, dest: &str, out: &Shape) {
        let d = x.1.dims[1].unwrap_or(0);
        let sums_shape = Shape { dims: vec![x.1.dims[0]], element: "f32".into() };
        let sums = self.alloc(&sums_shape, x);
        let sums_ty = memref(&sums_shape);
        let xt = self.tensor_of(x);
        let c0 = self.constant_index(0);
        let (rows, empty, zeros, res) = (self.fresh(), self.fresh(), self.fresh(), self.fresh());
        self.line(&format!("{rows} = memref.dim {sums}, {c0} : {sums_ty}"));
        self.line(&format!("{empty} = tensor.empty({rows}) : tensor<?xf32>"));
        self.line(&format!("{zeros} = linalg.fill ins(%zero : f32) outs({empty} : tensor<?xf32>) -> tensor<?xf32>"));
        let tile = RowTile { sizes: vec![1, lanes(Some(d))], fill_operand: Some(1), interchange: false, reduced: 1 };
        self.line(&format!(
            "{res} = linalg.generic {{indexing_maps = [{}, {}], iterator_types = [\"parallel\", \"reduction\"]}} ins({xt} : {}) outs({zeros} : tensor<?xf32>) attrs = {{v3c.rows = \"{}\"}} {{\n    ^bb0(%a: f32, %c: f32):\n      %sq = arith.mulf %a, %a : f32\n      %r = arith.addf %c, %sq : f32\n      linalg.yield %r : f32\n    }} -> tensor<?xf32>",
            affine(&["m", "d"], &["m", "d"]),
            affine(&["m", "d"], &["m"]),
            tensor_type(&x.1),
            tile.tag()
        ));
        self.use_tile(tile);
        self.line(&format!(
            "bufferization.materialize_in_destination {res} in restrict writable {sums} : (tensor<?xf32>, {sums_ty}) -> ()"
        ));
        let sums = (sums, sums_shape);
        let ins = [self.same_index(x), self.indexed_by(&sums, 2, &[0]), self.indexed_by(w, 2, &[1])];
        let body = format!(
            "%width = arith.constant {d}.0 : f32\n%eps = arith.constant {eps} : f32\n%mean = arith.divf %s, %width : f32\n%me = arith.addf %mean, %eps : f32\n%root = math.sqrt %me : f32\n%inv = arith.divf %one, %root : f32\n%xn = arith.mulf %a, %inv : f32\n{}\n%r = arith.mulf %wf, %xn : f32",
            load_f32(&w.1.element, "%wv", "%wf")
        );
        let args = format!("%a: f32, %s: f32, %wv: {}", w.1.element);
        self.row_generic((dest, &memref(out)), out, &ins, (&args, &body, "%r"));
    }

    /// `dest[n, :] = table[ids[n], :]` (as f32). The id is read by the row's index, not as a
    /// block argument: per tile it is one value then, and the table row a contiguous vector read
    /// (as an argument it was a lane value, and every element a gather).
    pub(super) fn embed(&mut self, table: &(String, Shape), ids: &(String, Shape), dest: &str, out: &Shape) {
        let (tt, it) = (self.tensor_of(table), self.tensor_of(ids));
        let body = format!(
            "%i0 = linalg.index 0 : index\n%id = tensor.extract {it}[%i0] : {}\n%row = arith.index_cast %id : {id} to index\n%col = linalg.index 1 : index\n%t = tensor.extract {tt}[%row, %col] : {}\n{}",
            tensor_type(&ids.1),
            tensor_type(&table.1),
            load_f32(&table.1.element, "%t", "%r"),
            id = ids.1.element,
        );
        self.row_generic((dest, &memref(out)), out, &[], ("", &body, "%r"));
    }

    /// RoPE over the last `dim` entries of x [N, (H,) dim] at `positions` [N]: pairs interleaved
    /// (2i, 2i+1) or in halves (i, i + dim/2), frequencies from the module constant `table`. The
    /// cosines and sines are computed once per token and frequency (two [N, dim/2] tables, as the
    /// reference does), then every head's pairs rotated with them. `inverse`: the sines negated
    /// (the inverse rotation, RoPE's gradient).
    pub(super) fn rope_rows(
        &mut self,
        x: &(String, Shape),
        positions: &(String, Shape),
        table: &(String, Shape),
        (interleave, factor, inverse): (bool, &str, bool),
        dest: &str,
        out: &Shape,
    ) {
        let rank = out.dims.len();
        let last = rank - 1;
        let half = table.1.dims[0].unwrap_or(0);
        let trig_shape = Shape { dims: vec![x.1.dims[0], Some(half)], element: "f32".into() };
        let mut trig = Vec::new();
        for f in ["cos", "sin"] {
            let buf = self.alloc(&trig_shape, x);
            let ins = [self.indexed_by(positions, 2, &[0]), self.indexed_by(table, 2, &[1])];
            let negate = if inverse && f == "sin" { "\n%r = arith.negf %r0 : f32" } else { "" };
            let scaled = if negate.is_empty() { "%r" } else { "%r0" };
            let body = format!(
                "%pos = arith.sitofp %pos64 : {} to f32\n%angle = arith.mulf %pos, %freq : f32\n%t = math.{f} %angle : f32\n%af = arith.constant {factor} : f32\n{scaled} = arith.mulf %t, %af : f32{negate}",
                positions.1.element
            );
            let args = format!("%pos64: {}, %freq: f32", positions.1.element);
            self.row_generic((&buf, &memref(&trig_shape)), &trig_shape, &ins, (&args, &body, "%r"));
            trig.push(self.tensor_of(&(buf, trig_shape.clone())));
        }
        let xt = self.tensor_of(x);
        let ins = [self.same_index(x)];
        let index_lines: String = (0..rank).map(|i| format!("%i{i} = linalg.index {i} : index\n")).collect();
        let mut partner: Vec<String> = (0..rank).map(|i| format!("%i{i}")).collect();
        partner[last] = "%partner".into();
        let pair = if interleave {
            format!("%c2 = arith.constant 2 : index\n%c1 = arith.constant 1 : index\n%f = arith.divui %i{last}, %c2 : index\n%odd = arith.remui %i{last}, %c2 : index\n%zero_i = arith.constant 0 : index\n%first = arith.cmpi eq, %odd, %zero_i : index\n%up = arith.addi %i{last}, %c1 : index\n%down = arith.subi %i{last}, %c1 : index\n%partner = arith.select %first, %up, %down : index\n")
        } else {
            format!("%h = arith.constant {half} : index\n%first = arith.cmpi ult, %i{last}, %h : index\n%f = arith.remui %i{last}, %h : index\n%up = arith.addi %i{last}, %h : index\n%down = arith.subi %i{last}, %h : index\n%partner = arith.select %first, %up, %down : index\n")
        };
        let body = format!(
            "{index_lines}{pair}%cos = tensor.extract {cos}[%i0, %f] : {tty}\n%sin = tensor.extract {sin}[%i0, %f] : {tty}\n%b = tensor.extract {xt}[{partner}] : {xty}\n%ac = arith.mulf %a, %cos : f32\n%bs = arith.mulf %b, %sin : f32\n%minus = arith.subf %ac, %bs : f32\n%plus = arith.addf %ac, %bs : f32\n%r = arith.select %first, %minus, %plus : f32",
            cos = trig[0],
            sin = trig[1],
            tty = tensor_type(&trig_shape),
            partner = partner.join(", "),
            xty = tensor_type(&x.1),
        );
        self.row_generic((dest, &memref(out)), out, &ins, ("%a: f32", &body, "%r"));
    }

    /// `dest := cache` with row `positions[b]` of sequence `b` replaced by `entries[b]`. The plan
    /// binds a decode cache and its update to one buffer: then nothing is copied (the pointers are
    /// compared at run time) and only the new rows are written, each a tagged row copy. Rows outside
    /// the cache are skipped here; the executor rejects them before launch.
    pub(super) fn cache_write(
        &mut self,
        cache: &(String, Shape),
        entries: &(String, Shape),
        positions: &(String, Shape),
        dest: &str,
        out: &Shape,
    ) {
        let out_ty = memref(out);
        let cache_ty = memref(&cache.1);
        let (src_ptr, dst_ptr, distinct) = (self.fresh(), self.fresh(), self.fresh());
        self.line(&format!("{src_ptr} = memref.extract_aligned_pointer_as_index {} : {cache_ty} -> index", cache.0));
        self.line(&format!("{dst_ptr} = memref.extract_aligned_pointer_as_index {dest} : {out_ty} -> index"));
        self.line(&format!("{distinct} = arith.cmpi ne, {src_ptr}, {dst_ptr} : index"));
        self.line(&format!(
            "scf.if {distinct} {{
      memref.copy {}, {dest} : {cache_ty} to {out_ty}
    }}",
            cache.0
        ));
        let et = self.tensor_of(entries);
        let width = out.dims[2];
        let row = Shape { dims: vec![width], element: out.element.clone() };
        let (c0, c1, c2) = (self.constant_index(0), self.constant_index(1), self.constant_index(2));
        let (b, s, w) = (self.fresh(), self.fresh(), self.fresh());
        self.line(&format!("{b} = memref.dim {dest}, {c0} : {out_ty}"));
        self.line(&format!("{s} = memref.dim {dest}, {c1} : {out_ty}"));
        self.line(&format!("{w} = memref.dim {dest}, {c2} : {out_ty}"));
        let (seq, p64, p, inside, piece, view) =
            (self.fresh(), self.fresh(), self.fresh(), self.fresh(), self.fresh(), self.fresh());
        let w_size = width.map_or(w.clone(), |n| n.to_string());
        let row_ty = tensor_type(&row);
        // One row of the cache, rank-reduced: contiguous at a dynamic offset.
        let view_ty = subview_type(&row, &[width]);
        self.line(&format!(
            "scf.for {seq} = {c0} to {b} step {c1} {{
    {p64} = memref.load {}[{seq}] : {}
    {p} = arith.index_cast {p64} : {} to index
    {inside} = arith.cmpi ult, {p}, {s} : index
    scf.if {inside} {{
    {piece} = tensor.extract_slice {et}[{seq}, 0] [1, {w_size}] [1, 1] : {} to {row_ty}
    {view} = memref.subview {dest}[{seq}, {p}, 0] [1, 1, {w_size}] [1, 1, 1] : {out_ty} to {view_ty}",
            positions.0,
            memref(&positions.1),
            positions.1.element,
            tensor_type(&entries.1),
        ));
        self.copy_rows((&piece, &row_ty), (&view, &view_ty), &row);
        self.line(
            "}
    }",
        );
    }

    /// `dest := src` element for element, `src` a tensor value of type `src_ty` with `dest`'s
    /// shape, `dest` a buffer (name, memref type).
    pub(super) fn copy_rows(&mut self, (src, src_ty): (&str, &str), dest: (&str, &str), shape: &Shape) {
        let ins = [RowInput { tensor: src.to_string(), ty: src_ty.to_string(), map: identity(shape.dims.len()) }];
        let el = storage(&shape.element).to_string();
        self.row_generic(dest, shape, &ins, (&format!("%a: {el}"), "", "%a"));
    }

    /// The SSA sizes of the dynamic dims of tensor `t` (of `shape`), in order.
    fn dynamic_sizes(&mut self, t: &str, shape: &Shape) -> Vec<String> {
        let mut sizes = Vec::new();
        for (i, d) in shape.dims.iter().enumerate() {
            if d.is_none() {
                let c = self.constant_index(i);
                let s = self.fresh();
                self.line(&format!("{s} = tensor.dim {t}, {c} : {}", tensor_type(shape)));
                sizes.push(s);
            }
        }
        sizes
    }

    /// `dest` := `src` with `out`'s shape (row-major; a dynamic leading dim stays the leading dim):
    /// the source's trailing dims collapsed into one, expanded into the destination's, then copied.
    pub(super) fn reshape(&mut self, src: &(String, Shape), dest: &str, out: &Shape) -> Result<(), String> {
        let keep = usize::from(src.1.dims.first().is_some_and(|d| d.is_none()));
        if keep != usize::from(out.dims.first().is_some_and(|d| d.is_none()))
            || src.1.dims.iter().skip(keep).any(Option::is_none)
            || out.dims.iter().skip(keep).any(Option::is_none)
            || src.1.dims.len() <= keep
            || out.dims.len() <= keep
        {
            return Err(format!("reshape {} -> {out}", src.1));
        }
        let mut t = self.tensor_of(src);
        let total: usize = src.1.dims.iter().skip(keep).map(|d| d.unwrap_or(1)).product();
        let flat = Shape {
            dims: [if keep == 1 { vec![None] } else { vec![] }, vec![Some(total)]].concat(),
            element: src.1.element.clone(),
        };
        if src.1.dims.len() > keep + 1 {
            let groups = reassociation(keep, src.1.dims.len());
            let c = self.fresh();
            self.line(&format!(
                "{c} = tensor.collapse_shape {t} {groups} : {} into {}",
                tensor_type(&src.1),
                tensor_type(&flat)
            ));
            t = c;
        }
        if out.dims.len() > keep + 1 {
            let dynamic = self.dynamic_sizes(&t, &flat);
            let mut sizes: Vec<String> = dynamic;
            sizes.extend(out.dims.iter().skip(keep).map(|d| d.unwrap_or(0).to_string()));
            let groups = reassociation(keep, out.dims.len());
            let x = self.fresh();
            self.line(&format!(
                "{x} = tensor.expand_shape {t} {groups} output_shape [{}] : {} into {}",
                sizes.join(", "),
                tensor_type(&flat),
                tensor_type(out)
            ));
            t = x;
        }
        self.copy_rows((&t, &tensor_type(out)), (dest, &memref(out)), out);
        Ok(())
    }

    /// `parts[i] := src[.., offset_i .. offset_i + size_i, ..]` along `axis` (static sizes).
    pub(super) fn split_rows(
        &mut self,
        src: &(String, Shape),
        axis: usize,
        parts: &[(String, Shape)],
    ) -> Result<(), String> {
        let st = self.tensor_of(src);
        let dynamic = self.dynamic_sizes(&st, &src.1);
        let mut offset = 0;
        for (dest, shape) in parts {
            let size = shape.dims[axis].ok_or("split along a dynamic axis")?;
            let mut dyn_iter = dynamic.iter();
            let sizes: Vec<String> = shape
                .dims
                .iter()
                .map(|d| match d {
                    Some(n) => n.to_string(),
                    None => dyn_iter.next().cloned().unwrap_or_default(),
                })
                .collect();
            let offsets: Vec<String> =
                (0..shape.dims.len()).map(|i| if i == axis { offset.to_string() } else { "0".into() }).collect();
            let piece = self.fresh();
            self.line(&format!(
                "{piece} = tensor.extract_slice {st}[{}] [{}] [{}] : {} to {}",
                offsets.join(", "),
                sizes.join(", "),
                vec!["1"; shape.dims.len()].join(", "),
                tensor_type(&src.1),
                tensor_type(shape)
            ));
            self.copy_rows((&piece, &tensor_type(shape)), (dest, &memref(shape)), shape);
            offset += size;
        }
        Ok(())
    }

    /// `dest := concat(lhs, rhs)` along `axis`: each operand copied into its subview of `dest`.
    pub(super) fn concat_rows(
        &mut self,
        (lhs, rhs): (&(String, Shape), &(String, Shape)),
        axis: usize,
        dest: &str,
        out: &Shape,
    ) {
        let rank = out.dims.len();
        let out_ty = memref(out);
        let zero = self.constant_index(0);
        let split_at = match lhs.1.dims[axis] {
            Some(n) => self.constant_index(n),
            None => {
                let a = self.constant_index(axis);
                let d = self.fresh();
                self.line(&format!("{d} = memref.dim {}, {a} : {}", lhs.0, memref(&lhs.1)));
                d
            }
        };
        for (part, start) in [(lhs, zero.clone()), (rhs, split_at)] {
            let mut sizes = Vec::new();
            for (i, d) in part.1.dims.iter().enumerate() {
                sizes.push(match d {
                    Some(n) => n.to_string(),
                    None => {
                        let c = self.constant_index(i);
                        let s = self.fresh();
                        self.line(&format!("{s} = memref.dim {}, {c} : {}", part.0, memref(&part.1)));
                        s
                    }
                });
            }
            let offsets: Vec<String> =
                (0..rank).map(|i| if i == axis { start.clone() } else { zero.clone() }).collect();
            let view = self.fresh();
            let view_ty = subview_type(out, &part.1.dims);
            self.line(&format!(
                "{view} = memref.subview {dest}[{}] [{}] [{}] : {out_ty} to {view_ty}",
                offsets.join(", "),
                sizes.join(", "),
                vec!["1"; rank].join(", ")
            ));
            let t = self.tensor_of(part);
            let shape = Shape { dims: part.1.dims.clone(), element: out.element.clone() };
            self.copy_rows((&t, &tensor_type(&part.1)), (&view, &view_ty), &shape);
        }
    }
}

/// `[[0], [1, 2, ..]]` (a kept leading dim) or `[[0, 1, ..]]` for a rank-`rank` side of a reshape.
fn reassociation(keep: usize, rank: usize) -> String {
    let rest: Vec<String> = (keep..rank).map(|i| i.to_string()).collect();
    if keep == 1 {
        format!("[[0], [{}]]", rest.join(", "))
    } else {
        format!("[[{}]]", rest.join(", "))
    }
}

/// A generic's body lines, indented for the region.
fn indent_body(body: &str) -> String {
    body.lines().filter(|l| !l.is_empty()).map(|l| format!("      {l}\n")).collect()
}
