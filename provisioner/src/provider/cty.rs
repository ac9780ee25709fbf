//! Terraform values on the wire: cty's msgpack encoding, read and written
//! with `rmpv`. Objects are maps keyed by attribute name; a value Terraform
//! does not know yet ("known after apply") is msgpack extension 0.

use rmpv::Value;

use super::wire::DynamicValue;

/// Why bytes are not a value devmesh can use.
#[derive(Debug, thiserror::Error)]
#[error("malformed value: {0}")]
pub(crate) struct ValueError(String);

/// The value in `dv` (msgpack; null when empty).
pub(crate) fn decode(dv: Option<&DynamicValue>) -> Result<Value, ValueError> {
    let Some(dv) = dv else {
        return Ok(Value::Nil);
    };
    if !dv.msgpack.is_empty() {
        return rmpv::decode::read_value(&mut dv.msgpack.as_slice())
            .map_err(|e| ValueError(e.to_string()));
    }
    if !dv.json.is_empty() {
        let json: serde_json::Value =
            serde_json::from_slice(&dv.json).map_err(|e| ValueError(e.to_string()))?;
        return Ok(from_json(&json));
    }
    Ok(Value::Nil)
}

/// `v` as a msgpack [`DynamicValue`].
pub(crate) fn encode(v: &Value) -> DynamicValue {
    let mut msgpack = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut msgpack, v);
    DynamicValue {
        msgpack,
        json: Vec::new(),
    }
}

/// A JSON value (a stored state) as a value of the same shape.
pub(crate) fn from_json(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) => Value::F64(f),
            (None, None) => Value::Nil,
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(from_json).collect()),
        serde_json::Value::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (Value::from(k.as_str()), from_json(v)))
                .collect(),
        ),
    }
}

/// "Known after apply".
pub(crate) fn unknown() -> Value {
    Value::Ext(0, vec![0])
}

/// Whether `v` is not known yet.
pub(crate) fn is_unknown(v: &Value) -> bool {
    matches!(v, Value::Ext(..))
}

/// Attribute `name` of object `obj` (null when absent).
pub(crate) fn get<'a>(obj: &'a Value, name: &str) -> &'a Value {
    const NIL: &Value = &Value::Nil;
    match obj {
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map_or(NIL, |(_, v)| v),
        _ => NIL,
    }
}

/// Attribute `name` of `obj` as a string, when it is a known string.
pub(crate) fn get_str<'a>(obj: &'a Value, name: &str) -> Option<&'a str> {
    get(obj, name).as_str()
}

/// Sets attribute `name` of object `obj`.
pub(crate) fn set(obj: &mut Value, name: &str, value: Value) {
    if let Value::Map(pairs) = obj {
        match pairs.iter_mut().find(|(k, _)| k.as_str() == Some(name)) {
            Some((_, v)) => *v = value,
            None => pairs.push((Value::from(name), value)),
        }
    }
}

/// An object with exactly `names`, each taken from `from` (null when
/// absent there): a value shaped like a schema.
pub(crate) fn shaped(from: &Value, names: &[&str]) -> Value {
    Value::Map(
        names
            .iter()
            .map(|n| (Value::from(*n), get(from, n).clone()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_the_wire_and_unknowns_stay_unknown() {
        let mut obj = Value::Map(vec![(Value::from("os"), Value::from("linux"))]);
        set(&mut obj, "token", unknown());
        set(&mut obj, "os", Value::from("darwin"));
        let back = decode(Some(&encode(&obj))).unwrap();
        assert_eq!(get_str(&back, "os"), Some("darwin"));
        assert!(is_unknown(get(&back, "token")));
        assert_eq!(get(&back, "missing"), &Value::Nil);
        // cty writes an unknown as fixext1 type 0.
        assert_eq!(encode(&unknown()).msgpack, vec![0xd4, 0, 0]);
    }

    #[test]
    fn a_stored_json_state_reads_as_the_same_object() {
        let json = serde_json::json!({"id": "a", "port": 8080, "env": {"K": "v"}, "x": null});
        let v = from_json(&json);
        assert_eq!(get_str(&v, "id"), Some("a"));
        assert_eq!(get(&v, "port").as_i64(), Some(8080));
        assert_eq!(get_str(get(&v, "env"), "K"), Some("v"));
        let s = shaped(&v, &["id", "new"]);
        assert_eq!(get(&s, "new"), &Value::Nil);
        assert!(
            decode(Some(&DynamicValue {
                msgpack: vec![0xa5, b'a'],
                json: vec![]
            }))
            .is_err()
        );
    }
}
