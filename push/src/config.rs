//! `deploy.toml`: how the pushing repository builds each namespace.
//!
//! ```toml
//! store = "s3://my-bucket/deploy"          # optional; --store and DEPLOY_STORE win
//!
//! [defaults]                               # optional; applies to namespaces not listed
//! builder = "nix"
//! attribute = "{namespace}"
//!
//! [namespaces."Biz/MyService.py"]
//! service = "my-service"                   # optional; default: the service whose
//!                                          # "namespace" field is this namespace
//! builder = "command"                      # "command" (archive) or "nix" (store path)
//! command = "make -C biz/my-service dist"  # run with sh -c in this file's directory
//! output = "biz/my-service/dist"           # the directory the command produces
//! format = "tar.zst"                       # archive format: tar.zst (default) or tar.gz
//! ```
//!
//! A `nix` namespace either names an `attribute` (built with `nix-build <file> -A
//! <attribute>`, `file` defaulting to `default.nix`) or a `command` and `output`: if the
//! output resolves into `/nix/store` that store path is used, else it is added with
//! `nix-store --add`. `{namespace}` in any string is replaced by the namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use deploy_manifest::model::ArchiveFormat;
use serde::Deserialize;

use crate::PushError;

pub const CONFIG_FILE: &str = "deploy.toml";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub store: Option<String>,
    pub defaults: Option<NamespaceConfig>,
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub service: Option<String>,
    pub builder: Option<BuilderKind>,
    pub command: Option<String>,
    pub output: Option<String>,
    pub file: Option<String>,
    pub attribute: Option<String>,
    pub format: Option<Format>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuilderKind {
    Command,
    Nix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Format {
    #[serde(rename = "tar.zst")]
    TarZst,
    #[serde(rename = "tar.gz")]
    TarGz,
}

/// A namespace's build, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Build {
    /// Run `command`; archive the directory `output`.
    Archive {
        command: String,
        output: PathBuf,
        format: ArchiveFormat,
    },
    /// `nix-build file -A attribute`.
    NixAttribute { file: PathBuf, attribute: String },
    /// Run `command`; use or add `output` as a store path.
    NixCommand { command: String, output: PathBuf },
}

/// The loaded configuration and the directory builds run in.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub dir: PathBuf,
    pub file: ConfigFile,
}

impl Config {
    /// Load `path`, or find `deploy.toml` in `start` or the nearest parent directory.
    pub fn load(path: Option<&Path>, start: &Path) -> Result<Config, PushError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => start
                .ancestors()
                .map(|d| d.join(CONFIG_FILE))
                .find(|p| p.is_file())
                .ok_or_else(|| PushError::Config {
                    path: start.join(CONFIG_FILE).display().to_string(),
                    message: format!(
                        "no {CONFIG_FILE} here or in a parent directory; create one (see the README, \"push\") or pass --config"
                    ),
                })?,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| PushError::Config {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let file: ConfigFile = toml::from_str(&text).map_err(|e| PushError::Config {
            path: path.display().to_string(),
            message: e.to_string().lines().collect::<Vec<_>>().join(" "),
        })?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        Ok(Config { path, dir, file })
    }

    /// The namespace's settings, over `[defaults]`, with `{namespace}` substituted.
    pub fn namespace(&self, namespace: &str) -> Result<NamespaceConfig, PushError> {
        let own = self.file.namespaces.get(namespace);
        let defaults = self.file.defaults.as_ref();
        if own.is_none() && defaults.is_none() {
            return Err(PushError::UnknownNamespace {
                namespace: namespace.to_owned(),
                config: self.path.display().to_string(),
            });
        }
        let own = own.cloned().unwrap_or_default();
        let def = defaults.cloned().unwrap_or_default();
        let sub = |v: Option<String>| v.map(|s| s.replace("{namespace}", namespace));
        Ok(NamespaceConfig {
            service: sub(own.service.or(def.service)),
            builder: own.builder.or(def.builder),
            command: sub(own.command.or(def.command)),
            output: sub(own.output.or(def.output)),
            file: sub(own.file.or(def.file)),
            attribute: sub(own.attribute.or(def.attribute)),
            format: own.format.or(def.format),
        })
    }

    /// What to run for `namespace`.
    pub fn build(&self, namespace: &str) -> Result<Build, PushError> {
        let ns = self.namespace(namespace)?;
        let bad = |message: &str| PushError::Config {
            path: self.path.display().to_string(),
            message: format!("[namespaces.\"{namespace}\"]: {message}"),
        };
        let builder = ns.builder.unwrap_or(if ns.attribute.is_some() {
            BuilderKind::Nix
        } else {
            BuilderKind::Command
        });
        match builder {
            BuilderKind::Command => {
                let command = ns
                    .command
                    .ok_or_else(|| bad("builder \"command\" needs `command`"))?;
                let output = ns.output.ok_or_else(|| {
                    bad("builder \"command\" needs `output`, the directory it produces")
                })?;
                let format = match ns.format {
                    Some(Format::TarGz) => ArchiveFormat::TarGz,
                    Some(Format::TarZst) | None => ArchiveFormat::TarZst,
                };
                Ok(Build::Archive {
                    command,
                    output: self.dir.join(output),
                    format,
                })
            }
            BuilderKind::Nix => match (ns.attribute, ns.command, ns.output) {
                (Some(attribute), None, None) => Ok(Build::NixAttribute {
                    file: self.dir.join(ns.file.as_deref().unwrap_or("default.nix")),
                    attribute,
                }),
                (None, Some(command), Some(output)) => Ok(Build::NixCommand {
                    command,
                    output: self.dir.join(output),
                }),
                _ => Err(bad(
                    "builder \"nix\" needs either `attribute` (and optionally `file`) or `command` and `output`",
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config {
            path: PathBuf::from("/repo/deploy.toml"),
            dir: PathBuf::from("/repo"),
            file: toml::from_str(text).unwrap(),
        }
    }

    #[test]
    fn namespaces_resolve_over_defaults() {
        let c = config(
            r#"
            [defaults]
            builder = "nix"
            attribute = "{namespace}"
            [namespaces."Biz/App.py"]
            builder = "command"
            command = "make {namespace}"
            output = "out"
            format = "tar.gz"
            "#,
        );
        assert_eq!(
            c.build("Biz/App.py").unwrap(),
            Build::Archive {
                command: "make Biz/App.py".into(),
                output: "/repo/out".into(),
                format: ArchiveFormat::TarGz
            }
        );
        assert_eq!(
            c.build("Omni/Ava.hs").unwrap(),
            Build::NixAttribute {
                file: "/repo/default.nix".into(),
                attribute: "Omni/Ava.hs".into()
            }
        );
    }

    #[test]
    fn unknown_namespaces_and_incomplete_builders_are_errors() {
        let c = config(
            r#"
            [namespaces."A"]
            command = "true"
            [namespaces."B"]
            builder = "nix"
            command = "true"
            "#,
        );
        assert!(matches!(
            c.build("Z"),
            Err(PushError::UnknownNamespace { .. })
        ));
        assert!(
            c.build("A")
                .unwrap_err()
                .to_string()
                .contains("needs `output`")
        );
        assert!(
            c.build("B")
                .unwrap_err()
                .to_string()
                .contains("either `attribute`")
        );
        assert!(toml::from_str::<ConfigFile>("[namespaces.A]\nbuidler = \"nix\"").is_err());
    }
}
