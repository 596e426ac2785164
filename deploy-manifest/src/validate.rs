//! Validation of manifests: the JSON Schema contract first, then the rules a schema cannot
//! say (unique names, references that must resolve). Every manifest read or written passes
//! through [`parse_manifest`] or [`check_manifest`].

use std::collections::BTreeSet;
use std::fmt;
use std::sync::LazyLock;

use serde_json::Value;

use crate::model::Manifest;

/// The manifest schema, as committed in `schemas/manifest.schema.json`.
pub const MANIFEST_SCHEMA: &str = include_str!("../../schemas/manifest.schema.json");

static SCHEMA: LazyLock<Value> =
    LazyLock::new(|| serde_json::from_str(MANIFEST_SCHEMA).expect("the embedded schema is JSON"));

static VALIDATOR: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    jsonschema::validator_for(&SCHEMA).expect("the embedded schema is a valid JSON Schema")
});

/// One problem found in a manifest: where (a readable field path) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `services[0] (ava).http.internalPort`; `(root)` for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Everything wrong with one manifest document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    /// Where the document came from (a file, a store key, "argument").
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid manifest ({}): ", self.origin)?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Invalid {
    /// `Ok` when there are no problems.
    fn check(origin: &str, problems: Vec<Problem>) -> Result<(), Invalid> {
        if problems.is_empty() {
            return Ok(());
        }
        Err(Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }

    fn one(origin: &str, field: &str, message: impl Into<String>) -> Self {
        Invalid {
            origin: origin.to_owned(),
            problems: vec![Problem {
                field: field.to_owned(),
                message: message.into(),
            }],
        }
    }
}

/// Parse and fully validate a manifest document.
pub fn parse_manifest(bytes: &[u8], origin: &str) -> Result<Manifest, Invalid> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Invalid::one(
            origin,
            "(document)",
            format!(
                "not valid JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    manifest_from_value(value, origin)
}

/// Validate an already-parsed JSON value and turn it into the model.
pub fn manifest_from_value(value: Value, origin: &str) -> Result<Manifest, Invalid> {
    check_schema(&value, origin)?;
    let manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| Invalid::one(origin, "(document)", e.to_string()))?;
    check_rules(&manifest, origin)?;
    Ok(manifest)
}

/// Validate a model value before it is written.
pub fn check_manifest(manifest: &Manifest, origin: &str) -> Result<(), Invalid> {
    let value = serde_json::to_value(manifest).expect("the model serialises");
    check_schema(&value, origin)?;
    check_rules(manifest, origin)
}

fn check_schema(value: &Value, origin: &str) -> Result<(), Invalid> {
    let problems: Vec<Problem> = VALIDATOR
        .iter_errors(value)
        .map(|e| Problem {
            field: field_path(value, e.instance_path().as_str()),
            message: explain(&e),
        })
        .collect();
    Invalid::check(origin, problems)
}

/// The validator's message, with the schema's own description of the expected form added
/// where the raw message would only show a regular expression or a list of alternatives.
fn explain(e: &jsonschema::ValidationError<'_>) -> String {
    let message = e.to_string();
    let schema_path = e.schema_path().as_str();
    let keyword = schema_path.rsplit('/').next().unwrap_or_default();
    if !matches!(keyword, "pattern" | "oneOf" | "not" | "propertyNames") {
        return message;
    }
    let parent = &schema_path[..schema_path.len() - keyword.len()].trim_end_matches('/');
    match SCHEMA
        .pointer(parent)
        .and_then(|s| s.get("description"))
        .and_then(Value::as_str)
    {
        Some(description) => format!("{message} (expected: {description})"),
        None => message,
    }
}

/// Turn a JSON pointer into the path an operator reads: `services[2] (ava).http.domain`.
fn field_path(document: &Value, pointer: &str) -> String {
    if pointer.is_empty() {
        return "(root)".to_owned();
    }
    let mut out = String::new();
    let mut node = Some(document);
    for raw in pointer.split('/').skip(1) {
        let token = raw.replace("~1", "/").replace("~0", "~");
        let next = node.and_then(|n| match n {
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get(i)),
            Value::Object(map) => map.get(&token),
            _ => None,
        });
        if matches!(node, Some(Value::Array(_))) {
            out.push_str(&format!("[{token}]"));
            if let Some(name) = next.and_then(|n| n.get("name")).and_then(Value::as_str) {
                out.push_str(&format!(" ({name})"));
            }
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&token);
        }
        node = next;
    }
    out
}

/// Rules beyond the schema.
fn check_rules(m: &Manifest, origin: &str) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    let mut routes = BTreeSet::new();
    let ecosystem: BTreeSet<&str> = m
        .infrastructure
        .iter()
        .flat_map(|i| i.services.keys().map(String::as_str))
        .collect();
    for (i, s) in m.services.iter().enumerate() {
        let at = format!("services[{i}] ({})", s.name);
        if !names.insert(s.name.as_str()) {
            problems.push(Problem {
                field: format!("{at}.name"),
                message: format!("duplicate service name {:?}: names must be unique", s.name),
            });
        }
        if let Some(http) = &s.http {
            for host in &s.hosts {
                let route = (
                    host.as_str(),
                    http.domain.to_ascii_lowercase(),
                    http.path.as_str(),
                );
                if !routes.insert(route) {
                    problems.push(Problem {
                        field: format!("{at}.http"),
                        message: format!(
                            "route {}{} on host {host} is already used by another service",
                            http.domain, http.path
                        ),
                    });
                }
            }
        }
        if let Some(infra) = &s.infrastructure {
            for (name, req) in &infra.services {
                for dep in &req.depends_on {
                    if !ecosystem.contains(dep.as_str()) && !infra.services.contains_key(dep) {
                        problems.push(Problem {
                            field: format!("{at}.infrastructure.services.{name}.dependsOn"),
                            message: format!("unknown infrastructure service {dep:?}"),
                        });
                    }
                }
            }
        }
    }
    if let Some(infra) = &m.infrastructure {
        for (name, svc) in &infra.services {
            for dep in &svc.depends_on {
                if !ecosystem.contains(dep.as_str()) {
                    problems.push(Problem {
                        field: format!("infrastructure.services.{name}.dependsOn"),
                        message: format!("unknown infrastructure service {dep:?}"),
                    });
                }
            }
        }
    }
    Invalid::check(origin, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed_service() -> Value {
        // The service of seed 004's "Adding New Service", verbatim.
        json!({
            "name": "my-service",
            "artifact": {"storePath": "/nix/store/placeholder"},
            "hosts": ["biz"],
            "exec": {"command": null, "user": "root", "group": "root"},
            "env": {"PORT": "8080"},
            "envFile": "/var/lib/deployer-secrets/my-service.env",
            "http": {"domain": "my.example.com", "path": "/", "internalPort": 8080}
        })
    }

    fn manifest_with(service: Value) -> Value {
        json!({"schemaVersion": 1, "services": [service]})
    }

    fn problems(v: Value) -> Vec<String> {
        match manifest_from_value(v, "test") {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn seed_service_is_valid() {
        assert_eq!(
            problems(manifest_with(seed_service())),
            Vec::<String>::new()
        );
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = seed_service();
        s["http"]["internalPort"] = json!(70000);
        let p = problems(manifest_with(s));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("services[0] (my-service).http.internalPort: 70000"),
            "{p:?}"
        );
    }

    #[test]
    fn typo_is_reported_as_unexpected_field() {
        let mut s = seed_service();
        s["evn"] = json!({});
        let p = problems(manifest_with(s));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("services[0] (my-service)") && p[0].contains("evn"),
            "{p:?}"
        );
    }

    #[test]
    fn injection_in_env_value_domain_and_name_is_rejected() {
        let cases = [
            ("/env/PORT", json!("8080\nExecStartPre=/bin/evil")),
            ("/http/domain", json!("a.com { }")),
            ("/http/path", json!("/x\" ; evil")),
            ("/name", json!("Bad Name")),
            ("/envFile", json!("/var/lib/../../etc/shadow")),
        ];
        for (pointer, bad) in cases {
            let mut s = seed_service();
            *s.pointer_mut(pointer).unwrap() = bad.clone();
            let p = problems(manifest_with(s));
            assert!(!p.is_empty(), "{pointer} = {bad} was accepted");
        }
        let mut s = seed_service();
        s["env"]["bad key"] = json!("x");
        assert!(!problems(manifest_with(s)).is_empty());
    }

    #[test]
    fn pattern_errors_carry_the_expected_form() {
        let mut s = seed_service();
        s["name"] = json!("Bad Name");
        let p = problems(manifest_with(s));
        assert!(p[0].contains("expected: Lower-case letters"), "{p:?}");
    }

    #[test]
    fn duplicate_names_and_routes_are_rejected() {
        let a = seed_service();
        let mut b = seed_service();
        b["http"]["internalPort"] = json!(9000);
        let p = problems(json!({"schemaVersion": 1, "services": [a, b]}));
        assert!(
            p.iter().any(|m| m.contains("duplicate service name")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("already used")), "{p:?}");
    }

    #[test]
    fn unknown_dependency_is_rejected() {
        let v = json!({"schemaVersion": 1, "services": [],
            "infrastructure": {"services": {"db": {"preset": "postgres", "dependsOn": ["nope"]}}}});
        let p = problems(v);
        assert!(
            p[0].contains("infrastructure.services.db.dependsOn"),
            "{p:?}"
        );
    }

    #[test]
    fn bad_json_reports_line_and_column() {
        let e = parse_manifest(b"{\"schemaVersion\": 1,\n \"services\": [}", "f.json").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_schema_version_is_rejected() {
        let p = problems(json!({"schemaVersion": 2, "services": []}));
        assert!(p[0].starts_with("schemaVersion"), "{p:?}");
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_example_manifest_is_valid() {
        let bytes = include_bytes!("../../examples/manifest.json");
        let m = super::parse_manifest(bytes, "examples/manifest.json")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.services.len(), 2);
    }
}
