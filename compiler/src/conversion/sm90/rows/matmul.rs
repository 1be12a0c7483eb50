//! The training step's f32 matmul on CUDA cores ([`super::TrainRow::Matmul`]) in the reference's
//! order, tiled: a block computes a [`TILE`] x [`TILE`] tile of `out`, each of its 128 threads 4
//! rows x 8 columns of it (rows `tr + 16 r`, columns `tc + 8 c`: conflict-free shared-memory
//! reads). Per [`DEPTH`] of the inner dimension, the block stages `a`'s and `b`'s slices in shared
//! memory (read along each operand's contiguous dimension: coalesced, whatever the layout), then
//! every thread adds its outputs' products for those `k` in order onto sums it keeps in shared
//! memory between the slices — each output is still one sequential sum from zero over `k`, each
//! product rounded before it is added (the reference's `matmul_t`: the same bits as one thread
//! per output), while each value a block reads from global memory serves 64 outputs, where one
//! block per output row read all of `b` for that row.

/// Rows and columns of `out` a block computes.
pub const TILE: usize = 64;
/// The inner dimension's slice staged at a time.
pub const DEPTH: usize = 32;
/// Threads of a block.
pub const THREADS: usize = 128;
/// A thread's rows and columns of the tile.
const ROWS: usize = 4;
const COLS: usize = 8;
/// Row stride of the staged slices `[DEPTH, TILE]` (padded by one: the staging stores, which run
/// along `k` for a row-major `a`, fall in distinct banks).
const STRIDE: usize = TILE + 1;

/// Shared arrays: the staged slices of `a` and `b` (`[DEPTH, STRIDE]`, `k` major) and the tile's
/// running sums.
pub(super) fn shared() -> Vec<(&'static str, usize)> {
    vec![("sh_a", DEPTH * STRIDE), ("sh_b", DEPTH * STRIDE), ("sh_acc", TILE * TILE)]
}

/// Constants (beyond the row kernels' own).
pub(super) fn constants(d: usize) -> String {
    format!(
        "%cTile = arith.constant {TILE} : index
%cDepth = arith.constant {DEPTH} : index
%cStride = arith.constant {STRIDE} : index
%cSlice = arith.constant {slice} : index
%cTileAll = arith.constant {all} : index
%cNB = arith.constant {nb} : index
%c8 = arith.constant 8 : index
%c16 = arith.constant 16 : index
",
        slice = DEPTH * TILE,
        all = TILE * TILE,
        nb = d.div_ceil(TILE),
    )
}

/// The block's tile (`%m0`, `%n0`), `M` and `K` (from `a`), the slices (`%nkt`).
pub(super) fn prologue(transpose_a: bool) -> String {
    let (m_dim, k_dim) = if transpose_a { (1, 0) } else { (0, 1) };
    format!(
        "%mb = arith.divui %row, %cNB : index
%nb = arith.remui %row, %cNB : index
%m0 = arith.muli %mb, %cTile : index
%n0 = arith.muli %nb, %cTile : index
%cM_dim = arith.constant {m_dim} : index
%cK_dim = arith.constant {k_dim} : index
%M = memref.dim %a, %cM_dim : memref<?x?xf32>
%K = memref.dim %a, %cK_dim : memref<?x?xf32>
%nkt = arith.ceildivui %K, %cDepth : index
"
    )
}

/// Stages one operand's slice: element `(tile index, k)` of `{name}` — `{name}[{at}]`, `at` in
/// `%t_abs` (the tile's row or column) and `%k_abs` — into `sh_{name}[k * STRIDE + tile index]`
/// (zero past the operand's `bound` or `K`), the threads running along the operand's contiguous
/// dimension (`k_fastest`: its rows are `k`'s).
fn stage(name: &str, origin: &str, bound: &str, at: &str, k_fastest: bool, sh: &str) -> String {
    let (t_of, k_of) = if k_fastest {
        ("arith.divui %x, %cDepth", "arith.remui %x, %cDepth")
    } else {
        ("arith.remui %x, %cTile", "arith.divui %x, %cTile")
    };
    format!(
        "scf.for %x = %tid to %cSlice step %cT {{
  %ti = {t_of} : index
  %ki = {k_of} : index
  %t_abs = arith.addi {origin}, %ti : index
  %k_abs = arith.addi %k0, %ki : index
  %t_in = arith.cmpi ult, %t_abs, {bound} : index
  %k_in = arith.cmpi ult, %k_abs, %K : index
  %in = arith.andi %t_in, %k_in : i1
  %v = scf.if %in -> (f32) {{
    %l = memref.load %{name}[{at}] : memref<?x?xf32>
    scf.yield %l : f32
  }} else {{
    scf.yield %zero : f32
  }}
  %row_at = arith.muli %ki, %cStride : index
  %sh_at = arith.addi %row_at, %ti : index
  memref.store %v, %sh_{name}[%sh_at] : {sh}
}}
"
    )
}

/// This thread's outputs: `%ai{r}_{c}`, the index of its sum (row `r`, column `c`) in `sh_acc`;
/// `%mi{r}`, `%nj{c}` their tile rows and columns.
fn outputs() -> String {
    let mut s = String::from("%tr = arith.divui %tid, %c8 : index\n%tc = arith.remui %tid, %c8 : index\n");
    for r in 0..ROWS {
        s.push_str(&format!(
            "%cr{r} = arith.constant {} : index\n%mi{r} = arith.addi %tr, %cr{r} : index\n%mrow{r} = arith.muli %mi{r}, %cTile : index\n",
            16 * r
        ));
    }
    for c in 0..COLS {
        s.push_str(&format!("%cc{c} = arith.constant {} : index\n%nj{c} = arith.addi %tc, %cc{c} : index\n", 8 * c));
    }
    for r in 0..ROWS {
        for c in 0..COLS {
            s.push_str(&format!("%ai{r}_{c} = arith.addi %mrow{r}, %nj{c} : index\n"));
        }
    }
    s
}

/// The phases: the sums zeroed; per slice, both operands staged, then each thread's products
/// added in `k` order; the sums written to `out` (rows below `M`, columns below `d`).
pub(super) fn phases(transpose_a: bool, transpose_b: bool, sh: &dyn Fn(&str) -> String) -> Vec<String> {
    let (a_sh, b_sh, acc) = (sh("sh_a"), sh("sh_b"), sh("sh_acc"));
    let a_at = if transpose_a { "%k_abs, %t_abs" } else { "%t_abs, %k_abs" };
    let b_at = if transpose_b { "%t_abs, %k_abs" } else { "%k_abs, %t_abs" };
    let k0 = "%k0 = arith.muli %kt, %cDepth : index\n";
    let staging = format!(
        "{k0}{}{}",
        stage("a", "%m0", "%M", a_at, !transpose_a, &a_sh),
        stage("b", "%n0", "%cD", b_at, transpose_b, &b_sh)
    );
    let pairs: Vec<(usize, usize)> = (0..ROWS).flat_map(|r| (0..COLS).map(move |c| (r, c))).collect();
    let loads: String =
        pairs.iter().map(|(r, c)| format!("%s{r}_{c} = memref.load %sh_acc[%ai{r}_{c}] : {acc}\n")).collect();
    let args: Vec<String> = pairs.iter().map(|(r, c)| format!("%v{r}_{c} = %s{r}_{c}")).collect();
    let types = vec!["f32"; pairs.len()].join(", ");
    let mut body = String::from("%k_row = arith.muli %kk, %cStride : index\n");
    for r in 0..ROWS {
        body.push_str(&format!(
            "%a_at{r} = arith.addi %k_row, %mi{r} : index\n%av{r} = memref.load %sh_a[%a_at{r}] : {a_sh}\n"
        ));
    }
    for c in 0..COLS {
        body.push_str(&format!(
            "%b_at{c} = arith.addi %k_row, %nj{c} : index\n%bv{c} = memref.load %sh_b[%b_at{c}] : {b_sh}\n"
        ));
    }
    for (r, c) in &pairs {
        body.push_str(&format!(
            "%p{r}_{c} = arith.mulf %av{r}, %bv{c} : f32\n%w{r}_{c} = arith.addf %v{r}_{c}, %p{r}_{c} : f32\n"
        ));
    }
    let yields: Vec<String> = pairs.iter().map(|(r, c)| format!("%w{r}_{c}")).collect();
    let stores: String = pairs
        .iter()
        .enumerate()
        .map(|(i, (r, c))| format!("memref.store %sums#{i}, %sh_acc[%ai{r}_{c}] : {acc}\n"))
        .collect();
    let accumulate = format!(
        "{k0}%k_end0 = arith.addi %k0, %cDepth : index
%k_end = arith.minui %k_end0, %K : index
%kn = arith.subi %k_end, %k0 : index
{outputs}{loads}%sums:{n} = scf.for %kk = %c0 to %kn step %c1 iter_args({args}) -> ({types}) {{
{body}scf.yield {yields} : {types}
}}
{stores}",
        outputs = outputs(),
        n = pairs.len(),
        args = args.join(", "),
        yields = yields.join(", "),
    );
    let writes: String = pairs
        .iter()
        .map(|(r, c)| {
            format!(
                "%om{r}_{c} = arith.addi %m0, %mi{r} : index
%on{r}_{c} = arith.addi %n0, %nj{c} : index
%im{r}_{c} = arith.cmpi ult, %om{r}_{c}, %M : index
%in{r}_{c} = arith.cmpi ult, %on{r}_{c}, %cD : index
%ok{r}_{c} = arith.andi %im{r}_{c}, %in{r}_{c} : i1
scf.if %ok{r}_{c} {{
  %o{r}_{c} = memref.load %sh_acc[%ai{r}_{c}] : {acc}
  memref.store %o{r}_{c}, %out[%om{r}_{c}, %on{r}_{c}] : memref<?x?xf32>
}}
"
            )
        })
        .collect();
    let mut phases =
        vec![format!("scf.for %x = %tid to %cTileAll step %cT {{\n  memref.store %zero, %sh_acc[%x] : {acc}\n}}\n")];
    phases.extend(super::loop_phases("kt", "nkt", vec![staging, accumulate]));
    phases.push(format!("{}{writes}", outputs()));
    phases
}
