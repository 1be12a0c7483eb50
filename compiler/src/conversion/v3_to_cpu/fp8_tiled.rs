//! fp8 templates through the transform dialect: the block-scaled e4m3 GEMM, the GEMM of f32
//! activations with e4m3 weights, and 1 x 128 quantization of whole rows.
//!
//! The block-scaled GEMM (`linear` with e4m3 activations and weights, their 1x128 and 128x128
//! scales) runs in the reference's arithmetic order: per output element and K block, a sequential
//! sum of products from zero, then `(partial * x_scale) * w_scale` added to the accumulator, block
//! after block (`v3c_models::interp::kernels::matmul_fp8`). A last-bit difference here moves the
//! next quantization across e4m3 rounding boundaries, so no reassociation and no fused
//! multiply-add.
//!
//! Its IR: the activations decoded once into a scratch `[M, KB, 128]` (zero past K); then, per
//! tile of 16 output columns (and one narrower tail tile), the tile's weights decoded into a
//! scratch `[KB, 128, 16]` (transposed, so that a K step reads the tile's 16 values contiguously;
//! with whole 128-blocks of K read as contiguous 16-byte rows and transposed in registers,
//! [`Emitter::transposed_decode`], else gathered)
//! and the tile's outputs as two tagged generics ([`Emitter::tile_generics`]): the per-block
//! partial sums `[M, KB, 16]` and their scaled sum over blocks `[M, 16]`, written into the
//! output's columns — for the rows in groups of [`ROW_GROUP`] (`[M/8, 8, ...]`), then for the
//! rest one row at a time. The script ([`script`]) tiles the scaled sum by one row group and one
//! block, fuses the partial sums of that block into it and tiles their reduction by one K step,
//! then vectorizes: each lane is one output column, each step one weight load, then per row one
//! multiply and one add, and the block's partial sums and the accumulator stay in registers
//! (loop-invariant subsets hoisted). The same generics without scales and with one block spanning
//! K are the order-preserving GEMM the grouped fp8 GEMMs (f32 activations) and MLA attention use.

use super::fp8::{DECODE_BODY, ENCODE_BODY, FP8_BLOCK};
use super::rows::{lanes, subview_type, tensor_type, RowTile};
use super::*;

/// A buffer: its SSA name and shape.
type Buffer = (String, Shape);

/// Rows of the order-preserving GEMM tiles computed together (that many accumulator vectors share
/// each weight load).
const ROW_GROUP: usize = 8;

/// Output columns of a full tile (one f32 lane each; divides [`FP8_BLOCK`]).
const TILE: usize = 16;

/// The tag of the sums over K blocks of fp8 GEMM tiles `width` columns wide: scaled (block-scaled
/// operands) or not (f32 activations on dequantized weights, one block spanning K).
fn reduce_tag(width: usize, scaled: bool, group: usize) -> String {
    let kind = if scaled { "reduce" } else { "sum" };
    if group == 1 {
        format!("{kind}_w{width}")
    } else {
        format!("{kind}_w{width}_g{group}")
    }
}

/// The transform-script block for the fp8 GEMM tiles `width` columns wide, scaled or not, over
/// rows one at a time (`group` 1) or in groups (`[row groups, group, ...]`, each group whole).
pub(super) fn script((width, scaled, group): (usize, bool, usize)) -> String {
    let tag = reduce_tag(width, scaled, group);
    // A row group is one more (untiled) dim after the rows.
    let g = if group == 1 { "" } else { "0, " };
    // The sum's output operand follows its inputs: partial sums, then (scaled) the two scales.
    let out = if scaled { 3 } else { 1 };
    format!(
        "    %fp8_{tag} = transform.structured.match ops{{[\"linalg.generic\"]}} attributes {{v3c.fp8 = \"{tag}\"}} in %root : (!transform.any_op) -> !transform.any_op
    transform.foreach %fp8_{tag} : !transform.any_op {{
    ^bb0(%red: !transform.any_op):
      %part = transform.get_producer_of_operand %red[0] : (!transform.any_op) -> !transform.any_op
      %pfill = transform.get_producer_of_operand %part[2] : (!transform.any_op) -> !transform.any_op
      %yfill = transform.get_producer_of_operand %red[{out}] : (!transform.any_op) -> !transform.any_op
      %tred, %lm, %lb = transform.structured.tile_using_for %red tile_sizes [1, {g}1, 0] : (!transform.any_op) -> (!transform.any_op, !transform.any_op, !transform.any_op)
      %fpart, %l1 = transform.structured.fuse_into_containing_op %part into %lb : (!transform.any_op, !transform.any_op) -> (!transform.any_op, !transform.any_op)
      %ffill, %l2 = transform.structured.fuse_into_containing_op %pfill into %l1 : (!transform.any_op, !transform.any_op) -> (!transform.any_op, !transform.any_op)
      %tyfill, %yl = transform.structured.tile_using_for %yfill tile_sizes [1, {g}0] : (!transform.any_op) -> (!transform.any_op, !transform.any_op)
      %tpart, %kl = transform.structured.tile_using_for %fpart tile_sizes [0, {g}0, 1, 0] : (!transform.any_op) -> (!transform.any_op, !transform.any_op)
      // Tiling over the dynamic rows left a whole-tensor copy of the partial sums' fill in the
      // loops, only sizing them; folded away before anything is vectorized.
      transform.apply_patterns to %lm {{
        transform.apply_patterns.canonicalization
      }} : !transform.any_op
      transform.structured.vectorize %tpart : !transform.any_op
      transform.structured.vectorize %tred : !transform.any_op
      transform.structured.vectorize %ffill : !transform.any_op
      transform.structured.vectorize %tyfill : !transform.any_op
    }}
"
    )
}

/// The transform-script block of the transposing generics `width` lanes wide
/// ([`Emitter::transposed_generic`]: the e4m3 weights' decodes, the attention's weight
/// transposes): tiles of 16 x the width, vectorized, and their transposed reads made contiguous row
/// loads and a register transpose (`transfer_permutation_patterns`, here only; the lowering's
/// `lower_transpose` shuffles) instead of one strided gather per element.
///
/// `width` 0 is the other shape, for an output `[columns, key tiles, 16]` read from rows of
/// columns: tiles of 16 columns x one key tile x 16 keys, key tiles outermost.
pub(super) fn transpose_script(width: usize) -> String {
    let (sizes, order) = if width == 0 { ("16, 1, 16", " interchange = [1, 0, 2]") } else { ("1, 16, {width}", "") };
    let sizes = sizes.replace("{width}", &width.to_string());
    format!(
        "    %tr_{width} = transform.structured.match ops{{[\"linalg.generic\"]}} attributes {{v3c.fp8 = \"transpose_w{width}\"}} in %root : (!transform.any_op) -> !transform.any_op
    transform.foreach %tr_{width} : !transform.any_op {{
    ^bb0(%op: !transform.any_op):
      %t, %l0, %l1, %l2 = transform.structured.tile_using_for %op tile_sizes [{sizes}]{order} : (!transform.any_op) -> (!transform.any_op, !transform.any_op, !transform.any_op, !transform.any_op)
      transform.structured.vectorize %t : !transform.any_op
      transform.apply_patterns to %l0 {{
        transform.apply_patterns.vector.transfer_permutation_patterns
      }} : !transform.any_op
    }}
"
    )
}

/// A generic body (indices `%i0..%i2` defined before it) that decodes `src[row, k]` (e4m3 bits)
/// for `k = kb * 128 + kk`, zero at `k >= k_len` (a partial last block): (body, its result).
pub(super) fn decode_at(
    src: &str,
    src_ty: &str,
    row: &str,
    (kb, kk): (&str, &str),
    k_len: usize,
) -> (String, &'static str) {
    let mut body = format!(
        "%blk = arith.constant {FP8_BLOCK} : index\n%kbase = arith.muli {kb}, %blk : index\n%k = arith.addi %kbase, {kk} : index\n"
    );
    let ragged = !k_len.is_multiple_of(FP8_BLOCK);
    if ragged {
        body.push_str(&format!(
            "%klen = arith.constant {k_len} : index\n%kin = arith.cmpi ult, %k, %klen : index\n%k0 = arith.constant 0 : index\n%kc = arith.select %kin, %k, %k0 : index\n"
        ));
    }
    let k = if ragged { "%kc" } else { "%k" };
    body.push_str(&format!("%b = tensor.extract {src}[{row}, {k}] : {src_ty}\n{DECODE_BODY}\n"));
    if ragged {
        body.push_str("%y = arith.select %kin, %r, %zero : f32");
        (body, "%y")
    } else {
        (body, "%r")
    }
}

fn indices(rank: usize) -> String {
    (0..rank).map(|i| format!("%i{i} = linalg.index {i} : index\n")).collect()
}

impl Emitter {
    /// `out = block-scaled x . w^T` for e4m3 `x` [M, K] with scales [M, KB] and e4m3 `w` [N, K]
    /// with scales [N/128, KB] (see the module docs).
    pub(super) fn linear_fp8(&mut self, a: &[(String, Shape)], dest: &str, out: &Shape) {
        let (x, xs, w, ws) = (&a[0], &a[1], &a[2], &a[3]);
        let k = x.1.dims[1].unwrap_or(0);
        let n = w.1.dims[0].unwrap_or(0);
        let kb = k.div_ceil(FP8_BLOCK);
        // The activations, decoded once.
        let xf_shape = Shape { dims: vec![x.1.dims[0], Some(kb), Some(FP8_BLOCK)], element: "f32".into() };
        let xf = self.alloc(&xf_shape, x);
        let xq = self.tensor_of(x);
        let (decode, result) = decode_at(&xq, &tensor_type(&x.1), "%i0", ("%i1", "%i2"), k);
        self.row_generic((&xf, &memref(&xf_shape)), &xf_shape, &[], ("", &format!("{}{decode}", indices(3)), result));
        let xft = self.tensor_of(&(xf, xf_shape.clone()));
        let (xst, wq, wst) = (self.tensor_of(xs), self.tensor_of(w), self.tensor_of(ws));
        let c0 = self.constant_index(0);
        let rows = self.fresh();
        self.line(&format!("{rows} = memref.dim {}, {c0} : {}", x.0, memref(&x.1)));
        let full = n / TILE;
        let tail = n % TILE;
        let names = FpNames { xft, xst, wq, wst, rows };
        // Weight tiles: scratch buffers allocated before the loop over tiles.
        let scratch = |e: &mut Emitter, width: usize| {
            let shape = Shape { dims: vec![Some(kb), Some(FP8_BLOCK), Some(width)], element: "f32".into() };
            (e.alloc(&shape, w), shape)
        };
        if full > 0 {
            let wt = scratch(self, TILE);
            let (lo, hi, step) = (self.constant_index(0), self.constant_index(full * TILE), self.constant_index(TILE));
            let j0 = self.fresh();
            self.line(&format!("scf.for {j0} = {lo} to {hi} step {step} {{"));
            self.fp8_tile(&names, (w, ws, &wt, k), (dest, out), &j0);
            self.line("}");
        }
        if tail > 0 {
            let wt = scratch(self, tail);
            let j0 = self.constant_index(full * TILE);
            self.fp8_tile(&names, (w, ws, &wt, k), (dest, out), &j0);
        }
    }

    /// Output columns `j0 .. j0 + width` of the fp8 GEMM: the weight tile decoded (transposed) into
    /// a scratch buffer, then the tagged partial sums and their scaled sum over K blocks.
    fn fp8_tile(
        &mut self,
        names: &FpNames,
        (w, ws, (wt, wt_shape), k): (&Buffer, &Buffer, &Buffer, usize),
        (dest, out): (&str, &Shape),
        j0: &str,
    ) {
        let (kb, width) = (wt_shape.dims[0].unwrap_or(0), wt_shape.dims[2].unwrap_or(0));
        let wt_ty = memref(wt_shape);
        // wt[b, kk, c] = w[j0 + c, b * 128 + kk]: one decode per weight per call.
        if k.is_multiple_of(FP8_BLOCK) {
            let (slice, sfx) = (self.fresh(), format!("_d{}", self.next));
            self.line(&format!(
                "{slice} = tensor.extract_slice {}[{j0}, 0] [{width}, {k}] [1, 1] : {} to tensor<{width}x{k}xi8>",
                names.wq,
                tensor_type(&w.1)
            ));
            let text = self.transposed_decode(&sfx, &slice, (k, width), (wt, &wt_ty));
            self.line(&text);
        } else {
            let (decode, result) = decode_at(&names.wq, &tensor_type(&w.1), "%col", ("%i0", "%i1"), k);
            let body = format!("{}%col = arith.addi {j0}, %i2 : index\n{decode}", indices(3));
            self.row_generic((wt, &wt_ty), wt_shape, &[], ("", &body, result));
        }
        let (wtt, ysub, nb, blk, c0, wsr) =
            (self.fresh(), self.fresh(), self.fresh(), self.fresh(), self.fresh(), self.fresh());
        let ysub_ty = subview_type(out, &[None, Some(width)]);
        let (rows, xft, xst, wst) = (&names.rows, &names.xft, &names.xst, &names.wst);
        let xs_ty = tensor_type(&Shape { dims: vec![None, Some(kb)], element: "f32".into() });
        let ws_ty = tensor_type(&ws.1);
        let wtt_ty = tensor_type(wt_shape);
        self.line(&format!(
            "{wtt} = bufferization.to_tensor {wt} restrict : {wt_ty} to {wtt_ty}
    {c0} = arith.constant 0 : index
    {blk} = arith.constant {FP8_BLOCK} : index
    {nb} = arith.divui {j0}, {blk} : index
    {wsr} = tensor.extract_slice {wst}[{nb}, 0] [1, {kb}] [1, 1] : {ws_ty} to tensor<{kb}xf32>
    {ysub} = memref.subview {dest}[{c0}, {j0}] [{rows}, {width}] [1, 1] : {o_ty} to {ysub_ty}",
            o_ty = memref(out),
        ));
        let sfx = format!("_f{}", self.next);
        let text = self.tile_generics(
            &sfx,
            rows,
            (xft, &format!("tensor<?x{kb}x{FP8_BLOCK}xf32>")),
            (&wtt, "f32"),
            Some((xst, &xs_ty, &wsr)),
            (kb, Some(FP8_BLOCK), width),
            (&ysub, &ysub_ty),
        );
        self.line(&text);
    }

    /// Text decoding the e4m3 rows `src` (a tensor `[width, K]` of bits, K a multiple of 128) into
    /// the transposed tile `buf` (`[K/128, 128, width]` f32, a memref of `buf_ty`) as the fp8 GEMM
    /// template reads its weights. SSA names end in `sfx`.
    pub(super) fn transposed_decode(
        &mut self,
        sfx: &str,
        src: &str,
        (k, width): (usize, usize),
        (buf, buf_ty): (&str, &str),
    ) -> String {
        let kb = k / FP8_BLOCK;
        let w3_ty = format!("tensor<{width}x{kb}x{FP8_BLOCK}xi8>");
        let view = format!(
            "%dw3{sfx} = tensor.expand_shape {src} [[0], [1, 2]] output_shape [{width}, {kb}, {FP8_BLOCK}] : tensor<{width}x{k}xi8> into {w3_ty}\n"
        );
        let generic = self.transposed_generic(
            sfx,
            (&format!("%dw3{sfx}"), &w3_ty, "i8"),
            ["c", "a", "b"],
            [kb, FP8_BLOCK, width],
            (DECODE_BODY, "%r"),
            (buf, buf_ty),
        );
        view + &generic
    }

    /// Registers the [`transpose_script`] block of `width` lanes; returns the tag it matches.
    pub(super) fn use_transpose(&mut self, width: usize) -> String {
        if !self.transposes.contains(&width) {
            self.transposes.push(width);
        }
        format!("transpose_w{width}")
    }

    /// Text of `buf[a, b, c] = f(src[read])` (`read` the source's indices in terms of the output's
    /// `a, b, c`, a permutation with `c` not last; `src` a tensor of `src_ty` with elements `el`,
    /// `dims` the output's, `f` the `body` on `%b` leaving `result`), tagged for
    /// [`transpose_script`]: contiguous row reads transposed in registers. The output's middle dim
    /// must be a multiple of 16, its last one at most 16 or a multiple of 16. SSA names end in
    /// `sfx`.
    pub(super) fn transposed_generic(
        &mut self,
        sfx: &str,
        (src, src_ty, el): (&str, &str, &str),
        read: [&str; 3],
        [d0, d1, d2]: [usize; 3],
        (body, result): (&str, &str),
        (buf, buf_ty): (&str, &str),
    ) -> String {
        let width = d2.min(16);
        let tag = self.use_transpose(width);
        let t_ty = format!("tensor<{d0}x{d1}x{d2}xf32>");
        format!(
            "%dwe{sfx} = tensor.empty() : {t_ty}
%dwd{sfx} = linalg.generic {{indexing_maps = [{}, {}], iterator_types = [\"parallel\", \"parallel\", \"parallel\"]}} ins({src} : {src_ty}) outs(%dwe{sfx} : {t_ty}) attrs = {{v3c.fp8 = \"{tag}\"}} {{
^bb0(%b: {el}, %c: f32):
{}
  linalg.yield {result} : f32
}} -> {t_ty}
bufferization.materialize_in_destination %dwd{sfx} in restrict writable {buf} : ({t_ty}, {buf_ty}) -> ()",
            affine(&["a", "b", "c"], &read),
            identity(3),
            indent(body, 2),
        )
    }

    /// The text of one fp8 GEMM tile (SSA names ending in `sfx`): the tagged per-block partial
    /// sums of `x` [R, KB, BL] (`rows` = R, an index value) and the tile's weights `wt`
    /// [KB, BL, W] (decoded, transposed; BL None: dynamic), then their sum over blocks — each
    /// block's sum times its activation and weight scales when `scales` (x scales [R, KB] with
    /// their type, the tile's weight scales [KB]) are given — materialized into `dest` ([R, W], a
    /// memref of `dest_ty`, a strided layout with a dynamic offset). Rows [`ROW_GROUP`] at a time
    /// (as many accumulator vectors per weight load), then the rest one at a time.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tile_generics(
        &mut self,
        sfx: &str,
        rows: &str,
        (x, x_ty): (&str, &str),
        (wt, wt_el): (&str, &str),
        scales: Option<(&str, &str, &str)>,
        (kb, bl, width): (usize, Option<usize>, usize),
        (dest, dest_ty): (&str, &str),
    ) -> String {
        let bls = bl.map_or("?".to_string(), |b| b.to_string());
        let blv = bl.map_or(format!("%tgbl{sfx}"), |b| b.to_string());
        let mut text = format!(
            "%tggc{sfx} = arith.constant {ROW_GROUP} : index
%tgrr{sfx} = arith.remui {rows}, %tggc{sfx} : index
%tgrg{sfx} = arith.subi {rows}, %tgrr{sfx} : index
%tgnb{sfx} = arith.divui %tgrg{sfx}, %tggc{sfx} : index
"
        );
        if bl.is_none() {
            text.push_str(&format!(
                "%tgc2{sfx} = arith.constant 2 : index\n%tgbl{sfx} = tensor.dim {x}, %tgc2{sfx} : {x_ty}\n"
            ));
        }
        let slice_ty = format!("tensor<?x{kb}x{bls}xf32>");
        let stride = dest_ty
            .split("strided<[")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .map_or(width.to_string(), |s| s.trim().to_string());
        let stride4 = stride.parse::<usize>().map_or("?".to_string(), |s| (ROW_GROUP * s).to_string());
        let d4_ty = format!("memref<?x{ROW_GROUP}x{width}xf32, strided<[{stride4}, {stride}, 1], offset: ?>>");
        text.push_str(&format!(
            "%tgxg{sfx}s = tensor.extract_slice {x}[0, 0, 0] [%tgrg{sfx}, {kb}, {blv}] [1, 1, 1] : {x_ty} to {slice_ty}
%tgxg{sfx} = tensor.expand_shape %tgxg{sfx}s [[0, 1], [2], [3]] output_shape [%tgnb{sfx}, {ROW_GROUP}, {kb}, {blv}] : {slice_ty} into tensor<?x{ROW_GROUP}x{kb}x{bls}xf32>
%tgx1{sfx} = tensor.extract_slice {x}[%tgrg{sfx}, 0, 0] [%tgrr{sfx}, {kb}, {blv}] [1, 1, 1] : {x_ty} to {slice_ty}
%tgdg{sfx}s = memref.subview {dest}[0, 0] [%tgrg{sfx}, {width}] [1, 1] : {dest_ty} to {dest_ty}
%tgdg{sfx} = memref.expand_shape %tgdg{sfx}s [[0, 1], [2]] output_shape [%tgnb{sfx}, {ROW_GROUP}, {width}] : {dest_ty} into {d4_ty}
%tgd1{sfx} = memref.subview {dest}[%tgrg{sfx}, 0] [%tgrr{sfx}, {width}] [1, 1] : {dest_ty} to {dest_ty}
"
        ));
        let (s4, s1) = match scales {
            Some((xs, xs_ty, ws)) => {
                let st = format!("tensor<?x{kb}xf32>");
                text.push_str(&format!(
                    "%tgsg{sfx}s = tensor.extract_slice {xs}[0, 0] [%tgrg{sfx}, {kb}] [1, 1] : {xs_ty} to {st}
%tgsg{sfx} = tensor.expand_shape %tgsg{sfx}s [[0, 1], [2]] output_shape [%tgnb{sfx}, {ROW_GROUP}, {kb}] : {st} into tensor<?x{ROW_GROUP}x{kb}xf32>
%tgs1{sfx} = tensor.extract_slice {xs}[%tgrg{sfx}, 0] [%tgrr{sfx}, {kb}] [1, 1] : {xs_ty} to {st}
"
                ));
                (
                    Some((format!("%tgsg{sfx}"), format!("tensor<?x{ROW_GROUP}x{kb}xf32>"), ws.to_string())),
                    Some((format!("%tgs1{sfx}"), st, ws.to_string())),
                )
            }
            None => (None, None),
        };
        let group4 = self.row_group(
            &format!("{sfx}_g"),
            ROW_GROUP,
            &format!("%tgnb{sfx}"),
            (&format!("%tgxg{sfx}"), &format!("tensor<?x{ROW_GROUP}x{kb}x{bls}xf32>")),
            (wt, &format!("tensor<{kb}x{bls}x{width}x{wt_el}>")),
            s4.as_ref().map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
            (kb, width),
            (&format!("%tgdg{sfx}"), &d4_ty),
        );
        let group1 = self.row_group(
            &format!("{sfx}_1"),
            1,
            &format!("%tgrr{sfx}"),
            (&format!("%tgx1{sfx}"), &slice_ty),
            (wt, &format!("tensor<{kb}x{bls}x{width}x{wt_el}>")),
            s1.as_ref().map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str())),
            (kb, width),
            (&format!("%tgd1{sfx}"), dest_ty),
        );
        text.push_str(&group4);
        text.push('\n');
        text.push_str(&group1);
        text
    }

    /// The two tagged generics of [`Emitter::tile_generics`] for rows one at a time (`group` 1:
    /// `x` [R, KB, BL], `dest` [R, W]) or `group` at a time (`x` [R/g, g, KB, BL], `dest`
    /// [R/g, g, W]); `count` the leading dim.
    #[allow(clippy::too_many_arguments)]
    fn row_group(
        &mut self,
        sfx: &str,
        group: usize,
        count: &str,
        (x, x_ty): (&str, &str),
        (wt, wt_ty): (&str, &str),
        scales: Option<(&str, &str, &str)>,
        (kb, width): (usize, usize),
        (dest, dest_ty): (&str, &str),
    ) -> String {
        self.use_fp8_width((width, scales.is_some(), group));
        // A weight tile of bf16 (MLA's kv_b read as stored) is widened as read: exact.
        let wt_el = wt_ty.rsplit('x').next().unwrap_or("f32>").trim_end_matches('>');
        let (widen, bw) = if wt_el == "f32" {
            (String::new(), "%b")
        } else {
            (format!("%bw = arith.extf %b : {wt_el} to f32"), "%bw")
        };
        let g = if group == 1 { String::new() } else { format!("{group}x") };
        let p_ty = format!("tensor<?x{g}{kb}x{width}xf32>");
        let y_ty = format!("tensor<?x{g}{width}xf32>");
        let map = |d: &[&str], r: &[&str]| affine(d, r);
        // Output columns innermost: the vector lanes; a row group's rows next to them.
        let rows: &[&str] = if group == 1 { &["m"] } else { &["m", "mi"] };
        let dims = |rest: &[&'static str]| [rows, rest].concat();
        let (pd, yd) = (dims(&["b", "kk", "n"]), dims(&["b", "n"]));
        let row_par = if group == 1 { "\"parallel\"" } else { "\"parallel\", \"parallel\"" };
        let tag = reduce_tag(width, scales.is_some(), group);
        let (ins, maps, args, scaled) = match scales {
            Some((xs, xs_ty, ws)) => (
                format!("%part{sfx}, {xs}, {ws} : {p_ty}, {xs_ty}, tensor<{kb}xf32>"),
                [map(&yd, &dims(&["b", "n"])), map(&yd, &dims(&["b"])), map(&yd, &["b"]), map(&yd, &dims(&["n"]))]
                    .join(", "),
                "%p: f32, %sx: f32, %sw: f32, %c: f32",
                "%t1 = arith.mulf %p, %sx : f32\n  %t2 = arith.mulf %t1, %sw : f32\n  %s = arith.addf %c, %t2 : f32",
            ),
            None => (
                format!("%part{sfx} : {p_ty}"),
                [map(&yd, &dims(&["b", "n"])), map(&yd, &dims(&["n"]))].join(", "),
                "%p: f32, %c: f32",
                "%s = arith.addf %c, %p : f32",
            ),
        };
        format!(
            "%pe{sfx} = tensor.empty({count}) : {p_ty}
%pz{sfx} = linalg.fill ins(%zero : f32) outs(%pe{sfx} : {p_ty}) -> {p_ty}
%part{sfx} = linalg.generic {{indexing_maps = [{}, {}, {}], iterator_types = [{row_par}, \"parallel\", \"reduction\", \"parallel\"]}} ins({x}, {wt} : {x_ty}, {wt_ty}) outs(%pz{sfx} : {p_ty}) attrs = {{v3c.fp8 = \"partial\"}} {{
^bb0(%a: f32, %b: {wt_el}, %c: f32):
  {widen}
  %p = arith.mulf %a, {bw} : f32
  %s = arith.addf %c, %p : f32
  linalg.yield %s : f32
}} -> {p_ty}
%ye{sfx} = tensor.empty({count}) : {y_ty}
%yz{sfx} = linalg.fill ins(%zero : f32) outs(%ye{sfx} : {y_ty}) -> {y_ty}
%y{sfx} = linalg.generic {{indexing_maps = [{maps}], iterator_types = [{row_par}, \"reduction\", \"parallel\"]}} ins({ins}) outs(%yz{sfx} : {y_ty}) attrs = {{v3c.fp8 = \"{tag}\"}} {{
^bb0({args}):
  {scaled}
  linalg.yield %s : f32
}} -> {y_ty}
bufferization.materialize_in_destination %y{sfx} in restrict writable {dest} : ({y_ty}, {dest_ty}) -> ()",
            map(&pd, &dims(&["b", "kk"])),
            map(&pd, &["b", "kk", "n"]),
            map(&pd, &dims(&["b", "n"])),
        )
    }

    /// f32 activations with an fp8 weight: `out = x . (e4m3(w) * ws)^T`, the weight dequantized as
    /// the reference does (each value times its 128 x 128 block's scale). Per chunk of 128 output
    /// columns (one scale block; a narrower tail chunk), the chunk's weights are dequantized into a
    /// scratch `[128, K]` by a tagged row template and multiplied by the dense f32 GEMM template
    /// ([`Emitter::gemm_vectorized`]) into a scratch `[M, 128]`, then copied into the output's
    /// columns: the dequantization is paid once per weight and call, never a whole f32 copy of it.
    pub(super) fn linear_dequant(&mut self, a: &[(String, Shape)], dest: &str, out: &Shape) {
        let (x, w, ws) = (&a[0], &a[1], &a[2]);
        let k = x.1.dims[1].unwrap_or(0);
        let n = w.1.dims[0].unwrap_or(0);
        let (wq, wst) = (self.tensor_of(w), self.tensor_of(ws));
        let (full, tail) = (n / FP8_BLOCK, n % FP8_BLOCK);
        let scratch = |e: &mut Emitter, width: usize| {
            let wd = Shape { dims: vec![Some(width), Some(k)], element: "f32".into() };
            let y = Shape { dims: vec![x.1.dims[0], Some(width)], element: "f32".into() };
            ((e.alloc(&wd, w), wd), (e.alloc(&y, x), y))
        };
        let names = (wq, wst);
        if full > 0 {
            let bufs = scratch(self, FP8_BLOCK);
            let (lo, hi, step) =
                (self.constant_index(0), self.constant_index(full * FP8_BLOCK), self.constant_index(FP8_BLOCK));
            let j0 = self.fresh();
            self.line(&format!("scf.for {j0} = {lo} to {hi} step {step} {{"));
            self.dequant_chunk(x, (w, ws), &names, &bufs, (dest, out), &j0);
            self.line("}");
        }
        if tail > 0 {
            let bufs = scratch(self, tail);
            let j0 = self.constant_index(full * FP8_BLOCK);
            self.dequant_chunk(x, (w, ws), &names, &bufs, (dest, out), &j0);
        }
    }

    /// Output columns `j0 ..` of [`Emitter::linear_dequant`], as wide as the scratch buffers.
    fn dequant_chunk(
        &mut self,
        x: &Buffer,
        (w, ws): (&Buffer, &Buffer),
        (wq, wst): &(String, String),
        ((wd, wd_shape), (y, y_shape)): &(Buffer, Buffer),
        (dest, out): (&str, &Shape),
        j0: &str,
    ) {
        let width = wd_shape.dims[0].unwrap_or(0);
        let body = format!(
            "{}%row = arith.addi {j0}, %i0 : index\n%b = tensor.extract {wq}[%row, %i1] : {}\n{DECODE_BODY}\n%blk = arith.constant {FP8_BLOCK} : index\n%nb = arith.divui %row, %blk : index\n%kb = arith.divui %i1, %blk : index\n%sc = tensor.extract {wst}[%nb, %kb] : {}\n%y = arith.mulf %r, %sc : f32",
            indices(2),
            tensor_type(&w.1),
            tensor_type(&ws.1)
        );
        self.row_generic((wd, &memref(wd_shape)), wd_shape, &[], ("", &body, "%y"));
        self.gemm_vectorized(x, &(wd.clone(), wd_shape.clone()), y, y_shape);
        let (yt, c0, view) = (self.fresh(), self.fresh(), self.fresh());
        let view_ty = subview_type(out, &[None, Some(width)]);
        let rows = self.fresh();
        self.line(&format!(
            "{yt} = bufferization.to_tensor {y} restrict : {} to {}
    {c0} = arith.constant 0 : index
    {rows} = memref.dim {y}, {c0} : {}
    {view} = memref.subview {dest}[{c0}, {j0}] [{rows}, {width}] [1, 1] : {} to {view_ty}",
            memref(y_shape),
            tensor_type(y_shape),
            memref(y_shape),
            memref(out)
        ));
        self.copy_rows((&yt, &tensor_type(y_shape)), (&view, &view_ty), y_shape);
    }

    /// 1 x `group` quantization of rows x [M, K] into e4m3 bits q [M, K] and scales [M, G]
    /// (`kernels::quantize_fp8`): per row and group, `amax` (a max: exact in any order) of |x|, then
    /// `s = max(amax, 1e-4) / 448` and `q = e4m3(x / s)`; three tagged row templates. When groups
    /// tile K, x and q are viewed as [M, G, group] (every read a plain vector load); otherwise the
    /// templates index x by `g * group + kk` and read past-K magnitudes as 0 (no change to a max).
    pub(super) fn quantize_rows(&mut self, x: &Buffer, group: usize, q: (&str, &Shape), scales: (&str, &Shape)) {
        let k = x.1.dims[1].unwrap_or(0);
        let groups = k.div_ceil(group);
        let amax_shape = Shape { dims: vec![x.1.dims[0], Some(groups)], element: "f32".into() };
        let amax = self.alloc(&amax_shape, x);
        let amax_ty = memref(&amax_shape);
        let (c0, rows, empty, zeros, res) =
            (self.constant_index(0), self.fresh(), self.fresh(), self.fresh(), self.fresh());
        self.line(&format!("{rows} = memref.dim {}, {c0} : {}", x.0, memref(&x.1)));
        let at = tensor_type(&amax_shape);
        let grouped = |shape: &Shape| Shape {
            dims: vec![shape.dims[0], Some(groups), Some(group)],
            element: shape.element.clone(),
        };
        let exact = k.is_multiple_of(group);
        // The reduction's one input: x viewed as [M, G, group], or (partial last group) a constant
        // of the group's extent that the body does not read, x then read by index.
        let (input, input_ty, read) = if exact {
            let view = self.fresh();
            self.line(&format!(
                "{view} = memref.expand_shape {} [[0], [1, 2]] output_shape [{rows}, {groups}, {group}] : {} into {}",
                x.0,
                memref(&x.1),
                memref(&grouped(&x.1))
            ));
            let t = self.tensor_of(&(view, grouped(&x.1)));
            (t, tensor_type(&grouped(&x.1)), "%v = math.absf %in : f32".to_string())
        } else {
            let extent = format!("{}_group_{}", self.prefix, self.next);
            self.globals
                .push(format!("memref.global \"private\" constant @{extent} : memref<{group}xf32> = dense<0.0>"));
            let (g, gt) = (self.fresh(), self.fresh());
            self.line(&format!("{g} = memref.get_global @{extent} : memref<{group}xf32>"));
            self.line(&format!(
                "{gt} = bufferization.to_tensor {g} restrict : memref<{group}xf32> to tensor<{group}xf32>"
            ));
            let xt = self.tensor_of(x);
            let read = format!(
                "%i0 = linalg.index 0 : index\n%i1 = linalg.index 1 : index\n%i2 = linalg.index 2 : index\n%grp = arith.constant {group} : index\n%kbase = arith.muli %i1, %grp : index\n%k = arith.addi %kbase, %i2 : index\n%klen = arith.constant {k} : index\n%kin = arith.cmpi ult, %k, %klen : index\n%k0 = arith.constant 0 : index\n%kc = arith.select %kin, %k, %k0 : index\n%xv = tensor.extract {xt}[%i0, %kc] : {}\n%xa = math.absf %xv : f32\n%v = arith.select %kin, %xa, %zero : f32",
                tensor_type(&x.1)
            );
            (gt, format!("tensor<{group}xf32>"), read)
        };
        let input_map =
            if exact { affine(&["m", "g", "kk"], &["m", "g", "kk"]) } else { affine(&["m", "g", "kk"], &["kk"]) };
        self.line(&format!("{empty} = tensor.empty({rows}) : {at}"));
        self.line(&format!("{zeros} = linalg.fill ins(%zero : f32) outs({empty} : {at}) -> {at}"));
        // A whole group a step (a max needs no order: one wide vector, one horizontal max).
        let tile = RowTile {
            sizes: vec![1, 1, if group <= 256 { group } else { lanes(Some(group)) }],
            fill_operand: Some(1),
            interchange: false,
            reduced: 1,
        };
        self.line(&format!(
            "{res} = linalg.generic {{indexing_maps = [{input_map}, {}], iterator_types = [\"parallel\", \"parallel\", \"reduction\"]}} ins({input} : {input_ty}) outs({zeros} : {at}) attrs = {{v3c.rows = \"{}\"}} {{
    ^bb0(%in: f32, %c: f32):
{}
      %r = arith.maxnumf %c, %v : f32
      linalg.yield %r : f32
    }} -> {at}",
            affine(&["m", "g", "kk"], &["m", "g"]),
            tile.tag(),
            indent(&read, 6),
        ));
        self.use_tile(tile);
        self.line(&format!(
            "bufferization.materialize_in_destination {res} in restrict writable {amax} : ({at}, {amax_ty}) -> ()"
        ));
        let amax = (amax, amax_shape);
        let ins = [self.same_index(&amax)];
        let body = "%floor = arith.constant 1.0e-04 : f32\n%fmax = arith.constant 448.0 : f32\n%am = arith.maxnumf %a, %floor : f32\n%s = arith.divf %am, %fmax : f32";
        self.row_generic((scales.0, &memref(scales.1)), scales.1, &ins, ("%a: f32", body, "%s"));
        let scales = (scales.0.to_string(), scales.1.clone());
        if exact {
            let (xv, qv) = (self.fresh(), self.fresh());
            let (x3, q3) = (grouped(&x.1), grouped(q.1));
            for (view, src, shape, view_shape) in [(&xv, &x.0, &x.1, &x3), (&qv, &q.0.to_string(), q.1, &q3)] {
                self.line(&format!(
                    "{view} = memref.expand_shape {src} [[0], [1, 2]] output_shape [{rows}, {groups}, {group}] : {} into {}",
                    memref(shape),
                    memref(view_shape)
                ));
            }
            let ins = [self.same_index(&(xv, x3)), self.indexed_by(&scales, 3, &[0, 1])];
            let body = format!("%x = arith.divf %xin, %sc : f32\n{ENCODE_BODY}");
            self.row_generic((&qv, &memref(&q3)), &q3, &ins, ("%xin: f32, %sc: f32", &body, "%r"));
        } else {
            let st = self.tensor_of(&scales);
            let ins = [self.same_index(x)];
            let body = format!(
                "%i0 = linalg.index 0 : index\n%i1 = linalg.index 1 : index\n%grp = arith.constant {group} : index\n%g = arith.divui %i1, %grp : index\n%sc = tensor.extract {st}[%i0, %g] : {}\n%x = arith.divf %xin, %sc : f32\n{ENCODE_BODY}",
                tensor_type(&scales.1)
            );
            self.row_generic((q.0, &memref(q.1)), q.1, &ins, ("%xin: f32", &body, "%r"));
        }
    }

    fn use_fp8_width(&mut self, tile: (usize, bool, usize)) {
        if !self.fp8_widths.contains(&tile) {
            self.fp8_widths.push(tile);
        }
    }
}

/// Tensors and sizes every tile of one fp8 GEMM shares.
struct FpNames {
    xft: String,
    xst: String,
    wq: String,
    wst: String,
    rows: String,
}
