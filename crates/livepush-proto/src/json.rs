//! Nesting depth of JSON text, and the one limit on it.
//!
//! A message's `data` is passed through as raw JSON and never parsed into a tree by the
//! server, so nothing there stops a value nested hundreds of levels deep, which clients with
//! a recursion limit then cannot decode (serde_json's is 128, including the envelope around
//! `data`). The server refuses such values where they come in (publish, inbox post, terminal
//! `send`), measured here on the text by a scan with no stack: counting `[`/`{` against
//! `]`/`}` outside strings. Invariant: on valid JSON, [`nesting_exceeds`] answers exactly
//! whether the value has more than `max` levels (`{}` and `[]` are 1, a scalar 0); on any
//! other text it still ends, in one pass, without panicking.

/// Default of the server's `max_json_depth`: a `data` value may nest arrays and objects this
/// many levels deep.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 32;

/// Whether the JSON text `json` nests arrays and objects more than `max` levels deep.
pub fn nesting_exceeds(json: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn depth(v: &Value) -> usize {
        match v {
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn nested(levels: usize) -> String {
        format!("{}{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn counts_levels_not_brackets_in_strings() {
        assert!(!nesting_exceeds("1", 0));
        assert!(nesting_exceeds("{}", 0));
        assert!(!nesting_exceeds("{}", 1));
        assert!(!nesting_exceeds(r#"{"a":"[[[[{{{{\"[[["}"#, 1));
        assert!(!nesting_exceeds(r#"["\\",["\\\""]]"#, 2));
        assert!(nesting_exceeds(r#"["\\",["\\\"",{}]]"#, 2));
        assert!(!nesting_exceeds(&nested(32), 32));
        assert!(nesting_exceeds(&nested(33), 32));
        // Far deeper than any recursive parser could go: no stack is used.
        assert!(nesting_exceeds(&nested(1_000_000), DEFAULT_MAX_JSON_DEPTH));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(12, 64, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn agrees_with_the_parsed_tree(v in json_value(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            };
            let d = depth(&v);
            prop_assert!(!nesting_exceeds(&text, d));
            if d > 0 {
                prop_assert!(nesting_exceeds(&text, d - 1));
            }
        }

        #[test]
        fn never_panics(s in ".{0,200}", max in 0usize..8) {
            let _ = nesting_exceeds(&s, max);
        }
    }
}
