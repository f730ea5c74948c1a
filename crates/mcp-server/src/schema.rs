//! A small JSON Schema validator for the subset of JSON Schema our tools publish.
//!
//! Every `tools/call` is checked against the tool's published `inputSchema` before the tool
//! runs, so a bad argument becomes a tool error that names the field (`cpus: expected an
//! integer <= 8, got 100`). Supported keywords: `type` (one name or a list), `properties`,
//! `required`, `additionalProperties` (a boolean or a schema), `items`, `enum`, `const`,
//! `minimum`, `maximum`, `minLength`, `maxLength`, `maxItems`, `maxProperties`. Annotation
//! keywords (`description`, `title`, `default`, `examples`, `$schema`) are ignored. A schema
//! using any other keyword is rejected when the server starts ([`check_supported`]), so a
//! published schema is never silently checked more loosely than it says.
//!
//! Limits: nesting deeper than [`MAX_DEPTH`] is an error (arguments come from the client).

use serde_json::{Map, Value};

/// Deepest nesting of arguments that is checked; deeper is an error.
pub const MAX_DEPTH: usize = 32;

const KNOWN: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "maxItems",
    "maxProperties",
    "description",
    "title",
    "default",
    "examples",
    "$schema",
];

/// A keyword of a published schema this validator does not implement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schema keyword {keyword:?} at {path} is not supported by the argument validator")]
pub struct Unsupported {
    /// The keyword.
    pub keyword: String,
    /// Where it is (`/properties/x`).
    pub path: String,
}

/// Checks that `schema` uses only keywords [`validate`] implements.
pub fn check_supported(schema: &Value) -> Result<(), Unsupported> {
    walk(schema, &mut String::new())
}

fn walk(schema: &Value, path: &mut String) -> Result<(), Unsupported> {
    let Value::Object(m) = schema else {
        // `true`/`false` schemas are fine.
        return Ok(());
    };
    for (k, v) in m {
        if !KNOWN.contains(&k.as_str()) {
            return Err(Unsupported {
                keyword: k.clone(),
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.clone()
                },
            });
        }
        let len = path.len();
        match k.as_str() {
            "properties" => {
                if let Value::Object(props) = v {
                    for (name, sub) in props {
                        path.push_str("/properties/");
                        path.push_str(name);
                        walk(sub, path)?;
                        path.truncate(len);
                    }
                }
            }
            "items" | "additionalProperties" => {
                path.push('/');
                path.push_str(k);
                walk(v, path)?;
                path.truncate(len);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Validates `value` against `schema`; the error names the field and says what was wrong.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, value, &mut String::new(), 0)
}

fn field(path: &str) -> &str {
    if path.is_empty() {
        "the arguments"
    } else {
        path
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_type(name: &str, v: &Value) -> bool {
    match name {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => match v {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        let mut end = 57;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

fn check(schema: &Value, value: &Value, path: &mut String, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "{}: nested deeper than {MAX_DEPTH} levels",
            field(path)
        ));
    }
    let m = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{}: is not allowed", field(path))),
        Value::Object(m) => m,
        _ => return Ok(()),
    };
    if let Some(t) = m.get("type") {
        let names: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !names.is_empty() && !names.iter().any(|n| is_type(n, value)) {
            return Err(format!(
                "{}: expected {}, got {}",
                field(path),
                names
                    .iter()
                    .map(|n| match *n {
                        "integer" => "an integer",
                        "number" => "a number",
                        "string" => "a string",
                        "boolean" => "a boolean",
                        "array" => "an array",
                        "object" => "an object",
                        "null" => "null",
                        other => other,
                    })
                    .collect::<Vec<_>>()
                    .join(" or "),
                type_name(value)
            ));
        }
    }
    if let Some(c) = m.get("const") {
        if c != value {
            return Err(format!(
                "{}: must be {}, got {}",
                field(path),
                short(c),
                short(value)
            ));
        }
    }
    if let Some(Value::Array(options)) = m.get("enum") {
        if !options.contains(value) {
            return Err(format!(
                "{}: must be one of {}, got {}",
                field(path),
                options.iter().map(short).collect::<Vec<_>>().join(", "),
                short(value)
            ));
        }
    }
    match value {
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if let Some(min) = m.get("minimum").and_then(Value::as_f64) {
                if f < min {
                    return Err(format!("{}: must be >= {min}, got {n}", field(path)));
                }
            }
            if let Some(max) = m.get("maximum").and_then(Value::as_f64) {
                if f > max {
                    return Err(format!("{}: must be <= {max}, got {n}", field(path)));
                }
            }
        }
        Value::String(s) => {
            let chars = s.chars().count() as u64;
            if let Some(min) = m.get("minLength").and_then(Value::as_u64) {
                if chars < min {
                    return Err(format!(
                        "{}: must be at least {min} characters long",
                        field(path)
                    ));
                }
            }
            if let Some(max) = m.get("maxLength").and_then(Value::as_u64) {
                if chars > max {
                    return Err(format!(
                        "{}: must be at most {max} characters long, got {chars}",
                        field(path)
                    ));
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = m.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    return Err(format!(
                        "{}: at most {max} items allowed, got {}",
                        field(path),
                        items.len()
                    ));
                }
            }
            if let Some(item_schema) = m.get("items") {
                let len = path.len();
                for (i, item) in items.iter().enumerate() {
                    path.push_str(&format!("[{i}]"));
                    check(item_schema, item, path, depth + 1)?;
                    path.truncate(len);
                }
            }
        }
        Value::Object(obj) => check_object(m, obj, path, depth)?,
        Value::Null | Value::Bool(_) => {}
    }
    Ok(())
}

fn check_object(
    m: &Map<String, Value>,
    obj: &Map<String, Value>,
    path: &mut String,
    depth: usize,
) -> Result<(), String> {
    if let Some(max) = m.get("maxProperties").and_then(Value::as_u64) {
        if obj.len() as u64 > max {
            return Err(format!(
                "{}: at most {max} entries allowed, got {}",
                field(path),
                obj.len()
            ));
        }
    }
    if let Some(Value::Array(req)) = m.get("required") {
        for name in req.iter().filter_map(Value::as_str) {
            if !obj.contains_key(name) {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push('.');
                }
                p.push_str(name);
                return Err(format!("{p}: is required"));
            }
        }
    }
    let props = m.get("properties").and_then(Value::as_object);
    let extra = m.get("additionalProperties");
    for (k, v) in obj {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(k);
        let r = match props.and_then(|p| p.get(k)) {
            Some(sub) => check(sub, v, path, depth + 1),
            None => match extra {
                Some(Value::Bool(false)) => Err(format!(
                    "{path}: unknown argument{}",
                    props
                        .map(|p| format!(
                            " (known: {})",
                            p.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                        ))
                        .unwrap_or_default()
                )),
                Some(sub) => check(sub, v, path, depth + 1),
                None => Ok(()),
            },
        };
        path.truncate(len);
        r?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "cpus": {"type": "integer", "minimum": 1, "maximum": 8},
                "argv": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
                "env": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 2},
                "mode": {"enum": ["a", "b"]},
                "net": {"const": false},
                "name": {"type": ["string", "null"], "minLength": 1}
            },
            "required": ["cpus"],
            "additionalProperties": false
        })
    }

    #[test]
    fn accepts_valid() {
        validate(
            &schema(),
            &json!({"cpus": 2, "argv": ["ls", "-l"], "env": {"A": "b"}, "mode": "a", "net": false, "name": null}),
        )
        .unwrap();
        validate(&schema(), &json!({"cpus": 2.0})).unwrap();
    }

    #[test]
    fn names_the_field() {
        let cases = [
            (json!({}), "cpus: is required"),
            (
                json!({"cpus": "2"}),
                "cpus: expected an integer, got a string",
            ),
            (json!({"cpus": 100}), "cpus: must be <= 8, got 100"),
            (json!({"cpus": 0}), "cpus: must be >= 1, got 0"),
            (
                json!({"cpus": 1.5}),
                "cpus: expected an integer, got a number",
            ),
            (
                json!({"cpus": 1, "argv": ["ls", 3]}),
                "argv[1]: expected a string, got an integer",
            ),
            (
                json!({"cpus": 1, "argv": ["toolong"]}),
                "argv[0]: must be at most 4 characters long, got 7",
            ),
            (
                json!({"cpus": 1, "argv": ["a", "b", "c", "d"]}),
                "argv: at most 3 items allowed, got 4",
            ),
            (
                json!({"cpus": 1, "env": {"A": 1}}),
                "env.A: expected a string, got an integer",
            ),
            (
                json!({"cpus": 1, "env": {"A": "", "B": "", "C": ""}}),
                "env: at most 2 entries allowed, got 3",
            ),
            (
                json!({"cpus": 1, "mode": "c"}),
                "mode: must be one of \"a\", \"b\", got \"c\"",
            ),
            (
                json!({"cpus": 1, "net": true}),
                "net: must be false, got true",
            ),
            (
                json!({"cpus": 1, "name": 3}),
                "name: expected a string or null, got an integer",
            ),
            (
                json!({"cpus": 1, "name": ""}),
                "name: must be at least 1 characters long",
            ),
            (
                json!({"cpus": 1, "bogus": 1}),
                "bogus: unknown argument (known: argv, cpus, env, mode, name, net)",
            ),
            (
                json!([1]),
                "the arguments: expected an object, got an array",
            ),
        ];
        for (value, want) in cases {
            assert_eq!(validate(&schema(), &value).unwrap_err(), want, "{value}");
        }
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let mut v = json!(1);
        let mut s = json!({"type": "integer"});
        for _ in 0..40 {
            v = json!([v]);
            s = json!({"type": "array", "items": s});
        }
        assert!(validate(&s, &v).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn unsupported_keywords_are_refused() {
        check_supported(&schema()).unwrap();
        let bad =
            json!({"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}});
        let e = check_supported(&bad).unwrap_err();
        assert_eq!(e.keyword, "pattern");
        assert_eq!(e.path, "/properties/x");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}", n in any::<i64>(), f in any::<f64>()) {
            for v in [json!(s.clone()), json!(n), json!(f), json!({"cpus": n, "argv": [s.clone()]}), json!({"env": {s.clone(): n}})] {
                let _ = validate(&schema(), &v);
            }
        }
    }
}
