//! Python's conversions and `str()`/`repr()` of JSON values.
//!
//! ComfyUI builds its validation messages with Python f-strings and converts widget values
//! with `int()`/`float()`; a compatible body needs the same text ("Value 0.5 smaller than
//! min of 1.0", "invalid literal for int() with base 10: 'wide'").

use std::cmp::Ordering;

use serde_json::{Number, Value};

/// A Python number: `int` is unbounded there, `i128` covers every JSON integer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum PyNum {
    Int(i128),
    Float(f64),
}

impl PyNum {
    pub(crate) fn from_json(v: &Value) -> Option<Self> {
        let n = v.as_number()?;
        Some(if let Some(i) = n.as_i64() {
            PyNum::Int(i.into())
        } else if let Some(u) = n.as_u64() {
            PyNum::Int(u.into())
        } else {
            PyNum::Float(n.as_f64()?)
        })
    }

    pub(crate) fn to_json(self) -> Value {
        match self {
            PyNum::Int(i) => i64::try_from(i)
                .map(Value::from)
                .or_else(|_| u64::try_from(i).map(Value::from))
                .unwrap_or_else(|_| float_json(i as f64)),
            PyNum::Float(f) => float_json(f),
        }
    }

    pub(crate) fn py_cmp(self, other: Self) -> Option<Ordering> {
        match (self, other) {
            (PyNum::Int(a), PyNum::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            PyNum::Int(i) => i as f64,
            PyNum::Float(f) => f,
        }
    }
}

impl std::fmt::Display for PyNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PyNum::Int(i) => write!(f, "{i}"),
            PyNum::Float(x) => f.write_str(&py_float_repr(*x)),
        }
    }
}

fn float_json(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// `repr(float)`: shortest round-trip digits, `.0` on integral values, exponent form
/// outside 1e-4 ≤ |x| < 1e16 written `1e+20`/`1e-05`.
pub(crate) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let a = x.abs();
    if a == 0.0 || (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').expect("{:e} has an exponent");
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        format!("{mantissa}e{sign}{digits:0>2}")
    }
}

/// `repr(value)` of the Python object json.loads would give.
pub(crate) fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(_) => PyNum::from_json(v).map_or_else(String::new, |n| n.to_string()),
        Value::String(s) => py_str_repr(s),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(py_repr).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", py_str_repr(k), py_repr(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

/// `str(value)`: strings as they are, everything else as its repr.
pub(crate) fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

fn py_str_repr(s: &str) -> String {
    // Python prefers single quotes and switches to double only to avoid escaping.
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// `int(value)`, with Python's exception message on failure.
pub(crate) fn py_int(v: &Value) -> Result<PyNum, String> {
    match v {
        Value::Bool(b) => Ok(PyNum::Int((*b).into())),
        Value::Number(_) => match PyNum::from_json(v) {
            Some(PyNum::Float(f)) => Ok(PyNum::Int(f.trunc() as i128)),
            Some(n) => Ok(n),
            None => Err("cannot convert number".into()),
        },
        Value::String(s) => parse_py_int(s)
            .map(PyNum::Int)
            .ok_or_else(|| format!("invalid literal for int() with base 10: {}", py_str_repr(s))),
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            type_name(other)
        )),
    }
}

fn parse_py_int(s: &str) -> Option<i128> {
    let t = s.trim();
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    // Python allows single underscores between digits ("1_000").
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    let n: i128 = digits.replace('_', "").parse().ok()?;
    Some(if neg { -n } else { n })
}

/// `float(value)`, with Python's exception message on failure.
pub(crate) fn py_float(v: &Value) -> Result<PyNum, String> {
    match v {
        Value::Bool(b) => Ok(PyNum::Float(if *b { 1.0 } else { 0.0 })),
        Value::Number(n) => Ok(PyNum::Float(n.as_f64().unwrap_or(f64::NAN))),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map(PyNum::Float)
            .map_err(|_| format!("could not convert string to float: {}", py_str_repr(s))),
        other => Err(format!(
            "float() argument must be a string or a real number, not '{}'",
            type_name(other)
        )),
    }
}

/// `bool(value)`: Python truthiness.
pub(crate) fn py_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// `a == b` as Python compares the decoded objects (`1 == 1.0`, `True == 1`).
pub(crate) fn py_eq(a: &Value, b: &Value) -> bool {
    let num = |v: &Value| match v {
        Value::Bool(b) => Some(PyNum::Int((*b).into())),
        _ => PyNum::from_json(v),
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.py_cmp(y) == Some(Ordering::Equal),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_like_python() {
        assert_eq!(py_float_repr(1.0), "1.0");
        assert_eq!(py_float_repr(0.5), "0.5");
        assert_eq!(py_float_repr(1e20), "1e+20");
        assert_eq!(py_float_repr(1e-5), "1e-05");
        assert_eq!(
            py_repr(&json!(["a", 1, 2.0, null, true])),
            "['a', 1, 2.0, None, True]"
        );
        assert_eq!(py_repr(&json!("it's")), "\"it's\"");
    }

    #[test]
    fn converts_like_python() {
        assert_eq!(py_int(&json!(" 42 ")), Ok(PyNum::Int(42)));
        assert_eq!(py_int(&json!(1.9)), Ok(PyNum::Int(1)));
        assert_eq!(
            py_int(&json!("wide")),
            Err("invalid literal for int() with base 10: 'wide'".into())
        );
        assert_eq!(
            py_float(&json!("abc")),
            Err("could not convert string to float: 'abc'".into())
        );
        assert!(py_eq(&json!(1), &json!(1.0)));
    }
}
