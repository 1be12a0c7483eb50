//! MLA attention (spec section 3), naive and absorbed forms, one sequence's prefill or a batch's
//! decode, through the transform dialect.
//!
//! Every product is the order-preserving GEMM of [`super::fp8_tiled`]
//! ([`Emitter::tile_generics`], unscaled: one vector lane per output column, each a sequential
//! sum of products from zero, a multiply then an add): the reference interpreter's order, so
//! attention gives the reference's bits in both precisions (fp8 quantizes its output next, where
//! a last-bit difference moves values across e4m3 rounding boundaries). Such a GEMM reads its
//! right operand K-major; operands that are not are transposed first (`kv_b` for the naive
//! expansion and W_UV, once per launch; per sequence, its latent rows and, naive, its keys), whole
//! 16 x 16 tiles read as rows and transposed in registers where the widths allow
//! ([`Emitter::transposed_generic`]), the rest by gathering row templates. A bf16 `kv_b` is read as
//! stored (widened as read); an e4m3 one is dequantized once per launch. The softmax is five row
//! templates over the scores kept as `[rows, key tiles, 16]` (every tile static, so
//! vectorizable): the masked and scaled scores, their max, the exponentials, their sum in key
//! order, the division.
//!
//! Per sequence (prefill: the one sequence and its T queries; decode: each of B sequences and its
//! one query), per chunk of queries (keys no query of the chunk sees are not computed): naive, per
//! head, scores = q_nope . keys + q_pe . k_pe over the latent's expansion, softmax, P . V;
//! absorbed, q_abs = q_nope . W_UK per head, then for every head at once (a score row per query and
//! head: keys and values are the latent rows all heads share) scores = q_abs . latent + q_pe .
//! k_pe, softmax, o_lat = P . latent, and per head o_lat . W_UV^T.

use super::fp8::{DECODE_BODY, FP8_BLOCK};
use super::rows::{tensor_type, RowTile};
use super::*;

/// Score rows per chunk (a row per query, absorbed a row per query and head): bounds the score
/// buffers to `5 x chunk x keys` floats.
const QUERY_CHUNK: usize = 256;

/// Static facts of one MLA op.
pub(super) struct AttentionSpec {
    pub(super) h: usize,
    pub(super) dn: usize,
    pub(super) dr: usize,
    pub(super) dv: usize,
    pub(super) kv: usize,
    pub(super) scale: String,
    pub(super) absorbed: bool,
    pub(super) decode: bool,
}

/// The output columns of an order-preserving GEMM.
pub(super) enum Columns<'a> {
    /// A static count: tiles of 16 (the loop variable the column), then a narrower last one.
    Static(usize),
    /// A dynamic count of 16-column tiles (the loop variable the tile's index).
    Tiles(&'a str),
}

/// The tile shape of the row templates over `[rows, tiles, 16]` (and of the transposes, key tiles
/// outermost).
fn key_tiles(interchange: bool, reduced: usize) -> RowTile {
    RowTile { sizes: vec![1, 1, 16], fill_operand: (reduced > 1).then_some(1), interchange, reduced }
}

/// `(n + 15) / 16` as `{name}` (with `%m_c15`, `%m_c16` defined).
fn tiles_of(name: &str, n: &str) -> String {
    format!("{name}0 = arith.addi {n}, %m_c15 : index\n{name} = arith.divui {name}0, %m_c16 : index\n")
}

/// A generic body dequantizing e4m3 `kv_b` (tensor `wt` of `w_ty`, scales `st` of `s_ty`) at row
/// `row0 + %i0`, column `%i1` (indices defined here): the bits decoded, times their 128 x 128
/// block's scale, into `%y`.
fn dequant_body((wt, w_ty): (&str, &str), (st, s_ty): (&str, &str), row0: &str) -> String {
    format!(
        "%i0 = linalg.index 0 : index\n%i1 = linalg.index 1 : index\n%row = arith.addi {row0}, %i0 : index\n%b = tensor.extract {wt}[%row, %i1] : {w_ty}\n{DECODE_BODY}\n%blk = arith.constant {FP8_BLOCK} : index\n%rb = arith.divui %row, %blk : index\n%cb = arith.divui %i1, %blk : index\n%sc = tensor.extract {st}[%rb, %cb] : {s_ty}\n%y = arith.mulf %r, %sc : f32"
    )
}

/// `%{name}w{w}`: columns `j ..` (`w` of them) of rows `r0 .. r0 + k` of the 2-D tensor `src`
/// (`src_ty`), as the `[1, k, w]` weight tile of an order-preserving GEMM (`k` a count, or an
/// index value for a dynamic one).
pub(super) fn k_major_tile(
    name: &str,
    (src, src_ty): (&str, &str),
    (r0, k): (&str, &str),
    j: &str,
    w: usize,
) -> String {
    let ks = if k.starts_with('%') { "?" } else { k };
    let el = src_ty.rsplit('x').next().unwrap_or("f32>").trim_end_matches('>');
    format!(
        "%{name}w{w}s = tensor.extract_slice {src}[{r0}, {j}] [{k}, {w}] [1, 1] : {src_ty} to tensor<{ks}x{w}x{el}>\n%{name}w{w} = tensor.expand_shape %{name}w{w}s [[0, 1], [2]] output_shape [1, {k}, {w}] : tensor<{ks}x{w}x{el}> into tensor<1x{ks}x{w}x{el}>"
    )
}

impl Emitter {
    /// Text of a tagged row template inside a region: the buffer `buf` (`buf_ty`) := the generic
    /// over the index space of tensor type `ty` (dynamic sizes `sizes`, `rank` dims) reading `ins`
    /// (tensor, type, indexing map), block arguments `args` then `%c`, its element `result`.
    #[allow(clippy::too_many_arguments)]
    fn generic_into(
        &mut self,
        name: &str,
        (buf, buf_ty): (&str, &str),
        (ty, sizes, rank): (&str, &str, usize),
        ins: &[(&str, &str, String)],
        (args, body, result): (&str, &str, &str),
        tile: RowTile,
    ) -> String {
        let tag = tile.tag();
        self.use_tile(tile);
        let maps: Vec<String> = ins.iter().map(|i| i.2.clone()).chain([identity(rank)]).collect();
        let operands = if ins.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = ins.iter().map(|i| i.0).collect();
            let types: Vec<&str> = ins.iter().map(|i| i.1).collect();
            format!("ins({} : {}) ", names.join(", "), types.join(", "))
        };
        let sep = if args.is_empty() { "" } else { ", " };
        format!(
            "{name}_e = tensor.empty({sizes}) : {ty}
{name}_g = linalg.generic {{indexing_maps = [{maps}], iterator_types = [{iters}]}} {operands}outs({name}_e : {ty}) attrs = {{v3c.rows = \"{tag}\"}} {{
^bb0({args}{sep}%c: f32):
{body}
  linalg.yield {result} : f32
}} -> {ty}
bufferization.materialize_in_destination {name}_g in restrict writable {buf} : ({ty}, {buf_ty}) -> ()
",
            maps = maps.join(", "),
            iters = vec!["\"parallel\""; rank].join(", "),
            body = indent(body, 2),
        )
    }

    /// Text of the reduction of `x` (`[%m_sr, tiles, 16]`, tensor `x`) over its keys into the
    /// buffer `buf` (`[%m_sr]`): from `init`, `combine` (`%a` the element, `%c` the running value)
    /// in key order.
    fn key_reduction(&mut self, name: &str, buf: &str, x: &str, init: &str, combine: &str) -> String {
        let tile = key_tiles(false, 2);
        let tag = tile.tag();
        self.use_tile(tile);
        format!(
            "{name}_e = tensor.empty(%m_sr) : tensor<?xf32>
{name}_f = linalg.fill ins({init} : f32) outs({name}_e : tensor<?xf32>) -> tensor<?xf32>
{name}_g = linalg.generic {{indexing_maps = [{}, {}], iterator_types = [\"parallel\", \"reduction\", \"reduction\"]}} ins({x} : tensor<?x?x16xf32>) outs({name}_f : tensor<?xf32>) attrs = {{v3c.rows = \"{tag}\"}} {{
^bb0(%a: f32, %c: f32):
  {combine}
  linalg.yield %r : f32
}} -> tensor<?xf32>
bufferization.materialize_in_destination {name}_g in restrict writable {buf} : (tensor<?xf32>, memref<?xf32>) -> ()
",
            identity(3),
            affine(&["d0", "d1", "d2"], &["d0"]),
        )
    }

    /// Text of the softmax over the visible keys of the scores `%m_an + %m_ar` (`[%m_sr, %m_ct,
    /// 16]`, a row per query and `%m_hr` heads, query-major), in the reference's order: scaled and
    /// masked (row r's query sees keys 0..=%m_first + r / %m_hr), the max, the exponentials,
    /// their sum in key order, the division into `%m_pr`; then `%m_xv`, the probabilities of the
    /// keys `0..%m_vis` as `[%m_sr, 1, %m_vis]`.
    fn softmax_text(&mut self) -> String {
        let st = "tensor<?x?x16xf32>";
        let sbuf = "memref<?x?x16xf32>";
        let to_t = |b: &str| format!("{b}t = bufferization.to_tensor {b} restrict : {sbuf} to {st}\n");
        let mut t = to_t("%m_an") + &to_t("%m_ar");
        let masked = "%i0 = linalg.index 0 : index\n%i1 = linalg.index 1 : index\n%i2 = linalg.index 2 : index\n%k16 = arith.constant 16 : index\n%jb = arith.muli %i1, %k16 : index\n%j = arith.addi %jb, %i2 : index\n%q = arith.divui %i0, %m_hr : index\n%lim = arith.addi %m_first, %q : index\n%seen = arith.cmpi ule, %j, %lim : index\n%sum = arith.addf %a, %b : f32\n%sv = arith.mulf %sum, %m_scale : f32\n%r = arith.select %seen, %sv, %m_ninf : f32";
        let same = identity(3);
        let sizes = (st, "%m_sr, %m_ct", 3);
        t.push_str(&self.generic_into(
            "%m_scx",
            ("%m_sc", sbuf),
            sizes,
            &[("%m_ant", st, same.clone()), ("%m_art", st, same.clone())],
            ("%a: f32, %b: f32", masked, "%r"),
            key_tiles(false, 1),
        ));
        t.push_str(&to_t("%m_sc"));
        t.push_str(&self.key_reduction("%m_mxx", "%m_mx", "%m_sct", "%m_ninf", "%r = arith.maximumf %c, %a : f32"));
        t.push_str("%m_mxt = bufferization.to_tensor %m_mx restrict : memref<?xf32> to tensor<?xf32>\n");
        let row = affine(&["d0", "d1", "d2"], &["d0"]);
        t.push_str(&self.generic_into(
            "%m_exx",
            ("%m_ex", sbuf),
            sizes,
            &[("%m_sct", st, same.clone()), ("%m_mxt", "tensor<?xf32>", row.clone())],
            ("%a: f32, %b: f32", "%d = arith.subf %a, %b : f32\n%r = math.exp %d : f32", "%r"),
            key_tiles(false, 1),
        ));
        t.push_str(&to_t("%m_ex"));
        t.push_str(&self.key_reduction("%m_smx", "%m_sm", "%m_ext", "%zero", "%r = arith.addf %c, %a : f32"));
        t.push_str("%m_smt = bufferization.to_tensor %m_sm restrict : memref<?xf32> to tensor<?xf32>\n");
        t.push_str(&self.generic_into(
            "%m_prx",
            ("%m_pr", sbuf),
            sizes,
            &[("%m_ext", st, same), ("%m_smt", "tensor<?xf32>", row)],
            ("%a: f32, %b: f32", "%r = arith.divf %a, %b : f32", "%r"),
            key_tiles(false, 1),
        ));
        t.push_str(&format!(
            "%m_prt = bufferization.to_tensor %m_pr restrict : {sbuf} to {st}
%m_prf = tensor.collapse_shape %m_prt [[0], [1, 2]] : {st} into tensor<?x?xf32>
%m_prv = tensor.extract_slice %m_prf[0, 0] [%m_sr, %m_vis] [1, 1] : tensor<?x?xf32> to tensor<?x?xf32>
%m_xv = tensor.expand_shape %m_prv [[0], [1, 2]] output_shape [%m_sr, 1, %m_vis] : tensor<?x?xf32> into tensor<?x1x?xf32>
"
        ));
        t
    }

    /// Text of `dest = x . w` in the reference's order: `x` a tensor `[R, 1, K]` (`rows` = R; K
    /// static, or dynamic when `None`), per 16-column tile of `n` the text `w_tile(v, width)`
    /// defining the tensor `%{name}w{width}` `[1, K, width]` of `w_el` (f32, or bf16 widened as read) and `dest(v, width)` defining the
    /// memref `%{name}d{width}` `[R, width]` (returning its type), `v` the loop variable.
    pub(super) fn exact_gemm(
        &mut self,
        name: &str,
        (x, rows, k): (&str, &str, Option<usize>),
        (n, w_el): (Columns, &str),
        w_tile: &dyn Fn(&str, usize) -> String,
        dest: &dyn Fn(&str, usize) -> (String, String),
    ) -> String {
        let ks = k.map_or("?".to_string(), |k| k.to_string());
        let x_ty = format!("tensor<?x1x{ks}xf32>");
        let mut tile = |v: &str, w: usize| {
            let (d, d_ty) = dest(v, w);
            let generics = self.tile_generics(
                &format!("{name}{w}"),
                rows,
                (x, &x_ty),
                (&format!("%{name}w{w}"), w_el),
                None,
                (1, k, w),
                (&format!("%{name}d{w}"), &d_ty),
            );
            format!("{}\n{d}\n{generics}", w_tile(v, w))
        };
        match n {
            Columns::Tiles(count) => format!(
                "scf.for %{name}_t = %m_c0 to {count} step %m_c1 {{\n{}\n}}\n",
                indent(&tile(&format!("%{name}_t"), 16), 2)
            ),
            Columns::Static(n) => {
                let (full, tail) = (n - n % 16, n % 16);
                let mut text = String::new();
                if full > 0 {
                    text.push_str(&format!(
                        "%{name}_n = arith.constant {full} : index\nscf.for %{name}_j = %m_c0 to %{name}_n step %m_c16 {{\n{}\n}}\n",
                        indent(&tile(&format!("%{name}_j"), 16), 2)
                    ));
                }
                if tail > 0 {
                    text.push_str(&format!(
                        "%{name}_jt = arith.constant {full} : index\n{}\n",
                        tile(&format!("%{name}_jt"), tail)
                    ));
                }
                text
            }
        }
    }

    /// An e4m3 `kv_b` [H (dn + dv), kv] dequantized (each value times its 128 x 128 block's
    /// `scale`) into f32 once per launch by a row template.
    fn kv_b_dequantized(&mut self, kvb: &(String, Shape), scale: &(String, Shape)) -> (String, Shape) {
        let shape = Shape { dims: kvb.1.dims.clone(), element: "f32".into() };
        let buf = self.alloc(&shape, kvb);
        let (wt, st) = (self.tensor_of(kvb), self.tensor_of(scale));
        let c0 = self.constant_index(0);
        let body = dequant_body((&wt, &tensor_type(&kvb.1)), (&st, &tensor_type(&scale.1)), &c0);
        self.row_generic((&buf, &memref(&shape)), &shape, &[], ("", &body, "%y"));
        (buf, shape)
    }

    /// MLA (see the module docs). Single sequence: query t sees latent rows 0..=S-T+t. Decode:
    /// sequence b's one query sees rows 0..=positions[b] of its own cache.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &mut self,
        a: &AttentionSpec,
        qn: &(String, Shape),
        qp: &(String, Shape),
        lat: &(String, Shape),
        (kvb, kvb_scale): (&(String, Shape), Option<&(String, Shape)>),
        positions: Option<&(String, Shape)>,
        dest: &str,
        out_shape: &Shape,
    ) {
        let AttentionSpec { h, dn, dr, dv, kv, absorbed, decode, .. } = *a;
        let (per, c) = (dn + dv, kv + dr);
        let hp = h * per;
        // kv_b as the products read it: f32 or bf16 as stored (bf16 widened as read, exact), fp8
        // dequantized once per launch.
        // Absorbed with whole 16-lane tiles and an e4m3 kv_b: each head's W_UK and W_UV rows are
        // dequantized in its head loops into small scratches (`%m_dq`), never all of kv_b at once.
        let head_dequant = absorbed && kv % 16 == 0 && dv % 16 == 0 && kvb_scale.is_some();
        let (kvbf, dequant) = match kvb_scale {
            Some(scale) if head_dequant => (kvb.clone(), Some(scale)),
            Some(scale) => (self.kv_b_dequantized(kvb, scale), None),
            None => (kvb.clone(), None),
        };
        // Text dequantizing kv_b rows `row0 .. row0 + n` into the scratch `%m_dq{n}` ([n, kv] f32),
        // then its tensor `%m_dq{n}t`.
        let dequant_rows = |e: &mut Emitter, row0: &str, n: usize| -> String {
            let Some(scale) = dequant else { return String::new() };
            let (wt, st) = (e.tensor_of(kvb), e.tensor_of(scale));
            let ty = format!("memref<{n}x{kv}xf32>");
            let body = dequant_body((&wt, &tensor_type(&kvb.1)), (&st, &tensor_type(&scale.1)), row0);
            let tile = RowTile { sizes: vec![1, 16], fill_operand: None, interchange: false, reduced: 1 };
            let text = e.generic_into(
                &format!("%m_dqx{n}"),
                (&format!("%m_dq{n}"), &ty),
                (&format!("tensor<{n}x{kv}xf32>"), "", 2),
                &[],
                ("", &body, "%y"),
                tile,
            );
            format!("{text}%m_dq{n}t = bufferization.to_tensor %m_dq{n} restrict : {ty} to tensor<{n}x{kv}xf32>\n")
        };
        if head_dequant {
            // One scratch per row count (W_UK's dn rows, W_UV's dv; one when they are equal).
            let counts = if dn == dv { vec![dn] } else { vec![dn, dv] };
            for n in counts {
                self.line(&format!("%m_dq{n} = memref.alloc() : memref<{n}x{kv}xf32>"));
                self.allocs.push(format!("memref.dealloc %m_dq{n} : memref<{n}x{kv}xf32>"));
            }
        }
        let kel = if head_dequant { "f32".to_string() } else { storage(&kvbf.1.element).to_string() };
        let kvbf_ty = format!("tensor<{hp}x{kv}x{kel}>");
        let widen = if kel == "f32" { String::new() } else { format!("%r = arith.extf %b : {kel} to f32") };
        let widened = if kel == "f32" { "%b" } else { "%r" };
        // K-major weights, once per launch: naive, kv_b^T [kv, hp] for the latent's expansion;
        // absorbed, W_UV^T per head [H, kv, dv].
        // Absorbed with whole 16-lane tiles: the text making one head's W_UV^T (`%m_wuvt`).
        let mut per_head_wuv = None;
        let weights = if absorbed {
            let shape = Shape { dims: vec![Some(h), Some(kv), Some(dv)], element: "f32".into() };
            let kt = self.tensor_of(&kvbf);
            if kv % 16 == 0 && dv % 16 == 0 {
                // W_UV^T per head, made in the output's head loop into a [1, kv, dv] scratch (rows
                // read, transposed in registers): a whole [H, kv, dv] copy every launch (33 MB at
                // V3's widths) was mapped and page-faulted in anew by each launch.
                let head_buf = self.fresh();
                self.line(&format!("{head_buf} = memref.alloc() : memref<1x{kv}x{dv}xf32>"));
                self.allocs.push(format!("memref.dealloc {head_buf} : memref<1x{kv}x{dv}xf32>"));
                let slice = if head_dequant {
                    let rows = dequant_rows(self, "%m_uvr", dv);
                    format!(
                        "%m_perv = arith.constant {per} : index\n%m_uvr0 = arith.muli %m_h, %m_perv : index\n%m_dnv = arith.constant {dn} : index\n%m_uvr = arith.addi %m_uvr0, %m_dnv : index\n{rows}%m_uvs = tensor.expand_shape %m_dq{dv}t [[0, 1], [2]] output_shape [1, {dv}, {kv}] : tensor<{dv}x{kv}xf32> into tensor<1x{dv}x{kv}xf32>\n"
                    )
                } else {
                    let v3 = self.fresh();
                    self.line(&format!(
                        "{v3} = tensor.expand_shape {kt} [[0, 1], [2]] output_shape [{h}, {per}, {kv}] : {kvbf_ty} into tensor<{h}x{per}x{kv}x{kel}>"
                    ));
                    format!(
                        "%m_uvs = tensor.extract_slice {v3}[%m_h, {dn}, 0] [1, {dv}, {kv}] [1, 1, 1] : tensor<{h}x{per}x{kv}x{kel}> to tensor<1x{dv}x{kv}x{kel}>\n"
                    )
                };
                let text = self.transposed_generic(
                    "_uvh",
                    ("%m_uvs", &format!("tensor<1x{dv}x{kv}x{kel}>"), &kel),
                    ["a", "c", "b"],
                    [1, kv, dv],
                    (&widen, widened),
                    (&head_buf, &format!("memref<1x{kv}x{dv}xf32>")),
                );
                per_head_wuv = Some(format!(
                    "{slice}{text}\n%m_wuvt = bufferization.to_tensor {head_buf} restrict : memref<1x{kv}x{dv}xf32> to tensor<1x{kv}x{dv}xf32>\n"
                ));
                String::new()
            } else {
                let buf = self.alloc(&shape, &kvbf);
                let body = format!(
                    "%i0 = linalg.index 0 : index\n%i1 = linalg.index 1 : index\n%i2 = linalg.index 2 : index\n%per = arith.constant {per} : index\n%dn = arith.constant {dn} : index\n%hb = arith.muli %i0, %per : index\n%vb = arith.addi %hb, %dn : index\n%row = arith.addi %vb, %i2 : index\n%v = tensor.extract {kt}[%row, %i1] : {kvbf_ty}\n{}",
                    load_f32(&kel, "%v", "%vf")
                );
                self.row_generic((&buf, &memref(&shape)), &shape, &[], ("", &body, "%vf"));
                self.tensor_of(&(buf, shape))
            }
        } else {
            let shape = Shape { dims: vec![Some(kv), Some(hp)], element: "f32".into() };
            let buf = self.alloc(&shape, &kvbf);
            if kv % 16 == 0 && hp % 16 == 0 {
                // kv_b^T: rows read, transposed in registers (as [1, kv, hp]).
                let kt = self.tensor_of(&kvbf);
                let (v3, b3) = (self.fresh(), self.fresh());
                self.line(&format!(
                    "{v3} = tensor.expand_shape {kt} [[0, 1], [2]] output_shape [1, {hp}, {kv}] : {kvbf_ty} into tensor<1x{hp}x{kv}x{kel}>
    {b3} = memref.expand_shape {buf} [[0, 1], [2]] output_shape [1, {kv}, {hp}] : {} into memref<1x{kv}x{hp}xf32>",
                    memref(&shape)
                ));
                let sfx = format!("_w{}", self.next);
                let text = self.transposed_generic(
                    &sfx,
                    (&v3, &format!("tensor<1x{hp}x{kv}x{kel}>"), &kel),
                    ["a", "c", "b"],
                    [1, kv, hp],
                    (&widen, widened),
                    (&b3, &format!("memref<1x{kv}x{hp}xf32>")),
                );
                self.line(&text);
            } else {
                let ins = [self.indexed_by(&kvbf, 2, &[1, 0])];
                let args = format!("%a: {kel}");
                let body = load_f32(&kel, "%a", "%af");
                self.row_generic((&buf, &memref(&shape)), &shape, &ins, (&args, &body, "%af"));
            }
            self.tensor_of(&(buf, shape))
        };
        let kvbf_t = self.tensor_of(&kvbf);
        let (lat_t, qn_t, qp_t) = (self.tensor_of(lat), self.tensor_of(qn), self.tensor_of(qp));
        let (qn_tty, qp_tty, lat_tty) = (tensor_type(&qn.1), tensor_type(&qp.1), tensor_type(&lat.1));
        let out_ty = memref(out_shape);
        let mut t = format!(
            "%m_c0 = arith.constant 0 : index
%m_c1 = arith.constant 1 : index
%m_c15 = arith.constant 15 : index
%m_c16 = arith.constant 16 : index
%m_qc = arith.constant {chunk} : index
%m_ninf = arith.constant 0xFF800000 : f32
%m_scale = arith.constant {scale} : f32
%m_nq = memref.dim {qn}, %m_c0 : {qn_mty}
",
            scale = a.scale,
            chunk = if absorbed { (QUERY_CHUNK / h).max(1) } else { QUERY_CHUNK },
            qn = qn.0,
            qn_mty = memref(&qn.1),
        );
        // Per sequence: its keys `%m_nk`, queries `%m_T` from row `%m_qb`, latent rows `%m_lat`.
        let sequence = if decode {
            let p = positions.expect("decode has positions");
            format!(
                "%m_srows = memref.dim {lat}, %m_c1 : {lat_mty}
%m_p64 = memref.load {pos}[%m_b] : {pos_ty}
%m_pi = arith.index_cast %m_p64 : i64 to index
%m_nk = arith.addi %m_pi, %m_c1 : index
%m_T = arith.addi %m_c1, %m_c0 : index
%m_qb = arith.addi %m_b, %m_c0 : index
%m_lat = tensor.extract_slice {lat_t}[%m_b, 0, 0] [1, %m_srows, {c}] [1, 1, 1] : {lat_tty} to tensor<?x{c}xf32>
",
                lat = lat.0,
                lat_mty = memref(&lat.1),
                pos = p.0,
                pos_ty = memref(&p.1),
            )
        } else {
            format!(
                "%m_srows = memref.dim {lat}, %m_c0 : {lat_mty}
%m_nk = arith.addi %m_srows, %m_c0 : index
%m_T = arith.addi %m_nq, %m_c0 : index
%m_qb = arith.addi %m_c0, %m_c0 : index
%m_lat = tensor.cast {lat_t} : {lat_tty} to tensor<?x{c}xf32>
",
                lat = lat.0,
                lat_mty = memref(&lat.1),
            )
        };
        let mut s = sequence;
        s.push_str(&tiles_of("%m_kt", "%m_nk"));
        s.push_str("%m_nk1 = arith.subi %m_nk, %m_c1 : index\n");
        // The latent rows transposed, [columns, key tiles, 16] (absorbed: every column; naive: the
        // rope columns), rows past the keys read as the last key (masked later).
        let (lt_rows, lt_col0) = if absorbed { (c, 0) } else { (dr, kv) };
        let lt_ty = format!("memref<{lt_rows}x?x16xf32>");
        s.push_str(&format!("%m_lt = memref.alloc(%m_kt) : {lt_ty}\n"));
        let key = "%i0 = linalg.index 0 : index\n%i1 = linalg.index 1 : index\n%i2 = linalg.index 2 : index\n%k16 = arith.constant 16 : index\n%jb = arith.muli %i1, %k16 : index\n%j = arith.addi %jb, %i2 : index\n%jc = arith.minui %j, %m_nk1 : index\n".to_string();
        // Whole key tiles (and whole 16-column tiles): contiguous row reads transposed in
        // registers (`fp8_tiled::transpose_script`); the last partial key tile by the clamped
        // gather below. Otherwise every tile by the clamped gather.
        let (first_tile, tiles) = if lt_rows % 16 == 0 {
            let (src_ty, st_ty) = (format!("tensor<?x16x{lt_rows}xf32>"), format!("tensor<{lt_rows}x?x16xf32>"));
            let view_ty = format!("memref<{lt_rows}x?x16xf32, strided<[?, 16, 1]>>");
            let tag = self.use_transpose(0);
            s.push_str(&format!(
                "%m_kf = arith.divui %m_nk, %m_c16 : index
%m_nkf = arith.muli %m_kf, %m_c16 : index
%m_latf = tensor.extract_slice %m_lat[0, {lt_col0}] [%m_nkf, {lt_rows}] [1, 1] : tensor<?x{c}xf32> to tensor<?x{lt_rows}xf32>
%m_lat3 = tensor.expand_shape %m_latf [[0, 1], [2]] output_shape [%m_kf, 16, {lt_rows}] : tensor<?x{lt_rows}xf32> into {src_ty}
%m_ltfv = memref.subview %m_lt[0, 0, 0] [{lt_rows}, %m_kf, 16] [1, 1, 1] : {lt_ty} to {view_ty}
%m_ltfe = tensor.empty(%m_kf) : {st_ty}
%m_ltfg = linalg.generic {{indexing_maps = [{}, {}], iterator_types = [\"parallel\", \"parallel\", \"parallel\"]}} ins(%m_lat3 : {src_ty}) outs(%m_ltfe : {st_ty}) attrs = {{v3c.fp8 = \"{tag}\"}} {{
^bb0(%a: f32, %c: f32):
  linalg.yield %a : f32
}} -> {st_ty}
bufferization.materialize_in_destination %m_ltfg in restrict writable %m_ltfv : ({st_ty}, {view_ty}) -> ()
%m_ktl = arith.subi %m_kt, %m_kf : index
",
                affine(&["c", "t", "l"], &["t", "l", "c"]),
                identity(3),
            ));
            ("%m_kf", "%m_ktl")
        } else {
            ("%m_c0", "%m_kt")
        };
        let tiles_ty = format!("memref<{lt_rows}x?x16xf32, strided<[?, 16, 1], offset: ?>>");
        s.push_str(&format!(
            "%m_ltv = memref.subview %m_lt[0, {first_tile}, 0] [{lt_rows}, {tiles}, 16] [1, 1, 1] : {lt_ty} to {tiles_ty}\n"
        ));
        let lt_body = format!(
            "{}%c0f = arith.constant {lt_col0} : index\n%col = arith.addi %i0, %c0f : index\n%v = tensor.extract %m_lat[%jc, %col] : tensor<?x{c}xf32>",
            key.replace("%jb = arith.muli %i1, %k16", &format!("%t = arith.addi %i1, {first_tile} : index\n%jb = arith.muli %t, %k16"))
        );
        let text = self.generic_into(
            "%m_ltx",
            ("%m_ltv", &tiles_ty),
            (&format!("tensor<{lt_rows}x?x16xf32>"), tiles, 3),
            &[],
            ("", &lt_body, "%v"),
            key_tiles(true, 1),
        );
        s.push_str(&text);
        s.push_str(&format!(
            "%m_ltt = bufferization.to_tensor %m_lt restrict : {lt_ty} to tensor<{lt_rows}x?x16xf32>\n"
        ));
        if !absorbed {
            // The latent rows expanded to keys and values [nk, hp], then the keys transposed
            // [H dn, key tiles, 16].
            s.push_str(&format!(
                "%m_kvx = memref.alloc(%m_nk) : memref<?x{hp}xf32>
%m_ckv = tensor.extract_slice %m_lat[0, 0] [%m_nk, {kv}] [1, 1] : tensor<?x{c}xf32> to tensor<?x{kv}xf32>
%m_xl = tensor.expand_shape %m_ckv [[0], [1, 2]] output_shape [%m_nk, 1, {kv}] : tensor<?x{kv}xf32> into tensor<?x1x{kv}xf32>
"
            ));
            let text = self.exact_gemm(
                "kx",
                ("%m_xl", "%m_nk", Some(kv)),
                (Columns::Static(hp), "f32"),
                &|j, w| k_major_tile("kx", (&weights, &format!("tensor<{kv}x{hp}xf32>")), ("0", &kv.to_string()), j, w),
                &|j, w| {
                    let ty = format!("memref<?x{w}xf32, strided<[{hp}, 1], offset: ?>>");
                    (
                        format!(
                            "%kxd{w} = memref.subview %m_kvx[0, {j}] [%m_nk, {w}] [1, 1] : memref<?x{hp}xf32> to {ty}"
                        ),
                        ty,
                    )
                },
            );
            s.push_str(&text);
            s.push_str(&format!(
                "%m_kvxt = bufferization.to_tensor %m_kvx restrict : memref<?x{hp}xf32> to tensor<?x{hp}xf32>
%m_kT = memref.alloc(%m_kt) : memref<{hdn}x?x16xf32>
",
                hdn = h * dn
            ));
            let kt_body = format!(
                "{key}%dn = arith.constant {dn} : index\n%per = arith.constant {per} : index\n%hh = arith.divui %i0, %dn : index\n%d = arith.remui %i0, %dn : index\n%hb = arith.muli %hh, %per : index\n%col = arith.addi %hb, %d : index\n%v = tensor.extract %m_kvxt[%jc, %col] : tensor<?x{hp}xf32>"
            );
            let text = self.generic_into(
                "%m_ktx",
                ("%m_kT", &format!("memref<{}x?x16xf32>", h * dn)),
                (&format!("tensor<{}x?x16xf32>", h * dn), "%m_kt", 3),
                &[],
                ("", &kt_body, "%v"),
                key_tiles(true, 1),
            );
            s.push_str(&text);
            s.push_str(&format!(
                "%m_kTt = bufferization.to_tensor %m_kT restrict : memref<{hdn}x?x16xf32> to tensor<{hdn}x?x16xf32>\n",
                hdn = h * dn
            ));
        }
        // Per chunk of queries: `%m_rows` of them from `%m_qr`; the first sees keys 0..=%m_first,
        // the chunk keys 0..%m_vis (`%m_ct` tiles of 16). Scores have a row per query and head
        // (`%m_sr` rows, query-major): absorbed, every head at once (keys and values are the
        // latent rows all heads share); naive, one head at a time.
        let mut q = String::from(
            "%m_left = arith.subi %m_T, %m_q0 : index
%m_rows = arith.minui %m_left, %m_qc : index
%m_first0 = arith.subi %m_nk, %m_T : index
%m_first = arith.addi %m_first0, %m_q0 : index
%m_vis = arith.addi %m_first, %m_rows : index
%m_qr = arith.addi %m_qb, %m_q0 : index
",
        );
        q.push_str(&tiles_of("%m_ct", "%m_vis"));
        let heads_per_row = if absorbed { h } else { 1 };
        q.push_str(&format!(
            "%m_hr = arith.constant {heads_per_row} : index\n%m_sr = arith.muli %m_rows, %m_hr : index\n"
        ));
        let scores = ["%m_an", "%m_ar", "%m_sc", "%m_ex", "%m_pr"];
        for b in scores {
            q.push_str(&format!("{b} = memref.alloc(%m_sr, %m_ct) : memref<?x?x16xf32>\n"));
        }
        for b in ["%m_mx", "%m_sm"] {
            q.push_str(&format!("{b} = memref.alloc(%m_sr) : memref<?xf32>\n"));
        }
        let per_q: Vec<(&str, String)> = if absorbed {
            vec![("%m_qa", format!("memref<?x{h}x{kv}xf32>")), ("%m_ol", format!("memref<?x{h}x{kv}xf32>"))]
        } else {
            Vec::new()
        };
        for (b, ty) in &per_q {
            q.push_str(&format!("{b} = memref.alloc(%m_rows) : {ty}\n"));
        }
        q.push_str(&format!("%m_heads = arith.constant {h} : index\n"));
        let head_loop =
            |body: &str| format!("scf.for %m_h = %m_c0 to %m_heads step %m_c1 {{\n{}\n}}\n", indent(body, 2));
        // A head's rows of q_nope (and q_pe), [rows, 1, d].
        let head_rows = format!(
            "%m_xn = tensor.extract_slice {qn_t}[%m_qr, %m_h, 0] [%m_rows, 1, {dn}] [1, 1, 1] : {qn_tty} to tensor<?x1x{dn}xf32>
%m_per = arith.constant {per} : index
%m_hb = arith.muli %m_h, %m_per : index
"
        );
        let head_pe = format!(
            "%m_xp = tensor.extract_slice {qp_t}[%m_qr, %m_h, 0] [%m_rows, 1, {dr}] [1, 1, 1] : {qp_tty} to tensor<?x1x{dr}xf32>\n"
        );
        // Score tiles: `src` rows `r0 ..` of `len` columns of a transposed `[rows, tiles, 16]`.
        let key_tile = |src: &str, src_rows: usize, r0: &str, len: usize, name: &str| {
            let w_name = name.to_string();
            let src = src.to_string();
            let r0 = r0.to_string();
            move |v: &str, w: usize| {
                format!("%{w_name}w{w}s = tensor.extract_slice {src}[{r0}, {v}, 0] [{len}, 1, 16] [1, 1, 1] : tensor<{src_rows}x?x16xf32> to tensor<{len}x16xf32>\n%{w_name}w{w} = tensor.expand_shape %{w_name}w{w}s [[0, 1], [2]] output_shape [1, {len}, 16] : tensor<{len}x16xf32> into tensor<1x{len}x16xf32>")
            }
        };
        let score_dest = |buf: &'static str, name: &'static str| {
            move |v: &str, w: usize| {
                let ty = format!("memref<?x{w}xf32, strided<[?, 1], offset: ?>>");
                (format!("%{name}d{w} = memref.subview {buf}[0, {v}, 0] [%m_sr, 1, {w}] [1, 1, 1] : memref<?x?x16xf32> to {ty}"), ty)
            }
        };
        // The head's output rows: out[%m_qr.., %m_h, columns].
        let out_dest = |name: &'static str| {
            let out_ty = out_ty.clone();
            let dest = dest.to_string();
            move |v: &str, w: usize| {
                let ty = format!("memref<?x{w}xf32, strided<[{}, 1], offset: ?>>", h * dv);
                (format!("%{name}d{w} = memref.subview {dest}[%m_qr, %m_h, {v}] [%m_rows, 1, {w}] [1, 1, 1] : {out_ty} to {ty}"), ty)
            }
        };
        // Value rows `0..%m_vis`, columns `col0 + v ..` of a `[?, cols]` tensor, as `[1, vis, w]`.
        let value_tile = |src: &'static str, cols: usize, col0: &'static str, name: &'static str| {
            move |v: &str, w: usize| {
                let col = format!("%{name}c{w}");
                let tile = k_major_tile(name, (src, &format!("tensor<?x{cols}xf32>")), ("0", "%m_vis"), &col, w);
                format!("{col} = arith.addi {col0}, {v} : index\n{tile}")
            }
        };
        if absorbed {
            // q_abs = q_nope . W_UK per head (the head's rows of kv_b, K-major as they are) into
            // [rows, H, kv]; then the scores of every head at once: [rows H, kv] against the
            // transposed latent rows, q_pe [rows H, dr] against their rope columns.
            let (wuk, wuk_ty, wuk_row) = if head_dequant {
                (format!("%m_dq{dn}t"), format!("tensor<{dn}x{kv}xf32>"), "0")
            } else {
                (kvbf_t.clone(), kvbf_ty.clone(), "%m_hb")
            };
            let wuk_rows = dequant_rows(self, "%m_hb", dn);
            let text = self.exact_gemm(
                "qa",
                ("%m_xn", "%m_rows", Some(dn)),
                (Columns::Static(kv), &kel),
                &|j, w| k_major_tile("qa", (&wuk, &wuk_ty), (wuk_row, &dn.to_string()), j, w),
                &|j, w| {
                    let ty = format!("memref<?x{w}xf32, strided<[{}, 1], offset: ?>>", h * kv);
                    (format!("%qad{w} = memref.subview %m_qa[0, %m_h, {j}] [%m_rows, 1, {w}] [1, 1, 1] : memref<?x{h}x{kv}xf32> to {ty}"), ty)
                },
            );
            q.push_str(&head_loop(&format!("{head_rows}{wuk_rows}{text}")));
            q.push_str(&format!(
                "%m_qat = bufferization.to_tensor %m_qa restrict : memref<?x{h}x{kv}xf32> to tensor<?x{h}x{kv}xf32>
%m_qaf = tensor.collapse_shape %m_qat [[0, 1], [2]] : tensor<?x{h}x{kv}xf32> into tensor<?x{kv}xf32>
%m_xq = tensor.expand_shape %m_qaf [[0], [1, 2]] output_shape [%m_sr, 1, {kv}] : tensor<?x{kv}xf32> into tensor<?x1x{kv}xf32>
%m_pes = tensor.extract_slice {qp_t}[%m_qr, 0, 0] [%m_rows, {h}, {dr}] [1, 1, 1] : {qp_tty} to tensor<?x{h}x{dr}xf32>
%m_pef = tensor.collapse_shape %m_pes [[0, 1], [2]] : tensor<?x{h}x{dr}xf32> into tensor<?x{dr}xf32>
%m_xp = tensor.expand_shape %m_pef [[0], [1, 2]] output_shape [%m_sr, 1, {dr}] : tensor<?x{dr}xf32> into tensor<?x1x{dr}xf32>
"
            ));
            let an = self.exact_gemm(
                "an",
                ("%m_xq", "%m_sr", Some(kv)),
                (Columns::Tiles("%m_ct"), "f32"),
                &key_tile("%m_ltt", c, "0", kv, "an"),
                &score_dest("%m_an", "an"),
            );
            let ar = self.exact_gemm(
                "ar",
                ("%m_xp", "%m_sr", Some(dr)),
                (Columns::Tiles("%m_ct"), "f32"),
                &key_tile("%m_ltt", c, &kv.to_string(), dr, "ar"),
                &score_dest("%m_ar", "ar"),
            );
            q.push_str(&an);
            q.push_str(&ar);
            let text = self.softmax_text();
            q.push_str(&text);
            // o_lat = P . latent rows for every head at once, then per head o_lat . W_UV^T.
            let text = self.exact_gemm(
                "ol",
                ("%m_xv", "%m_sr", None),
                (Columns::Static(kv), "f32"),
                &value_tile("%m_lat", c, "%m_c0", "ol"),
                &|j, w| {
                    let ty = format!("memref<?x{w}xf32, strided<[{kv}, 1], offset: ?>>");
                    (
                        format!(
                            "%old{w} = memref.subview %m_olf[0, {j}] [%m_sr, {w}] [1, 1] : memref<?x{kv}xf32> to {ty}"
                        ),
                        ty,
                    )
                },
            );
            q.push_str(&format!(
                "%m_olf = memref.collapse_shape %m_ol [[0, 1], [2]] : memref<?x{h}x{kv}xf32> into memref<?x{kv}xf32>\n{text}%m_olt = bufferization.to_tensor %m_ol restrict : memref<?x{h}x{kv}xf32> to tensor<?x{h}x{kv}xf32>\n"
            ));
            let (wuv, wuv_ty, wuv_h, make) = match &per_head_wuv {
                Some(make) => ("%m_wuvt".to_string(), format!("tensor<1x{kv}x{dv}xf32>"), "0", make.clone()),
                None => (weights.clone(), format!("tensor<{h}x{kv}x{dv}xf32>"), "%m_h", String::new()),
            };
            let text = self.exact_gemm(
                "ou",
                ("%m_xo", "%m_rows", Some(kv)),
                (Columns::Static(dv), "f32"),
                &move |j, w| {
                    format!("%ouw{w} = tensor.extract_slice {wuv}[{wuv_h}, 0, {j}] [1, {kv}, {w}] [1, 1, 1] : {wuv_ty} to tensor<1x{kv}x{w}xf32>")
                },
                &out_dest("ou"),
            );
            q.push_str(&head_loop(&format!(
                "{make}%m_xo = tensor.extract_slice %m_olt[0, %m_h, 0] [%m_rows, 1, {kv}] [1, 1, 1] : tensor<?x{h}x{kv}xf32> to tensor<?x1x{kv}xf32>\n{text}"
            )));
        } else {
            // Per head: scores against the head's transposed keys and the rope columns, softmax,
            // then P . V over the head's value columns of the expansion.
            let mut hd = format!(
                "{head_rows}{head_pe}%m_dnc = arith.constant {dn} : index\n%m_kr = arith.muli %m_h, %m_dnc : index\n"
            );
            let an = self.exact_gemm(
                "an",
                ("%m_xn", "%m_sr", Some(dn)),
                (Columns::Tiles("%m_ct"), "f32"),
                &key_tile("%m_kTt", h * dn, "%m_kr", dn, "an"),
                &score_dest("%m_an", "an"),
            );
            let ar = self.exact_gemm(
                "ar",
                ("%m_xp", "%m_sr", Some(dr)),
                (Columns::Tiles("%m_ct"), "f32"),
                &key_tile("%m_ltt", dr, "0", dr, "ar"),
                &score_dest("%m_ar", "ar"),
            );
            hd.push_str(&an);
            hd.push_str(&ar);
            let text = self.softmax_text();
            hd.push_str(&text);
            hd.push_str(&format!("%m_dn = arith.constant {dn} : index\n%m_vb = arith.addi %m_hb, %m_dn : index\n"));
            let text = self.exact_gemm(
                "pv",
                ("%m_xv", "%m_rows", None),
                (Columns::Static(dv), "f32"),
                &value_tile("%m_kvxt", hp, "%m_vb", "pv"),
                &out_dest("pv"),
            );
            hd.push_str(&text);
            q.push_str(&head_loop(&hd));
        }
        for b in scores {
            q.push_str(&format!("memref.dealloc {b} : memref<?x?x16xf32>\n"));
        }
        for b in ["%m_mx", "%m_sm"] {
            q.push_str(&format!("memref.dealloc {b} : memref<?xf32>\n"));
        }
        for (b, ty) in &per_q {
            q.push_str(&format!("memref.dealloc {b} : {ty}\n"));
        }
        s.push_str(&format!("scf.for %m_q0 = %m_c0 to %m_T step %m_qc {{\n{}\n}}\n", indent(&q, 2)));
        s.push_str(&format!("memref.dealloc %m_lt : {lt_ty}\n"));
        if !absorbed {
            s.push_str(&format!(
                "memref.dealloc %m_kvx : memref<?x{hp}xf32>\nmemref.dealloc %m_kT : memref<{}x?x16xf32>\n",
                h * dn
            ));
        }
        let nseq = if decode { "%m_nq" } else { "%m_c1" };
        t.push_str(&format!("scf.for %m_b = %m_c0 to {nseq} step %m_c1 {{\n{}\n}}\n", indent(&s, 2)));
        self.line(&format!("scf.execute_region {{\n{}\n  scf.yield\n}}", indent(&t, 2)));
    }
}
