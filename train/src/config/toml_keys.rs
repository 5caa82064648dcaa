//! TOML helpers of [`super`]: parse errors that name the line and key, the key of a value
//! of the wrong type in a partial file, layering, and the first difference between two
//! configurations.

use super::{ConfigError, TrainConfig};

/// serde's message in words, on one line (`expected u64` → `expected a whole number`).
pub(super) fn readable(message: &str) -> String {
    let mut m = message.trim().replace('\n', " ");
    for (serde, words) in [
        ("expected u64", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        m = m.replace(serde, words);
    }
    m
}

pub(super) fn parse_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            // the line itself names the key (`steps = "5"`)
            let source = text.lines().nth(line - 1).unwrap_or("").trim();
            if source.is_empty() || source.len() > 80 {
                format!("line {line}: {}", readable(e.message()))
            } else {
                format!("line {line} (`{source}`): {}", readable(e.message()))
            }
        }
        None => readable(e.message()),
    };
    ConfigError::Parse {
        origin: origin.to_string(),
        message,
    }
}

/// The values of `table` by dotted key (arrays and inline values are leaves).
fn leaves(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) => leaves(t, &path, out),
            v => out.push((path, v.clone())),
        }
    }
}

/// The first value of `user` that makes `base` (a valid configuration) fail to deserialise,
/// with serde's message.
pub(super) fn failing_key(base: &toml::Table, user: &toml::Table) -> Option<(String, String)> {
    let mut values = Vec::new();
    leaves(user, "", &mut values);
    values.into_iter().find_map(|(key, value)| {
        let mut table = base.clone();
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop()?;
        let mut at = &mut table;
        for part in parts {
            at = at
                .entry(part)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()?;
        }
        at.insert(last.to_string(), value);
        match toml::Value::Table(table).try_into::<TrainConfig>() {
            Ok(_) => None,
            Err(e) => Some((key.clone(), readable(e.message()))),
        }
    })
}

pub(super) fn parse_table(origin: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| parse_error(origin, text, &e))
}

/// Recursively replaces the values of `base` by those of `over` (tables are merged).
pub(super) fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The first key, other than `ignore`, whose value differs between `a` and `b`, as
/// `key = A in the run, B here`.
pub(super) fn first_difference(
    a: &TrainConfig,
    b: &TrainConfig,
    ignore: &[&str],
) -> Option<String> {
    let table = |c: &TrainConfig| -> Vec<(String, toml::Value)> {
        let value = toml::Value::try_from(c).expect("the training config serialises");
        let mut out = Vec::new();
        if let toml::Value::Table(t) = value {
            leaves(&t, "", &mut out);
        }
        out.retain(|(k, _)| !ignore.contains(&k.as_str()));
        out
    };
    let (mine, theirs) = (table(a), table(b));
    let show = |v: Option<&toml::Value>| v.map_or("unset".to_string(), |v| v.to_string());
    let mut keys: Vec<&String> = mine.iter().chain(&theirs).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().find_map(|key| {
        let x = mine.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let y = theirs.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        (x != y).then(|| format!("{key} = {} in the run, {} here", show(x), show(y)))
    })
}
