//! JSON schemas as regular expressions (and, where a schema refers to itself or leaves a value
//! open, as GBNF rules: [`schema_rules`], written out by [`crate::gbnf::schema_rules`]): what
//! `response_format: {"type": "json_schema"}`, vLLM's `guided_json` and tools' parameters are
//! held to. The expressions are of JSON texts as serde_json writes them (a space at most between
//! tokens), so that a [`crate::grammar::Pattern`] built from one masks a model's tokens to
//! instances of the schema.
//!
//! Not handled (refused by name with where they are): `multipleOf` but powers of ten of at most 1
//! (a number's decimals), `minProperties`/`maxProperties`, `patternProperties`, `not`,
//! `if`/`then`/`else`, `allOf` of more than one schema but objects, `uniqueItems` over items of
//! more than a few values (an enum's). What is written is a part of what a schema allows where the
//! whole would not be regular: other members of an object come after its named ones, distinct
//! items in their enum's order, numbers of a power of ten's decimals without trailing zeros past
//! them (instances otherwise written are valid but never generated).

use crate::grammar::escape;
/// Whitespace between a schema's JSON tokens: one space at most (as outlines writes it): any
/// whitespace would let a model go on with it for ever, as small ones do.
const WS: &str = r"[ ]?";

/// One character of a JSON string's contents: any but a quote, a backslash or a control
/// character, or an escape.
const STRING_CHAR: &str = r#"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})"#;

/// The most a `maxLength` or `maxItems` may be (larger ones make automata too large to build).
const MAX_BOUND: u64 = 256;

/// The regular expression of the JSON texts a JSON schema allows, as OpenAI's strict mode
/// writes schemas and more: objects with `properties` in their order, those not `required`
/// there or not (no others: `additionalProperties` false or left out; a schema: other members
/// after them, keys none of the named, values of that schema); `items` of arrays
/// (`minItems`, `maxItems`; `prefixItems` first); strings (`minLength`, `maxLength`; or a `format`
/// of [`FORMATS`], others annotations; or a `pattern`: [`string_pattern_regex`]), numbers, integers
/// (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`), booleans, null; `enum`,
/// `const`, `anyOf` / `oneOf`, a list of `type`s, and `$ref` to `#/$defs/...` or
/// `#/definitions/...` (not recursive here: [`crate::gbnf::schema_grammar`] takes those).
/// Annotations (`title`, `description`, `default`, `examples`, `$schema`, `$id`) are left out;
/// any other keyword is refused by name with where it is.
pub fn schema_regex(schema: &serde_json::Value) -> Result<String, String> {
    SchemaRegex { root: schema, depth: 0, refs: None, used: Vec::new() }.of(schema, "#")
}

/// The first of the private-use characters that stand for `$ref`s in [`schema_rules`]'
/// expressions (the k-th reference: this plus k).
pub const REF_MARK: u32 = 0xF0000;

/// A schema as rules: the expression of its texts with each `$ref` (to `#`, `#/$defs/...` or
/// `#/definitions/...`) a character [`REF_MARK`] + k, then each referenced schema's expression
/// alike, the k-th after the root — for schemas that refer to themselves, which one regular
/// expression cannot hold ([`crate::gbnf::schema_grammar`] writes them as a grammar). Also
/// whether any reference is recursive.
pub fn schema_rules(schema: &serde_json::Value) -> Result<(Vec<String>, bool), String> {
    let mut compiler = SchemaRegex { root: schema, depth: 0, refs: Some(Vec::new()), used: Vec::new() };
    let mut rules = vec![compiler.of(schema, "#")?];
    let mut done = 0;
    let mut uses: Vec<Vec<usize>> = vec![compiler.taken()];
    while done < compiler.refs.as_ref().map_or(0, Vec::len) {
        let path = compiler.refs.as_ref().map(|r| r[done].clone()).unwrap_or_default();
        if path == ANY_OBJECT || path == ANY_VALUE {
            // Any object or value: rules of the grammar's own ([`crate::gbnf::any_object_rules`] and alike).
            rules.push(path);
            uses.push(Vec::new());
            done += 1;
            continue;
        }
        let target = compiler.target(&path, "#")?;
        rules.push(compiler.of(target, &path)?);
        uses.push(compiler.taken());
        done += 1;
    }
    // Any object or value is not a regular language: a grammar too.
    let free = compiler.refs.as_ref().is_some_and(|r| r.iter().any(|p| p == ANY_OBJECT || p == ANY_VALUE));
    // A cycle among the references (rule k uses rule k + 1's references...).
    let n = rules.len();
    let mut reach: Vec<Vec<bool>> = vec![vec![false; n]; n];
    for (k, u) in uses.iter().enumerate() {
        for &r in u {
            reach[k][r + 1] = true;
        }
    }
    for m in 0..n {
        for i in 0..n {
            for j in 0..n {
                if reach[i][m] && reach[m][j] {
                    reach[i][j] = true;
                }
            }
        }
    }
    let recursive = free || (0..n).any(|k| reach[k][k]);
    Ok((rules, recursive))
}

/// The rule [`schema_rules`] gives in place of an expression for an object whose properties the
/// schema leaves open (`{"type": "object"}`): any JSON object.
pub const ANY_OBJECT: &str = "(any object)";

/// The rule [`schema_rules`] gives in place of an expression for a schema that allows any JSON
/// value (`{}`, `true`, an array's missing `items`, `additionalProperties: true` beside
/// properties).
pub const ANY_VALUE: &str = "(any value)";

/// Annotations: said of a schema, never of its texts.
const NOTES: [&str; 10] = [
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
];

struct SchemaRegex<'s> {
    root: &'s serde_json::Value,
    depth: usize,
    /// Where `$ref`s are written as marks: the references met, in order (their paths), and
    /// those the expression being compiled uses (taken by [`SchemaRegex::taken`]).
    refs: Option<Vec<String>>,
    used: Vec<usize>,
}

impl<'s> SchemaRegex<'s> {
    /// The schema a `$ref` names.
    fn target(&self, r: &str, at: &str) -> Result<&'s serde_json::Value, String> {
        if r == "#" && self.refs.is_some() {
            return Ok(self.root);
        }
        ["#/$defs/", "#/definitions/"]
            .iter()
            .find_map(|p| r.strip_prefix(p).map(|name| (p, name)))
            .and_then(|(p, name)| self.root.get(&p[2..p.len() - 1])?.get(name))
            .ok_or_else(|| format!("{at}/$ref: {r} is not a schema of #/$defs or #/definitions"))
    }

    /// `allOf`'s `parts` (and what `o` says beside them) as one object schema: their properties
    /// together, each named once (or alike wherever named), all their required ones, closed
    /// unless every part leaves other members open alike. Anything but objects is refused: an
    /// intersection of other schemas is not written here.
    fn merged_objects(
        &self,
        o: &serde_json::Map<String, serde_json::Value>,
        parts: &[serde_json::Value],
        at: &str,
    ) -> Result<serde_json::Value, String> {
        use serde_json::{Map, Value};
        const TAKEN: [&str; 9] = [
            "type",
            "properties",
            "required",
            "additionalProperties",
            "$ref",
            "allOf",
            "$defs",
            "definitions",
            "strict",
        ];
        let beside: Map<String, Value> =
            o.iter().filter(|(k, _)| *k != "allOf").map(|(k, v)| (k.clone(), v.clone())).collect();
        // Depth first, in order (a base's properties before what extends it): a stack, the
        // next part on top.
        let mut stack: Vec<(String, Value)> = vec![(at.to_string(), Value::Object(beside))];
        stack.extend(parts.iter().enumerate().rev().map(|(i, p)| (format!("{at}/allOf/{i}"), p.clone())));
        let (mut properties, mut required, mut open) = (Map::new(), Vec::<Value>::new(), Vec::new());
        let mut taken = 0;
        while let Some((where_, part)) = stack.pop() {
            taken += 1;
            if taken > 64 {
                return Err(format!("{at}/allOf: more than 64 schemas (a reference to itself?)"));
            }
            let part = match part.get("$ref").and_then(Value::as_str) {
                Some(r) => self.target(r, &where_)?.clone(),
                None => part,
            };
            let p = part.as_object().ok_or_else(|| format!("{where_}: {part} is not an object's schema"))?;
            if let Some(k) = p.keys().find(|k| !TAKEN.contains(&k.as_str()) && !NOTES.contains(&k.as_str())) {
                return Err(format!("{where_}: the keyword {k} in allOf (only objects' properties are merged)"));
            }
            if p.get("type").is_some_and(|t| t != "object") {
                return Err(format!("{where_}: allOf of other than objects is not supported"));
            }
            if let Some(Value::Array(inner)) = p.get("allOf") {
                // Its parts next, then what it says beside them.
                let mut rest = p.clone();
                rest.remove("allOf");
                stack.push((where_.clone(), Value::Object(rest)));
                stack.extend(inner.iter().enumerate().rev().map(|(i, s)| (format!("{where_}/allOf/{i}"), s.clone())));
                continue;
            }
            if let Some(ps) = p.get("properties") {
                let ps = ps.as_object().ok_or_else(|| format!("{where_}/properties: {ps} is not an object"))?;
                for (name, schema) in ps {
                    match properties.get(name) {
                        Some(earlier) if earlier != schema => {
                            return Err(format!("{where_}/properties/{name}: named again otherwise in allOf"))
                        }
                        _ => {
                            properties.insert(name.clone(), schema.clone());
                        }
                    }
                }
            }
            for r in p.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !required.contains(r) {
                    required.push(r.clone());
                }
            }
            // Only parts that say something of objects count for what they leave open.
            if p.contains_key("properties") || p.contains_key("additionalProperties") || p.get("type").is_some() {
                open.push(p.get("additionalProperties").cloned().unwrap_or(Value::Bool(false)));
            }
        }
        let mut merged = Map::new();
        for (k, v) in o.iter().filter(|(k, _)| NOTES.contains(&k.as_str())) {
            merged.insert(k.clone(), v.clone());
        }
        merged.insert("type".into(), "object".into());
        merged.insert("properties".into(), Value::Object(properties));
        merged.insert("required".into(), Value::Array(required));
        let closed = Value::Bool(false);
        let others = match open.split_first() {
            Some((first, rest)) if rest.iter().all(|x| x == first) => first.clone(),
            // Some part closed: no others (what another part leaves open it does not allow).
            _ => closed,
        };
        merged.insert("additionalProperties".into(), others);
        Ok(Value::Object(merged))
    }

    /// Where references are marks: the mark of the rule of `path` (a `$ref`, or [`ANY_OBJECT`]),
    /// noted as used (None: references are not marks here).
    fn mark(&mut self, path: &str) -> Option<String> {
        let refs = self.refs.as_mut()?;
        let k = match refs.iter().position(|x| x == path) {
            Some(k) => k,
            None => {
                refs.push(path.to_string());
                refs.len() - 1
            }
        };
        self.used.push(k);
        Some(format!("\\x{{{:x}}}", REF_MARK + k as u32))
    }

    /// Any object or value ([`ANY_OBJECT`], [`ANY_VALUE`]): the mark of its rule, which only a
    /// grammar holds.
    fn any(&mut self, what: &str, at: &str) -> Result<String, String> {
        self.mark(what).ok_or_else(|| format!("{at}: {} needs a grammar", &what[1..what.len() - 1]))
    }

    /// The references the expressions compiled since the last call use (by number).
    fn taken(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.used)
    }

    fn of(&mut self, s: &serde_json::Value, at: &str) -> Result<String, String> {
        use serde_json::Value;
        let o = match s {
            Value::Object(o) => o,
            Value::Bool(true) => return self.any(ANY_VALUE, at),
            x => return Err(format!("{at}: {x} is not a schema")),
        };
        self.depth += 1;
        if self.depth > 32 {
            return Err(format!("{at}: nested more than 32 deep (a recursive $ref?)"));
        }
        let r = self.object_schema(o, at);
        self.depth -= 1;
        r
    }

    fn object_schema(&mut self, o: &serde_json::Map<String, serde_json::Value>, at: &str) -> Result<String, String> {
        use serde_json::Value;
        const KNOWN: [&str; 27] = [
            "allOf",
            "multipleOf",
            "uniqueItems",
            "prefixItems",
            "pattern",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "format",
            "type",
            "properties",
            "required",
            "additionalProperties",
            "items",
            "minItems",
            "maxItems",
            "minLength",
            "maxLength",
            "enum",
            "const",
            "anyOf",
            "oneOf",
            "$ref",
            "$defs",
            "definitions",
            "strict",
        ];
        if let Some(k) = o.keys().find(|k| !NOTES.contains(&k.as_str()) && !KNOWN.contains(&k.as_str())) {
            return Err(format!("{at}: the keyword {k} is not supported"));
        }
        let literal = |v: &Value| escape(&v.to_string());
        if let Some(r) = o.get("$ref") {
            let r = r.as_str().ok_or_else(|| format!("{at}/$ref: not a string"))?;
            let target = self.target(r, at)?;
            if let Some(mark) = self.mark(r) {
                // Its schema compiled as a rule of its own.
                return Ok(mark);
            }
            return self.of(target, r);
        }
        if let Some(c) = o.get("const") {
            return Ok(literal(c));
        }
        if let Some(e) = o.get("enum") {
            let e = e.as_array().filter(|e| !e.is_empty()).ok_or_else(|| format!("{at}/enum: not a list of values"))?;
            return Ok(format!("(?:{})", e.iter().map(literal).collect::<Vec<_>>().join("|")));
        }
        if let Some(all) = o.get("allOf") {
            return match all.as_array().map(Vec::as_slice) {
                // One schema (what pydantic writes around a reference with a description): that one.
                Some([one]) => self.of(one, &format!("{at}/allOf/0")),
                // Objects (a base and what extends it, as OpenAPI's generators write them): one.
                Some(parts) if !parts.is_empty() => {
                    let merged = self.merged_objects(o, parts, at)?;
                    self.of(&merged, &format!("{at}/allOf"))
                }
                _ => Err(format!("{at}/allOf: not a list of schemas")),
            };
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(all) = o.get(key) {
                let all = all.as_array().ok_or_else(|| format!("{at}/{key}: not a list of schemas"))?;
                if all.is_empty() {
                    return Err(format!("{at}/{key}: an empty list (no value matches)"));
                }
                let each = all.iter().enumerate().map(|(i, s)| self.of(s, &format!("{at}/{key}/{i}")));
                return Ok(format!("(?:{})", each.collect::<Result<Vec<_>, _>>()?.join("|")));
            }
        }
        let types: Vec<&str> = match o.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| t.as_str().ok_or_else(|| format!("{at}/type: {t} is not a type name")))
                .collect::<Result<_, _>>()?,
            Some(x) => return Err(format!("{at}/type: {x} is not a type name")),
            None if o.contains_key("properties") => vec!["object"],
            // Nothing but annotations (`{}`): any value.
            None if o
                .keys()
                .all(|k| NOTES.contains(&k.as_str()) || ["$defs", "definitions", "strict"].contains(&k.as_str())) =>
            {
                return self.any(ANY_VALUE, at)
            }
            None => return Err(format!("{at}: no type")),
        };
        let bound = |k: &str| -> Result<Option<u64>, String> {
            match o.get(k) {
                None => Ok(None),
                Some(n) => match n.as_u64() {
                    Some(n) if n <= MAX_BOUND => Ok(Some(n)),
                    _ => Err(format!("{at}/{k}: {n} is not a count of at most {MAX_BOUND}")),
                },
            }
        };
        let mut each = Vec::new();
        for t in types {
            each.push(match t {
                "null" => "null".to_string(),
                "boolean" => "(?:true|false)".to_string(),
                "integer" => {
                    // Every integer is a multiple of a power of ten of at most 1; of others, not all.
                    if let Some(m) = o.get("multipleOf") {
                        decimal_places(m, at)?;
                    }
                    let (mut lo, mut hi) = integer_bounds(o, at)?;
                    // OpenAPI's int32 bounds it (other formats of numbers are annotations).
                    if o.get("format").and_then(Value::as_str) == Some("int32") {
                        lo = Some(lo.map_or(i64::from(i32::MIN), |l| l.max(i32::MIN.into())));
                        hi = Some(hi.map_or(i64::from(i32::MAX), |h| h.min(i32::MAX.into())));
                    }
                    if hi.zip(lo).is_some_and(|(h, l)| h < l) {
                        return Err(format!("{at}: no integer is within its minimum and maximum"));
                    }
                    integer_regex(lo, hi)
                }
                "number" => number_regex(o, at)?,
                "string" if o.contains_key("pattern") => {
                    if let Some(k) = ["minLength", "maxLength", "format"].iter().find(|k| o.contains_key(**k)) {
                        return Err(format!("{at}/{k}: not with a pattern"));
                    }
                    let p = o["pattern"].as_str().ok_or_else(|| format!("{at}/pattern: not a string"))?;
                    string_pattern_regex(p).map_err(|e| format!("{at}/pattern: {e}"))?
                }
                // A format of those known is held to; any other is an annotation (JSON Schema's
                // default: any string).
                "string" if o.get("format").and_then(Value::as_str).and_then(format_regex).is_some() => {
                    if let Some(k) = ["minLength", "maxLength"].iter().find(|k| o.contains_key(**k)) {
                        return Err(format!("{at}/{k}: not with a format"));
                    }
                    let f = o["format"].as_str().and_then(format_regex).unwrap_or_default();
                    format!("\"{f}\"")
                }
                "string" if o.get("format").is_some_and(|f| !f.is_string()) => {
                    return Err(format!("{at}/format: {} is not a format's name", o["format"]))
                }
                "string" => {
                    let (min, max) = (bound("minLength")?.unwrap_or(0), bound("maxLength")?);
                    if max.is_some_and(|m| m < min) {
                        return Err(format!("{at}: maxLength is below minLength"));
                    }
                    let max = max.map_or(String::new(), |m| m.to_string());
                    format!(r#""{STRING_CHAR}{{{min},{max}}}""#)
                }
                "array" => {
                    // The first items' own schemas (a tuple), then `items` for the rest (`false`: none).
                    let prefix = match o.get("prefixItems") {
                        None => &[][..],
                        Some(Value::Array(p)) => p.as_slice(),
                        Some(x) => return Err(format!("{at}/prefixItems: {x} is not a list of schemas")),
                    };
                    let (min, max) = (bound("minItems")?.unwrap_or(0), bound("maxItems")?);
                    match o.get("uniqueItems") {
                        None | Some(Value::Bool(false)) => {}
                        Some(Value::Bool(true)) => {
                            // Items of a few values: each written at most once, in the schema's order.
                            let values = match o.get("items").map(finite_values) {
                                Some(Some(v)) if prefix.is_empty() => v,
                                _ => {
                                    return Err(format!(
                                        "{at}/uniqueItems: only over items of an enum, a const or booleans (no prefixItems)"
                                    ))
                                }
                            };
                            let values: Vec<String> = values.iter().map(literal).collect();
                            return distinct_regex(&values, min, max).ok_or_else(|| {
                                format!("{at}: no array of distinct items is within minItems and maxItems")
                            });
                        }
                        Some(x) => return Err(format!("{at}/uniqueItems: {x} is not true or false")),
                    }
                    let k = prefix.len() as u64;
                    let max = match o.get("items") {
                        Some(Value::Bool(false)) => Some(max.map_or(k, |m| m.min(k))),
                        _ => max,
                    };
                    if max.is_some_and(|m| m < min) {
                        return Err(format!("{at}: maxItems (or prefixItems with items false) is below minItems"));
                    }
                    let mut elements = Vec::new();
                    for (i, p) in prefix.iter().enumerate().take(max.map_or(usize::MAX, |m| m as usize)) {
                        elements.push(self.of(p, &format!("{at}/prefixItems/{i}"))?);
                    }
                    let item = match o.get("items") {
                        _ if max.is_some_and(|m| m <= k) => None,
                        Some(items) => Some(self.of(items, &format!("{at}/items"))?),
                        // Items of any value.
                        None => Some(self.any(ANY_VALUE, &format!("{at}/items"))?),
                    };
                    array_regex(&elements, item.as_deref(), min, max)
                }
                "object" => {
                    let named = o.contains_key("properties");
                    // Members besides the named ones: the expression of their values, if any.
                    let (open, others) = match o.get("additionalProperties") {
                        None => (!named, None),
                        Some(Value::Bool(false)) => (false, None),
                        Some(Value::Bool(true)) if !named => (true, None),
                        // A map: any keys, each value an instance of the schema.
                        Some(values @ Value::Object(_)) if !named => {
                            let value = self.of(values, &format!("{at}/additionalProperties"))?;
                            let pair = format!(r#""{STRING_CHAR}*"{WS}:{WS}{value}"#);
                            each.push(format!(r"\{{{WS}(?:{pair}(?:{WS},{WS}{pair})*)?{WS}\}}"));
                            continue;
                        }
                        Some(values @ (Value::Bool(true) | Value::Object(_))) => {
                            (false, Some(self.of(values, &format!("{at}/additionalProperties"))?))
                        }
                        Some(x) => {
                            return Err(format!("{at}/additionalProperties: {x} is not true, false or a schema"))
                        }
                    };
                    if open {
                        // Any object, its members as they come: a rule of its own.
                        let mark = self.mark(ANY_OBJECT);
                        each.push(
                            mark.ok_or_else(|| format!("{at}: any object (no properties named) needs a grammar"))?,
                        );
                        continue;
                    }
                    let empty = serde_json::Map::new();
                    let props = match o.get("properties") {
                        None => &empty,
                        Some(Value::Object(p)) => p,
                        Some(x) => return Err(format!("{at}/properties: {x} is not an object")),
                    };
                    let required: Vec<&str> = match o.get("required") {
                        None => Vec::new(),
                        Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
                        Some(x) => return Err(format!("{at}/required: {x} is not a list of names")),
                    };
                    if let Some(k) = required.iter().find(|k| !props.contains_key(**k)) {
                        return Err(format!("{at}/required: {k} is not among the properties"));
                    }
                    let fields = props
                        .iter()
                        .map(|(k, v)| {
                            let field = format!(
                                "{}{WS}:{WS}{}",
                                literal(&Value::from(k.as_str())),
                                self.of(v, &format!("{at}/properties/{k}"))?
                            );
                            Ok((field, required.contains(&k.as_str())))
                        })
                        .collect::<Result<Vec<_>, String>>()?;
                    let members = match others {
                        None => object_fields(&fields),
                        Some(value) => {
                            let names: Vec<&str> = props.keys().map(String::as_str).collect();
                            let other = format!(r#""{}"{WS}:{WS}{value}"#, other_name(&names));
                            object_fields_and_others(&fields, &other)
                        }
                    };
                    format!(r"\{{{WS}{members}{WS}\}}")
                }
                t => return Err(format!("{at}/type: {t} is not a JSON type")),
            });
        }
        Ok(if each.len() == 1 { each.remove(0) } else { format!("(?:{})", each.join("|")) })
    }
}

/// The values an items schema allows when they are few (an `enum`, a `const`, booleans, null):
/// each once, in the schema's order (None: any other schema).
fn finite_values(items: &serde_json::Value) -> Option<Vec<serde_json::Value>> {
    use serde_json::Value;
    let values: Vec<Value> = if let Some(e) = items.get("enum") {
        e.as_array()?.clone()
    } else if let Some(c) = items.get("const") {
        vec![c.clone()]
    } else {
        match items.get("type")?.as_str()? {
            "boolean" => vec![Value::Bool(true), Value::Bool(false)],
            "null" => vec![Value::Null],
            _ => return None,
        }
    };
    let mut distinct: Vec<Value> = Vec::new();
    for v in values {
        if !distinct.contains(&v) {
            distinct.push(v);
        }
    }
    Some(distinct)
}

/// The regular expression of a JSON array of distinct `values` (regular expressions, each of one
/// value), those written in their order, between `min` and `max` of them (None: no such array).
/// Past 8 values, only counts from 0 or 1 up to all of them.
fn distinct_regex(values: &[String], min: u64, max: Option<u64>) -> Option<String> {
    let n = values.len() as u64;
    let max = max.map_or(n, |m| m.min(n));
    if min > max {
        return None;
    }
    let sep = format!("{WS},{WS}");
    let contents = if n > 8 {
        if min > 1 || max < n {
            return None;
        }
        let fields: Vec<(String, bool)> = values.iter().map(|v| (v.clone(), false)).collect();
        match min {
            0 => object_fields(&fields),
            _ => alternation(fields_written(&fields)),
        }
    } else {
        // The values from `i` on, `taken` already written (the first without a comma).
        fn pick(values: &[String], i: usize, taken: u64, (min, max): (u64, u64), sep: &str) -> Option<String> {
            if taken == max || i == values.len() {
                return (taken >= min).then(String::new);
            }
            let comma = if taken == 0 { "" } else { sep };
            let take =
                pick(values, i + 1, taken + 1, (min, max), sep).map(|rest| format!("{comma}{}{rest}", values[i]));
            let skip = pick(values, i + 1, taken, (min, max), sep);
            let each: Vec<String> = take.into_iter().chain(skip).collect();
            (!each.is_empty()).then(|| alternation(each))
        }
        pick(values, 0, 0, (min, max), &sep)?
    };
    Some(format!(r"\[{WS}{contents}{WS}\]"))
}

/// The regular expression of a JSON array whose elements are `prefix`'s instances, in order, then
/// any number of `item`'s (None: no more), between `min` and `max` of them in all.
fn array_regex(prefix: &[String], item: Option<&str>, min: u64, max: Option<u64>) -> String {
    let sep = format!("{WS},{WS}");
    let k = prefix.len() as u64;
    let element = |i: u64| prefix.get(i as usize).map_or(item.unwrap_or_default(), String::as_str);
    // The elements from `i` on (if any), each after a comma, from the last back to the second.
    let mut tail = match item {
        Some(item) if max.is_none_or(|m| m > k.max(1)) => {
            let from = k.max(1);
            let hi = max.map_or(String::new(), |m| (m - from).to_string());
            format!("(?:{sep}{item}){{{},{hi}}}", min.saturating_sub(from))
        }
        _ => String::new(),
    };
    for i in (1..k.min(max.unwrap_or(k))).rev() {
        let this = format!("{sep}{}{tail}", element(i));
        tail = if i >= min { format!("(?:{this})?") } else { this };
    }
    match (min, max) {
        (_, Some(0)) => format!(r"\[{WS}\]"),
        (0, _) => format!(r"\[{WS}(?:{}{tail})?{WS}\]", element(0)),
        _ => format!(r"\[{WS}{}{tail}{WS}\]", element(0)),
    }
}

/// [`object_fields`] followed by any number of other members (`other`: one's expression), all
/// separated by commas.
fn object_fields_and_others(fields: &[(String, bool)], other: &str) -> String {
    let sep = format!("{WS},{WS}");
    let others = format!("(?:{sep}{other})*");
    if fields.iter().any(|(_, required)| *required) {
        return format!("{}{others}", object_fields(fields));
    }
    // Every named member optional: some of them, then others; or others only; or none.
    let mut each: Vec<String> = fields_written(fields).into_iter().map(|f| format!("{f}{others}")).collect();
    each.push(format!("(?:{other}{others})?"));
    alternation(each)
}

/// The regular expression of a JSON string's contents (no escapes) other than each of `names`
/// (the named properties, so that another member does not repeat one): a trie of the names, at
/// each node the strings that end there (unless a name does), go on with a character no name
/// does, or follow a name's character and are none of the names below.
fn other_name(names: &[&str]) -> String {
    const PLAIN: &str = r#"[^"\\\x00-\x1f]"#;
    fn below(names: &[Vec<char>], depth: usize) -> String {
        let mut alternatives = Vec::new();
        if !names.iter().any(|n| n.len() == depth) {
            alternatives.push(String::new());
        }
        let mut next: Vec<char> = names.iter().filter_map(|n| n.get(depth).copied()).collect();
        next.sort_unstable();
        next.dedup();
        let hex = |c: char| format!("\\x{{{:x}}}", c as u32);
        let others: String = next.iter().map(|&c| hex(c)).collect();
        alternatives.push(format!(r#"[^"\\\x00-\x1f{others}]{PLAIN}*"#));
        for c in next {
            let with: Vec<Vec<char>> = names.iter().filter(|n| n.get(depth) == Some(&c)).cloned().collect();
            alternatives.push(format!("{}{}", hex(c), below(&with, depth + 1)));
        }
        format!("(?:{})", alternatives.join("|"))
    }
    // A name a string without escapes cannot spell is no name to leave out.
    let names: Vec<Vec<char>> = names
        .iter()
        .filter(|n| n.chars().all(|c| c != '"' && c != '\\' && c >= ' '))
        .map(|n| n.chars().collect())
        .collect();
    below(&names, 0)
}

/// The regular expression of an object's members (`fields`: each member's expression and whether
/// it is required), in their order, separated by commas: each optional one there or not. The
/// first member written is any up to the first required one, the others each after a comma.
fn object_fields(fields: &[(String, bool)]) -> String {
    let mut each = fields_written(fields);
    if !fields.iter().any(|(_, required)| *required) {
        // Every member optional: none at all too.
        each.push(String::new());
    }
    alternation(each)
}

/// [`object_fields`]' alternatives that write at least one member: one for each member that
/// may be the first written.
fn fields_written(fields: &[(String, bool)]) -> Vec<String> {
    let sep = format!("{WS},{WS}");
    // After member i: the members from i + 1 on, each preceded by a comma.
    let rest = |i: usize| {
        fields[i + 1..]
            .iter()
            .map(|(f, required)| if *required { format!("{sep}{f}") } else { format!("(?:{sep}{f})?") })
            .collect::<String>()
    };
    let firsts = fields.iter().position(|(_, required)| *required).map_or(fields.len(), |r| r + 1);
    (0..firsts).map(|i| format!("{}{}", fields[i].0, rest(i))).collect()
}

/// One of `each` (regular expressions): the one, or a group of them.
fn alternation(mut each: Vec<String>) -> String {
    match each.len() {
        1 => each.remove(0),
        _ => format!("(?:{})", each.join("|")),
    }
}

/// The regular expression of the JSON strings (quotes and escapes included) whose contents hold a
/// match of `pattern` (JSON Schema's: found anywhere unless anchored with `^` / `$`): the
/// pattern's characters as JSON writes them — a quote, a backslash and control characters
/// escaped (any of JSON's spellings of them), others as they are.
pub fn string_pattern_regex(pattern: &str) -> Result<String, String> {
    use regex_syntax::hir::{HirKind, Look};
    let hir = regex_syntax::Parser::new().parse(pattern).map_err(|e| {
        let e = e.to_string();
        e.lines().last().unwrap_or(&e).trim().to_string()
    })?;
    // Anchors at the ends decide whether anything may come before or after.
    let mut parts: Vec<&regex_syntax::hir::Hir> = match hir.kind() {
        HirKind::Concat(parts) => parts.iter().collect(),
        _ => vec![&hir],
    };
    let start = parts.first().is_some_and(|h| matches!(h.kind(), HirKind::Look(Look::Start)));
    if start {
        parts.remove(0);
    }
    let end = parts.last().is_some_and(|h| matches!(h.kind(), HirKind::Look(Look::End)));
    if end {
        parts.pop();
    }
    let mut core = String::new();
    for part in parts {
        core.push_str(&json_encoded(part)?);
    }
    let any = format!("{STRING_CHAR}*");
    Ok(format!("\"{}(?:{core}){}\"", if start { "" } else { &any }, if end { "" } else { &any }))
}

/// The regular expression of the JSON encodings of what `hir` matches (inside a string).
fn json_encoded(hir: &regex_syntax::hir::Hir) -> Result<String, String> {
    use regex_syntax::hir::{Class, HirKind};
    Ok(match hir.kind() {
        HirKind::Empty => String::new(),
        HirKind::Literal(l) => {
            let text = std::str::from_utf8(&l.0).map_err(|_| "bytes that are not UTF-8".to_string())?;
            text.chars().map(json_char).collect()
        }
        HirKind::Class(Class::Unicode(c)) => {
            // The characters JSON writes as they are, in one class; the others each escaped.
            let mut plain = String::new();
            let mut escaped = Vec::new();
            for r in c.iter() {
                let (lo, hi) = (r.start() as u32, r.end() as u32);
                for special in ['"', '\\'].into_iter().map(|c| c as u32).chain(0..0x20) {
                    if (lo..=hi).contains(&special) {
                        escaped.push(json_char(char::from_u32(special).unwrap_or('\0')));
                    }
                }
                // The range less the specials: split around them.
                let mut from = lo;
                for cut in (0..0x20u32).chain(['"' as u32, '\\' as u32]) {
                    if (from..=hi).contains(&cut) {
                        if cut > from {
                            plain.push_str(&format!("\\x{{{from:x}}}-\\x{{{:x}}}", cut - 1));
                        }
                        from = cut + 1;
                    }
                }
                if from <= hi {
                    plain.push_str(&format!("\\x{{{from:x}}}-\\x{{{hi:x}}}"));
                }
            }
            let mut each = escaped;
            if !plain.is_empty() {
                each.insert(0, format!("[{plain}]"));
            }
            match each.len() {
                // An empty class: nothing matches.
                0 => "[^\\x{0}-\\x{10ffff}]".to_string(),
                _ => format!("(?:{})", each.join("|")),
            }
        }
        // What regex-syntax makes of a class that matches nothing (`[^\s\S]`).
        HirKind::Class(Class::Bytes(b)) if b.ranges().is_empty() => "[^\\x{0}-\\x{10ffff}]".to_string(),
        HirKind::Class(Class::Bytes(_)) => return Err("byte classes ((?-u)) are not supported".into()),
        HirKind::Look(look) => {
            return Err(format!("the assertion {look:?} is not supported (only ^ and $ at the ends)"))
        }
        HirKind::Repetition(r) => {
            let max = r.max.map_or(String::new(), |m| m.to_string());
            format!("(?:{}){{{},{max}}}", json_encoded(&r.sub)?, r.min)
        }
        HirKind::Capture(c) => format!("(?:{})", json_encoded(&c.sub)?),
        HirKind::Concat(parts) => parts.iter().map(json_encoded).collect::<Result<String, String>>()?,
        HirKind::Alternation(parts) => {
            format!("(?:{})", parts.iter().map(json_encoded).collect::<Result<Vec<_>, _>>()?.join("|"))
        }
    })
}

/// The regular expression of a character as JSON writes it in a string: a quote or a
/// backslash escaped, a control character as any of its escapes, others as they are.
fn json_char(c: char) -> String {
    let short = match c {
        '"' => return r#"\\""#.to_string(),
        '\\' => return r"\\\\".to_string(),
        '\n' => Some('n'),
        '\r' => Some('r'),
        '\t' => Some('t'),
        '\u{8}' => Some('b'),
        '\u{c}' => Some('f'),
        c if (c as u32) < 0x20 => None,
        c => return regex_syntax::escape(c.encode_utf8(&mut [0; 4])),
    };
    let n = c as u32;
    let hex = |d: u32| {
        let x = char::from_digit(d, 16).unwrap_or('0');
        if x.is_ascii_digit() {
            x.to_string()
        } else {
            format!("[{}{}]", x, x.to_ascii_uppercase())
        }
    };
    let long = format!(r"\\u00{}{}", hex(n >> 4), hex(n & 15));
    match short {
        Some(s) => format!(r"(?:\\{s}|{long})"),
        None => long,
    }
}

/// The string formats a schema may ask for.
/// The string formats held to (others are annotations: any string).
pub const FORMATS: [&str; 11] =
    ["date", "time", "date-time", "duration", "uuid", "ipv4", "ipv6", "hostname", "email", "uri", "byte"];

/// The regular expression of a string format's texts (none needs a JSON escape).
fn format_regex(format: &str) -> Option<String> {
    const DATE: &str = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])";
    const TIME: &str =
        r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])";
    const OCTET: &str = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    Some(match format {
        "date" => DATE.to_string(),
        "time" => TIME.to_string(),
        "date-time" => format!("{DATE}T{TIME}"),
        "uuid" => r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}".to_string(),
        "ipv4" => format!(r"(?:{OCTET}\.){{3}}{OCTET}"),
        "ipv6" => ipv6_regex(&format!(r"(?:{OCTET}\.){{3}}{OCTET}")),
        // RFC 1123 labels (letters, digits, inner hyphens; 1 to 63 characters), at most four of at
        // most 62: never past the 253 characters a name may have.
        "hostname" => {
            let label = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,60}[A-Za-z0-9])?";
            format!(r"{label}(?:\.{label}){{0,3}}")
        }
        // RFC 3339's durations (its Appendix A): weeks; or a date of years, months, days and a
        // time (after a T) of hours, minutes, seconds — each a run from its first part on
        // (`1Y2M`, `2M3D`, not `1Y3D`), the date or the time there or both.
        "duration" => {
            let n = "[0-9]+";
            let time = format!("T(?:{n}H(?:{n}M(?:{n}S)?)?|{n}M(?:{n}S)?|{n}S)");
            let date = format!("(?:{n}Y(?:{n}M(?:{n}D)?)?|{n}M(?:{n}D)?|{n}D)");
            format!("P(?:{n}W|{date}(?:{time})?|{time})")
        }
        // OpenAPI's base64 bytes, padded.
        "byte" => "(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?".to_string(),
        "email" => r"[a-zA-Z0-9._%+-]+@[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*\.[a-zA-Z]{2,}".to_string(),
        // RFC 3986's characters after a scheme (its parts' order not checked).
        "uri" => r"[a-zA-Z][a-zA-Z0-9+.\-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+".to_string(),
        _ => return None,
    })
}

/// RFC 4291's text forms of an IPv6 address (RFC 3986's grammar): eight groups of 1 to 4 hex
/// digits, or fewer around one `::`, the last two as an IPv4 address (`ipv4`) or not.
fn ipv6_regex(ipv4: &str) -> String {
    let h16 = "[0-9A-Fa-f]{1,4}";
    let ls32 = format!("(?:{h16}:{h16}|{ipv4})");
    // `before` groups (each followed by a colon, the last by none) then `::`, then `after`
    // groups each followed by a colon, then what ends it.
    let mut each = vec![format!("(?:{h16}:){{6}}{ls32}")];
    for after in (0..=5).rev() {
        let head = match 5 - after {
            0 => String::new(),
            n => format!("(?:(?:{h16}:){{0,{}}}{h16})?", n - 1),
        };
        let tail = if after > 0 { format!("(?:{h16}:){{{after}}}") } else { String::new() };
        each.push(format!("{head}::{tail}{ls32}"));
    }
    each.push(format!("(?:(?:{h16}:){{0,5}}{h16})?::{h16}"));
    each.push(format!("(?:(?:{h16}:){{0,6}}{h16})?::"));
    format!("(?:{})", each.join("|"))
}

/// The bounds an integer's schema sets (`minimum`, `maximum`, and the exclusive ones), as the
/// least and greatest integers allowed.
fn integer_bounds(
    o: &serde_json::Map<String, serde_json::Value>,
    at: &str,
) -> Result<(Option<i64>, Option<i64>), String> {
    const LIMIT: f64 = 1e15;
    let get = |k: &str| -> Result<Option<f64>, String> {
        match o.get(k) {
            None => Ok(None),
            Some(x) => match x.as_f64() {
                Some(v) if v.abs() <= LIMIT => Ok(Some(v)),
                _ => Err(format!("{at}/{k}: {x} is not a number within ±1e15")),
            },
        }
    };
    let lo = [get("minimum")?.map(f64::ceil), get("exclusiveMinimum")?.map(|v| v.floor() + 1.0)];
    let hi = [get("maximum")?.map(f64::floor), get("exclusiveMaximum")?.map(|v| v.ceil() - 1.0)];
    let lo = lo.into_iter().flatten().reduce(f64::max).map(|v| v as i64);
    let hi = hi.into_iter().flatten().reduce(f64::min).map(|v| v as i64);
    Ok((lo, hi))
}

/// The regular expression of a number's schema: any JSON number, or with bounds (`minimum`,
/// `maximum` and the exclusive ones, compared exactly as decimals) the numbers within them
/// written without an exponent (`0.5`, `-12`, `3.250`; no `-0`).
fn number_regex(o: &serde_json::Map<String, serde_json::Value>, at: &str) -> Result<String, String> {
    let bound = |k: &str, inclusive: bool| -> Result<Option<Bound>, String> {
        o.get(k).map(|x| Decimal::of(x).map(|d| (d, inclusive)).map_err(|e| format!("{at}/{k}: {e}"))).transpose()
    };
    let los = [bound("minimum", true)?, bound("exclusiveMinimum", false)?];
    let his = [bound("maximum", true)?, bound("exclusiveMaximum", false)?];
    // `multipleOf` a power of ten: at most that many decimals (no exponent).
    let cap = o.get("multipleOf").map(|m| decimal_places(m, at)).transpose()?;
    if los.iter().chain(&his).all(Option::is_none) && cap.is_none() {
        return Ok(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?".to_string());
    }
    // The tightest of each side; of two equal bounds the exclusive one.
    let tightest = |all: [Option<Bound>; 2], tighter: std::cmp::Ordering| {
        all.into_iter().flatten().reduce(|a, b| {
            let c = b.0.cmp(&a.0);
            if c == tighter || (c.is_eq() && !b.1) {
                b
            } else {
                a
            }
        })
    };
    let (lo, hi) = (tightest(los, std::cmp::Ordering::Greater), tightest(his, std::cmp::Ordering::Less));
    let zero = Decimal::default();
    let mut each = Vec::new();
    // The negative ones: minus the magnitudes above -hi (or zero, excluded) up to -lo.
    if lo.as_ref().is_none_or(|l| l.0.negative) {
        let above = match &hi {
            Some((h, inclusive)) if h.negative => (h, *inclusive),
            _ => (&zero, false),
        };
        if let Some(r) = magnitude_regex(above, lo.as_ref().map(|(l, i)| (l, *i)), cap) {
            each.push(format!("-{r}"));
        }
    }
    if hi.as_ref().is_none_or(|h| !h.0.negative) {
        let above = match &lo {
            Some((l, inclusive)) if !l.negative => (l, *inclusive),
            _ => (&zero, true),
        };
        if let Some(r) = magnitude_regex(above, hi.as_ref().map(|(h, i)| (h, *i)), cap) {
            each.push(r);
        }
    }
    if each.is_empty() {
        return Err(format!("{at}: no number is within its minimum and maximum"));
    }
    Ok(format!("(?:{})", each.join("|")))
}

/// The decimals `multipleOf` allows when it is a power of ten of at most 1 (1, 0.1, 0.01, ...):
/// its number of decimals.
fn decimal_places(m: &serde_json::Value, at: &str) -> Result<usize, String> {
    let d = Decimal::of(m).map_err(|e| format!("{at}/multipleOf: {e}"))?;
    match (d.negative, d.int, d.frac.split_last()) {
        (false, 1, None) => Ok(0),
        (false, 0, Some((b'1', zeros))) if zeros.iter().all(|&z| z == b'0') => Ok(d.frac.len()),
        _ => Err(format!("{at}/multipleOf: {m}: only a power of ten of at most 1 (1, 0.1, 0.01, ...)")),
    }
}

/// A bound of a number, and whether it is included.
type Bound = (Decimal, bool);

/// A number exactly as its decimal: its sign, integer part and fraction's digits (no trailing
/// zeros; zero is not negative).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    int: u64,
    frac: Vec<u8>,
}

impl Decimal {
    /// Integer parts up to 1e15 and fractions of up to 40 digits.
    fn of(x: &serde_json::Value) -> Result<Decimal, String> {
        let bad = || format!("{x} is not a number within ±1e15 of at most 40 decimals");
        let text = match x {
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(bad()),
        };
        let (mantissa, exp) = match text.split_once(['e', 'E']) {
            Some((m, e)) => (m, e.parse::<i32>().map_err(|_| bad())?),
            None => (text.as_str(), 0),
        };
        let (negative, mantissa) = match mantissa.strip_prefix('-') {
            Some(m) => (true, m),
            None => (false, mantissa),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
        if !digits.iter().all(u8::is_ascii_digit) || exp.abs() > 64 {
            return Err(bad());
        }
        // Where the point is, counted in digits from the left.
        let point = int.len() as i32 + exp;
        let digit = |i: i32| if (0..digits.len() as i32).contains(&i) { digits[i as usize] } else { b'0' };
        let int: Vec<u8> = (0..point).map(digit).skip_while(|&d| d == b'0').collect();
        let mut frac: Vec<u8> = (point.max(0)..digits.len() as i32).map(digit).collect();
        frac.splice(0..0, (point..0).map(|_| b'0'));
        while frac.last() == Some(&b'0') {
            frac.pop();
        }
        if int.len() > 16 || frac.len() > 40 {
            return Err(bad());
        }
        let int =
            std::str::from_utf8(&int).ok().filter(|i| !i.is_empty()).map_or(Ok(0), str::parse).map_err(|_| bad())?;
        if int > 1_000_000_000_000_000 {
            return Err(bad());
        }
        let negative = negative && (int > 0 || !frac.is_empty());
        Ok(Decimal { negative, int, frac })
    }

    fn magnitude(&self) -> (u64, &[u8]) {
        // Without trailing zeros, fractions compare as their digit strings do.
        (self.int, &self.frac)
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self.negative, other.negative) {
            (false, true) => std::cmp::Ordering::Greater,
            (true, false) => std::cmp::Ordering::Less,
            (false, false) => self.magnitude().cmp(&other.magnitude()),
            (true, true) => other.magnitude().cmp(&self.magnitude()),
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The regular expression of the non-negative numbers written `I` or `I.F` (no exponent) at or
/// above `lo` (above only when it is not included) and up to `hi`, comparing magnitudes; None if
/// there are none.
fn magnitude_regex(lo: (&Decimal, bool), hi: Option<(&Decimal, bool)>, cap: Option<usize>) -> Option<String> {
    let mut each = Vec::new();
    let part = |int: u64, lo: Option<(&[u8], bool)>, hi: Option<(&[u8], bool)>| {
        fraction_regex(fraction_digits(lo, hi, cap)).map(|f| format!("{int}{f}"))
    };
    let low = Some((lo.0.frac.as_slice(), lo.1));
    match hi {
        Some((h, _)) if h.int < lo.0.int => return None,
        Some((h, inclusive)) if h.int == lo.0.int => {
            each.extend(part(h.int, low, Some((h.frac.as_slice(), inclusive))));
        }
        _ => {
            each.extend(part(lo.0.int, low, None));
            // The integer parts strictly between, any fraction.
            let below = hi.map(|(h, _)| h.int - 1);
            if below.is_none_or(|b| b > lo.0.int) {
                let any = match cap {
                    None => r"(?:\.[0-9]+)?".to_string(),
                    Some(0) => String::new(),
                    Some(e) => format!(r"(?:\.[0-9]{{1,{e}}})?"),
                };
                each.push(format!("{}{any}", natural_regex(lo.0.int + 1, below)));
            }
            if let Some((h, inclusive)) = hi {
                each.extend(part(h.int, None, Some((h.frac.as_slice(), inclusive))));
            }
        }
    }
    (!each.is_empty()).then(|| format!("(?:{})", each.join("|")))
}

/// What follows an integer part: nothing (where the empty fraction is allowed) or `.` and the
/// digits, from [`fraction_digits`]; None if neither may.
fn fraction_regex((empty, digits): (bool, Vec<String>)) -> Option<String> {
    match (empty, digits.is_empty()) {
        (true, true) => Some(String::new()),
        (false, true) => None,
        (_, false) => Some(format!(r"(?:\.(?:{})){}", digits.join("|"), if empty { "?" } else { "" })),
    }
}

/// The digit strings `d` with `0.d` at or above `0.lo` (above only when it is not included)
/// and at or below (below) `0.hi` (None: no bound; bounds without trailing zeros), of at most
/// `cap` digits (None: any): whether the empty string is one, and regular expressions of the
/// others, by first digit.
fn fraction_digits(lo: Option<(&[u8], bool)>, hi: Option<(&[u8], bool)>, cap: Option<usize>) -> (bool, Vec<String>) {
    // Up to `n` more digits: `{0,n}` (or `*`).
    let upto = |n: usize| cap.map_or("*".to_string(), |_| format!("{{0,{n}}}"));
    let room = cap.unwrap_or(usize::MAX);
    // At or above zero: no bound.
    let lo = lo.filter(|&(l, inclusive)| !(l.is_empty() && inclusive));
    match (lo, hi) {
        (None, None) => return (true, if room == 0 { vec![] } else { vec![format!("[0-9][0-9]{}", upto(room - 1))] }),
        // At or below zero: zeros only (below zero: none).
        (lo, Some((&[], inclusive))) => {
            let zeros = inclusive && lo.is_none();
            return (zeros, if zeros && room > 0 { vec![format!("00{}", upto(room - 1))] } else { vec![] });
        }
        // Above zero, no upper bound: a digit other than zero somewhere.
        (Some((&[], _)), None) => {
            return match cap {
                None => (false, vec!["0*[1-9][0-9]*".to_string()]),
                // The first digit other than zero at place k + 1: k zeros, it, then the rest.
                Some(n) => (false, (0..n).map(|k| format!("0{{{k}}}[1-9][0-9]{{0,{}}}", n - k - 1)).collect()),
            };
        }
        _ => {}
    }
    // The empty string is zero: above a bound left only where that bound is zero (and
    // included: excluded above), below one wherever that bound is not zero.
    let empty = lo.is_none() && hi.is_none_or(|(h, inclusive)| !h.is_empty() || inclusive);
    if room == 0 {
        return (empty, Vec::new());
    }
    let first = |b: Option<(&[u8], bool)>, unbounded: u8| b.map_or(unbounded, |(d, _)| d.first().map_or(b'0', |c| *c));
    fn rest(b: Option<(&[u8], bool)>) -> Option<(&[u8], bool)> {
        b.map(|(d, inclusive)| (d.get(1..).unwrap_or(&[]), inclusive))
    }
    let (a, z) = (first(lo, b'0'), first(hi, b'9'));
    let mut each = Vec::new();
    if a > z {
        return (empty, each);
    }
    let then = |digit: u8, lo, hi| {
        let (empty, more) = fraction_digits(lo, hi, cap.map(|n| n - 1));
        match (empty, more.is_empty()) {
            (_, true) => empty.then(|| (digit as char).to_string()),
            (e, false) => Some(format!("{}(?:{}){}", digit as char, more.join("|"), if e { "?" } else { "" })),
        }
    };
    each.extend(then(a, rest(lo), if a == z { rest(hi) } else { None }));
    if z > a {
        if z - a >= 2 {
            each.push(format!("[{}-{}][0-9]{}", (a + 1) as char, (z - 1) as char, upto(room - 1)));
        }
        each.extend(then(z, None, rest(hi)));
    }
    (empty, each)
}

/// The regular expression of the integers from `lo` to `hi` (None: no bound), written as JSON
/// writes them (no leading zeros, no `-0`).
fn integer_regex(lo: Option<i64>, hi: Option<i64>) -> String {
    let mut each = Vec::new();
    // The negative ones: minus the naturals from -hi (at least 1) to -lo.
    if lo.is_none_or(|l| l < 0) {
        let from = hi.map_or(1, |h| (-h).max(1) as u64);
        each.push(format!("-{}", natural_regex(from, lo.map(|l| l.unsigned_abs()))));
    }
    if hi.is_none_or(|h| h >= 0) {
        each.push(natural_regex(lo.map_or(0, |l| l.max(0) as u64), hi.map(|h| h as u64)));
    }
    format!("(?:{})", each.join("|"))
}

/// The naturals from `lo` to `hi` (None: no bound), in decimal without leading zeros.
fn natural_regex(lo: u64, hi: Option<u64>) -> String {
    let digits = |n: u64| n.to_string().len();
    let mut each = Vec::new();
    let last = hi.map_or(digits(lo), digits);
    for len in digits(lo)..=last {
        let first = if len == 1 { 0 } else { 10u64.pow(len as u32 - 1) };
        let end = 10u64.pow(len as u32) - 1;
        let (a, b) = (lo.max(first), hi.map_or(end, |h| h.min(end)));
        if a <= b {
            each.push(same_length(a.to_string().as_bytes(), b.to_string().as_bytes()));
        }
    }
    if hi.is_none() {
        // Every longer number.
        each.push(format!("[1-9][0-9]{{{},}}", digits(lo)));
    }
    format!("(?:{})", each.join("|"))
}

/// The digit strings from `lo` to `hi`, both of the same length.
fn same_length(lo: &[u8], hi: &[u8]) -> String {
    let Some((&a, rest_lo)) = lo.split_first() else { return String::new() };
    let (&b, rest_hi) = hi.split_first().expect("the same length");
    if a == b {
        return format!("{}{}", a as char, same_length(rest_lo, rest_hi));
    }
    let n = rest_lo.len();
    let (nines, zeros) = (vec![b'9'; n], vec![b'0'; n]);
    let mut each = vec![format!("{}{}", a as char, same_length(rest_lo, &nines))];
    if b - a >= 2 {
        each.push(format!("[{}-{}][0-9]{{{n}}}", (a + 1) as char, (b - 1) as char));
    }
    each.push(format!("{}{}", b as char, same_length(&zeros, rest_hi)));
    format!("(?:{})", each.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grammar::Pattern;

    /// Every sequence of up to `longest` picks among `0..kinds`, shorter ones first (the empty one
    /// too): the texts, arrays and objects the tests below go through whole.
    fn sequences(kinds: usize, longest: usize) -> Vec<Vec<usize>> {
        let mut level = vec![Vec::new()];
        let mut all = level.clone();
        for _ in 0..longest {
            level = level
                .iter()
                .flat_map(|s: &Vec<usize>| (0..kinds).map(move |k| [s.as_slice(), &[k]].concat()))
                .collect();
            all.extend(level.iter().cloned());
        }
        all
    }

    /// A schema's texts: serde_json's writing of instances (compact, and a space after colons and
    /// commas) match, and each
    /// way of breaking one does not — a property missing, added, out of order, of the wrong type,
    /// a string too long, an array too short, a value outside an enum.
    #[test]
    fn schemas_match_their_instances_only() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 8},
                "age": {"type": "integer"},
                "score": {"type": ["number", "null"]},
                "tags": {"type": "array", "items": {"allOf": [{"$ref": "#/$defs/tag"}], "readOnly": true}, "minItems": 1, "maxItems": 3},
                "ok": {"type": "boolean", "description": "an annotation", "deprecated": false},
                "kind": {"enum": ["a", "b c", 3]},
                "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"legs": {"const": 4}}, "required": ["legs"], "additionalProperties": false}]}
            },
            "required": ["name", "age", "score", "tags", "ok", "kind", "pet"],
            "additionalProperties": false,
            "$defs": {"tag": {"type": "string"}}
        });
        let p = Pattern::new(&schema_regex(&schema).unwrap()).unwrap();
        let good = serde_json::json!({"name": "Ada é", "age": -3, "score": 1.5e-3, "tags": ["x", "\"q\"\n"], "ok": true,
            "kind": "b c", "pet": {"legs": 4}});
        for v in [
            good.clone(),
            serde_json::json!({"name": "B", "age": 0, "score": null, "tags": [""], "ok": false, "kind": 3, "pet": null}),
        ] {
            let text = serde_json::to_string(&v).unwrap();
            let spaced = text.replace("\":", "\": ").replace(",\"", ", \"");
            for text in [text, spaced] {
                assert!(p.matches(text.as_bytes()), "{text}");
            }
        }
        let text = serde_json::to_string(&good).unwrap();
        for bad in [
            text.replace(r#""age":-3,"#, ""),
            text.replace(r#""ok":true"#, r#""ok":true,"more":1"#),
            text.replace(r#""name":"Ada é","age":-3"#, r#""age":-3,"name":"Ada é""#),
            text.replace(r#""age":-3"#, r#""age":-3.5"#),
            text.replace("Ada é", "Ada Lovelace"),
            text.replace(r#""name":"Ada é""#, r#""name":"""#),
            text.replace(r#"["x","\"q\"\n"]"#, "[]"),
            text.replace(r#""b c""#, r#""c""#),
            text.replace(r#"{"legs":4}"#, r#"{"legs":3}"#),
            text.replace("true", "\"true\""),
            text.replace(":-3", ":  -3"),
        ] {
            assert_ne!(bad, text);
            assert!(!p.matches(bad.as_bytes()), "{bad}");
        }
        let refused = |s: serde_json::Value| schema_regex(&s).unwrap_err();
        // Formats not known are annotations (JSON Schema's default): any string; int32 bounds.
        let any =
            Pattern::new(&schema_regex(&serde_json::json!({"type": "string", "format": "uri-template"})).unwrap());
        assert!(any.unwrap().matches(br#""{x} y""#));
        assert_eq!(refused(serde_json::json!({"type": "string", "format": 5})), "#/format: 5 is not a format's name");
        for (m, ty) in [(5.0, "integer"), (0.25, "number"), (-0.1, "number"), (10.0, "number")] {
            let e = refused(serde_json::json!({"type": ty, "multipleOf": m}));
            assert!(e.ends_with("only a power of ten of at most 1 (1, 0.1, 0.01, ...)"), "{m}: {e}");
        }
        // Every integer is a multiple of 0.01.
        let cents = Pattern::new(&schema_regex(&serde_json::json!({"type": "integer", "multipleOf": 0.01})).unwrap());
        assert!(cents.unwrap().matches(b"-17"));
        let int32 = serde_json::json!({"type": "integer", "format": "int32", "minimum": -5});
        let int32 = Pattern::new(&schema_regex(&int32).unwrap()).unwrap();
        for (text, ok) in [("-5", true), ("2147483647", true), ("2147483648", false), ("-6", false)] {
            assert_eq!(int32.matches(text.as_bytes()), ok, "{text}");
        }
        let int64 = Pattern::new(&schema_regex(&serde_json::json!({"type": "integer", "format": "int64"})).unwrap());
        assert!(int64.unwrap().matches(b"99999999999999999999"));
        assert_eq!(
            refused(serde_json::json!({"allOf": [{"type": "number"}, {"minimum": 1}]})),
            "#/allOf/0: allOf of other than objects is not supported"
        );
        assert_eq!(
            refused(serde_json::json!({"type": "number", "minimum": 1e20})),
            "#/minimum: 1e+20 is not a number within ±1e15 of at most 40 decimals"
        );
        assert_eq!(
            refused(serde_json::json!({"type": "number", "minimum": 0.5, "exclusiveMaximum": 0.5})),
            "#: no number is within its minimum and maximum"
        );
        assert_eq!(
            refused(serde_json::json!({"type": "integer", "minimum": 3, "exclusiveMaximum": 3})),
            "#: no integer is within its minimum and maximum"
        );
        assert_eq!(
            refused(serde_json::json!({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]})),
            "#/required: b is not among the properties"
        );
        assert_eq!(
            refused(serde_json::json!({"type": "object", "properties": {}, "additionalProperties": true})),
            "#/additionalProperties: any value needs a grammar"
        );
        assert_eq!(
            refused(serde_json::json!({"type": "object", "properties": {}, "additionalProperties": 1})),
            "#/additionalProperties: 1 is not true, false or a schema"
        );
        assert_eq!(refused(serde_json::json!({"type": "array"})), "#/items: any value needs a grammar");
        assert_eq!(refused(serde_json::json!({"description": "x"})), "#: any value needs a grammar");
        assert_eq!(refused(serde_json::json!({"minimum": 1})), "#: no type");
        assert_eq!(
            refused(serde_json::json!({"type": "object"})),
            "#: any object (no properties named) needs a grammar"
        );
        let looped =
            serde_json::json!({"$ref": "#/$defs/a", "$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}}});
        assert!(refused(looped).contains("nested more than 32 deep"));
        assert!(refused(serde_json::json!({"type": "string", "maxLength": 100000})).contains("at most 256"));
        // Before, the regex's own parse error, which named none of them.
        assert_eq!(
            refused(
                serde_json::json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 5, "maxLength": 2}}})
            ),
            "#/properties/s: maxLength is below minLength"
        );
    }

    /// Integers' bounds: for each of many (minimum, maximum, exclusive ones), every integer from
    /// -1200 to 1200 matches exactly when it is within them, and no other spelling of one does
    /// (leading zeros, `-0`, a plus sign, a fraction).
    #[test]
    fn integer_bounds_match_exactly_the_integers_within() {
        let bounds: Vec<serde_json::Value> = vec![
            serde_json::json!({}),
            serde_json::json!({"minimum": 0}),
            serde_json::json!({"minimum": 1}),
            serde_json::json!({"exclusiveMinimum": 0}),
            serde_json::json!({"maximum": -1}),
            serde_json::json!({"minimum": -7, "maximum": 7}),
            serde_json::json!({"minimum": 13, "maximum": 987}),
            serde_json::json!({"minimum": -1000, "maximum": -10}),
            serde_json::json!({"minimum": -85, "exclusiveMaximum": 110}),
            serde_json::json!({"minimum": 99, "maximum": 100}),
            serde_json::json!({"minimum": 5.5, "maximum": 5.5}),
            serde_json::json!({"minimum": 5.5, "maximum": 6.5}),
            serde_json::json!({"exclusiveMinimum": -3.5, "exclusiveMaximum": 1000}),
            serde_json::json!({"minimum": 190}),
            serde_json::json!({"maximum": 321}),
        ];
        for b in bounds {
            let mut schema = b.clone();
            schema["type"] = "integer".into();
            let regex = match schema_regex(&schema) {
                Ok(r) => r,
                Err(e) => {
                    assert_eq!(b, serde_json::json!({"minimum": 5.5, "maximum": 5.5}), "{e}");
                    continue;
                }
            };
            let p = Pattern::new(&regex).unwrap();
            let f = |k: &str| b.get(k).and_then(serde_json::Value::as_f64);
            for x in -1200i64..=1200 {
                let v = x as f64;
                let within = f("minimum").is_none_or(|m| v >= m)
                    && f("maximum").is_none_or(|m| v <= m)
                    && f("exclusiveMinimum").is_none_or(|m| v > m)
                    && f("exclusiveMaximum").is_none_or(|m| v < m);
                assert_eq!(p.matches(x.to_string().as_bytes()), within, "{b}: {x}");
            }
            for spelled in ["-0", "007", "+5", "5.0", "", "-", "1e2"] {
                assert!(!p.matches(spelled.as_bytes()), "{b}: {spelled}");
            }
        }
    }

    /// Numbers' bounds, compared exactly as decimals: for each of many (minimum, maximum,
    /// exclusive ones), every number of a grid around them — integer parts from -30 to 30, with
    /// fractions near the bounds' digits, trailing zeros included — matches exactly when it is
    /// within them, and no spelling JSON does not write (`-0`, leading zeros, `.5`, `1.`) does.
    #[test]
    fn number_bounds_match_exactly_the_numbers_within() {
        let bounds: Vec<serde_json::Value> = vec![
            serde_json::json!({"minimum": 0}),
            serde_json::json!({"exclusiveMinimum": 0}),
            serde_json::json!({"minimum": 0, "maximum": 1}),
            serde_json::json!({"exclusiveMinimum": 0, "exclusiveMaximum": 1}),
            serde_json::json!({"minimum": -1, "maximum": 1}),
            serde_json::json!({"minimum": 0.25, "maximum": 0.75}),
            serde_json::json!({"minimum": 0.25, "exclusiveMaximum": 0.2501}),
            serde_json::json!({"exclusiveMinimum": 0.05, "maximum": 2.5}),
            serde_json::json!({"minimum": -2.5, "exclusiveMaximum": -0.05}),
            serde_json::json!({"maximum": -0.5}),
            serde_json::json!({"exclusiveMaximum": 0}),
            serde_json::json!({"minimum": -12.125, "maximum": 17.0625}),
            serde_json::json!({"exclusiveMinimum": -3, "exclusiveMaximum": -3.0001}),
            serde_json::json!({"minimum": 1.5, "maximum": 1.5}),
            serde_json::json!({"minimum": 9.99, "exclusiveMinimum": 9.99, "maximum": 20, "exclusiveMaximum": 10.01}),
            serde_json::json!({"minimum": 0.1, "maximum": 0.3}),
            serde_json::json!({"exclusiveMinimum": -0.0, "maximum": 0.0009}),
            serde_json::json!({"minimum": 5e-4, "maximum": 1e1}),
        ];
        // Exactly, in units of 1e-9.
        let scaled = |text: &str| -> i128 {
            let (negative, t) = text.strip_prefix('-').map_or((false, text), |t| (true, t));
            let (int, frac) = t.split_once('.').unwrap_or((t, ""));
            let frac = format!("{frac:0<9}");
            let v = int.parse::<i128>().unwrap() * 1_000_000_000 + frac.parse::<i128>().unwrap();
            if negative {
                -v
            } else {
                v
            }
        };
        let fractions = [
            "",
            ".0",
            ".00",
            ".5",
            ".50",
            ".25",
            ".2501",
            ".25009",
            ".2502",
            ".05",
            ".049",
            ".051",
            ".1",
            ".3",
            ".30",
            ".3000001",
            ".2999",
            ".75",
            ".7500",
            ".7501",
            ".0001",
            ".0009",
            ".00091",
            ".00089",
            ".0005",
            ".0004999",
            ".125",
            ".1249",
            ".0625",
            ".06251",
            ".99",
            ".999999999",
            ".01",
            ".0099",
            ".9",
        ];
        // `multipleOf` a power of ten: at most that many decimals, as well (a multiple written with
        // more, trailing zeros, is left out: a part of what the schema allows).
        let caps = [
            None,
            Some((serde_json::json!(1), 0)),
            Some((serde_json::json!(0.1), 1)),
            Some((serde_json::json!(0.01), 2)),
            Some((serde_json::json!(0.0001), 4)),
        ];
        let runs = caps.iter().flat_map(|c| {
            let unbounded = c.as_ref().map(|_| serde_json::json!({}));
            bounds.iter().cloned().chain(unbounded).map(move |b| (b, c.clone()))
        });
        for (b, cap) in runs {
            let mut schema = b.clone();
            schema["type"] = "number".into();
            if let Some((m, _)) = &cap {
                schema["multipleOf"] = m.clone();
            }
            let places = cap.as_ref().map_or(usize::MAX, |c| c.1);
            // None: refused, as no number is within (then none of the grid may be).
            let p = match schema_regex(&schema) {
                Ok(r) => Some(Pattern::new(&r).unwrap()),
                Err(e) => {
                    assert!(e.contains("no number is within"), "{schema}: {e}");
                    None
                }
            };
            let f = |k: &str| b.get(k).map(|v| scaled(&format!("{:.9}", v.as_f64().unwrap())));
            let mut some = 0;
            for int in -30i64..=30 {
                for frac in fractions {
                    let text = format!("{}{}{frac}", if int < 0 { "-" } else { "" }, int.abs());
                    for text in [text.clone(), format!("-{text}")] {
                        if text.starts_with("--") || text.strip_prefix('-').is_some_and(|t| scaled(t) == 0) {
                            continue;
                        }
                        let v = scaled(&text);
                        let decimals = text.split_once('.').map_or(0, |(_, f)| f.len());
                        let within = f("minimum").is_none_or(|m| v >= m)
                            && f("maximum").is_none_or(|m| v <= m)
                            && f("exclusiveMinimum").is_none_or(|m| v > m)
                            && f("exclusiveMaximum").is_none_or(|m| v < m)
                            && decimals <= places;
                        let matched = p.as_ref().is_some_and(|p| p.matches(text.as_bytes()));
                        assert_eq!(matched, within, "{schema}: {text}");
                        some += within as usize;
                    }
                }
            }
            assert!(some > 0 || (cap.is_some() && p.is_none()) || b["exclusiveMinimum"] == -3, "{schema}");
            for spelled in ["-0", "-0.0", "-0.00", "00", "01", "+1", ".5", "1.", "1e0", "-", ""] {
                assert!(!p.as_ref().is_some_and(|p| p.matches(spelled.as_bytes())), "{b}: {spelled}");
            }
        }
    }

    /// A string's `pattern`: the JSON encoding of a text matches exactly when the regex crate
    /// finds the pattern in the text (JSON Schema's search; anchored with ^ and $), over texts
    /// with quotes, backslashes, control characters and non-ASCII — and serde_json's encoding
    /// with its escapes spelled otherwise (\u000A for \n) too.
    #[test]
    fn string_patterns_match_as_the_regex_crate_finds_them() {
        let patterns = [
            "^[a-z]+$",
            "[0-9]{3}-[0-9]{4}",
            "^\"q",
            r"a\\b",
            r"^\d+(\.\d+)?$",
            "x|y",
            "^(ab)*$",
            "é+",
            "^[^a]*$",
            r"\n\t",
            "^.{2,3}$",
            r"(?i)^AB",
            "^$",
            r"[\x00-\x1f]",
            // A class that matches nothing, beside one that matches: before, refused as a byte class.
            r"^(a|[^\s\S])$",
        ];
        let mut rng = 11u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let alphabet: Vec<char> = "abxyAB019-.\"\\\n\t\u{1}\u{1f}é😀 q".chars().collect();
        let mut texts: Vec<String> = vec![String::new(), "ab".into(), "abab".into(), "123-4567".into(), "a\\b".into()];
        for _ in 0..400 {
            let len = next(7);
            texts.push((0..len).map(|_| alphabet[next(alphabet.len() as u64) as usize]).collect());
        }
        for pattern in patterns {
            let regex = string_pattern_regex(pattern).unwrap();
            let p = Pattern::new(&regex).unwrap();
            let oracle = fancy_regex::Regex::new(pattern).unwrap();
            for text in &texts {
                let found = oracle.is_match(text).unwrap();
                let encoded = serde_json::to_string(text).unwrap();
                assert_eq!(p.matches(encoded.as_bytes()), found, "{pattern} on {encoded}");
                let respelled = encoded.replace("\\n", "\\u000A").replace("\\u001f", "\\u001F");
                assert_eq!(p.matches(respelled.as_bytes()), found, "{pattern} on {respelled}");
            }
        }
        let refused = |p: &str| string_pattern_regex(p).unwrap_err();
        assert!(refused(r"\bword").contains("is not supported (only ^ and $ at the ends)"), "{}", refused(r"\bword"));
        assert!(refused("(").contains("unclosed group"), "{}", refused("("));
        assert_eq!(
            schema_regex(&serde_json::json!({"anyOf": []})).unwrap_err(),
            "#/anyOf: an empty list (no value matches)"
        );
        let nothing = string_pattern_regex(r"[^\s\S]").unwrap();
        assert_eq!(Pattern::new(&nothing).err().unwrap(), "matches no text");
        let schema = serde_json::json!({"type": "string", "pattern": "^a", "maxLength": 3});
        assert_eq!(schema_regex(&schema).unwrap_err(), "#/maxLength: not with a pattern");
    }

    /// String formats: instances match, near misses do not.
    #[test]
    fn string_formats_match_their_texts() {
        for (format, good, bad) in [
            ("date", vec!["2026-12-01", "1999-02-29"], vec!["2026-13-01", "2026-1-01", "2026-12-32"]),
            (
                "time",
                vec!["23:59:60Z", "00:00:00Z", "12:30:05.25+05:30"],
                vec!["24:00:00Z", "12:30Z", "12:60:00Z", "12:00:00"],
            ),
            ("date-time", vec!["2026-12-01T06:58:00Z", "2026-12-01T06:58:00.5-08:00"], vec!["2026-12-01 06:58:00Z"]),
            ("uuid", vec!["123e4567-e89b-12d3-a456-426614174000"], vec!["123e4567e89b12d3a456426614174000"]),
            (
                "duration",
                vec![
                    "P1W",
                    "P3Y",
                    "P1Y2M",
                    "P1Y2M3D",
                    "P2M3D",
                    "P4D",
                    "PT1H",
                    "PT1H2M",
                    "PT1H2M3S",
                    "PT2M",
                    "PT2M3S",
                    "PT3S",
                    "P1DT12H",
                    "P1Y2M3DT4H5M6S",
                ],
                vec!["P", "PT", "P1Y3D", "PT1H3S", "P1W2D", "1D", "P1.5D", "P1DT", "PT1S2M"],
            ),
            (
                "hostname",
                vec!["localhost", "example.org", "a-b.c0.example.org", "x1", &"a".repeat(62)],
                vec!["-a.org", "a-.org", "a..org", "a_b.org", "", ".org", "a.b.c.d.e"],
            ),
            ("byte", vec!["", "QUJD", "QUI=", "QQ==", "SGVsbG8gd29ybGQ="], vec!["QUJ", "Q===", "QUJD=", "QU=D"]),
            ("ipv4", vec!["192.168.0.1", "255.255.255.255"], vec!["256.1.1.1", "1.2.3", "01.2.3.4"]),
            ("email", vec!["ada@example.org", "a.b+c@mail.co.uk"], vec!["ada@", "@example.org", "ada@example"]),
            (
                "uri",
                vec!["https://example.org/a?b=c&d=%20#e", "mailto:ada@example.org", "urn:isbn:0451450523"],
                vec!["example.org", "https://exa mple.org", "1http://x", "https://x/%zz", "https:"],
            ),
        ] {
            let p =
                Pattern::new(&schema_regex(&serde_json::json!({"type": "string", "format": format})).unwrap()).unwrap();
            for g in good {
                assert!(p.matches(format!("\"{g}\"").as_bytes()), "{format}: {g}");
            }
            for b in bad {
                assert!(!p.matches(format!("\"{b}\"").as_bytes()), "{format}: {b}");
            }
        }
    }

    /// IPv6 addresses: every text of a few groups, colons, `::` and IPv4 tails matches exactly
    /// when Rust's own parser (`std::net::Ipv6Addr`) reads it.
    #[test]
    fn ipv6_addresses_are_what_the_standard_library_reads() {
        let p = Pattern::new(&schema_regex(&serde_json::json!({"type": "string", "format": "ipv6"})).unwrap()).unwrap();
        let pieces = [
            "0",
            "1f",
            "abcd",
            "FFFF",
            "12345",
            ":",
            "::",
            ":::",
            "1.2.3.4",
            "255.0.0.1",
            "256.1.1.1",
            "01.1.1.1",
            "g",
        ];
        let (mut read, mut seen) = (0, 0);
        let mut texts: Vec<String> =
            sequences(pieces.len(), 5).iter().map(|s| s.iter().map(|&i| pieces[i]).collect()).collect();
        // Whole addresses too: eight groups, and each run of groups left out.
        let groups = ["1", "0", "ab", "ffff", "0db8", "7", "c0", "10"];
        for from in 0..=8 {
            for to in from..=8 {
                let (head, tail) = (groups[..from].join(":"), groups[to..].join(":"));
                texts.push(if from == to && from > 0 && to < 8 {
                    format!("{head}:{tail}")
                } else {
                    format!("{head}::{tail}")
                });
            }
        }
        texts.push(groups.join(":"));
        texts.push(format!("{}:1.2.3.4", groups[..6].join(":")));
        for t in &texts {
            let std_reads = t.parse::<std::net::Ipv6Addr>().is_ok();
            assert_eq!(p.matches(format!("\"{t}\"").as_bytes()), std_reads, "{t:?}");
            (read, seen) = (read + std_reads as usize, seen + 1);
        }
        assert!(read > 50 && seen > 300_000, "{read} of {seen}");
    }

    /// A map (`additionalProperties` a schema, no properties named): any keys, each value an
    /// instance of the schema.
    #[test]
    fn maps_take_any_keys_with_values_of_their_schema() {
        let schema = serde_json::json!({"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}});
        let p = Pattern::new(&schema_regex(&schema).unwrap()).unwrap();
        for (text, ok) in [
            ("{}", true),
            (r#"{"a":1}"#, true),
            (r#"{ "a": 1, "b \"c\"": 20, "é": 0 }"#, true),
            (r#"{"a":-1}"#, false),
            (r#"{"a":"1"}"#, false),
            (r#"{"a":1,}"#, false),
            (r#"{a:1}"#, false),
        ] {
            assert_eq!(p.matches(text.as_bytes()), ok, "{text}");
        }
    }

    /// Members besides the named properties (`additionalProperties` a schema beside `properties`):
    /// for every object of up to three members with keys among a few (named ones, their
    /// prefixes and extensions, the empty key) and values of either type, the text matches
    /// exactly when the named members come first, in their order, the required one there, and
    /// every other member's key is none of the named and its value an integer.
    #[test]
    fn other_members_follow_the_named_ones_and_repeat_none() {
        let keys = ["a", "b", "ab", "ba", "", "c", "bb"];
        let values = ["1", "\"s\""];
        for required in [vec!["a"], vec![]] {
            let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"},
                "b": {"type": "string"}}, "required": required, "additionalProperties": {"type": "integer"}});
            let p = Pattern::new(&schema_regex(&schema).unwrap()).unwrap();
            // Every list of up to three (key, value) members.
            let members: Vec<Vec<(usize, usize)>> = sequences(keys.len() * values.len(), 3)
                .into_iter()
                .map(|m| m.into_iter().map(|i| (i / values.len(), i % values.len())).collect())
                .collect();
            let mut matched = 0;
            for m in &members {
                let text = format!(
                    "{{{}}}",
                    m.iter().map(|&(k, v)| format!("\"{}\":{}", keys[k], values[v])).collect::<Vec<_>>().join(",")
                );
                // Named members: a (integer) then b (string), each at most once, before others.
                let named = m.iter().take_while(|&&(k, _)| k < 2).collect::<Vec<_>>();
                let ordered = named.windows(2).all(|w| w[0].0 < w[1].0);
                let typed = named.iter().all(|&&(k, v)| v == k);
                let has_a = named.first().is_some_and(|&&(k, _)| k == 0);
                let others_ok = m[named.len()..].iter().all(|&(k, v)| k >= 2 && v == 0);
                let ok = ordered && typed && others_ok && (required.is_empty() || has_a);
                assert_eq!(p.matches(text.as_bytes()), ok, "{text} (required {required:?})");
                matched += ok as usize;
            }
            assert!(matched > 20, "{matched}");
        }
    }

    /// Tuples (`prefixItems`, pydantic's `tuple[int, str]`): for prefixes of none to two schemas,
    /// `items` a schema, `false` or left out of the tuple's length, and bounds on the count,
    /// every array of up to four elements of three kinds matches exactly when it is an instance.
    #[test]
    fn tuples_take_their_prefix_then_the_items() {
        let kinds = ["1", "\"s\"", "true"];
        let schemas = [serde_json::json!({"type": "integer"}), serde_json::json!({"type": "string"})];
        let arrays = sequences(3, 4);
        let mut checked = 0;
        for k in 0..=2usize {
            for items in [Some(serde_json::json!({"type": "boolean"})), Some(serde_json::json!(false)), None] {
                if items.is_none() && k == 0 {
                    continue;
                }
                for (min, max) in [(None, None), (Some(1), None), (Some(2), Some(3)), (None, Some(1)), (Some(3), None)]
                {
                    let mut schema = serde_json::json!({"type": "array", "prefixItems": schemas[..k]});
                    for (key, v) in [("minItems", min), ("maxItems", max)] {
                        if let Some(v) = v {
                            schema[key] = v.into();
                        }
                    }
                    // Items left out: the tuple's length at most (pydantic's fixed tuples).
                    match &items {
                        Some(i) => schema["items"] = i.clone(),
                        None => schema["maxItems"] = max.unwrap_or(k).min(k).into(),
                    }
                    let limit = schema["maxItems"].as_u64().unwrap_or(u64::MAX) as usize;
                    let closed = items.as_ref().is_some_and(|i| *i == false);
                    let p = match schema_regex(&schema) {
                        Ok(r) => Pattern::new(&r).unwrap(),
                        Err(e) => {
                            assert!(min.unwrap_or(0) > limit.min(if closed { k } else { usize::MAX }), "{schema}: {e}");
                            continue;
                        }
                    };
                    for a in &arrays {
                        let text = format!("[{}]", a.iter().map(|&e| kinds[e]).collect::<Vec<_>>().join(", "));
                        let ok = a.len() >= min.unwrap_or(0)
                            && a.len() <= limit
                            && !(closed && a.len() > k)
                            && a.iter().enumerate().all(|(i, &e)| if i < k { e == i } else { e == 2 });
                        assert_eq!(p.matches(text.as_bytes()), ok, "{text} against {schema}");
                        checked += ok as usize;
                    }
                }
            }
        }
        assert!(checked > 60, "{checked}");
    }

    /// `allOf` of objects (a base by reference and what extends it, nested too): one object of
    /// all their properties and required ones, closed; other intersections refused by name.
    #[test]
    fn all_of_objects_is_one_object() {
        let schema = serde_json::json!({
            "$defs": {
                "Base": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
                "Named": {"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"name": {"type": "string"}}}]},
            },
            "description": "a pet",
            "allOf": [{"$ref": "#/$defs/Named"}, {"type": "object", "properties": {"legs": {"enum": [2, 4]},
                "id": {"type": "integer"}}, "required": ["legs"]}],
        });
        let p = Pattern::new(&schema_regex(&schema).unwrap()).unwrap();
        for (text, ok) in [
            (r#"{"id":1,"legs":4}"#, true),
            (r#"{"id":1,"name":"Rex","legs":2}"#, true),
            (r#"{"name":"Rex","legs":2}"#, false),
            (r#"{"id":1}"#, false),
            (r#"{"id":1,"legs":3}"#, false),
            (r#"{"id":1,"legs":4,"tail":true}"#, false),
        ] {
            assert_eq!(p.matches(text.as_bytes()), ok, "{text}");
        }
        let refused = |s: serde_json::Value| schema_regex(&s).unwrap_err();
        let clash = serde_json::json!({"allOf": [{"properties": {"a": {"type": "integer"}}},
            {"properties": {"a": {"type": "string"}}}]});
        assert_eq!(refused(clash), "#/allOf/1/properties/a: named again otherwise in allOf");
        let bounded = serde_json::json!({"allOf": [{"properties": {"a": {"type": "integer"}}}, {"maxProperties": 1}]});
        assert_eq!(
            refused(bounded),
            "#/allOf/1: the keyword maxProperties in allOf (only objects' properties are merged)"
        );
    }

    /// Sets (`uniqueItems` over an enum, pydantic's `set[Literal[...]]`): for every array of up to
    /// four of a few values and bounds on the count, the text matches exactly when its items are
    /// the enum's, distinct, in the enum's order and as many as the bounds allow.
    #[test]
    fn unique_items_are_distinct_values_in_order() {
        let kinds = ["\"a\"", "\"b\"", "\"c\"", "1"];
        let arrays = sequences(4, 4);
        let mut checked = 0;
        for (items, allowed) in [
            (serde_json::json!({"enum": ["a", "b", "c"], "type": "string"}), vec![0, 1, 2]),
            (serde_json::json!({"enum": ["b", "b", 1]}), vec![1, 3]),
            (serde_json::json!({"const": "c"}), vec![2]),
        ] {
            for (min, max) in [(0, None), (1, None), (2, Some(2)), (0, Some(1)), (3, None)] {
                let mut schema =
                    serde_json::json!({"type": "array", "items": items, "uniqueItems": true, "minItems": min});
                if let Some(m) = max {
                    schema["maxItems"] = m.into();
                }
                let p = match schema_regex(&schema) {
                    Ok(r) => Pattern::new(&r).unwrap(),
                    Err(e) => {
                        assert!(min > allowed.len(), "{schema}: {e}");
                        assert!(e.contains("no array of distinct items"), "{e}");
                        continue;
                    }
                };
                for a in &arrays {
                    let text = format!("[{}]", a.iter().map(|&e| kinds[e]).collect::<Vec<_>>().join(", "));
                    let places: Option<Vec<usize>> = a.iter().map(|e| allowed.iter().position(|x| x == e)).collect();
                    let ok = places.is_some_and(|p| p.windows(2).all(|w| w[0] < w[1]))
                        && a.len() >= min
                        && max.is_none_or(|m| a.len() <= m);
                    assert_eq!(p.matches(text.as_bytes()), ok, "{text} against {schema}");
                    checked += ok as usize;
                }
            }
        }
        assert!(checked > 20, "{checked}");
        // Booleans, and many values (counts from 0 or 1 up to all only).
        let p = Pattern::new(
            &schema_regex(&serde_json::json!({"type": "array", "items": {"type": "boolean"},
            "uniqueItems": true}))
            .unwrap(),
        )
        .unwrap();
        for (text, ok) in
            [("[]", true), ("[true,false]", true), ("[false]", true), ("[false,true]", false), ("[true,true]", false)]
        {
            assert_eq!(p.matches(text.as_bytes()), ok, "{text}");
        }
        let many = serde_json::json!({"type": "array", "items": {"enum": (0..12).collect::<Vec<_>>()}, "uniqueItems": true,
            "minItems": 1});
        let p = Pattern::new(&schema_regex(&many).unwrap()).unwrap();
        for (text, ok) in [("[0,5,11]", true), ("[3]", true), ("[]", false), ("[5,0]", false), ("[1,1]", false)] {
            assert_eq!(p.matches(text.as_bytes()), ok, "{text}");
        }
        let refused = |s: serde_json::Value| schema_regex(&s).unwrap_err();
        assert_eq!(
            refused(serde_json::json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true})),
            "#/uniqueItems: only over items of an enum, a const or booleans (no prefixItems)"
        );
        let mut past = many.clone();
        past["maxItems"] = 3.into();
        assert_eq!(refused(past), "#: no array of distinct items is within minItems and maxItems");
    }

    /// The keys of other members: every string of up to three of a few characters (and a
    /// longer one) is one exactly when it is none of the names.
    #[test]
    fn other_names_are_every_string_but_the_names() {
        for names in [vec![], vec![""], vec!["a"], vec!["a", "ab", "abc", "b"], vec!["ba", "é", "\"q", "c\\"]] {
            let p = Pattern::new(&format!("\"{}\"", other_name(&names))).unwrap();
            let chars = ["a", "b", "c", "é"];
            let mut strings: Vec<String> =
                sequences(chars.len(), 3).iter().map(|s| s.iter().map(|&i| chars[i]).collect()).collect();
            strings.push("abcabc".to_string());
            for s in strings {
                assert_eq!(
                    p.matches(format!("\"{s}\"").as_bytes()),
                    !names.contains(&s.as_str()),
                    "{s:?} among {names:?}"
                );
            }
        }
    }

    /// Optional properties: for every choice of which of four are required and every subset of
    /// them written (in order, compact and spaced), the text matches exactly when the required
    /// ones are all there; stray, doubled, leading and trailing commas and reordered members
    /// never match.
    #[test]
    fn optional_properties_may_be_left_out_required_ones_not() {
        let names = ["a", "bb", "c", "d"];
        for required_mask in 0u32..16 {
            let required: Vec<&str> = (0..4).filter(|i| required_mask >> i & 1 == 1).map(|i| names[i]).collect();
            let schema = serde_json::json!({"type": "object", "properties": {
                "a": {"type": "integer"}, "bb": {"type": "boolean"}, "c": {"type": "null"}, "d": {"enum": ["x"]}},
                "required": required, "additionalProperties": false});
            let p = Pattern::new(&schema_regex(&schema).unwrap()).unwrap();
            let values = ["1", "true", "null", "\"x\""];
            for present in 0u32..16 {
                let members: Vec<String> = (0..4)
                    .filter(|i| present >> i & 1 == 1)
                    .map(|i| format!("\"{}\":{}", names[i], values[i]))
                    .collect();
                let ok = required_mask & !present == 0;
                let compact = format!("{{{}}}", members.join(","));
                let spaced = format!("{{ {} }}", members.join(", ").replace(':', ": "));
                for text in [&compact, &spaced] {
                    assert_eq!(p.matches(text.as_bytes()), ok, "required {required:?}: {text}");
                }
                if members.len() >= 2 {
                    let mut swapped = members.clone();
                    swapped.swap(0, 1);
                    let bad = [
                        format!("{{{}}}", swapped.join(",")),
                        format!("{{{}}}", members.join(",,")),
                        format!("{{{},}}", members.join(",")),
                        format!("{{,{}}}", members.join(",")),
                    ];
                    for text in bad {
                        assert!(!p.matches(text.as_bytes()), "required {required:?}: {text}");
                    }
                }
            }
        }
    }
}
