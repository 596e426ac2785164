//! Service edits, as pure functions on a manifest. Each returns the one-line summary that
//! is recorded with the new version. Edits work on the JSON value and re-validate the whole
//! document, so an error names the field exactly as `validate` would.

use serde_json::{Map, Value};

use crate::Error;
use crate::model::Manifest;
use crate::validate::{Invalid, Problem, manifest_from_value};

/// Parse a JSON argument given on the command line.
pub fn parse_json_arg(arg: &str, what: &str) -> Result<Value, Error> {
    serde_json::from_str(arg).map_err(|e| {
        Error::Invalid(Invalid {
            origin: what.to_owned(),
            problems: vec![Problem {
                field: "(document)".to_owned(),
                message: format!(
                    "not valid JSON: {e}; pass it in single quotes, or - to read standard input"
                ),
            }],
        })
    })
}

/// `add-service '<json>'`: append a service; its name must be new.
pub fn add_service(m: &mut Manifest, service: &Value) -> Result<String, Error> {
    let name = service_name(service)?;
    if m.service(&name).is_some() {
        return Err(Error::DuplicateService { name });
    }
    edit_value(m, "add-service", |doc| {
        services(doc).push(service.clone());
        Ok(())
    })?;
    Ok(format!("add service {name}"))
}

/// `update-service <name> '<json merge patch>'`: RFC 7396 merge patch onto the service
/// (`null` removes a field). The name cannot change.
pub fn update_service(m: &mut Manifest, name: &str, patch: &Value) -> Result<String, Error> {
    if !patch.is_object() {
        return Err(Error::BadArgument(
            "the patch must be a JSON object, e.g. '{\"env\": {\"PORT\": \"9090\"}}'".to_owned(),
        ));
    }
    if let Some(new) = patch.get("name")
        && new.as_str() != Some(name)
    {
        return Err(Error::BadArgument(format!(
            "update-service cannot rename {name:?}; remove it and add the new one"
        )));
    }
    let index = index_of(m, name)?;
    let fields: Vec<&str> = patch
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .map(String::as_str)
        .collect();
    edit_value(m, "update-service", |doc| {
        merge_patch(&mut services(doc)[index], patch);
        Ok(())
    })?;
    Ok(format!("update service {name} ({})", fields.join(", ")))
}

/// `remove-service <name>`.
pub fn remove_service(m: &mut Manifest, name: &str) -> Result<String, Error> {
    let index = index_of(m, name)?;
    m.services.remove(index);
    Ok(format!("remove service {name}"))
}

/// `set-artifact <service> <storePath | archive JSON>`. The archive may be given as
/// `{"archive": {...}}` or as the bare `{"sha256": …, "name": …, "size": …}`.
pub fn set_artifact(m: &mut Manifest, name: &str, arg: &str) -> Result<String, Error> {
    let index = index_of(m, name)?;
    let arg = arg.trim();
    let artifact = if arg.starts_with('{') {
        let v = parse_json_arg(arg, "the artifact")?;
        if v.get("archive").is_some() || v.get("storePath").is_some() {
            v
        } else {
            serde_json::json!({ "archive": v })
        }
    } else if arg.starts_with('/') {
        serde_json::json!({ "storePath": arg })
    } else {
        return Err(Error::BadArgument(format!(
            "{arg:?} is neither a /nix/store path nor archive JSON ({{\"sha256\": …, \"name\": …, \"size\": …}})"
        )));
    };
    edit_value(m, "set-artifact", |doc| {
        services(doc)[index]["artifact"] = artifact;
        Ok(())
    })?;
    let label = m.services[index].artifact.label();
    Ok(format!("set {name} artifact to {label}"))
}

/// `set-infrastructure '<json>'`: replace the ecosystem layer (`infrastructure`, e.g.
/// `{"services": {"db": {"preset": "postgres"}}}`); `null` removes it.
pub fn set_infrastructure(m: &mut Manifest, infrastructure: &Value) -> Result<String, Error> {
    edit_value(m, "set-infrastructure", |doc| {
        let map = doc.as_object_mut().expect("a manifest is an object");
        if infrastructure.is_null() {
            map.remove("infrastructure");
        } else {
            map.insert("infrastructure".to_owned(), infrastructure.clone());
        }
        Ok(())
    })?;
    let names: Vec<&str> = m
        .infrastructure
        .iter()
        .flat_map(|i| i.services.keys().map(String::as_str))
        .collect();
    Ok(format!("set infrastructure ({})", names.join(", ")))
}

/// Replace the manifest's `rollout` (host labels and the fleet's default policy); `null`
/// removes it (every host deploys at its next poll, unless a service has its own policy).
pub fn set_rollout(m: &mut Manifest, rollout: &Value) -> Result<String, Error> {
    edit_value(m, "set-rollout", |doc| {
        let map = doc.as_object_mut().expect("a manifest is an object");
        if rollout.is_null() {
            map.remove("rollout");
        } else {
            map.insert("rollout".to_owned(), rollout.clone());
        }
        Ok(())
    })?;
    let waves = m
        .rollout
        .as_ref()
        .and_then(|r| r.policy.as_ref())
        .and_then(|p| p.waves.as_ref())
        .map_or(0, Vec::len);
    Ok(match waves {
        0 => "set rollout (no default waves)".to_owned(),
        n => format!("set rollout ({n} default waves)"),
    })
}

fn service_name(service: &Value) -> Result<String, Error> {
    match service.get("name").and_then(Value::as_str) {
        Some(n) => Ok(n.to_owned()),
        None if service.is_object() => Err(Error::BadArgument(
            "the service has no \"name\" string".to_owned(),
        )),
        None => Err(Error::BadArgument(
            "the service must be a JSON object".to_owned(),
        )),
    }
}

fn index_of(m: &Manifest, name: &str) -> Result<usize, Error> {
    m.services
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| Error::UnknownService {
            name: name.to_owned(),
        })
}

fn services(doc: &mut Value) -> &mut Vec<Value> {
    doc.get_mut("services")
        .and_then(Value::as_array_mut)
        .expect("a serialised manifest has a services array")
}

/// Apply `f` to the manifest as JSON, then validate the result and take it as the new model.
fn edit_value(
    m: &mut Manifest,
    origin: &str,
    f: impl FnOnce(&mut Value) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut doc = serde_json::to_value(&*m).expect("the model serialises");
    f(&mut doc)?;
    *m = manifest_from_value(doc, origin)?;
    Ok(())
}

/// RFC 7396 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("just made an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_service() -> Manifest {
        let mut m = Manifest::empty();
        add_service(
            &mut m,
            &json!({"name": "ava", "artifact": {"storePath": "/nix/store/placeholder"},
                    "hosts": ["biz"], "env": {"PORT": "8080", "MODE": "x"}}),
        )
        .unwrap();
        m
    }

    #[test]
    fn add_refuses_duplicates_and_invalid_services() {
        let mut m = with_service();
        let dup = json!({"name": "ava", "artifact": {"storePath": "/nix/store/x"}, "hosts": []});
        assert!(matches!(
            add_service(&mut m, &dup),
            Err(Error::DuplicateService { .. })
        ));
        let bad = json!({"name": "bob", "artifact": {"storePath": "/nix/store/x"}, "hosts": "biz"});
        let e = add_service(&mut m, &bad).unwrap_err().to_string();
        assert!(e.contains("services[1] (bob).hosts"), "{e}");
        assert_eq!(
            m.services.len(),
            1,
            "a refused edit leaves the manifest unchanged"
        );
    }

    #[test]
    fn update_merges_and_null_removes() {
        let mut m = with_service();
        let summary = update_service(
            &mut m,
            "ava",
            &json!({"env": {"PORT": "9090", "MODE": null}}),
        )
        .unwrap();
        assert_eq!(summary, "update service ava (env)");
        let env = &m.service("ava").unwrap().env;
        assert_eq!(env.get("PORT").map(String::as_str), Some("9090"));
        assert!(!env.contains_key("MODE"));
        assert!(update_service(&mut m, "ava", &json!({"name": "eve"})).is_err());
        assert!(matches!(
            update_service(&mut m, "nope", &json!({})),
            Err(Error::UnknownService { .. })
        ));
    }

    #[test]
    fn set_artifact_accepts_store_paths_and_archives() {
        let mut m = with_service();
        set_artifact(
            &mut m,
            "ava",
            "/nix/store/0c0hpb5bblw0gb2k1s2a5j7bn3ldf5r8-ava",
        )
        .unwrap();
        assert_eq!(
            m.service("ava").unwrap().artifact.label(),
            "/nix/store/0c0hpb5bblw0gb2k1s2a5j7bn3ldf5r8-ava"
        );
        let sha = "a".repeat(64);
        let s = set_artifact(
            &mut m,
            "ava",
            &format!(r#"{{"sha256":"{sha}","name":"ava","size":3}}"#),
        )
        .unwrap();
        assert_eq!(s, "set ava artifact to ava@aaaaaaaaaaaa");
        assert!(set_artifact(&mut m, "ava", r#"{"sha256":"xyz","name":"ava","size":3}"#).is_err());
        assert!(set_artifact(&mut m, "ava", "relative/path").is_err());
    }

    #[test]
    fn set_infrastructure_validates_and_replaces() {
        let mut m = with_service();
        let s = set_infrastructure(&mut m, &json!({"services": {"db": {"preset": "postgres"}}}))
            .unwrap();
        assert_eq!(s, "set infrastructure (db)");
        assert!(
            set_infrastructure(&mut m, &json!({"services": {"db": {"preset": "oracle"}}})).is_err()
        );
        assert_eq!(
            m.infrastructure.as_ref().unwrap().services.len(),
            1,
            "unchanged after a refused edit"
        );
        set_infrastructure(&mut m, &Value::Null).unwrap();
        assert!(m.infrastructure.is_none());
    }

    #[test]
    fn remove_takes_the_service_out() {
        let mut m = with_service();
        remove_service(&mut m, "ava").unwrap();
        assert!(m.services.is_empty());
        assert!(remove_service(&mut m, "ava").is_err());
    }

    #[test]
    fn merge_patch_follows_rfc7396() {
        // RFC 7396 appendix A, a few of its cases.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, want) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, want);
        }
    }
}
