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
