//! What changed between two manifests: services added, removed and changed, field by field.
//! Env values are never shown (only which keys were added, removed or changed): they may
//! hold things an operator would not paste into a chat.

use serde::Serialize;
use serde_json::Value;

use crate::model::Manifest;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Diff {
    pub from: Option<String>,
    pub to: Option<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<ServiceChange>,
    /// Changes to the top-level `infrastructure`.
    pub infrastructure: Vec<FieldChange>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.infrastructure.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceChange {
    pub name: String,
    pub fields: Vec<FieldChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldChange {
    /// e.g. `artifact`, `env.DATABASE_URL`, `infrastructure.services.db`.
    pub field: String,
    pub change: Change,
    /// Compact JSON of the old value; `None` when absent or redacted.
    pub old: Option<String>,
    pub new: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

pub fn diff(a: &Manifest, b: &Manifest) -> Diff {
    let mut d = Diff {
        from: a.version.clone(),
        to: b.version.clone(),
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
        infrastructure: Vec::new(),
    };
    for s in &b.services {
        if a.service(&s.name).is_none() {
            d.added.push(s.name.clone());
        }
    }
    for old in &a.services {
        let Some(new) = b.service(&old.name) else {
            d.removed.push(old.name.clone());
            continue;
        };
        let (old_v, new_v) = (to_value(old), to_value(new));
        let mut fields = Vec::new();
        for key in keys(&old_v, &new_v) {
            let (o, n) = (old_v.get(&key), new_v.get(&key));
            if key == "env" {
                env_changes(o, n, &mut fields);
            } else {
                field_change(&key, o, n, &mut fields);
            }
        }
        if !fields.is_empty() {
            d.changed.push(ServiceChange {
                name: old.name.clone(),
                fields,
            });
        }
    }
    let (old_i, new_i) = (to_value(&a.infrastructure), to_value(&b.infrastructure));
    let empty = Value::Null;
    let old_services = old_i.get("services").unwrap_or(&empty);
    let new_services = new_i.get("services").unwrap_or(&empty);
    for key in keys(old_services, new_services) {
        field_change(
            &format!("infrastructure.services.{key}"),
            old_services.get(&key),
            new_services.get(&key),
            &mut d.infrastructure,
        );
    }
    d
}

fn to_value<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("the model serialises")
}

/// The union of two objects' keys, in first-seen order.
fn keys(a: &Value, b: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in [a, b] {
        if let Value::Object(map) = v {
            for k in map.keys() {
                if !out.contains(k) {
                    out.push(k.clone());
                }
            }
        }
    }
    out
}

fn change_kind(o: Option<&Value>, n: Option<&Value>) -> Option<Change> {
    match (o, n) {
        (None, None) => None,
        (None, Some(_)) => Some(Change::Added),
        (Some(_), None) => Some(Change::Removed),
        (Some(a), Some(b)) if a == b => None,
        (Some(_), Some(_)) => Some(Change::Changed),
    }
}

fn field_change(field: &str, o: Option<&Value>, n: Option<&Value>, out: &mut Vec<FieldChange>) {
    if let Some(change) = change_kind(o, n) {
        out.push(FieldChange {
            field: field.to_owned(),
            change,
            old: o.map(Value::to_string),
            new: n.map(Value::to_string),
        });
    }
}

fn env_changes(o: Option<&Value>, n: Option<&Value>, out: &mut Vec<FieldChange>) {
    let empty = Value::Object(Default::default());
    let (o, n) = (o.unwrap_or(&empty), n.unwrap_or(&empty));
    for key in keys(o, n) {
        if let Some(change) = change_kind(o.get(&key), n.get(&key)) {
            out.push(FieldChange {
                field: format!("env.{key}"),
                change,
                old: None,
                new: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::{add_service, update_service};
    use serde_json::json;

    #[test]
    fn reports_services_and_fields_with_env_values_redacted() {
        let mut a = Manifest::empty();
        for name in ["ava", "bob"] {
            add_service(
                &mut a,
                &json!({"name": name, "artifact": {"storePath": "/nix/store/x"}, "hosts": ["biz"],
                        "env": {"TOKEN": "hunter2", "OLD": "1"}}),
            )
            .unwrap();
        }
        let mut b = a.clone();
        crate::edit::remove_service(&mut b, "bob").unwrap();
        add_service(
            &mut b,
            &json!({"name": "cat", "artifact": {"storePath": "/nix/store/y"}, "hosts": []}),
        )
        .unwrap();
        update_service(
            &mut b,
            "ava",
            &json!({"artifact": {"storePath": "/nix/store/z"}, "env": {"TOKEN": "s3cret", "OLD": null, "NEW": "2"}}),
        )
        .unwrap();
        let d = diff(&a, &b);
        assert_eq!(d.added, ["cat"]);
        assert_eq!(d.removed, ["bob"]);
        assert_eq!(d.changed.len(), 1);
        let fields: Vec<(&str, Change)> = d.changed[0]
            .fields
            .iter()
            .map(|f| (f.field.as_str(), f.change))
            .collect();
        assert_eq!(
            fields,
            [
                ("artifact", Change::Changed),
                ("env.OLD", Change::Removed),
                ("env.TOKEN", Change::Changed),
                ("env.NEW", Change::Added),
            ]
        );
        let text = serde_json::to_string(&d).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
        assert!(text.contains("/nix/store/z"));
        assert!(diff(&a, &a).is_empty());
    }
}
