//! Filetests: `tests/filetests/*.mlir`, each starting with `// pipeline: <stage | pass,pass,...>` and
//! holding cases separated by `// -----`. Each case is `v3`-stage IR: it runs through the pipeline
//! driver up to the named stage, or through the named passes; the printed result or the diagnostics
//! are snapshotted (one snapshot per file). Outputs must round-trip: print -> parse -> print is
//! identical.

use std::path::Path;

use v3c_compiler::pipeline::Driver;

fn run_case(pipeline: &str, name: &str, text: &str) -> String {
    let context = v3c_compiler::mlir::new_context();
    let is_stage = v3c_compiler::pipeline::STAGES.iter().any(|s| s.name == pipeline);
    let result = if is_stage {
        Driver::quiet().run_text(&context, text, name, "v3", pipeline)
    } else {
        Driver::quiet().run_text(&context, text, name, "v3", "v3").and_then(|mut m| {
            let passes: Vec<&str> = pipeline.split(',').map(str::trim).collect();
            v3c_compiler::transforms::run_passes(&context, &mut m, &passes)?;
            Ok(m)
        })
    };
    let output = match result {
        Ok(module) => {
            let printed = module.as_operation().to_string();
            // The output parses back (as the stage it is) to the same text.
            let again = Driver::quiet()
                .run_text(&v3c_compiler::mlir::new_context(), &printed, name, "v3", "v3")
                .map(|m| m.as_operation().to_string())
                .unwrap_or_else(|e| panic!("{name}: printed IR does not parse back: {e}"));
            assert_eq!(again, printed, "{name}: print -> parse -> print differs");
            printed
        }
        Err(e) => format!("error: {e}\n"),
    };
    output
}

#[test]
fn filetests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("filetests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "mlir"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        let stage = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("// pipeline:"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{}: first line must be `// pipeline: <stage>`", file.display()));
        let mut out = String::new();
        for (i, case) in text.split("// -----").enumerate() {
            let name = format!("{stem}.mlir#{i}");
            out.push_str(&format!("// ----- case {i}\n"));
            out.push_str(&run_case(stage, &name, case));
        }
        insta::assert_snapshot!(stem, out);
    }
}
