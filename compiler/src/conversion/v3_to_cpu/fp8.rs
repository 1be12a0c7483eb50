//! fp8 e4m3: encode/decode helpers, 1x128 quantization, block-scaled GEMMs and fp8 experts.

use super::*;

/// e4m3 bits `%b` (i8) -> `%r` (f32), as scalar arith ops: the body of the decode helper, and
/// what the transform-dialect templates inline into their generics (a call would not vectorize).
/// Defines `%bi`, `%c*`, `%sign`, `%e*`, `%m*`, `%n0`, `%n1`, `%normal`, `%sub*`, `%tiny`,
/// `%zero_i`, `%neg`, `%issub`, `%v`, `%isnan`, `%nan`.
pub(super) const DECODE_BODY: &str = "%bi = arith.extui %b : i8 to i32\n\
    %c3 = arith.constant 3 : i32\n\
    %c7 = arith.constant 7 : i32\n\
    %c15 = arith.constant 15 : i32\n\
    %c20 = arith.constant 20 : i32\n\
    %c23 = arith.constant 23 : i32\n\
    %c24 = arith.constant 24 : i32\n\
    %c120 = arith.constant 120 : i32\n\
    %c128 = arith.constant 128 : i32\n\
    %sign = arith.andi %bi, %c128 : i32\n\
    %signbit = arith.shli %sign, %c24 : i32\n\
    %eraw = arith.shrui %bi, %c3 : i32\n\
    %e = arith.andi %eraw, %c15 : i32\n\
    %m = arith.andi %bi, %c7 : i32\n\
    %eb = arith.addi %e, %c120 : i32\n\
    %es = arith.shli %eb, %c23 : i32\n\
    %ms = arith.shli %m, %c20 : i32\n\
    %n0 = arith.ori %es, %ms : i32\n\
    %n1 = arith.ori %n0, %signbit : i32\n\
    %normal = arith.bitcast %n1 : i32 to f32\n\
    %mf = arith.uitofp %m : i32 to f32\n\
    %tiny = arith.constant 1.953125e-03 : f32\n\
    %subabs = arith.mulf %mf, %tiny : f32\n\
    %subneg = arith.negf %subabs : f32\n\
    %zero_i = arith.constant 0 : i32\n\
    %neg = arith.cmpi ne, %sign, %zero_i : i32\n\
    %sub = arith.select %neg, %subneg, %subabs : f32\n\
    %issub = arith.cmpi eq, %e, %zero_i : i32\n\
    %v = arith.select %issub, %sub, %normal : f32\n\
    %emax = arith.cmpi eq, %e, %c15 : i32\n\
    %mmax = arith.cmpi eq, %m, %c7 : i32\n\
    %isnan = arith.andi %emax, %mmax : i1\n\
    %nan = arith.constant 0x7FC00000 : f32\n\
    %r = arith.select %isnan, %nan, %v : f32";

/// f32 `%x` -> its e4m3 bits `%r` (i8), round to nearest even, |x| >= 464 and NaN -> NaN code, as
/// scalar arith ops: the body of the encode helper, and what the transform-dialect templates
/// inline into their generics. Defines `%bits`, `%c*`, `%sh`, `%sign`, `%a`, `%ab`, `%mask23`,
/// `%half`, `%e*`, `%mant`, `%lsb*`, `%inc`, `%rounded`, `%m3`, `%carry`, `%mm`, `%eb`,
/// `%normal`, `%scaled`, `%q`, `%qr`, `%sub`, `%minnormal`, `%issub`, `%code*`, `%limit`,
/// `%over`, `%isnan`, `%bad`, `%withsign`.
pub(super) const ENCODE_BODY: &str = "%bits = arith.bitcast %x : f32 to i32\n\
    %c24 = arith.constant 24 : i32\n\
    %c128 = arith.constant 128 : i32\n\
    %sh = arith.shrui %bits, %c24 : i32\n\
    %sign = arith.andi %sh, %c128 : i32\n\
    %a = math.absf %x : f32\n\
    %ab = arith.bitcast %a : f32 to i32\n\
    %c23 = arith.constant 23 : i32\n\
    %c20 = arith.constant 20 : i32\n\
    %c1 = arith.constant 1 : i32\n\
    %c3 = arith.constant 3 : i32\n\
    %c7 = arith.constant 7 : i32\n\
    %c120 = arith.constant 120 : i32\n\
    %mask23 = arith.constant 8388607 : i32\n\
    %half = arith.constant 524287 : i32\n\
    %e = arith.shrui %ab, %c23 : i32\n\
    %mant = arith.andi %ab, %mask23 : i32\n\
    %lsb0 = arith.shrui %mant, %c20 : i32\n\
    %lsb = arith.andi %lsb0, %c1 : i32\n\
    %inc = arith.addi %half, %lsb : i32\n\
    %rounded = arith.addi %mant, %inc : i32\n\
    %m3 = arith.shrui %rounded, %c20 : i32\n\
    %carry = arith.shrui %m3, %c3 : i32\n\
    %mm = arith.andi %m3, %c7 : i32\n\
    %e8a = arith.subi %e, %c120 : i32\n\
    %e8 = arith.addi %e8a, %carry : i32\n\
    %eb = arith.shli %e8, %c3 : i32\n\
    %normal = arith.ori %eb, %mm : i32\n\
    %scaled = arith.constant 512.0 : f32\n\
    %q = arith.mulf %a, %scaled : f32\n\
    %qr = math.roundeven %q : f32\n\
    %sub = arith.fptoui %qr : f32 to i32\n\
    %minnormal = arith.constant 0.015625 : f32\n\
    %issub = arith.cmpf olt, %a, %minnormal : f32\n\
    %code0 = arith.select %issub, %sub, %normal : i32\n\
    %limit = arith.constant 464.0 : f32\n\
    %over = arith.cmpf oge, %a, %limit : f32\n\
    %isnan = arith.cmpf uno, %x, %x : f32\n\
    %bad = arith.ori %over, %isnan : i1\n\
    %c127 = arith.constant 127 : i32\n\
    %code = arith.select %bad, %c127, %code0 : i32\n\
    %withsign = arith.ori %code, %sign : i32\n\
    %r = arith.trunci %withsign : i32 to i8";

/// Helper functions every fp8 kernel module carries (names prefixed by the kernel's): e4m3 bits
/// to f32 and f32 to e4m3 bits, round to nearest even, |x| >= 464 -> NaN, exactly as
/// `v3c_models::dtype` does.
pub(crate) fn fp8_helpers(prefix: &str) -> String {
    let decode = indent(DECODE_BODY, 4);
    let encode = indent(ENCODE_BODY, 4);
    let l = VECTOR_CODEC_LANES;
    let (decode_v, encode_v) = (indent(&vectorized(DECODE_BODY, l), 4), indent(&vectorized(ENCODE_BODY, l), 4));
    format!(
        "func.func private @{prefix}_f8_decode(%b: i8) -> f32 {{
{decode}
    return %r : f32
  }}
  func.func private @{prefix}_f8_encode(%x: f32) -> i8 {{
{encode}
    return %r : i8
  }}
  func.func private @{prefix}_f8_decode_v(%b: vector<{l}xi8>) -> vector<{l}xf32> {{
{decode_v}
    return %r : vector<{l}xf32>
  }}
  func.func private @{prefix}_f8_encode_v(%x: vector<{l}xf32>) -> vector<{l}xi8> {{
{encode_v}
    return %r : vector<{l}xi8>
  }}
"
    )
}

/// Lanes of the vector e4m3 helpers (`@<prefix>_f8_decode_v`, `@<prefix>_f8_encode_v`).
pub(super) const VECTOR_CODEC_LANES: usize = 16;

/// A scalar helper body (one op per line, types after the last ` : `) as the same ops on
/// `vector<lanes x T>`: every lane computes what the scalar op computes, so the bits are equal.
fn vectorized(body: &str, lanes: usize) -> String {
    let vector = |t: &str| format!("vector<{lanes}x{t}>");
    let retype = |types: &str| {
        types
            .split(' ')
            .map(|w| match w.trim_end_matches(',') {
                t @ ("f32" | "i32" | "i8" | "i1") => w.replace(t, &vector(t)),
                _ => w.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    body.lines()
        .map(|line| {
            let (lhs, types) = line.rsplit_once(" : ").expect("an op with its types");
            if let Some((name, value)) = lhs.split_once(" = arith.constant ") {
                return format!("{name} = arith.constant dense<{value}> : {}", vector(types.trim()));
            }
            if lhs.contains("arith.select ") {
                return format!("{lhs} : {}, {}", vector("i1"), vector(types.trim()));
            }
            format!("{lhs} : {}", retype(types))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// fp8 activation group and weight block edge (DeepSeek-V3: 1x128 activations, 128x128 weights).
pub(super) const FP8_BLOCK: usize = 128;

impl Emitter {
    pub(super) fn encode(&mut self) -> String {
        self.uses_fp8 = true;
        format!("@{}_f8_encode", self.prefix)
    }

    /// 1 x `group` quantization of rows: s = max(amax, 1e-4) / 448, xq = e4m3(x / s).
    /// Rank-3 operands (the permuted rows of a grouped GEMM) are quantized as their rank-2 views;
    /// in a partitioned kernel, only the partition's columns (whole groups; both ends round up, so
    /// an empty partition clamped to the end of a ragged last group quantizes nothing).
    pub(super) fn quantize(&mut self, x: &(String, Shape), group: usize, q: (&str, &Shape), scales: (&str, &Shape)) {
        let k = x.1.dims.last().copied().flatten().unwrap_or(0);
        let groups = k.div_ceil(group);
        let enc = self.encode();
        let mut flat = |v: &str, shape: &Shape| -> (String, Shape) {
            if shape.dims.len() != 3 {
                return (v.to_string(), shape.clone());
            }
            let f = self.fresh();
            let inner = shape.dims[2];
            let view = Shape { dims: vec![None, inner], element: shape.element.clone() };
            self.line(&format!(
                "{f} = memref.collapse_shape {v} [[0, 1], [2]] : {} into {}",
                memref(shape),
                memref(&view)
            ));
            (f, view)
        };
        let (xv, xs) = flat(&x.0, &x.1);
        let (qv, qs) = flat(q.0, q.1);
        let (sv, ss) = flat(scales.0, scales.1);
        let (x, q, scales) = (&(xv, xs), (qv.as_str(), &qs), (sv.as_str(), &ss));
        let partitioned = self.partitioned && group == super::grouped::GATE_UP_GRANULE;
        if !partitioned {
            // Whole rows: the tiled templates (`fp8_tiled`); a grouped kernel's share of columns
            // stays in the loops below.
            self.quantize_rows(x, group, q, scales);
            return;
        }
        let (x_ty, q_ty, s_ty) = (memref(&x.1), memref(q.1), memref(scales.1));
        let blocks = if partitioned {
            format!(
                "{}\n      %blo = arith.ceildivui %qclo, %cg : index\n      %bhi = arith.ceildivui %qchi, %cg : index",
                super::grouped::partition_range(k, group, "%qclo", "%qchi").replace('\n', "\n      ")
            )
        } else {
            "%blo = arith.addi %c0, %c0 : index\n      %bhi = arith.addi %cb, %c0 : index".to_string()
        };
        self.line(&format!(
            "scf.execute_region {{
      %c0 = arith.constant 0 : index
      %c1 = arith.constant 1 : index
      %ck = arith.constant {k} : index
      %cg = arith.constant {group} : index
      %cb = arith.constant {groups} : index
      %floor = arith.constant 1.0e-04 : f32
      %fmax = arith.constant 448.0 : f32
      {blocks}
      %rows = memref.dim {x}, %c0 : {x_ty}
      scf.for %r = %c0 to %rows step %c1 {{
        scf.for %b = %blo to %bhi step %c1 {{
          %lo = arith.muli %b, %cg : index
          %hi0 = arith.addi %lo, %cg : index
          %hi = arith.minui %hi0, %ck : index
          %amax = scf.for %i = %lo to %hi step %c1 iter_args(%a = %zero) -> (f32) {{
            %v = memref.load {x}[%r, %i] : {x_ty}
            %av = math.absf %v : f32
            %m = arith.maximumf %a, %av : f32
            scf.yield %m : f32
          }}
          %am = arith.maximumf %amax, %floor : f32
          %s = arith.divf %am, %fmax : f32
          memref.store %s, {sc}[%r, %b] : {s_ty}
          scf.for %i = %lo to %hi step %c1 {{
            %v = memref.load {x}[%r, %i] : {x_ty}
            %d = arith.divf %v, %s : f32
            %bits = func.call {enc}(%d) : (f32) -> i8
            memref.store %bits, {qd}[%r, %i] : {q_ty}
          }}
        }}
      }}
      scf.yield
    }}",
            x = x.0,
            sc = scales.0,
            qd = q.0
        ));
    }
}
