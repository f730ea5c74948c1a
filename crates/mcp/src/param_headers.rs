//! `x-mcp-header` (2026-07-28, Streamable HTTP): tool parameters mirrored into
//! `Mcp-Param-{Name}` headers.
//!
//! A server may annotate properties of a tool's `inputSchema` with `"x-mcp-header": "Name"`;
//! an HTTP client must then send the argument's value in `Mcp-Param-Name` on every `tools/call`
//! of that tool, and must drop from `tools/list` any tool whose annotations break the rules:
//! the value must be a non-empty HTTP token, unique (case-insensitively) within the schema, on
//! a property of type `string`, `integer` or `boolean`, reachable from the root through
//! `properties` keys only (not through `items`, `oneOf`, `$ref`...). [`extract`] checks a schema
//! and returns the annotations; [`headers_for`] computes the headers of one call (absent or
//! `null` values omit the header; strings use the Base64 sentinel when not plain ASCII).

use serde_json::Value;

use crate::http::encode_header_value;

/// One annotated parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamHeader {
    /// The `{Name}` of `Mcp-Param-{Name}`.
    pub name: String,
    /// Property names from the schema root to the parameter.
    pub path: Vec<String>,
}

/// Why a tool definition was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamHeaderError {
    /// The annotation is not a non-empty HTTP token.
    #[error("x-mcp-header value {0:?} is not a valid header name token")]
    BadName(String),
    /// Two annotations differ only in case.
    #[error("x-mcp-header value {0:?} is used twice")]
    Duplicate(String),
    /// The annotation is not on a statically reachable property.
    #[error("x-mcp-header at {0} is not on a property reachable through `properties` only")]
    NotReachable(String),
    /// The annotated property is not a string, integer or boolean.
    #[error("x-mcp-header {0:?} is on a property that is not a string, integer or boolean")]
    NotPrimitive(String),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The annotations of a tool's input schema, or why the tool must be rejected.
pub fn extract(schema: &Value) -> Result<Vec<ParamHeader>, ParamHeaderError> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    walk(schema, &mut path, &mut out)?;
    let mut seen: Vec<String> = Vec::new();
    for h in &out {
        let lower = h.name.to_ascii_lowercase();
        if seen.contains(&lower) {
            return Err(ParamHeaderError::Duplicate(h.name.clone()));
        }
        seen.push(lower);
    }
    Ok(out)
}

fn walk<'a>(
    node: &'a Value,
    path: &mut Vec<&'a str>,
    out: &mut Vec<ParamHeader>,
) -> Result<(), ParamHeaderError> {
    match node {
        Value::Object(map) => {
            if let Some(ann) = map.get("x-mcp-header") {
                let name = ann.as_str().unwrap_or_default();
                if name.is_empty() || !name.bytes().all(is_tchar) {
                    return Err(ParamHeaderError::BadName(ann.to_string()));
                }
                // Reachable: properties/<a>/properties/<b>/... (even length, every even key
                // "properties").
                let reachable = !path.is_empty()
                    && path.len() % 2 == 0
                    && path.iter().step_by(2).all(|k| *k == "properties");
                if !reachable {
                    return Err(ParamHeaderError::NotReachable(format!(
                        "/{}",
                        path.join("/")
                    )));
                }
                let primitive = matches!(
                    map.get("type").and_then(Value::as_str),
                    Some("string" | "integer" | "boolean")
                );
                if !primitive {
                    return Err(ParamHeaderError::NotPrimitive(name.to_owned()));
                }
                out.push(ParamHeader {
                    name: name.to_owned(),
                    path: path
                        .iter()
                        .skip(1)
                        .step_by(2)
                        .map(|s| (*s).to_owned())
                        .collect(),
                });
            }
            for (k, v) in map {
                if k == "x-mcp-header" {
                    continue;
                }
                path.push(k);
                walk(v, path, out)?;
                path.pop();
            }
            Ok(())
        }
        Value::Array(items) => {
            for v in items {
                // Array positions are never a static path.
                path.push("[]");
                walk(v, path, out)?;
                path.pop();
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The `(Mcp-Param-{Name}, value)` headers of one call with `arguments`.
pub fn headers_for(specs: &[ParamHeader], arguments: Option<&Value>) -> Vec<(String, String)> {
    let Some(args) = arguments else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for spec in specs {
        let mut v = args;
        let mut found = true;
        for key in &spec.path {
            match v.get(key) {
                Some(next) => v = next,
                None => {
                    found = false;
                    break;
                }
            }
        }
        if !found {
            continue;
        }
        const SAFE: i64 = (1 << 53) - 1;
        let value = match v {
            Value::String(s) => encode_header_value(s).into_owned(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => match n.as_i64() {
                Some(i) if (-SAFE..=SAFE).contains(&i) => i.to_string(),
                _ => continue,
            },
            _ => continue,
        };
        out.push((format!("Mcp-Param-{}", spec.name), value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extracts_reachable_annotations() {
        let s = json!({"type":"object","properties":{
            "region":{"type":"string","x-mcp-header":"Region"},
            "opts":{"type":"object","properties":{"dry":{"type":"boolean","x-mcp-header":"Dry-Run"}}},
            "q":{"type":"string"}}});
        let h = extract(&s).unwrap();
        assert_eq!(h.len(), 2);
        assert!(h.contains(&ParamHeader {
            name: "Region".into(),
            path: vec!["region".into()]
        }));
        assert!(h.contains(&ParamHeader {
            name: "Dry-Run".into(),
            path: vec!["opts".into(), "dry".into()]
        }));
        let args = json!({"region":"us-west1","opts":{"dry":true},"q":"x"});
        let mut got = headers_for(&h, Some(&args));
        got.sort();
        assert_eq!(
            got,
            [
                ("Mcp-Param-Dry-Run".to_owned(), "true".to_owned()),
                ("Mcp-Param-Region".to_owned(), "us-west1".to_owned())
            ]
        );
        assert_eq!(headers_for(&h, Some(&json!({"region": null}))), []);
        assert_eq!(
            headers_for(&h, Some(&json!({"region":"Zürich"}))),
            [(
                "Mcp-Param-Region".to_owned(),
                "=?base64?WsO8cmljaA==?=".to_owned()
            )]
        );
    }

    #[test]
    fn rejects_bad_annotations() {
        let bad = [
            json!({"properties":{"a":{"type":"string","x-mcp-header":""}}}),
            json!({"properties":{"a":{"type":"string","x-mcp-header":"A B"}}}),
            json!({"properties":{"a":{"type":"number","x-mcp-header":"A"}}}),
            json!({"properties":{"a":{"type":"array","items":{"type":"string","x-mcp-header":"A"}}}}),
            json!({"oneOf":[{"properties":{"a":{"type":"string","x-mcp-header":"A"}}}]}),
            json!({"properties":{"a":{"type":"string","x-mcp-header":"A"},"b":{"type":"string","x-mcp-header":"a"}}}),
            json!({"type":"string","x-mcp-header":"Root"}),
        ];
        for s in bad {
            assert!(extract(&s).is_err(), "{s}");
        }
        assert_eq!(
            headers_for(
                &[ParamHeader {
                    name: "N".into(),
                    path: vec!["n".into()]
                }],
                Some(&json!({"n": 1.5}))
            ),
            []
        );
    }
}
