//! MLA attention (naive and absorbed; one sequence or batched decode) as scf loops.

use super::gemm::LANES;
use super::*;

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

impl Emitter {
    /// MLA with scf loops (spec section 3). Single sequence: query t sees latent rows 0..=S-T+t.
    /// Decode: sequence b's one query sees rows 0..=positions[b] of its own cache.
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
        // Prefill (naive form, dense kv_b): the latent rows' expansion to per-head keys and values
        // is a dense GEMM, kvb = latent[:, :kv] . kv_b^T: the transform-dialect GEMM template, run
        // before the attention loops into a buffer they read.
        let expanded = (!absorbed && !decode && kvb_scale.is_none()).then(|| {
            let f32_shape = |cols: usize| Shape { dims: vec![lat.1.dims[0], Some(cols)], element: "f32".into() };
            let (ckv_shape, kvb_shape) = (f32_shape(kv), f32_shape(h * (dn + dv)));
            let ckv = self.alloc(&ckv_shape, lat);
            let lt = self.tensor_of(lat);
            let (c0, keys, piece) = (self.constant_index(0), self.fresh(), self.fresh());
            self.line(&format!("{keys} = memref.dim {}, {c0} : {}", lat.0, memref(&lat.1)));
            self.line(&format!(
                "{piece} = tensor.extract_slice {lt}[0, 0] [{keys}, {kv}] [1, 1] : {} to {}",
                rows::tensor_type(&lat.1),
                rows::tensor_type(&ckv_shape)
            ));
            self.copy_rows((&piece, &rows::tensor_type(&ckv_shape)), (&ckv, &memref(&ckv_shape)), &ckv_shape);
            let expanded = self.alloc(&kvb_shape, lat);
            self.gemm_vectorized(&(ckv, ckv_shape), kvb, &expanded, &kvb_shape);
            expanded
        });
        let dec = if kvb_scale.is_some() { self.decode() } else { String::new() };
        // With an fp8 kv_b (fp8 precision, whose attention output is quantized next), every sum
        // runs in the reference's order (sequential products, probabilities normalized before P.V):
        // a difference in the last bit would move some values across an e4m3 rounding boundary.
        let exact = kvb_scale.is_some();
        let per_head = dn + dv;
        let (qn_ty, qp_ty, lat_ty, kvb_ty, out_ty) =
            (memref(&qn.1), memref(&qp.1), memref(&lat.1), memref(&kvb.1), memref(out_shape));
        let kvb_load = |row: &str, col: &str, out: &str| {
            match kvb_scale {
            // fp8 kv_b_proj: bits decoded and scaled by their 128 x 128 block's scale.
            Some(scale) => format!(
                "%kraw = memref.load {}[{row}, {col}] : {kvb_ty}\n%kdec = func.call {dec}(%kraw) : (i8) -> f32\n%krb = arith.divui {row}, %c128 : index\n%kcb = arith.divui {col}, %c128 : index\n%ksc = memref.load {}[%krb, %kcb] : {}\n{out} = arith.mulf %kdec, %ksc : f32",
                kvb.0,
                scale.0,
                memref(&scale.1)
            ),
            None => {
                let conv = if kvb.1.element == "f32" {
                    format!("{out} = arith.addf %kraw, %zero : f32")
                } else {
                    format!("{out} = arith.extf %kraw : {} to f32", kvb.1.element)
                };
                format!("%kraw = memref.load {}[{row}, {col}] : {kvb_ty}\n{conv}", kvb.0)
            }
        }
        };
        // fp8 kv_b: dequantized once per launch (each value exactly as `kvb_load` computes it), so
        // the sums below read f32 values instead of decoding per multiply; the absorbed form reads
        // a bf16 or f32 kv_b as f32 the same way (vector loads of its rows).
        let hp_all = h * per_head;
        let dequantized = (kvb_scale.is_some() || absorbed).then(|| {
            format!(
                "%kvbf = memref.alloc() : memref<{hp_all}x{kv}xf32>\nscf.for %r = %c0 to %c{hp_all} step %c1 {{\n  scf.for %c = %c0 to %c{kv} step %c1 {{\n{}\n    memref.store %kf, %kvbf[%r, %c] : memref<{hp_all}x{kv}xf32>\n  }}\n}}",
                indent(&kvb_load("%r", "%c", "%kf"), 4)
            )
        });
        let kvb_load = |row: &str, col: &str, out: &str| match &dequantized {
            Some(_) => format!("{out} = memref.load %kvbf[{row}, {col}] : memref<{hp_all}x{kv}xf32>"),
            None => kvb_load(row, col, out),
        };
        // The latent row j of the current sequence.
        let lat_idx = |j: &str, c: &str| if decode { format!("%seq, {j}, {c}") } else { format!("{j}, {c}") };
        // The absorbed form, vectorized so that every lane keeps the reference's order (mul then
        // add, sequential over the reduced dimension; fp8 needs it, f32 gains from it too): q_abs
        // across latent columns, the scores across 16 keys at a time (over a transposed copy of the
        // latent rows), P.V across latent columns, the output across value columns (over a
        // transposed W_UV, made once per launch).
        let vec_scores = absorbed;
        let vec_kv = vec_scores && kv % LANES == 0;
        let vec_dv = vec_kv && dv % LANES == 0;
        // The exact naive form (fp8 prefill), vectorized the same way: the expansion of the latent
        // rows across 16 of their K/V columns (a transposed W), the scores across 16 keys (the keys'
        // nope parts and the latent's rope columns transposed), P.V across 16 value columns. (f32
        // keeps its fused multiply-adds over the reduced dimension: faster, and no order to keep.)
        let vec_naive = exact && !absorbed && !decode && (h * per_head) % LANES == 0 && dv % LANES == 0;
        let width = kv + dr;
        let mut t = String::new();
        let w = |t: &mut String, s: &str| {
            for line in s.lines() {
                t.push_str("    ");
                t.push_str(line);
                t.push('\n');
            }
        };
        w(&mut t, &format!("%c0 = arith.constant 0 : index\n%c1 = arith.constant 1 : index\n%ninf = arith.constant 0xFF800000 : f32\n%scale = arith.constant {} : f32\n%zv = arith.constant dense<0.0> : vector<{LANES}xf32>\n%cl = arith.constant {LANES} : index", a.scale));
        let (rows_dim, queries) = if decode { (1, "%nb") } else { (0, "%nt") };
        w(&mut t, &format!("%c_rows = arith.constant {rows_dim} : index\n%srows = memref.dim {}, %c_rows : {lat_ty}\n%nq = memref.dim {}, %c0 : {qn_ty}", lat.0, qn.0));
        let _ = queries;
        if vec_naive {
            let hdn = h * dn;
            w(
                &mut t,
                &padded_scores(&format!(
                    "%kT = memref.alloc(%spad) : memref<{hdn}x?xf32>\n%latR = memref.alloc(%spad) : memref<{dr}x?xf32>"
                )),
            );
        } else if vec_scores {
            w(&mut t, &padded_scores(&format!("%latT = memref.alloc(%spad) : memref<{width}x?xf32>")));
        } else {
            w(&mut t, "%scores = memref.alloc(%srows) : memref<?xf32>");
        }
        if let Some(d) = &dequantized {
            w(&mut t, d);
        }
        if vec_dv {
            // W_UV transposed per head: wuvT[h, c, e] = W[h * (dn + dv) + dn + e, c].
            w(&mut t, &format!(
                "%wuvT = memref.alloc() : memref<{h}x{kv}x{dv}xf32>\nscf.for %th = %c0 to %c{h} step %c1 {{\n  %tb = arith.muli %th, %c{per_head} : index\n  %tv = arith.addi %tb, %c{dn} : index\n  scf.for %te = %c0 to %c{dv} step %c1 {{\n    %tr = arith.addi %tv, %te : index\n    scf.for %tc = %c0 to %c{kv} step %c1 {{\n{}\n      memref.store %kf, %wuvT[%th, %tc, %te] : memref<{h}x{kv}x{dv}xf32>\n    }}\n  }}\n}}",
                indent(&kvb_load("%tr", "%tc", "%kf"), 6)
            ));
        }
        // The latent rows `0..rows` transposed into %latT (columns x keys), 64 keys at a time, each
        // column of the block written contiguously (the block's rows stay in L1 while its columns
        // are read): a row-by-row copy wrote every element to another cache line of %latT.
        let transpose = |rows: &str| {
            format!(
                "scf.for %tb = %c0 to {rows} step %c64 {{\n  %te0 = arith.addi %tb, %c64 : index\n  %te = arith.minui %te0, {rows} : index\n  scf.for %tc = %c0 to %c{width} step %c1 {{\n    scf.for %tj = %tb to %te step %c1 {{\n      %tl = memref.load {}[{}] : {lat_ty}\n      memref.store %tl, %latT[%tc, %tj] : memref<{width}x?xf32>\n    }}\n  }}\n}}",
                lat.0,
                lat_idx("%tj", "%tc")
            )
        };
        if vec_scores && !decode {
            // Prefill: one latent for every query.
            w(&mut t, &transpose("%srows"));
        }
        if absorbed {
            w(&mut t, &format!("%qabs = memref.alloc() : memref<{kv}xf32>\n%olat = memref.alloc() : memref<{kv}xf32>"));
        } else {
            // kvb[j, r] = sum_c latent[j, c] * kv_b[r, c] over the kv_lora_rank latent columns.
            let kvb_ty = format!("memref<?x{}xf32>", h * per_head);
            match &expanded {
                Some(e) => w(&mut t, &format!("%kvb = memref.cast {e} : {kvb_ty} to {kvb_ty}")),
                None => w(&mut t, &format!("%kvb = memref.alloc(%srows) : {kvb_ty}")),
            }
        }
        // Loop over queries (decode: one per sequence).
        // kvb[j, r] = sum_c latent[j, c] * kv_b[r, c] for the rows a query may see.
        let expand = |pad: &str, rows: &str| {
            format!(
                "{pad}scf.for %j = %c0 to {rows} step %c1 {{\n{pad}  scf.for %r = %c0 to %c{hp} step %c1 {{\n{pad}    %acc = scf.for %c = %c0 to %c{kv} step %c1 iter_args(%s = %zero) -> (f32) {{\n        %l = memref.load {}[{}] : {lat_ty}\n{}\n        %m = arith.mulf %l, %kf : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      memref.store %acc, %kvb[%j, %r] : memref<?x{hp}xf32>\n    }}\n  }}",
                lat.0,
                lat_idx("%j", "%c"),
                indent(&kvb_load("%r", "%c", "%kf"), 8),
                hp = h * per_head
            )
        };
        if vec_naive {
            // Prefill (naive form): expanded once, before the queries, 16 columns at a time over W
            // transposed; then the keys' nope parts and the rope columns transposed.
            let hp = h * per_head;
            let g_hp = lane_group(hp);
            w(&mut t, &format!(
                "%wT = memref.alloc() : memref<{kv}x{hp}xf32>\nscf.for %tr = %c0 to %c{hp} step %c1 {{\n  scf.for %tc = %c0 to %c{kv} step %c1 {{\n{}\n    memref.store %kf, %wT[%tc, %tr] : memref<{kv}x{hp}xf32>\n  }}\n}}\nscf.for %j = %c0 to %srows step %c1 {{\n  scf.for %r = %c0 to %c{hp} step %c{rstep} {{\n{expand}\n  }}\n  scf.for %th = %c0 to %c{h} step %c1 {{\n    %tb = arith.muli %th, %c{per_head} : index\n    %tk = arith.muli %th, %c{dn} : index\n    scf.for %td = %c0 to %c{dn} step %c1 {{\n      %col = arith.addi %tb, %td : index\n      %kval = memref.load %kvb[%j, %col] : memref<?x{hp}xf32>\n      %krow = arith.addi %tk, %td : index\n      memref.store %kval, %kT[%krow, %j] : memref<{hdn}x?xf32>\n    }}\n  }}\n  scf.for %tr = %c0 to %c{dr} step %c1 {{\n    %col = arith.addi %tr, %c{kv} : index\n    %rv = memref.load {lat}[{lr}] : {lat_ty}\n    memref.store %rv, %latR[%tr, %j] : memref<{dr}x?xf32>\n  }}\n}}\nmemref.dealloc %wT : memref<{kv}x{hp}xf32>",
                indent(&kvb_load("%tr", "%tc", "%kf"), 4),
                lat = lat.0,
                lr = lat_idx("%j", "%col"),
                hdn = h * dn,
                rstep = LANES * g_hp,
                expand = indent(
                    &format!(
                        "{}{}\n{}",
                        block_offsets("%r", g_hp),
                        lane_sums(
                            "%acc",
                            g_hp,
                            "%c",
                            &format!("%c{kv}"),
                            &format!("%x = memref.load {}[{}] : {lat_ty}", lat.0, lat_idx("%j", "%c")),
                            &|k| format!("%y{k} = vector.load %wT[%c, %bo{k}] : memref<{kv}x{hp}xf32>, vector<{LANES}xf32>"),
                        ),
                        (0..g_hp)
                            .map(|k| format!("vector.store %acc#{k}, %kvb[%j, %bo{k}] : memref<?x{hp}xf32>, vector<{LANES}xf32>"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    ),
                    4
                ),
            ));
        } else if !absorbed && !decode && expanded.is_none() {
            // Prefill (naive form, fp8 kv_b): expanded once, before the queries.
            w(&mut t, &expand("", "%srows"));
        }
        w(&mut t, "scf.for %q = %c0 to %nq step %c1 {");
        if decode {
            let p = positions.expect("decode has positions");
            w(&mut t, &format!("  %seq = arith.addi %q, %c0 : index\n  %p64 = memref.load {}[%q] : {}\n  %last = arith.index_cast %p64 : i64 to index", p.0, memref(&p.1)));
        } else {
            w(&mut t, "  %tq = arith.subi %srows, %nq : index\n  %last = arith.addi %tq, %q : index");
        }
        w(&mut t, "  %nkeys = arith.addi %last, %c1 : index");
        if vec_scores && decode {
            w(&mut t, &indent(&transpose("%nkeys"), 2));
        }
        if !absorbed && decode {
            // Decode (naive form): each sequence expands its own visible rows.
            w(&mut t, &expand("  ", "%nkeys"));
        }
        w(
            &mut t,
            &format!("  scf.for %hh = %c0 to %c{h} step %c1 {{\n    %hbase = arith.muli %hh, %c{per_head} : index"),
        );
        if vec_kv {
            // q_abs = q_nope[q, h] @ W_UK[h], 16 latent columns at a time.
            let g = lane_group(kv);
            let sum = lane_sums(
                "%acc",
                g,
                "%d",
                &format!("%c{dn}"),
                &format!("%x = memref.load {}[%q, %hh, %d] : {qn_ty}\n%row = arith.addi %hbase, %d : index", qn.0),
                &|k| {
                    format!("%y{k} = vector.load %kvbf[%row, %bo{k}] : memref<{hp_all}x{kv}xf32>, vector<{LANES}xf32>")
                },
            );
            let stores: String = (0..g)
                .map(|k| format!("vector.store %acc#{k}, %qabs[%bo{k}] : memref<{kv}xf32>, vector<{LANES}xf32>\n"))
                .collect();
            w(
                &mut t,
                &format!(
                    "    scf.for %c = %c0 to %c{kv} step %c{} {{\n{}\n{}\n{}    }}",
                    LANES * g,
                    indent(&block_offsets("%c", g), 6),
                    indent(&sum, 6),
                    indent(&stores, 6)
                ),
            );
        } else if absorbed {
            // q_abs = q_nope[q, h] @ W_UK[h]  ([dn] x [dn, kv])
            w(&mut t, &format!(
                "    scf.for %c = %c0 to %c{kv} step %c1 {{\n      %acc = scf.for %d = %c0 to %c{dn} step %c1 iter_args(%s = %zero) -> (f32) {{\n        %qv = memref.load {}[%q, %hh, %d] : {qn_ty}\n        %row = arith.addi %hbase, %d : index\n{}\n        %m = arith.mulf %qv, %kf : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      memref.store %acc, %qabs[%c] : memref<{kv}xf32>\n    }}",
                qn.0, indent(&kvb_load("%row", "%c", "%kf"), 8)
            ));
        }
        // Scores and their max.
        let nope_dot = if absorbed {
            format!("%dn_acc = scf.for %c = %c0 to %c{kv} step %c1 iter_args(%s = %zero) -> (f32) {{\n  %qa = memref.load %qabs[%c] : memref<{kv}xf32>\n  %l = memref.load {}[{}] : {lat_ty}\n  %m = arith.mulf %qa, %l : f32\n  %n = arith.addf %s, %m : f32\n  scf.yield %n : f32\n}}", lat.0, lat_idx("%j", "%c"))
        } else if !decode && kvb_scale.is_none() && dn % LANES == 0 {
            // Prefill with dense kv_b: q_nope . k_nope over dn, LANES at a time.
            format!(
                "%dvacc = scf.for %d = %c0 to %c{dn} step %cl iter_args(%va = %zv) -> (vector<{LANES}xf32>) {{\n  %qvv = vector.load {}[%q, %hh, %d] : {qn_ty}, vector<{LANES}xf32>\n  %col = arith.addi %hbase, %d : index\n  %kvv = vector.load %kvb[%j, %col] : memref<?x{}xf32>, vector<{LANES}xf32>\n  %f = vector.fma %qvv, %kvv, %va : vector<{LANES}xf32>\n  scf.yield %f : vector<{LANES}xf32>\n}}\n%dn_acc = vector.reduction <add>, %dvacc : vector<{LANES}xf32> into f32",
                qn.0,
                h * per_head
            )
        } else {
            format!("%dn_acc = scf.for %d = %c0 to %c{dn} step %c1 iter_args(%s = %zero) -> (f32) {{\n  %qv = memref.load {}[%q, %hh, %d] : {qn_ty}\n  %col = arith.addi %hbase, %d : index\n  %k = memref.load %kvb[%j, %col] : memref<?x{}xf32>\n  %m = arith.mulf %qv, %k : f32\n  %n = arith.addf %s, %m : f32\n  scf.yield %n : f32\n}}", qn.0, h * per_head)
        };
        let rope_dot = if !exact && dr % LANES == 0 && qp.1.element == "f32" && lat.1.element == "f32" {
            // q_pe . k_pe over dr, LANES at a time (k_pe: the latent row's last dr columns).
            format!(
                "%rvacc = scf.for %r = %c0 to %c{dr} step %cl iter_args(%va = %zv) -> (vector<{LANES}xf32>) {{\n  %qvv = vector.load {}[%q, %hh, %r] : {qp_ty}, vector<{LANES}xf32>\n  %col = arith.addi %r, %c{kv} : index\n  %lvv = vector.load {}[{}] : {lat_ty}, vector<{LANES}xf32>\n  %f = vector.fma %qvv, %lvv, %va : vector<{LANES}xf32>\n  scf.yield %f : vector<{LANES}xf32>\n}}\n%dr_acc = vector.reduction <add>, %rvacc : vector<{LANES}xf32> into f32",
                qp.0,
                lat.0,
                lat_idx("%j", "%col")
            )
        } else {
            format!("%dr_acc = scf.for %r = %c0 to %c{dr} step %c1 iter_args(%s = %zero) -> (f32) {{\n  %qv = memref.load {}[%q, %hh, %r] : {qp_ty}\n  %col = arith.addi %r, %c{kv} : index\n  %l = memref.load {}[{}] : {lat_ty}\n  %m = arith.mulf %qv, %l : f32\n  %n = arith.addf %s, %m : f32\n  scf.yield %n : f32\n}}", qp.0, lat.0, lat_idx("%j", "%col"))
        };
        let rope_part = |x_more: &str, y: &dyn Fn(usize) -> String| {
            let x = format!("%x = memref.load {}[%q, %hh, %r] : {qp_ty}{x_more}", qp.0);
            lane_sums("%ar", 4, "%r", &format!("%c{dr}"), &x, y)
        };
        if vec_naive {
            // 16 keys at a time: q_nope . k_nope over the transposed keys, q_pe . k_pe over the
            // transposed rope columns.
            let hdn = h * dn;
            let an = lane_sums(
                "%an",
                4,
                "%d",
                &format!("%c{dn}"),
                &format!("%x = memref.load {}[%q, %hh, %d] : {qn_ty}\n%krow = arith.addi %kbase, %d : index", qn.0),
                &|k| format!("%y{k} = vector.load %kT[%krow, %bo{k}] : memref<{hdn}x?xf32>, vector<{LANES}xf32>"),
            );
            let ar = rope_part("", &|k| {
                format!("%y{k} = vector.load %latR[%r, %bo{k}] : memref<{dr}x?xf32>, vector<{LANES}xf32>")
            });
            w(
                &mut t,
                &format!("    %kbase = arith.muli %hh, %c{dn} : index\n{}", indent(&key_block_scores(&an, &ar), 4)),
            );
        } else if vec_scores {
            // 16 keys at a time: q_abs . latent and q_pe . k_pe over the transposed latent rows.
            let an = lane_sums(
                "%an",
                4,
                "%c",
                &format!("%c{kv}"),
                &format!("%x = memref.load %qabs[%c] : memref<{kv}xf32>"),
                &|k| format!("%y{k} = vector.load %latT[%c, %bo{k}] : memref<{width}x?xf32>, vector<{LANES}xf32>"),
            );
            let ar = rope_part(&format!("\n%col = arith.addi %r, %c{kv} : index"), &|k| {
                format!("%y{k} = vector.load %latT[%col, %bo{k}] : memref<{width}x?xf32>, vector<{LANES}xf32>")
            });
            w(&mut t, &indent(&key_block_scores(&an, &ar), 4));
        } else {
            w(&mut t, &format!(
                "    %max = scf.for %j = %c0 to %nkeys step %c1 iter_args(%mx = %ninf) -> (f32) {{\n{}\n{}\n      %sum_s = arith.addf %dn_acc, %dr_acc : f32\n      %sc = arith.mulf %sum_s, %scale : f32\n      memref.store %sc, %scores[%j] : memref<?xf32>\n      %nm = arith.maximumf %mx, %sc : f32\n      scf.yield %nm : f32\n    }}",
                indent(&nope_dot, 6), indent(&rope_dot, 6)
            ));
        }
        w(&mut t, "    %den = scf.for %j = %c0 to %nkeys step %c1 iter_args(%sm = %zero) -> (f32) {\n      %sc = memref.load %scores[%j] : memref<?xf32>\n      %z = arith.subf %sc, %max : f32\n      %ex = math.exp %z : f32\n      memref.store %ex, %scores[%j] : memref<?xf32>\n      %ns = arith.addf %sm, %ex : f32\n      scf.yield %ns : f32\n    }".replace("\\n", "\n").as_str());
        // Normalization: exact, the probabilities themselves (then P.V divides by 1); otherwise
        // once per output after P.V.
        let den = if exact {
            w(&mut t, "    scf.for %j = %c0 to %nkeys step %c1 {\n      %ex = memref.load %scores[%j] : memref<?xf32>\n      %pn = arith.divf %ex, %den : f32\n      memref.store %pn, %scores[%j] : memref<?xf32>\n    }\n    %unit = arith.constant 1.0 : f32");
            "%unit"
        } else {
            "%den"
        };
        if vec_kv {
            // olat = P . latent, 16 latent columns at a time (each lane sequential over the keys).
            let g = lane_group(kv);
            let sum = lane_sums("%acc", g, "%j", "%nkeys", "%x = memref.load %scores[%j] : memref<?xf32>", &|k| {
                format!(
                    "%y{k} = vector.load {}[{}] : {lat_ty}, vector<{LANES}xf32>",
                    lat.0,
                    lat_idx("%j", &format!("%bo{k}"))
                )
            });
            let stores: String = (0..g)
                .map(|k| format!("%norm{k} = arith.divf %acc#{k}, %denv : vector<{LANES}xf32>\nvector.store %norm{k}, %olat[%bo{k}] : memref<{kv}xf32>, vector<{LANES}xf32>\n"))
                .collect();
            w(&mut t, &format!(
                "    %denv = vector.broadcast {den} : f32 to vector<{LANES}xf32>\n    scf.for %c = %c0 to %c{kv} step %c{} {{\n{}\n{}\n{}    }}",
                LANES * g,
                indent(&block_offsets("%c", g), 6),
                indent(&sum, 6),
                indent(&stores, 6)
            ));
        }
        if vec_naive {
            // out[q, h, :] = sum_j p_j * v_j, 16 value columns at a time, each lane sequential over
            // the keys (P already normalized), divided by 1 as the reference's order has it.
            let (g, hp) = (lane_group(dv), h * per_head);
            let sum = lane_sums("%acc", g, "%j", "%nkeys", "%x = memref.load %scores[%j] : memref<?xf32>", &|k| {
                format!("%y{k} = vector.load %kvb[%j, %vc{k}] : memref<?x{hp}xf32>, vector<{LANES}xf32>")
            });
            let cols: String = (0..g).map(|k| format!("%vc{k} = arith.addi %vcol0, %bo{k} : index\n")).collect();
            let stores: String = (0..g)
                .map(|k| format!("%norm{k} = arith.divf %acc#{k}, %denv : vector<{LANES}xf32>\nvector.store %norm{k}, {dest}[%q, %hh, %bo{k}] : {out_ty}, vector<{LANES}xf32>\n"))
                .collect();
            w(&mut t, &format!(
                "    %vcol0 = arith.addi %hbase, %c{dn} : index\n    %denv = vector.broadcast {den} : f32 to vector<{LANES}xf32>\n    scf.for %e = %c0 to %c{dv} step %c{} {{\n{}{}\n{}\n{}    }}",
                LANES * g,
                indent(&block_offsets("%e", g), 6),
                indent(&cols, 6),
                indent(&sum, 6),
                indent(&stores, 6)
            ));
        } else if vec_dv {
            // out = olat . W_UV^T, 16 value columns at a time over the transposed W_UV.
            let g = lane_group(dv);
            let sum = lane_sums(
                "%acc",
                g,
                "%c",
                &format!("%c{kv}"),
                &format!("%x = memref.load %olat[%c] : memref<{kv}xf32>"),
                &|k| {
                    format!(
                        "%y{k} = vector.load %wuvT[%hh, %c, %bo{k}] : memref<{h}x{kv}x{dv}xf32>, vector<{LANES}xf32>"
                    )
                },
            );
            let stores: String = (0..g)
                .map(|k| format!("vector.store %acc#{k}, {dest}[%q, %hh, %bo{k}] : {out_ty}, vector<{LANES}xf32>\n"))
                .collect();
            w(
                &mut t,
                &format!(
                    "    scf.for %e = %c0 to %c{dv} step %c{} {{\n{}\n{}\n{}    }}",
                    LANES * g,
                    indent(&block_offsets("%e", g), 6),
                    indent(&sum, 6),
                    indent(&stores, 6)
                ),
            );
        } else if vec_kv {
            // The scalar output over the vectorized olat.
            w(&mut t, &format!(
                "    scf.for %e = %c0 to %c{dv} step %c1 {{\n      %vrow0 = arith.addi %hbase, %c{dn} : index\n      %vrow = arith.addi %vrow0, %e : index\n      %acc = scf.for %c = %c0 to %c{kv} step %c1 iter_args(%s = %zero) -> (f32) {{\n        %ol = memref.load %olat[%c] : memref<{kv}xf32>\n{}\n        %m = arith.mulf %ol, %kf : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      memref.store %acc, {dest}[%q, %hh, %e] : {out_ty}\n    }}",
                indent(&kvb_load("%vrow", "%c", "%kf"), 8)
            ));
        } else if absorbed {
            w(&mut t, &format!(
                "    scf.for %c = %c0 to %c{kv} step %c1 {{\n      %acc = scf.for %j = %c0 to %nkeys step %c1 iter_args(%s = %zero) -> (f32) {{\n        %pj = memref.load %scores[%j] : memref<?xf32>\n        %l = memref.load {}[{}] : {lat_ty}\n        %m = arith.mulf %pj, %l : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      %norm = arith.divf %acc, {den} : f32\n      memref.store %norm, %olat[%c] : memref<{kv}xf32>\n    }}\n    scf.for %e = %c0 to %c{dv} step %c1 {{\n      %vrow0 = arith.addi %hbase, %c{dn} : index\n      %vrow = arith.addi %vrow0, %e : index\n      %acc = scf.for %c = %c0 to %c{kv} step %c1 iter_args(%s = %zero) -> (f32) {{\n        %ol = memref.load %olat[%c] : memref<{kv}xf32>\n{}\n        %m = arith.mulf %ol, %kf : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      memref.store %acc, {dest}[%q, %hh, %e] : {out_ty}\n    }}",
                lat.0, lat_idx("%j", "%c"), indent(&kvb_load("%vrow", "%c", "%kf"), 8)
            ));
        } else if !exact && dv % LANES == 0 && out_shape.element == "f32" {
            // out[q, h, :] = sum_j p_j * v_j, LANES columns at a time over contiguous value rows
            // (accumulated in the output row), then normalized.
            w(&mut t, &format!(
                "    %vcol0 = arith.addi %hbase, %c{dn} : index\n    scf.for %e = %c0 to %c{dv} step %cl {{\n      vector.store %zv, {dest}[%q, %hh, %e] : {out_ty}, vector<{LANES}xf32>\n    }}\n    scf.for %j = %c0 to %nkeys step %c1 {{\n      %pj = memref.load %scores[%j] : memref<?xf32>\n      %pjv = vector.broadcast %pj : f32 to vector<{LANES}xf32>\n      scf.for %e = %c0 to %c{dv} step %cl {{\n        %vcol = arith.addi %vcol0, %e : index\n        %v = vector.load %kvb[%j, %vcol] : memref<?x{hp}xf32>, vector<{LANES}xf32>\n        %o = vector.load {dest}[%q, %hh, %e] : {out_ty}, vector<{LANES}xf32>\n        %f = vector.fma %pjv, %v, %o : vector<{LANES}xf32>\n        vector.store %f, {dest}[%q, %hh, %e] : {out_ty}, vector<{LANES}xf32>\n      }}\n    }}\n    %denv = vector.broadcast %den : f32 to vector<{LANES}xf32>\n    scf.for %e = %c0 to %c{dv} step %cl {{\n      %o = vector.load {dest}[%q, %hh, %e] : {out_ty}, vector<{LANES}xf32>\n      %nv = arith.divf %o, %denv : vector<{LANES}xf32>\n      vector.store %nv, {dest}[%q, %hh, %e] : {out_ty}, vector<{LANES}xf32>\n    }}",
                hp = h * per_head
            ));
        } else {
            w(&mut t, &format!(
                "    scf.for %e = %c0 to %c{dv} step %c1 {{\n      %vcol0 = arith.addi %hbase, %c{dn} : index\n      %vcol = arith.addi %vcol0, %e : index\n      %acc = scf.for %j = %c0 to %nkeys step %c1 iter_args(%s = %zero) -> (f32) {{\n        %pj = memref.load %scores[%j] : memref<?xf32>\n        %v = memref.load %kvb[%j, %vcol] : memref<?x{}xf32>\n        %m = arith.mulf %pj, %v : f32\n        %n = arith.addf %s, %m : f32\n        scf.yield %n : f32\n      }}\n      %norm = arith.divf %acc, {den} : f32\n      memref.store %norm, {dest}[%q, %hh, %e] : {out_ty}\n    }}",
                h * per_head
            ));
        }
        w(&mut t, "  }\n}");
        w(&mut t, "memref.dealloc %scores : memref<?xf32>");
        if vec_scores {
            w(&mut t, &format!("memref.dealloc %latT : memref<{width}x?xf32>"));
        }
        if vec_naive {
            w(
                &mut t,
                &format!("memref.dealloc %kT : memref<{}x?xf32>\nmemref.dealloc %latR : memref<{dr}x?xf32>", h * dn),
            );
        }
        if vec_dv {
            w(&mut t, &format!("memref.dealloc %wuvT : memref<{h}x{kv}x{dv}xf32>"));
        }
        if dequantized.is_some() {
            w(&mut t, &format!("memref.dealloc %kvbf : memref<{hp_all}x{kv}xf32>"));
        }
        if absorbed {
            w(&mut t, &format!("memref.dealloc %qabs : memref<{kv}xf32>\nmemref.dealloc %olat : memref<{kv}xf32>"));
        } else if expanded.is_none() {
            w(&mut t, &format!("memref.dealloc %kvb : memref<?x{}xf32>", h * per_head));
        }
        // Constants used above.
        let mut consts = String::new();
        // (16 * k: the offsets of side-by-side 16-lane blocks; 63 and 64: whole groups of them.)
        for n in [h, dn, dr, dv, kv, per_head, hp_all, 128, width, 16, 32, 48, 63, 64] {
            // %c0 and %c1 are defined with the region's other constants (a dim of 1 is common).
            if n <= 1 {
                continue;
            }
            let line = format!("    %c{n} = arith.constant {n} : index\n");
            if !consts.contains(&line) {
                consts.push_str(&line);
            }
        }
        // Each MLA op gets its own region so the fixed names above never clash with other ops.
        self.line(&format!("scf.execute_region {{\n{consts}{t}    scf.yield\n    }}"));
    }
}

/// `g` independent 16-lane sums (instruction-level parallelism across column or key blocks), as
/// `name#0..g`: each the sum over `iv` in `0..count` of broadcast(`%x`) * `%y<k>`, every lane in
/// order from zero, a multiply then an add (the reference's summation). `x` defines the f32 `%x`
/// (and anything the loads share), `y(k)` the vector `%y<k>` (both may read `iv`).
fn lane_sums(name: &str, g: usize, iv: &str, count: &str, x: &str, y: &dyn Fn(usize) -> String) -> String {
    let v = format!("vector<{LANES}xf32>");
    let inits: Vec<String> = (0..g).map(|k| format!("%ls{k} = %zv")).collect();
    let mut body = format!("{}\n  %xb = vector.broadcast %x : f32 to {v}\n", indent(x, 2));
    for k in 0..g {
        body.push_str(&format!(
            "{}\n  %lm{k} = arith.mulf %xb, %y{k} : {v}\n  %ln{k} = arith.addf %ls{k}, %lm{k} : {v}\n",
            indent(&y(k), 2)
        ));
    }
    let yields: Vec<String> = (0..g).map(|k| format!("%ln{k}")).collect();
    format!(
        "{name}:{g} = scf.for {iv} = %c0 to {count} step %c1 iter_args({}) -> ({}) {{\n{body}  scf.yield {} : {}\n}}",
        inits.join(", "),
        vec![v.clone(); g].join(", "),
        yields.join(", "),
        vec![v.clone(); g].join(", ")
    )
}

/// How many 16-lane sums run side by side over `n` columns: 4 when `n` holds whole groups of 64.
fn lane_group(n: usize) -> usize {
    if n.is_multiple_of(4 * LANES) {
        4
    } else {
        1
    }
}

/// `%bo<k>` = `base` + 16 k for the `g` blocks of one step.
fn block_offsets(base: &str, g: usize) -> String {
    (0..g).map(|k| format!("%bo{k} = arith.addi {base}, %c{} : index\n", k * LANES)).collect()
}

/// Scores of 64 keys at a time (`%scores` padded to whole 64-key groups), four 16-key blocks side by
/// side: the nope sums `an` then the rope sums `ar` (each [`lane_sums`] `%an` / `%ar` of 4 over the
/// blocks at `%bo<k>`), summed and scaled as the reference does; then the maximum `%max` over the
/// visible keys.
fn key_block_scores(an: &str, ar: &str) -> String {
    let mut store = String::new();
    for k in 0..4 {
        store.push_str(&format!(
            "  %sv{k} = arith.addf %an#{k}, %ar#{k} : vector<{LANES}xf32>\n  %scv{k} = arith.mulf %sv{k}, %scalev : vector<{LANES}xf32>\n  vector.store %scv{k}, %scores[%bo{k}] : memref<?xf32>, vector<{LANES}xf32>\n"
        ));
    }
    format!(
        "%nblk0 = arith.addi %nkeys, %c63 : index
%nblk = arith.divui %nblk0, %c64 : index
%scalev = vector.broadcast %scale : f32 to vector<{LANES}xf32>
scf.for %jb = %c0 to %nblk step %c1 {{
  %j0 = arith.muli %jb, %c64 : index
{offsets}{an}
{ar}
{store}}}
%max = scf.for %j = %c0 to %nkeys step %c1 iter_args(%mx = %ninf) -> (f32) {{
  %sc = memref.load %scores[%j] : memref<?xf32>
  %nm = arith.maximumf %mx, %sc : f32
  scf.yield %nm : f32
}}",
        offsets = indent(&block_offsets("%j0", 4), 2) + "\n",
        an = indent(an, 2),
        ar = indent(ar, 2)
    )
}

/// Scores padded to whole 64-key groups (`%spad` of them), and `extra` buffers of that many keys.
fn padded_scores(extra: &str) -> String {
    format!(
        "%spad0 = arith.addi %srows, %c63 : index
%spad1 = arith.divui %spad0, %c64 : index
%spad = arith.muli %spad1, %c64 : index
%scores = memref.alloc(%spad) : memref<?xf32>
{extra}"
    )
}
