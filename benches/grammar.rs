//! Structured output's cost a token (`response_format: json_object`, `v3c_runtime::grammar`):
//! the mask of the tokens JSON's grammar allows next, walked through the vocabulary's byte trie,
//! in three places of a text — between values (few tokens fit), inside a string (almost all do)
//! and inside a number — walked afresh, and kept from an earlier token in the same state; and
//! building the trie, and patterns' automata. The tokenizer: `V3R_BENCH_TOKENIZER` (a
//! tokenizer.json, e.g. DeepSeek-V3's 129280 tokens), else the fixture's 980.

use criterion::{criterion_group, criterion_main, Criterion};
use v3c_runtime::gbnf::Grammar;
use v3c_runtime::grammar::{Json, Pattern, TokenTrie};
use v3c_runtime::schema::schema_regex;
use v3c_runtime::tokenizer::Tokenizer;

fn grammar(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = std::env::var_os("V3R_BENCH_TOKENIZER")
        .map_or_else(|| root.join("tests/fixtures/tokenizer/tokenizer.json"), std::path::PathBuf::from);
    let t = Tokenizer::from_file(&file).expect("the tokenizer");
    let trie = t.trie();
    let mut g = c.benchmark_group(format!("json_mask_{}", t.vocab_size()));
    for (name, text) in
        [("between_values", &br#"{"a": 1,"#[..]), ("in_string", br#"{"a": "text "#), ("in_number", br#"{"a": 12"#)]
    {
        let state = Json::new().feed(text).expect("on the grammar");
        g.bench_function(name, |b| b.iter(|| trie.walk(std::hint::black_box(state))));
    }
    // A JSON schema's pattern (a dense DFA): inside a string, and between properties.
    let schema = serde_json::json!({"type": "object", "properties": {"answer": {"type": "string"},
        "score": {"type": "number"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
        "required": ["answer", "score", "tags"]});
    let pattern = Pattern::new(&schema_regex(&schema).expect("a schema")).expect("a pattern");
    for (name, prefix) in
        [("schema_in_string", &br#"{"answer": "text "#[..]), ("schema_after_value", br#"{"answer": "x","#)]
    {
        g.bench_function(name, |b| b.iter(|| pattern.walk_after(&trie, std::hint::black_box(prefix))));
    }
    // A sequence's next mask in a state it was in before (a long string's tokens): kept.
    let state = Json::new().feed(br#"{"a": "text "#).expect("on the grammar");
    g.bench_function("in_string_kept", |b| b.iter(|| trie.allowed(std::hint::black_box(state))));
    g.sample_size(10);
    g.bench_function("build_trie", |b| b.iter(|| TokenTrie::of(&t)));
    // Building a pattern's DFA (once per distinct schema: patterns are kept): the schema above.
    let regex = schema_regex(&schema).expect("a schema");
    g.bench_function("build_pattern_schema", |b| b.iter(|| Pattern::new(std::hint::black_box(&regex))));
    // A GBNF grammar of JSON objects inside a string: the first mask at a state (the grammar
    // read afresh, its automaton built as the trie is walked), and one kept.
    let json = v3c_runtime::gbnf::JSON_OBJECT;
    let in_string =
        |g: &Grammar| br#"{"a": "text "#.iter().try_fold(g.start(), |s, &b| g.step(&s, b)).expect("on the grammar");
    g.bench_function("gbnf_json_in_string_first", |b| {
        b.iter(|| {
            let grammar = Grammar::parse(json).expect("a grammar");
            grammar.allowed(&trie, &in_string(&grammar))
        })
    });
    let grammar = Grammar::parse(json).expect("a grammar");
    let state = in_string(&grammar);
    grammar.allowed(&trie, &state);
    g.bench_function("gbnf_json_in_string_kept", |b| b.iter(|| grammar.allowed(&trie, std::hint::black_box(&state))));
    g.finish();
}

criterion_group!(benches, grammar);
criterion_main!(benches);
