//! A strict reader of the Prometheus text exposition format (0.0.4), for
//! tests: every line is a `# HELP`, a `# TYPE`, a sample or blank; names
//! and labels are well formed; a family's `# TYPE` comes before its
//! samples and at most once; samples of a family are together; histogram
//! buckets are cumulative, end at `+Inf` and agree with `_count`.

use std::collections::{BTreeMap, HashSet};

/// One sample: its name (with any `_bucket`/`_sum`/`_count` suffix),
/// labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Families by name: their type and samples.
#[derive(Debug, Default)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: BTreeMap<String, Vec<Sample>>,
}

impl Exposition {
    /// Samples of family `name` whose labels include `with`.
    pub fn find(&self, name: &str, with: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .get(name)
            .map(|v| {
                v.iter()
                    .filter(|s| {
                        with.iter()
                            .all(|(k, val)| s.labels.get(*k).map(String::as_str) == Some(*val))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn family_of(sample: &str, types: &BTreeMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return base.to_string();
            }
        }
    }
    sample.to_string()
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, r) = rest
            .split_once("=\"")
            .ok_or(format!("label without =\": {rest}"))?;
        if !valid_name(k) || k.starts_with("__") {
            return Err(format!("bad label name {k:?}"));
        }
        let mut v = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => v.push('\n'),
                    Some((_, '\\')) => v.push('\\'),
                    Some((_, '"')) => v.push('"'),
                    other => return Err(format!("bad escape {other:?} in {s}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => v.push(c),
                None => return Err(format!("unterminated label value in {s}")),
            }
        };
        if out.insert(k.to_string(), v).is_some() {
            return Err(format!("label {k} twice in {s}"));
        }
        rest = &r[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(out)
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse().map_err(|_| format!("bad value {v:?}")),
    }
}

/// A histogram series: its buckets (bound, count) and its `_count`.
type Series = (Vec<(f64, f64)>, Option<f64>);

/// Parses `text`, or says what breaks the format.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut x = Exposition::default();
    let mut done: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if !valid_name(name) {
                return Err(at(format!("bad name {name:?}")));
            }
            match kw {
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(at(format!("bad type {t:?}")));
                    }
                    if x.types.insert(name.to_string(), t.to_string()).is_some() {
                        return Err(at("second TYPE".into()));
                    }
                    if x.samples.contains_key(name) {
                        return Err(at("TYPE after samples".into()));
                    }
                }
                "HELP" => {}
                _ => {}
            }
            continue;
        }
        let (head, value) = line.rsplit_once(' ').ok_or(at("no value".into()))?;
        let value = parse_value(value).map_err(at)?;
        let (name, labels) = match head.split_once('{') {
            Some((name, l)) => {
                let l = l.strip_suffix('}').ok_or(at("labels not closed".into()))?;
                (name, parse_labels(l).map_err(at)?)
            }
            None => (head, BTreeMap::new()),
        };
        if !valid_name(name) {
            return Err(at(format!("bad sample name {name:?}")));
        }
        let family = family_of(name, &x.types);
        if current.as_deref() != Some(family.as_str()) {
            if !done.insert(family.clone()) {
                return Err(at(format!("samples of {family} are not together")));
            }
            current = Some(family.clone());
        }
        x.samples.entry(family).or_default().push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for (family, t) in &x.types {
        if t != "histogram" {
            continue;
        }
        let samples = x.samples.get(family).cloned().unwrap_or_default();
        // Per label set (without `le`): buckets rise and end at +Inf = count.
        let mut series: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
        for s in samples {
            let mut key: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            key.sort();
            let e = series.entry(key).or_default();
            if s.name.ends_with("_bucket") {
                let le = s
                    .labels
                    .get("le")
                    .ok_or(format!("{family}: bucket without le"))?;
                e.0.push((parse_value(le)?, s.value));
            } else if s.name.ends_with("_count") {
                e.1 = Some(s.value);
            }
        }
        for (key, (buckets, count)) in series {
            let last = buckets
                .last()
                .ok_or(format!("{family} {key:?}: no buckets"))?;
            if last.0 != f64::INFINITY || Some(last.1) != count {
                return Err(format!(
                    "{family} {key:?}: +Inf bucket {last:?} and count {count:?} disagree"
                ));
            }
            if buckets
                .windows(2)
                .any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1)
            {
                return Err(format!(
                    "{family} {key:?}: buckets not cumulative: {buckets:?}"
                ));
            }
        }
    }
    Ok(x)
}
