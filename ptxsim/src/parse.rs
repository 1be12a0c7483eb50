//! PTX text to kernels: statements split, inline-asm scopes resolved (their `.reg` and labels are
//! local), registers numbered, symbols (parameters, shared variables) turned into addresses and
//! every instruction decoded once into an [`Instr`].

use std::collections::HashMap;

/// A value's kind and width, from an instruction's type suffix (`.u32`, `.s64`, `.f32`, `.b16`,
/// `.pred`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ty {
    pub kind: Kind,
    pub bits: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    U,
    S,
    F,
    B,
    Pred,
    Bf16,
    E4m3x2,
}

impl Ty {
    fn parse(s: &str) -> Option<Ty> {
        let t = |kind, bits| Some(Ty { kind, bits });
        match s {
            "pred" => t(Kind::Pred, 1),
            "bf16" => t(Kind::Bf16, 16),
            "e4m3x2" => t(Kind::E4m3x2, 16),
            _ => {
                let (k, n) = s.split_at(1);
                let bits: u32 = n.parse().ok()?;
                if ![8, 16, 32, 64].contains(&bits) {
                    return None;
                }
                match k {
                    "u" => t(Kind::U, bits),
                    "s" => t(Kind::S, bits),
                    "f" => t(Kind::F, bits),
                    "b" => t(Kind::B, bits),
                    _ => None,
                }
            }
        }
    }
}

/// A state space of a memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Global,
    Shared,
    Param,
    /// No space named: shared when the address lies in the shared window, else global.
    Generic,
}

/// Special registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    Tid(usize),
    Ntid(usize),
    Ctaid(usize),
    Nctaid(usize),
    LaneId,
    WarpId,
    /// `%cluster_ctaid` / `%cluster_nctaid`: the CTA's place in its cluster, the cluster's size.
    ClusterCtaid(usize),
    ClusterNctaid(usize),
}

/// The register of `_` in a vector (a value written nowhere).
pub const SINK: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq)]
pub enum Opnd {
    Reg(u32),
    Imm(u64),
    Special(Special),
    /// `[base + disp]` (symbols resolved into `disp`).
    Addr {
        base: Option<u32>,
        disp: i64,
    },
    /// `{%r1, %r2, ...}`.
    Vector(Vec<u32>),
    /// A TMA source: `[map, {c0, c1, ...}]`.
    Tensor {
        map: u32,
        coords: Vec<Opnd>,
    },
    Label(usize),
}

/// A `setp` comparison: ordered (integers; floats false when either is NaN), unordered (`equ`,
/// `neu`, `ltu`, ...: true when either is NaN), or whether both are numbers / either is NaN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Ordered(CmpBase),
    Unordered(CmpBase),
    Num,
    Nan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpBase {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arith {
    Add,
    Sub,
    MulLo,
    MulHi,
    MulWide,
    MadLo,
    MadWide,
    Fma,
    Div,
    Rem,
    Min,
    Max,
    Neg,
    Abs,
}

/// `cvt.rzi` / `rni` / `rmi` / `rpi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntRound {
    Zero,
    Nearest,
    Down,
    Up,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    Ex2,
    Lg2,
    Rcp,
    Sqrt,
    Rsqrt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logic {
    And,
    Or,
    Xor,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShflMode {
    Bfly,
    Down,
    Up,
    Idx,
}

/// A wgmma's shape and operand type: `m64nNkK`, `bf16` or `e4m3` inputs, f32 accumulators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mma {
    pub n: usize,
    pub k: usize,
    /// Bytes of an input element (2: bf16, 1: e4m3).
    pub input_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `mov`, with its width (what a packing or unpacking `mov.bN` splits).
    Mov(Option<Ty>),
    Arith(Arith, Ty),
    /// `max.NaN.f32` / `min.NaN.f32`: NaN if either is.
    MinMaxNan(bool),
    Logic(Logic, Ty),
    Shl(Ty),
    Shr(Ty),
    Bfe(Ty),
    /// `shf.{l,r}.{wrap,clamp}.b32 d, a, b, n`: the funnel shift of the 64 bits `b:a` (b high),
    /// `d` the high word after a left shift, the low one after a right shift; `n` taken mod 32
    /// (wrap) or at most 32 (clamp).
    Shf {
        left: bool,
        wrap: bool,
    },
    /// `prmt.b32 d, a, b, c` (the default mode): byte `i` of `d` is the byte of the 8 bytes `b:a`
    /// (a low) that nibble `i` of `c` selects by its low 3 bits; with its high bit set, that
    /// byte's sign replicated.
    Prmt,
    Setp(Cmp, Ty),
    Selp(Ty),
    /// `round`: the rounding of a float to an integer.
    Cvt {
        to: Ty,
        from: Ty,
        round: Option<IntRound>,
        sat: bool,
    },
    /// `cvt.rn.satfinite.e4m3x2.f32 d, a, b`: a in the high byte, b in the low.
    CvtE4m3x2,
    /// `cvt.rn.f16x2.e4m3x2 d, a`: each byte of a to the f16 in the same half of d.
    CvtE4m3x2ToF16x2,
    /// `cvt.rn.bf16x2.f32 d, a, b`: a rounded to bf16 (to nearest even) in the high half, b in
    /// the low.
    CvtF32x2ToBf16x2,
    /// `cvta.X` (to generic) or `cvta.to.X` (from generic), X shared or global.
    Cvta {
        to_generic: bool,
        shared: bool,
    },
    Ld(Space, Ty),
    St(Space, Ty),
    Atom(Space, AtomOp, Ty),
    Unary(Unary),
    Bra,
    Ret,
    /// `bar.sync id[, count]`.
    Bar,
    Shfl(ShflMode),
    MbarInit,
    MbarArrive {
        expect_tx: bool,
    },
    /// try_wait / test_wait with a parity.
    MbarWait,
    /// `cp.async.bulk.tensor.Nd.shared::cluster.global.tile.mbarrier::complete_tx::bytes`, to one
    /// CTA or (`multicast`) to those of a CTA mask.
    Tma {
        multicast: bool,
    },
    /// `mapa.shared::cluster d, a, rank`: a shared address in another CTA of the cluster.
    Mapa,
    /// `barrier.cluster.arrive` / `barrier.cluster.wait`.
    ClusterArrive,
    ClusterWait,
    Wgmma(Mma),
    /// `wgmma.commit_group`: the warpgroup's wgmmas so far form a group.
    WgmmaCommit,
    /// `wgmma.wait_group N`: all but the newest N groups complete.
    WgmmaWait,
    /// `fence.proxy.async`: the thread's shared-memory writes so far ordered before the async
    /// proxy's (wgmma operand) reads that come after it.
    ProxyFence,
    /// A GPU- (or system-) scope memory fence: `membar.gl`, `fence.sc.gpu`, `fence.acq_rel.gpu`:
    /// with an atomic after it, what the CTA wrote is released to the CTAs that atomic's address
    /// hands off to.
    GpuFence,
    /// Other fences, prefetches, register reallocation: nothing to do.
    Nop,
}

#[derive(Debug, Clone)]
pub struct Instr {
    pub op: Op,
    /// `@%p` / `@!%p`: the register and whether it is negated.
    pub guard: Option<(u32, bool)>,
    pub args: Vec<Opnd>,
    /// 1-based line in the PTX text.
    pub line: usize,
}

/// One `.entry` of a module, decoded.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub name: String,
    /// Byte offset and size of each parameter in the parameter buffer.
    pub params: Vec<(usize, usize)>,
    pub param_bytes: usize,
    pub registers: usize,
    /// Where dynamic shared memory starts, after the static variables (bytes).
    pub dynamic_offset: usize,
    pub max_threads: Option<usize>,
    /// CTAs per cluster (`.reqnctapercluster`; 1 without).
    pub cluster: usize,
    pub instrs: Vec<Instr>,
    /// Each instruction's text, for errors.
    pub text: Vec<String>,
}

/// A parsed PTX module.
#[derive(Debug, Clone)]
pub struct Module {
    pub kernels: Vec<Kernel>,
}

/// A statement of the text, in the scope it sits in.
#[derive(Debug)]
enum Item {
    Stmt { text: String, line: usize, scope: Vec<usize> },
    Label { name: String, scope: Vec<usize> },
}

/// Splits text into statements and labels, tracking `{ }` scopes (not operand braces).
fn items(text: &str, first_line: usize) -> Result<Vec<Item>, String> {
    let mut out = Vec::new();
    let (mut buf, mut line, mut start_line) = (String::new(), first_line, first_line);
    let (mut depth, mut next_scope, mut stack) = (0usize, 1usize, vec![0usize]);
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '\n' {
            line += 1;
        }
        let blank = buf.trim().is_empty();
        if blank && c != '\n' && !c.is_whitespace() {
            start_line = line;
        }
        match c {
            '{' if blank => {
                stack.push(next_scope);
                next_scope += 1;
                buf.clear();
            }
            '}' if blank && depth == 0 => {
                if stack.len() == 1 {
                    return Err(format!("line {line}: unbalanced '}}'"));
                }
                stack.pop();
                buf.clear();
            }
            '{' => {
                depth += 1;
                buf.push(c);
            }
            '}' => {
                depth = depth.saturating_sub(1);
                buf.push(c);
            }
            ';' => {
                out.push(Item::Stmt { text: buf.trim().to_string(), line: start_line, scope: stack.clone() });
                buf.clear();
            }
            ':' if depth == 0
                && chars.get(i + 1) != Some(&':')
                && i > 0
                && chars[i - 1] != ':'
                && !buf.trim().is_empty()
                && buf.trim().chars().all(|ch| ch.is_alphanumeric() || ch == '_' || ch == '$') =>
            {
                out.push(Item::Label { name: buf.trim().to_string(), scope: stack.clone() });
                buf.clear();
            }
            _ => buf.push(c),
        }
        i += 1;
    }
    if !buf.trim().is_empty() {
        return Err(format!("line {start_line}: statement without ';': {}", buf.trim()));
    }
    if stack.len() != 1 {
        return Err("unbalanced '{' at the end of the text".into());
    }
    Ok(out)
}

/// Splits operands at top-level commas (not inside `{}` or `[]`).
fn split_operands(s: &str) -> Vec<String> {
    let (mut out, mut buf, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '{' | '[' => {
                depth += 1;
                buf.push(c)
            }
            '}' | ']' => {
                depth -= 1;
                buf.push(c)
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut buf).trim().to_string()),
            _ => buf.push(c),
        }
    }
    if !buf.trim().is_empty() {
        out.push(buf.trim().to_string());
    }
    out
}

/// Names in scope while a kernel's body is decoded.
struct Names {
    /// (scope, name) -> register; `%`-names live in scope 0 whatever scope declares them.
    regs: HashMap<(usize, String), u32>,
    labels: HashMap<(usize, String), usize>,
    /// Parameters and shared variables: their addresses (parameter-buffer / shared offsets).
    symbols: HashMap<String, i64>,
    next_reg: u32,
}

impl Names {
    fn reg(&mut self, name: &str, scope: &[usize]) -> Option<u32> {
        if let Some(stripped) = name.strip_prefix('%') {
            if special(stripped).is_some() {
                return None;
            }
            let key = (0, name.to_string());
            if let Some(&r) = self.regs.get(&key) {
                return Some(r);
            }
            let r = self.next_reg;
            self.next_reg += 1;
            self.regs.insert(key, r);
            return Some(r);
        }
        scope.iter().rev().find_map(|s| self.regs.get(&(*s, name.to_string())).copied())
    }

    fn declare_local(&mut self, name: &str, scope: usize) {
        let r = self.next_reg;
        self.next_reg += 1;
        self.regs.insert((scope, name.to_string()), r);
    }

    fn label(&self, name: &str, scope: &[usize]) -> Option<usize> {
        scope.iter().rev().find_map(|s| self.labels.get(&(*s, name.to_string())).copied())
    }
}

fn special(s: &str) -> Option<Special> {
    let dim = |d: &str| match d {
        "x" => Some(0),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    match s {
        "laneid" => return Some(Special::LaneId),
        "warpid" => return Some(Special::WarpId),
        _ => {}
    }
    let (base, d) = s.split_once('.')?;
    let d = dim(d)?;
    match base {
        "tid" => Some(Special::Tid(d)),
        "ntid" => Some(Special::Ntid(d)),
        "ctaid" => Some(Special::Ctaid(d)),
        "nctaid" => Some(Special::Nctaid(d)),
        "cluster_ctaid" => Some(Special::ClusterCtaid(d)),
        "cluster_nctaid" => Some(Special::ClusterNctaid(d)),
        _ => None,
    }
}

fn immediate(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0f").or_else(|| s.strip_prefix("0F")) {
        return u32::from_str_radix(h, 16).ok().map(u64::from);
    }
    if let Some(h) = s.strip_prefix("0d").or_else(|| s.strip_prefix("0D")) {
        return u64::from_str_radix(h, 16).ok();
    }
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h.trim_end_matches('U'), 16).ok();
    }
    let t = s.trim_end_matches('U');
    t.parse::<i64>().map(|v| v as u64).ok().or_else(|| t.parse::<u64>().ok())
}

impl Names {
    fn operand(&mut self, s: &str, scope: &[usize]) -> Result<Opnd, String> {
        let s = s.trim();
        if let Some(inner) = s.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            let regs = inner
                .split(',')
                .map(|r| match r.trim() {
                    "_" => Ok(SINK),
                    r => self.reg(r, scope).ok_or_else(|| format!("'{r}' is not a register")),
                })
                .collect::<Result<Vec<u32>, String>>()?;
            return Ok(Opnd::Vector(regs));
        }
        if let Some(inner) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
            if inner.contains('{') {
                let parts = split_operands(inner);
                let [map, coords] = parts.as_slice() else { return Err(format!("tensor operand '{s}'")) };
                let map = self.reg(map, scope).ok_or_else(|| format!("tensor map '{map}' is not a register"))?;
                let coords = coords
                    .trim_start_matches('{')
                    .trim_end_matches('}')
                    .split(',')
                    .map(|c| self.operand(c, scope))
                    .collect::<Result<Vec<Opnd>, String>>()?;
                return Ok(Opnd::Tensor { map, coords });
            }
            let (mut base, mut disp) = (None, 0i64);
            // `a+4`, `a+-4`, `a`, `4`.
            let inner = inner.replace(' ', "");
            let (head, off) = match inner.find('+').or_else(|| inner[1..].find('-').map(|i| i + 1)) {
                Some(i) => (&inner[..i], Some(&inner[i..])),
                None => (inner.as_str(), None),
            };
            if let Some(off) = off {
                let off = off.trim_start_matches('+');
                disp += immediate(off).ok_or_else(|| format!("address offset '{off}'"))? as i64;
            }
            if let Some(r) = self.reg(head, scope) {
                base = Some(r);
            } else if let Some(&a) = self.symbols.get(head) {
                disp += a;
            } else if let Some(v) = immediate(head) {
                disp += v as i64;
            } else {
                return Err(format!("unknown name '{head}' in address '{s}'"));
            }
            return Ok(Opnd::Addr { base, disp });
        }
        if let Some(sp) = s.strip_prefix('%').and_then(special) {
            return Ok(Opnd::Special(sp));
        }
        if s == "_" {
            return Ok(Opnd::Reg(SINK));
        }
        if let Some(r) = self.reg(s, scope) {
            return Ok(Opnd::Reg(r));
        }
        if let Some(v) = immediate(s) {
            return Ok(Opnd::Imm(v));
        }
        if let Some(&a) = self.symbols.get(s) {
            return Ok(Opnd::Imm(a as u64));
        }
        if let Some(l) = self.label(s, scope) {
            return Ok(Opnd::Label(l));
        }
        Err(format!("unknown operand '{s}'"))
    }
}

fn cmp(s: &str) -> Option<Cmp> {
    use CmpBase as B;
    Some(match s {
        "eq" => Cmp::Ordered(B::Eq),
        "ne" => Cmp::Ordered(B::Ne),
        "lt" | "lo" => Cmp::Ordered(B::Lt),
        "le" | "ls" => Cmp::Ordered(B::Le),
        "gt" | "hi" => Cmp::Ordered(B::Gt),
        "ge" | "hs" => Cmp::Ordered(B::Ge),
        "equ" => Cmp::Unordered(B::Eq),
        "neu" => Cmp::Unordered(B::Ne),
        "ltu" => Cmp::Unordered(B::Lt),
        "leu" => Cmp::Unordered(B::Le),
        "gtu" => Cmp::Unordered(B::Gt),
        "geu" => Cmp::Unordered(B::Ge),
        "num" => Cmp::Num,
        "nan" => Cmp::Nan,
        _ => return None,
    })
}

fn space(parts: &[&str]) -> Space {
    if parts.iter().any(|p| p.starts_with("shared")) {
        Space::Shared
    } else if parts.contains(&"global") {
        Space::Global
    } else if parts.contains(&"param") {
        Space::Param
    } else {
        Space::Generic
    }
}

/// The last part of an opcode that is a type.
fn last_ty(parts: &[&str]) -> Option<Ty> {
    parts.iter().rev().find_map(|p| Ty::parse(p))
}

/// Decodes an opcode (`add.s64`, `ld.global.b32`, ...) into an [`Op`].
fn decode(opcode: &str) -> Result<Op, String> {
    let parts: Vec<&str> = opcode.split('.').collect();
    let has = |m: &str| parts.contains(&m);
    let ty = || last_ty(&parts).ok_or_else(|| format!("no type in '{opcode}'"));
    let arith = |a: Arith| -> Result<Op, String> { Ok(Op::Arith(a, ty()?)) };
    let unsupported = || Err(format!("unsupported instruction '{opcode}'"));
    match parts[0] {
        "mov" => Ok(Op::Mov(last_ty(&parts))),
        "add" => arith(Arith::Add),
        "sub" => arith(Arith::Sub),
        "mul" if has("hi") => arith(Arith::MulHi),
        "mul" if has("wide") => arith(Arith::MulWide),
        "mul" => arith(Arith::MulLo),
        "mad" if has("wide") => arith(Arith::MadWide),
        "mad" if has("hi") => unsupported(),
        "mad" if ty()?.kind == Kind::F => arith(Arith::Fma),
        "mad" => arith(Arith::MadLo),
        "fma" => arith(Arith::Fma),
        "div" => arith(Arith::Div),
        "rem" => arith(Arith::Rem),
        "min" | "max" if has("NaN") => Ok(Op::MinMaxNan(parts[0] == "max")),
        "min" => arith(Arith::Min),
        "max" => arith(Arith::Max),
        "neg" => arith(Arith::Neg),
        "abs" => arith(Arith::Abs),
        "and" => Ok(Op::Logic(Logic::And, ty()?)),
        "or" => Ok(Op::Logic(Logic::Or, ty()?)),
        "xor" => Ok(Op::Logic(Logic::Xor, ty()?)),
        "not" => Ok(Op::Logic(Logic::Not, ty()?)),
        "shl" => Ok(Op::Shl(ty()?)),
        "shr" => Ok(Op::Shr(ty()?)),
        "bfe" => Ok(Op::Bfe(ty()?)),
        "shf" if ty()?.bits == 32 && (has("l") || has("r")) && (has("wrap") || has("clamp")) => {
            Ok(Op::Shf { left: has("l"), wrap: has("wrap") })
        }
        "prmt" if parts.len() == 2 && ty()?.bits == 32 => Ok(Op::Prmt),
        "setp" => {
            let c = parts.get(1).and_then(|c| cmp(c)).ok_or_else(|| format!("comparison in '{opcode}'"))?;
            if parts.len() > 3 {
                return unsupported();
            }
            Ok(Op::Setp(c, ty()?))
        }
        "selp" => Ok(Op::Selp(ty()?)),
        "cvt" if has("e4m3x2") && has("f16x2") => Ok(Op::CvtE4m3x2ToF16x2),
        "cvt" if has("bf16x2") && has("f32") && has("rn") && !has("relu") && !has("satfinite") => {
            Ok(Op::CvtF32x2ToBf16x2)
        }
        "cvt" if has("e4m3x2") => Ok(Op::CvtE4m3x2),
        "cvt" => {
            let tys: Vec<Ty> = parts.iter().filter_map(|p| Ty::parse(p)).collect();
            let [to, from] = tys.as_slice() else { return Err(format!("types of '{opcode}'")) };
            let round = parts.iter().find_map(|p| match *p {
                "rzi" => Some(IntRound::Zero),
                "rni" => Some(IntRound::Nearest),
                "rmi" => Some(IntRound::Down),
                "rpi" => Some(IntRound::Up),
                _ => None,
            });
            Ok(Op::Cvt { to: *to, from: *from, round, sat: has("sat") || has("satfinite") })
        }
        "cvta" => Ok(Op::Cvta { to_generic: !has("to"), shared: parts.iter().any(|p| p.starts_with("shared")) }),
        "ld" => Ok(Op::Ld(space(&parts), ty()?)),
        "st" => Ok(Op::St(space(&parts), ty()?)),
        "atom" => {
            let ops = [
                ("add", AtomOp::Add),
                ("min", AtomOp::Min),
                ("max", AtomOp::Max),
                ("exch", AtomOp::Exch),
                ("cas", AtomOp::Cas),
            ];
            match ops.iter().find(|(m, _)| has(m)) {
                Some(&(_, op)) => Ok(Op::Atom(space(&parts), op, ty()?)),
                None => unsupported(),
            }
        }
        "ex2" => Ok(Op::Unary(Unary::Ex2)),
        "lg2" => Ok(Op::Unary(Unary::Lg2)),
        "rcp" => Ok(Op::Unary(Unary::Rcp)),
        "sqrt" => Ok(Op::Unary(Unary::Sqrt)),
        "rsqrt" => Ok(Op::Unary(Unary::Rsqrt)),
        "bra" => Ok(Op::Bra),
        "ret" | "exit" => Ok(Op::Ret),
        "bar" | "barrier" if has("sync") => Ok(Op::Bar),
        "shfl" => {
            let modes = [("bfly", ShflMode::Bfly), ("down", ShflMode::Down), ("up", ShflMode::Up)];
            Ok(Op::Shfl(modes.iter().find(|(m, _)| has(m)).map_or(ShflMode::Idx, |&(_, mode)| mode)))
        }
        "mbarrier" if has("init") => Ok(Op::MbarInit),
        "mbarrier" if has("arrive") && !has("noComplete") => Ok(Op::MbarArrive { expect_tx: has("expect_tx") }),
        "mbarrier" if (has("try_wait") || has("test_wait")) && has("parity") => Ok(Op::MbarWait),
        "cp" if has("bulk") && has("tensor") && has("tile") && has("global") => {
            Ok(Op::Tma { multicast: has("multicast::cluster") })
        }
        "mapa" => Ok(Op::Mapa),
        "barrier" if has("cluster") && has("arrive") => Ok(Op::ClusterArrive),
        "barrier" if has("cluster") && has("wait") => Ok(Op::ClusterWait),
        "wgmma" if has("mma_async") => {
            let shape = parts.iter().find(|p| p.starts_with("m64n")).ok_or_else(|| format!("shape of '{opcode}'"))?;
            let (n, k) = shape[4..].split_once('k').ok_or_else(|| format!("shape of '{opcode}'"))?;
            let (n, k): (usize, usize) = (
                n.parse().map_err(|_| format!("N of '{opcode}'"))?,
                k.parse().map_err(|_| format!("K of '{opcode}'"))?,
            );
            let input_bytes = if has("bf16") {
                2
            } else if has("e4m3") {
                1
            } else {
                return unsupported();
            };
            if !has("f32") {
                return unsupported();
            }
            Ok(Op::Wgmma(Mma { n, k, input_bytes }))
        }
        "wgmma" if has("commit_group") => Ok(Op::WgmmaCommit),
        "wgmma" if has("wait_group") => Ok(Op::WgmmaWait),
        "fence" if has("proxy") && has("async") => Ok(Op::ProxyFence),
        "membar" if has("gl") || has("sys") => Ok(Op::GpuFence),
        "fence" if (has("sc") || has("acq_rel")) && (has("gpu") || has("sys")) => Ok(Op::GpuFence),
        "wgmma" | "fence" | "membar" | "prefetch" | "setmaxnreg" => Ok(Op::Nop),
        _ => unsupported(),
    }
}

/// Reads `.shared [.align A] .b8 NAME[SIZE];` (or `[]` for the dynamic one): (name, align, size).
fn shared_decl(text: &str) -> Option<(String, usize, Option<usize>)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if !words.contains(&".shared") {
        return None;
    }
    let align = words.iter().position(|w| *w == ".align").and_then(|i| words.get(i + 1)?.parse().ok()).unwrap_or(1);
    let last = words.last()?;
    let (name, rest) = last.split_once('[')?;
    let elem = words.iter().rev().nth(1).and_then(|t| t.strip_prefix('.')).and_then(Ty::parse)?;
    let n = rest.trim_end_matches(']');
    let size = if n.is_empty() { None } else { Some(n.parse::<usize>().ok()? * (elem.bits as usize / 8)) };
    Some((name.to_string(), align, size))
}

impl Module {
    /// Parses a module's text: every `.entry`, decoded.
    pub fn parse(text: &str) -> Result<Module, String> {
        // Module-level shared variables first (they sit outside every entry).
        let mut kernels = Vec::new();
        let mut globals: Vec<(String, usize, Option<usize>)> = Vec::new();
        let mut rest = text;
        let mut line_base = 1;
        while let Some(at) = rest.find(".entry") {
            let head = &rest[..at];
            for stmt in head.split(';') {
                if let Some(d) = shared_decl(stmt) {
                    globals.push(d);
                }
            }
            line_base += head.matches('\n').count();
            let from = &rest[at..];
            let open = from.find('(').ok_or("an .entry without parameters")?;
            let close = from.find(')').ok_or("an .entry's parameters are not closed")?;
            let name = from[".entry".len()..open].trim().to_string();
            let params_text = &from[open + 1..close];
            let body_open = from[close..].find('{').ok_or_else(|| format!("{name}: no body"))? + close;
            let directives = &from[close + 1..body_open];
            // The body: up to its matching brace.
            let mut depth = 0;
            let mut body_close = None;
            for (i, c) in from[body_open..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            body_close = Some(body_open + i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let body_close = body_close.ok_or_else(|| format!("{name}: body not closed"))?;
            let body_line = line_base + from[..body_open + 1].matches('\n').count();
            let kernel = kernel(&name, params_text, directives, &from[body_open + 1..body_close], body_line, &globals)
                .map_err(|e| format!("{name}: {e}"))?;
            kernels.push(kernel);
            line_base += from[..body_close].matches('\n').count();
            rest = &from[body_close + 1..];
        }
        Ok(Module { kernels })
    }

    pub fn kernel(&self, name: &str) -> Option<&Kernel> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

fn kernel(
    name: &str,
    params_text: &str,
    directives: &str,
    body: &str,
    body_line: usize,
    globals: &[(String, usize, Option<usize>)],
) -> Result<Kernel, String> {
    let mut names = Names { regs: HashMap::new(), labels: HashMap::new(), symbols: HashMap::new(), next_reg: 0 };
    // Parameters, naturally aligned.
    let mut params = Vec::new();
    let mut offset = 0usize;
    for p in params_text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let words: Vec<&str> = p.split_whitespace().collect();
        let ty = words
            .iter()
            .find_map(|w| w.strip_prefix('.').and_then(Ty::parse))
            .ok_or_else(|| format!("parameter '{p}' has no type"))?;
        let bytes = (ty.bits as usize / 8).max(1);
        offset = offset.next_multiple_of(bytes);
        let pname = words.last().ok_or_else(|| format!("parameter '{p}'"))?;
        names.symbols.insert(pname.to_string(), offset as i64);
        params.push((offset, bytes));
        offset += bytes;
    }
    let max_threads = directives
        .split(|c: char| c == '\n' || c == ';')
        .find_map(|d| d.trim().strip_prefix(".maxntid").or_else(|| d.trim().strip_prefix(".reqntid")))
        .map(|d| d.split(',').filter_map(|x| x.trim().parse::<usize>().ok()).product());
    let cluster = directives
        .split(|c: char| c == '\n' || c == ';')
        .find_map(|d| d.trim().strip_prefix(".reqnctapercluster"))
        .map_or(1, |d| d.split(',').filter_map(|x| x.trim().parse::<usize>().ok()).product());
    let items = items(body, body_line)?;
    // Shared variables: module-level then the body's, laid out in order; the dynamic one after.
    let mut shared = 0usize;
    let mut dynamic = None;
    let body_decls = items.iter().filter_map(|it| match it {
        Item::Stmt { text, .. } => shared_decl(text),
        _ => None,
    });
    for (var, align, size) in globals.iter().cloned().chain(body_decls) {
        match size {
            Some(size) => {
                shared = shared.next_multiple_of(align.max(1));
                names.symbols.insert(var, shared as i64);
                shared += size;
            }
            None => dynamic = Some((var, align)),
        }
    }
    let dynamic_offset = match &dynamic {
        Some((var, align)) => {
            let at = shared.next_multiple_of((*align).max(16));
            names.symbols.insert(var.clone(), at as i64);
            at
        }
        None => shared.next_multiple_of(16),
    };
    // Labels and local registers.
    let mut pc = 0;
    for it in &items {
        match it {
            Item::Label { name, scope } => {
                names.labels.insert((*scope.last().unwrap_or(&0), name.clone()), pc);
            }
            Item::Stmt { text, scope, .. } => {
                if text.starts_with(".reg") {
                    let s = *scope.last().unwrap_or(&0);
                    if s != 0 {
                        for r in text.split_whitespace().skip(2).flat_map(|w| w.split(',')) {
                            let r = r.trim();
                            if !r.is_empty() && !r.starts_with('%') {
                                names.declare_local(r, s);
                            }
                        }
                    }
                } else if !text.starts_with('.') && !text.is_empty() {
                    pc += 1;
                }
            }
        }
    }
    let mut instrs = Vec::new();
    let mut texts = Vec::new();
    for it in &items {
        let Item::Stmt { text, line, scope } = it else { continue };
        if text.starts_with('.') || text.is_empty() {
            continue;
        }
        let located = |e: String| format!("line {line}: {e} (in '{text}')");
        let (guard, rest) = match text.strip_prefix('@') {
            Some(g) => {
                let (p, rest) = g.split_once(char::is_whitespace).ok_or_else(|| located("a guard alone".into()))?;
                let (neg, p) = match p.strip_prefix('!') {
                    Some(p) => (true, p),
                    None => (false, p),
                };
                let r = names.reg(p, scope).ok_or_else(|| located(format!("guard '{p}' is not a register")))?;
                (Some((r, neg)), rest.trim())
            }
            None => (None, text.as_str()),
        };
        let (opcode, operands) = match rest.split_once(char::is_whitespace) {
            Some((o, a)) => (o, a.trim()),
            None => (rest, ""),
        };
        let op = decode(opcode).map_err(located)?;
        let mut operands = split_operands(operands);
        // `shfl.sync d|p, a, b, c, mask`: the lane's predicate (whether its source lane was in
        // range) goes last, after the member mask.
        if let Some((d, p)) =
            operands.first().and_then(|d| d.split_once('|')).map(|(d, p)| (d.to_string(), p.to_string()))
        {
            if !matches!(op, Op::Shfl(_)) || operands.len() != 5 {
                return Err(located("a destination pair 'd|p' outside shfl.sync".into()));
            }
            operands[0] = d;
            operands.push(p);
        }
        let args =
            operands.iter().map(|a| names.operand(a, scope)).collect::<Result<Vec<Opnd>, String>>().map_err(located)?;
        instrs.push(Instr { op, guard, args, line: *line });
        texts.push(text.clone());
    }
    Ok(Kernel {
        name: name.to_string(),
        params,
        param_bytes: offset,
        registers: names.next_reg as usize,

        dynamic_offset,
        max_threads,
        cluster,
        instrs,
        text: texts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_asm_scopes_keep_their_labels_and_registers_apart() {
        let text = "
.visible .entry k(
\t.param .u64 k_param_0,
\t.param .f32 k_param_1
)
.maxntid 128, 1, 1
{
\t.reg .b32 %r<3>;
\t.shared .align 8 .b8 bar[16];
\tld.param.b64 %r1, [k_param_0];
\tmov.b64 %r2, bar;
\t{
\t.reg .pred P1;
\tLAB_WAIT:
\tmbarrier.try_wait.parity.shared.b64 P1, [%r2], 0, 100;
\t@P1 bra.uni DONE;
\tbra.uni LAB_WAIT;
\tDONE:
\t}
\t{
\t.reg .pred P1;
\tLAB_WAIT:
\t@!P1 bra.uni LAB_WAIT;
\t}
\tret;
}";
        let m = Module::parse(text).unwrap();
        let k = &m.kernels[0];
        assert_eq!(k.params, vec![(0, 8), (8, 4)]);
        assert_eq!(k.max_threads, Some(128));
        assert_eq!(k.instrs.len(), 7);
        // The first block's branches go to its own labels; the second block's to its own.
        assert_eq!(k.instrs[3].args, vec![Opnd::Label(5)]);
        assert_eq!(k.instrs[4].args, vec![Opnd::Label(2)]);
        assert_eq!(k.instrs[5].args, vec![Opnd::Label(5)]);
        // Two different P1 registers.
        let g1 = k.instrs[3].guard.unwrap().0;
        let g2 = k.instrs[5].guard.unwrap().0;
        assert_ne!(g1, g2);
        assert_eq!(k.instrs[1].args[1], Opnd::Imm(0));
    }

    #[test]
    fn unknown_instructions_are_named_with_their_line() {
        let text = ".visible .entry k()\n{\n\tfoo.bar %r1;\n}";
        let e = Module::parse(text).unwrap_err();
        assert!(e.contains("line 3") && e.contains("unsupported instruction 'foo.bar'"), "{e}");
    }
}
