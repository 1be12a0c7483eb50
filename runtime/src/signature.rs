//! What a cpu kernel's machine code takes, as that code itself says.
//!
//! The compiler puts each cpu kernel's [`KernelSignature`] into the kernel's own code: a
//! NUL-terminated JSON string in the global `v3c_signature_<kernel>` beside its entry point. The
//! runtime reads it from the shared object it `dlopen`s, so the plan (and the manifest) are checked
//! against what the code will index, not against other files of the same artifact: a plan whose
//! launch binds an `i32` buffer where the code reads `f32`s, a smaller buffer than the code writes,
//! or a manifest whose `partitioned` flag would make the call misread its arguments, is refused
//! with a line naming the launch, the buffer and both types, instead of running the code out of
//! bounds.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::plan::DimRule;

/// The prefix of the global holding a kernel's signature (`v3c_signature_<kernel>`).
pub const SIGNATURE_SYMBOL_PREFIX: &str = "v3c_signature_";

/// A memref a kernel takes: its element type (MLIR's name) and dims (`None`: any size).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferType {
    pub dims: Vec<Option<usize>>,
    pub element: String,
}

impl fmt::Display for BufferType {
    /// MLIR's form without the `memref<>`: `?x64xf32`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.dims {
            match d {
                Some(n) => write!(f, "{n}x")?,
                None => write!(f, "?x")?,
            }
        }
        write!(f, "{}", self.element)
    }
}

impl BufferType {
    fn fits(&self, shape: &[usize], element: &str) -> bool {
        self.element == element
            && self.dims.len() == shape.len()
            && self.dims.iter().zip(shape).all(|(d, &n)| d.is_none_or(|d| d == n))
    }
}

/// A cpu kernel's calling convention: its buffers (inputs, then one per result, written in
/// place), how the results' dims follow from the inputs', whether it takes `(part, parts)` after
/// its buffers, and how its rows may be split over threads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSignature {
    pub inputs: Vec<BufferType>,
    pub outputs: Vec<BufferType>,
    /// Per output, per dim.
    pub output_rules: Vec<Vec<DimRule>>,
    pub partitioned: bool,
    pub row_split: Option<crate::host::RowSplit>,
    /// Classes of `(input, dim)`: dynamic dims of the inputs that the kernel reads as one size
    /// (the rows of a norm's input and of RoPE's positions, ...). Absent in the signatures of
    /// kernels compiled before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub equal_dims: Vec<Vec<(usize, usize)>>,
}

impl KernelSignature {
    /// The symbol of the global holding `kernel`'s signature.
    pub fn symbol(kernel: &str) -> String {
        format!("{SIGNATURE_SYMBOL_PREFIX}{kernel}")
    }

    /// The signature as the compiler embeds it (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a signature serializes")
    }

    /// Parses an embedded signature, checking that it is consistent with itself (one rule per
    /// output dim, rules naming inputs it has, a row flag per buffer).
    pub fn from_json(text: &str) -> Result<KernelSignature, String> {
        let s: KernelSignature = serde_json::from_str(text).map_err(|e| format!("unreadable signature: {e}"))?;
        let ranks: Vec<usize> = s.inputs.iter().map(|b| b.dims.len()).collect();
        let rules_fit = s.output_rules.len() == s.outputs.len()
            && s.outputs
                .iter()
                .zip(&s.output_rules)
                .all(|(o, r)| r.len() == o.dims.len() && r.iter().all(|r| names_input_dims(r, &ranks)));
        if !rules_fit {
            return Err("signature: its output rules do not match its buffers".into());
        }
        let buffers: Vec<&BufferType> = s.inputs.iter().chain(&s.outputs).collect();
        let split_fits = |r: &crate::host::RowSplit| {
            r.rows.len() == buffers.len()
                && r.rows.iter().zip(&buffers).all(|(&row, b)| !row || b.dims.first() == Some(&None))
        };
        if s.row_split.as_ref().is_some_and(|r| !split_fits(r)) {
            return Err("signature: its row split does not match its buffers".into());
        }
        let dynamic = |&(i, d): &(usize, usize)| s.inputs.get(i).and_then(|b| b.dims.get(d)) == Some(&None);
        if s.equal_dims.iter().any(|class| class.len() < 2 || !class.iter().all(dynamic)) {
            return Err("signature: its equal dims are not dynamic dims of its inputs".into());
        }
        Ok(s)
    }

    /// Why buffers of `shapes` and `elements` (the inputs, then the outputs) cannot be passed to
    /// the kernel: the count, an element type, a rank, a static dim, or an output's dims other than
    /// those the kernel computes from the inputs' (it writes them all). The error names the buffer
    /// by its position (`describe(i)`).
    pub fn check<S: AsRef<[usize]>>(
        &self,
        buffers: &[(S, &str)],
        describe: &dyn Fn(usize) -> String,
    ) -> Result<(), String> {
        let want = self.inputs.len() + self.outputs.len();
        if buffers.len() != want {
            return Err(format!(
                "{} buffers, the kernel takes {want} ({} inputs, {} outputs)",
                buffers.len(),
                self.inputs.len(),
                self.outputs.len()
            ));
        }
        for (i, ((shape, element), ty)) in buffers.iter().zip(self.inputs.iter().chain(&self.outputs)).enumerate() {
            if !ty.fits(shape.as_ref(), element) {
                return Err(format!("{} is {:?} {element}; the kernel takes {ty} there", describe(i), shape.as_ref()));
            }
        }
        // A row-split kernel's rows are dim 0 of every buffer flagged so, one count for all.
        if let Some(split) = &self.row_split {
            let rows = |j: usize| buffers[j].0.as_ref()[0];
            let flagged: Vec<usize> = (0..buffers.len()).filter(|&j| split.rows[j]).collect();
            if let Some(&j) = flagged.iter().find(|&&j| rows(j) != rows(flagged[0])) {
                return Err(format!(
                    "{} has {} rows, {} has {}; the kernel's rows are one count",
                    describe(j),
                    rows(j),
                    describe(flagged[0]),
                    rows(flagged[0])
                ));
            }
        }
        let inputs: Vec<&[usize]> = buffers[..self.inputs.len()].iter().map(|(s, _)| s.as_ref()).collect();
        for class in &self.equal_dims {
            let (i, d) = class[0];
            if let Some(&(j, e)) = class.iter().find(|&&(j, e)| inputs[j][e] != inputs[i][d]) {
                let dims = if d == e {
                    format!("dim {d} of both")
                } else {
                    format!("dim {e} of the one and {d} of the other")
                };
                return Err(format!(
                    "{} is {:?} and {} is {:?}; the kernel reads {dims} as one size",
                    describe(j),
                    inputs[j],
                    describe(i),
                    inputs[i]
                ));
            }
        }
        for (k, rules) in self.output_rules.iter().enumerate() {
            let i = self.inputs.len() + k;
            let wanted: Option<Vec<usize>> = rules.iter().map(|r| r.eval(&inputs)).collect();
            if wanted.as_deref() != Some(buffers[i].0.as_ref()) {
                return Err(format!(
                    "{} is {:?}; for its inputs the kernel writes {}",
                    describe(i),
                    buffers[i].0.as_ref(),
                    wanted.map_or("past the address space".into(), |w| format!("{w:?}"))
                ));
            }
        }
        Ok(())
    }
}

/// The signature `kernel`'s shared object `object` (its bytes: a 64-bit little-endian ELF file, as
/// v3c links them) holds, read from its symbol table without loading it: what `v3r info` checks
/// a cpu artifact's plan against on any machine, whether or not it could run the code.
pub fn read_embedded(object: &[u8], kernel: &str) -> Result<KernelSignature, String> {
    let symbol = KernelSignature::symbol(kernel);
    let bytes = elf_symbol(object, &symbol)?.ok_or_else(|| {
        format!("no {symbol} (the code says nothing of its buffers: compiled by an older v3c? compile the model again)")
    })?;
    let text = bytes.split(|&b| b == 0).next().unwrap_or_default();
    let text = std::str::from_utf8(text).map_err(|_| format!("{symbol} is not UTF-8"))?;
    KernelSignature::from_json(text)
}

/// The bytes of the data symbol `name` in the ELF file `elf` (None: no such symbol), bounds-checked
/// throughout: a damaged file is an error, never a read past it.
fn elf_symbol<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    let bad = |what: &str| format!("not a 64-bit little-endian ELF file ({what})");
    let at = |offset: u64, len: u64| -> Result<&'a [u8], String> {
        let start = usize::try_from(offset).map_err(|_| bad("offset"))?;
        let end = start.checked_add(usize::try_from(len).map_err(|_| bad("size"))?).ok_or_else(|| bad("size"))?;
        elf.get(start..end).ok_or_else(|| bad("truncated"))
    };
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let header = at(0, 64)?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(bad("header"));
    }
    let (shoff, shentsize, shnum) = (u64_at(header, 0x28), u16_at(header, 0x3a) as u64, u16_at(header, 0x3c) as u64);
    if shentsize < 64 {
        return Err(bad("section header size"));
    }
    let section = |i: u64| -> Result<&'a [u8], String> {
        if i >= shnum {
            return Err(bad("section index"));
        }
        at(shoff.checked_add(i * shentsize).ok_or_else(|| bad("section offset"))?, 64)
    };
    // (type, addr, offset, size, link, entsize) of section `i`.
    let fields = |i: u64| -> Result<(u32, u64, u64, u64, u32, u64), String> {
        let h = section(i)?;
        Ok((u32_at(h, 4), u64_at(h, 16), u64_at(h, 24), u64_at(h, 32), u32_at(h, 40), u64_at(h, 56)))
    };
    const SYMTAB: u32 = 2;
    const DYNSYM: u32 = 11;
    const NOBITS: u32 = 8;
    for i in 0..shnum {
        let (kind, _, offset, size, link, entsize) = fields(i)?;
        if kind != SYMTAB && kind != DYNSYM {
            continue;
        }
        if entsize < 24 {
            return Err(bad("symbol size"));
        }
        let table = at(offset, size)?;
        let (_, _, str_offset, str_size, _, _) = fields(link as u64)?;
        let strings = at(str_offset, str_size)?;
        for sym in table.chunks_exact(entsize as usize) {
            let name_at = u32_at(sym, 0) as usize;
            let named = strings.get(name_at..).and_then(|s| s.split(|&b| b == 0).next());
            if named != Some(name.as_bytes()) {
                continue;
            }
            let (shndx, value, len) = (u16_at(sym, 6) as u64, u64_at(sym, 8), u64_at(sym, 16));
            let (kind, addr, offset, size, _, _) = fields(shndx)?;
            let within = value.checked_sub(addr).filter(|o| o.checked_add(len).is_some_and(|end| end <= size));
            let Some(into) = within.filter(|_| kind != NOBITS) else { return Err(bad("symbol outside its section")) };
            return at(offset.checked_add(into).ok_or_else(|| bad("symbol offset"))?, len).map(Some);
        }
    }
    Ok(None)
}

/// Whether every input dim `r` names is one of inputs of `ranks`.
fn names_input_dims(r: &DimRule, ranks: &[usize]) -> bool {
    match r {
        DimRule::Const(_) => true,
        DimRule::Input { input, dim } => ranks.get(*input).is_some_and(|&rank| *dim < rank),
        DimRule::Sum(a, b) => names_input_dims(a, ranks) && names_input_dims(b, ranks),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_matmul() -> KernelSignature {
        let ty = |dims: &[Option<usize>], element: &str| BufferType { dims: dims.to_vec(), element: element.into() };
        KernelSignature {
            inputs: vec![ty(&[None, Some(4)], "f32"), ty(&[Some(4), Some(8)], "f32")],
            outputs: vec![ty(&[None, Some(8)], "f32")],
            output_rules: vec![vec![DimRule::Input { input: 0, dim: 0 }, DimRule::Const(8)]],
            partitioned: false,
            row_split: None,
            equal_dims: Vec::new(),
        }
    }

    #[test]
    fn dims_the_kernel_reads_as_one_size_are_equal() {
        // (x [?, 4], positions [?], weight [4, 8]) -> [?, 8]: a position per row.
        let mut s = rows_matmul();
        s.inputs.insert(1, BufferType { dims: vec![None], element: "i64".into() });
        s.equal_dims = vec![vec![(0, 0), (1, 0)]];
        assert_eq!(KernelSignature::from_json(&s.to_json()).unwrap(), s);
        let name = |i: usize| format!("buffer {i}");
        let with = |positions: usize| {
            let buffers = [(vec![6, 4], "f32"), (vec![positions], "i64"), (vec![4, 8], "f32"), (vec![6, 8], "f32")];
            s.check(&buffers, &name)
        };
        with(6).unwrap();
        assert_eq!(
            with(3).unwrap_err(),
            "buffer 1 is [3] and buffer 0 is [6, 4]; the kernel reads dim 0 of both as one size"
        );
        // Only dynamic dims of inputs, two or more to a class.
        for class in [vec![(0, 0), (2, 0)], vec![(0, 0), (5, 0)], vec![(0, 0), (1, 1)], vec![(0, 0)]] {
            let mut bad = s.clone();
            bad.equal_dims = vec![class];
            assert!(KernelSignature::from_json(&bad.to_json()).unwrap_err().contains("equal dims"));
        }
        // A signature without them (an older compiler's) reads as none.
        let json = s.to_json().replace(r#","equal_dims":[[[0,0],[1,0]]]"#, "");
        assert_eq!(KernelSignature::from_json(&json).unwrap().equal_dims, Vec::<Vec<(usize, usize)>>::new());
    }

    #[test]
    fn buffers_are_checked_against_the_signature() {
        let s = rows_matmul();
        let name = |i: usize| format!("buffer {i}");
        let ok = [(vec![3, 4], "f32"), (vec![4, 8], "f32"), (vec![3, 8], "f32")];
        s.check(&ok, &name).unwrap();
        let cases: [(&[(Vec<usize>, &str)], &str); 5] = [
            (&ok[..2], "2 buffers, the kernel takes 3 (2 inputs, 1 outputs)"),
            (
                &[(vec![3, 4], "i32"), ok[1].clone(), ok[2].clone()],
                "buffer 0 is [3, 4] i32; the kernel takes ?x4xf32 there",
            ),
            (
                &[ok[0].clone(), (vec![4, 9], "f32"), ok[2].clone()],
                "buffer 1 is [4, 9] f32; the kernel takes 4x8xf32 there",
            ),
            (
                &[ok[0].clone(), (vec![32], "f32"), ok[2].clone()],
                "buffer 1 is [32] f32; the kernel takes 4x8xf32 there",
            ),
            (
                &[ok[0].clone(), ok[1].clone(), (vec![2, 8], "f32")],
                "buffer 2 is [2, 8]; for its inputs the kernel writes [3, 8]",
            ),
        ];
        for (buffers, want) in cases {
            assert_eq!(s.check(buffers, &name).unwrap_err(), want);
        }
    }

    #[test]
    fn a_row_split_kernels_rows_are_one_count() {
        let mut s = rows_matmul();
        s.inputs[1].dims[0] = None;
        s.row_split = Some(crate::host::RowSplit { rows: vec![true, true, true], min_rows: 8 });
        let name = |i: usize| format!("buffer {i}");
        s.check(&[(vec![3, 4], "f32"), (vec![3, 8], "f32"), (vec![3, 8], "f32")], &name).unwrap();
        let err = s.check(&[(vec![3, 4], "f32"), (vec![2, 8], "f32"), (vec![3, 8], "f32")], &name).unwrap_err();
        assert_eq!(err, "buffer 1 has 2 rows, buffer 0 has 3; the kernel's rows are one count");
    }

    #[test]
    fn signatures_are_read_from_shared_objects_without_loading_them() {
        let s = rows_matmul();
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("k.c");
        let escaped = s.to_json().replace('\\', "\\\\").replace('"', "\\\"");
        let source = format!(
            "const char {}[] = \"{escaped}\";\nint padding[64] = {{1}};\nvoid entry(void **a) {{ (void)a; }}\n",
            KernelSignature::symbol("k")
        );
        std::fs::write(&c, source).unwrap();
        let so = dir.path().join("k.so");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let built = std::process::Command::new(cc).args(["-shared", "-fPIC", "-o"]).arg(&so).arg(&c).status().unwrap();
        assert!(built.success());
        let bytes = std::fs::read(&so).unwrap();
        assert_eq!(read_embedded(&bytes, "k").unwrap(), s);
        assert!(read_embedded(&bytes, "other").unwrap_err().starts_with("no v3c_signature_other (the code says"));
        // Damaged files are errors, never reads past them: every truncation, and bytes flipped.
        for len in (0..bytes.len()).step_by(7) {
            let _ = read_embedded(&bytes[..len], "k");
        }
        assert!(read_embedded(&bytes[..40], "k").unwrap_err().contains("not a 64-bit little-endian ELF file"));
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut damaged = bytes.clone();
            for _ in 0..4 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let at = (rng % damaged.len() as u64) as usize;
                damaged[at] = (rng >> 32) as u8;
            }
            let _ = read_embedded(&damaged, "k");
        }
    }

    #[test]
    fn embedded_signatures_round_trip_and_inconsistent_ones_are_refused() {
        let s = rows_matmul();
        assert_eq!(KernelSignature::from_json(&s.to_json()).unwrap(), s);
        let mut bad = s.clone();
        bad.output_rules[0][0] = DimRule::Input { input: 2, dim: 0 };
        assert!(KernelSignature::from_json(&bad.to_json()).unwrap_err().contains("output rules"));
        let mut bad = s.clone();
        bad.row_split = Some(crate::host::RowSplit { rows: vec![true, false], min_rows: 8 });
        assert!(KernelSignature::from_json(&bad.to_json()).unwrap_err().contains("row split"));
        // Rows are a dynamic dim 0 (not the weight's static 4).
        bad.row_split = Some(crate::host::RowSplit { rows: vec![true, true, true], min_rows: 8 });
        assert!(KernelSignature::from_json(&bad.to_json()).unwrap_err().contains("row split"));
        assert!(KernelSignature::from_json("{").unwrap_err().starts_with("unreadable signature"));
    }
}
