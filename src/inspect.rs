//! The JSON `skopeo inspect` and `skopeo list-tags` print, computed from the
//! manifest, config and tag list, so `inspect.json` and `apt-layer inspect`
//! can be diffed against skopeo. The output follows skopeo's Go encoder:
//! field order of its struct, map keys sorted, four-space indent, HTML
//! characters escaped, RFC 3339 times with trailing zeros trimmed, and a
//! final newline.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// What `inspect` needs to know about one image.
pub struct InspectInput<'a> {
    /// `registry/repo` (`docker.io/library/debian`).
    pub name: &'a str,
    /// The tag asked for, if any (omitted from the output when `None`).
    pub tag: Option<&'a str>,
    /// Digest of the top-level manifest (the index for multi-platform tags).
    pub digest: &'a str,
    /// Every tag of the repository.
    pub repo_tags: &'a [String],
    /// The platform image manifest bytes.
    pub manifest: &'a [u8],
    /// The image config bytes.
    pub config: &'a [u8],
}

/// Builds the `skopeo inspect` JSON (with the trailing newline skopeo prints).
pub fn inspect_json(i: &InspectInput<'_>) -> Result<Vec<u8>, String> {
    let manifest: Value =
        serde_json::from_slice(i.manifest).map_err(|e| format!("manifest: {e}"))?;
    let config: Value = serde_json::from_slice(i.config).map_err(|e| format!("config: {e}"))?;
    let cfg = config.get("config").cloned().unwrap_or(Value::Null);
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();

    let mut o = Map::new();
    o.insert("Name".into(), Value::String(i.name.into()));
    if let Some(t) = i.tag {
        o.insert("Tag".into(), Value::String(t.into()));
    }
    o.insert("Digest".into(), Value::String(i.digest.into()));
    o.insert(
        "RepoTags".into(),
        Value::Array(i.repo_tags.iter().cloned().map(Value::String).collect()),
    );
    o.insert(
        "Created".into(),
        config
            .get("created")
            .and_then(Value::as_str)
            .map(|c| Value::String(go_time(c)))
            .unwrap_or(Value::Null),
    );
    o.insert(
        "DockerVersion".into(),
        Value::String(
            config
                .get("docker_version")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
        ),
    );
    o.insert("Labels".into(), sorted_string_map(cfg.get("Labels")));
    o.insert(
        "Architecture".into(),
        Value::String(str_field(&config, "architecture")),
    );
    if let Some(v) = config
        .get("variant")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
    {
        o.insert("Variant".into(), Value::String(v.into()));
    }
    o.insert("Os".into(), Value::String(str_field(&config, "os")));
    o.insert(
        "Layers".into(),
        Value::Array(
            layers
                .iter()
                .map(|l| l.get("digest").cloned().unwrap_or(Value::Null))
                .collect(),
        ),
    );
    o.insert(
        "LayersData".into(),
        Value::Array(
            layers
                .iter()
                .map(|l| {
                    let mut d = Map::new();
                    d.insert(
                        "MIMEType".into(),
                        l.get("mediaType")
                            .cloned()
                            .unwrap_or(Value::String(String::new())),
                    );
                    d.insert(
                        "Digest".into(),
                        l.get("digest").cloned().unwrap_or(Value::Null),
                    );
                    d.insert(
                        "Size".into(),
                        l.get("size").cloned().unwrap_or(Value::from(0)),
                    );
                    d.insert(
                        "Annotations".into(),
                        sorted_string_map(l.get("annotations")),
                    );
                    Value::Object(d)
                })
                .collect(),
        ),
    );
    o.insert(
        "Env".into(),
        match cfg.get("Env") {
            Some(Value::Array(a)) => Value::Array(a.clone()),
            _ => Value::Null,
        },
    );
    Ok(go_json(&Value::Object(o)))
}

/// Builds the `skopeo list-tags` JSON.
pub fn list_tags_json(repository: &str, tags: &[String]) -> Vec<u8> {
    let mut o = Map::new();
    o.insert("Repository".into(), Value::String(repository.into()));
    o.insert(
        "Tags".into(),
        Value::Array(tags.iter().cloned().map(Value::String).collect()),
    );
    go_json(&Value::Object(o))
}

fn str_field(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

/// Go marshals `map[string]string` with sorted keys; `nil` as `null`.
fn sorted_string_map(v: Option<&Value>) -> Value {
    match v {
        Some(Value::Object(m)) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            Value::Object(
                sorted
                    .into_iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        }
        _ => Value::Null,
    }
}

/// Re-renders an RFC 3339 time the way Go's `time.Time` marshals it:
/// fractional seconds without trailing zeros, `Z` for UTC.
pub fn go_time(s: &str) -> String {
    let (main, zone) = match s
        .find(['Z', 'z'])
        .or_else(|| s.rfind(['+', '-']).filter(|&i| i > 10))
    {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let zone = match zone {
        "z" | "Z" | "+00:00" | "-00:00" => "Z",
        z => z,
    };
    let main = match main.split_once('.') {
        Some((secs, frac)) => {
            let frac = frac.trim_end_matches('0');
            if frac.is_empty() {
                secs.to_string()
            } else {
                format!("{secs}.{frac}")
            }
        }
        None => main.to_string(),
    };
    format!("{main}{zone}")
}

/// `json.MarshalIndent(v, "", "    ")` plus the newline `fmt.Println` adds.
fn go_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(v, &mut ser).expect("serialising a Value cannot fail");
    let s = String::from_utf8(out).expect("serde_json writes UTF-8");
    let mut escaped = String::with_capacity(s.len() + 1);
    for c in s.chars() {
        match c {
            '<' => escaped.push_str("\\u003c"),
            '>' => escaped.push_str("\\u003e"),
            '&' => escaped.push_str("\\u0026"),
            '\u{2028}' => escaped.push_str("\\u2028"),
            '\u{2029}' => escaped.push_str("\\u2029"),
            c => escaped.push(c),
        }
    }
    escaped.push('\n');
    escaped.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_times() {
        assert_eq!(
            go_time("2024-01-02T03:04:05.120000000Z"),
            "2024-01-02T03:04:05.12Z"
        );
        assert_eq!(go_time("2024-01-02T03:04:05.000Z"), "2024-01-02T03:04:05Z");
        assert_eq!(go_time("2024-01-02T03:04:05+00:00"), "2024-01-02T03:04:05Z");
        assert_eq!(
            go_time("2024-01-02T03:04:05.5+02:00"),
            "2024-01-02T03:04:05.5+02:00"
        );
    }

    #[test]
    fn inspect_shape() {
        let manifest = br#"{"schemaVersion":2,"config":{"digest":"sha256:c","size":1},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:l1","size":10}]}"#;
        let config = br#"{"created":"2020-01-01T00:00:00Z","architecture":"amd64","os":"linux","config":{"Env":["A=<b>"],"Labels":{"z":"1","a":"2"}}}"#;
        let tags = vec!["v1".to_string(), "v2".to_string()];
        let out = inspect_json(&InspectInput {
            name: "h:1/r",
            tag: Some("v1"),
            digest: "sha256:m",
            repo_tags: &tags,
            manifest,
            config,
        })
        .unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.ends_with("}\n"));
        assert!(s.contains("\\u003cb\\u003e"));
        let v: Value = serde_json::from_str(&s).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "Name",
                "Tag",
                "Digest",
                "RepoTags",
                "Created",
                "DockerVersion",
                "Labels",
                "Architecture",
                "Os",
                "Layers",
                "LayersData",
                "Env"
            ]
        );
        let labels: Vec<&String> = v["Labels"].as_object().unwrap().keys().collect();
        assert_eq!(labels, ["a", "z"]);
        assert_eq!(v["LayersData"][0]["Size"], 10);
        assert_eq!(v["LayersData"][0]["Annotations"], Value::Null);
    }
}
