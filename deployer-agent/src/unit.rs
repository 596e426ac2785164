//! systemd unit files, generated, never hand-written. Everything that goes into one is
//! checked or escaped here: a value with a newline or control character is refused, `%`
//! and `$` are escaped so systemd never expands them, quotes and backslashes are escaped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: &str, reason: impl Into<String>) -> UnitError {
    UnitError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// What a generated service unit says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpec {
    pub description: String,
    /// argv; the first element is an absolute path.
    pub exec_start: Vec<String>,
    pub working_directory: Option<PathBuf>,
    /// Only on the system manager (a user manager refuses `User=`).
    pub user: Option<String>,
    pub group: Option<String>,
    pub environment: BTreeMap<String, String>,
    /// `EnvironmentFile=`; a leading `-` is not used: a missing secrets file is an error.
    pub environment_files: Vec<PathBuf>,
    /// `append:` targets for output when there is no journal (tests, user managers).
    pub log_file: Option<PathBuf>,
    /// Sandboxing defaults that need privileges (system manager only).
    pub hardening: bool,
    /// Run once to completion (a release command) instead of as a long-running service.
    pub oneshot: bool,
}

/// A unit name: ASCII letters, digits, `:-_.\@`, at most 255 characters, with its suffix.
pub fn check_unit_name(name: &str) -> Result<(), UnitError> {
    let ok = name.len() <= 255
        && name.ends_with(".service")
        && name.len() > ".service".len()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "unit name",
            format!("{name:?} is not a valid service unit name"),
        ))
    }
}

fn check_text(field: &str, value: &str) -> Result<(), UnitError> {
    if let Some(c) = value.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(invalid(
            field,
            format!("contains the control character {c:?}; refusing to write it into a unit file"),
        ));
    }
    Ok(())
}

/// Quote one word for `ExecStart=`: double quotes, `\` and `"` escaped, `%` as `%%` (no
/// specifier expansion) and `$` as `$$` (no variable expansion).
fn quote_word(field: &str, word: &str) -> Result<String, UnitError> {
    check_text(field, word)?;
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    Ok(out)
}

/// `Environment="KEY=value"` with the value escaped.
fn environment_line(key: &str, value: &str) -> Result<String, UnitError> {
    let valid_key = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_key {
        return Err(invalid(&format!("env.{key}"), "not a valid variable name"));
    }
    check_text(&format!("env.{key}"), value)?;
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '%' => escaped.push_str("%%"),
            '\t' => escaped.push_str("\\t"),
            c => escaped.push(c),
        }
    }
    Ok(format!("Environment=\"{key}={escaped}\""))
}

/// A path for `EnvironmentFile=`, `WorkingDirectory=`: absolute, printable, no spaces.
fn path_value(field: &str, path: &Path) -> Result<String, UnitError> {
    let s = path
        .to_str()
        .ok_or_else(|| invalid(field, "not valid UTF-8"))?;
    check_text(field, s)?;
    if !s.starts_with('/') || s.contains(char::is_whitespace) || s.contains('%') {
        return Err(invalid(
            field,
            format!("{s:?} must be absolute, without spaces or '%'"),
        ));
    }
    Ok(s.to_owned())
}

impl UnitSpec {
    pub fn render(&self) -> Result<String, UnitError> {
        let mut u = String::new();
        check_text("description", &self.description)?;
        let first = self
            .exec_start
            .first()
            .ok_or_else(|| invalid("exec", "empty command"))?;
        if !first.starts_with('/') {
            return Err(invalid(
                "exec",
                format!("{first:?} is not an absolute path"),
            ));
        }
        let exec = self
            .exec_start
            .iter()
            .map(|w| quote_word("exec", w))
            .collect::<Result<Vec<_>, _>>()?
            .join(" ");
        let _ = writeln!(u, "# Generated by deployer-agent; changes are overwritten.");
        let _ = writeln!(u, "[Unit]");
        let _ = writeln!(u, "Description={}", self.description.replace('%', "%%"));
        let _ = writeln!(u, "StartLimitIntervalSec=0");
        let _ = writeln!(u);
        let _ = writeln!(u, "[Service]");
        let _ = writeln!(
            u,
            "Type={}",
            if self.oneshot { "oneshot" } else { "simple" }
        );
        let _ = writeln!(u, "ExecStart={exec}");
        if let Some(dir) = &self.working_directory {
            let _ = writeln!(
                u,
                "WorkingDirectory={}",
                path_value("workingDirectory", dir)?
            );
        }
        for (field, value) in [("user", &self.user), ("group", &self.group)] {
            if let Some(v) = value {
                let ok = !v.is_empty()
                    && v.len() <= 32
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
                if !ok {
                    return Err(invalid(field, format!("{v:?} is not a valid account name")));
                }
                let key = if field == "user" { "User" } else { "Group" };
                let _ = writeln!(u, "{key}={v}");
            }
        }
        for (k, v) in &self.environment {
            let _ = writeln!(u, "{}", environment_line(k, v)?);
        }
        for f in &self.environment_files {
            let _ = writeln!(u, "EnvironmentFile={}", path_value("envFile", f)?);
        }
        if let Some(log) = &self.log_file {
            let log = path_value("log file", log)?;
            let _ = writeln!(u, "StandardOutput=append:{log}");
            let _ = writeln!(u, "StandardError=append:{log}");
        }
        if !self.oneshot {
            let _ = writeln!(u, "Restart=on-failure");
            let _ = writeln!(u, "RestartSec=1s");
        }
        let _ = writeln!(u, "TimeoutStopSec=30s");
        if self.hardening {
            for line in [
                "NoNewPrivileges=yes",
                "PrivateTmp=yes",
                "ProtectSystem=strict",
                "ProtectHome=read-only",
                "ProtectKernelTunables=yes",
                "ProtectKernelModules=yes",
                "ProtectControlGroups=yes",
                "RestrictSUIDSGID=yes",
                "LockPersonality=yes",
                "StateDirectory=%N",
            ] {
                let _ = writeln!(u, "{line}");
            }
        }
        let _ = writeln!(u);
        let _ = writeln!(u, "[Install]");
        let _ = writeln!(u, "WantedBy=multi-user.target");
        Ok(u)
    }
}

/// Split a command line into words: whitespace separates, single quotes are literal,
/// double quotes allow `\"` and `\\`, a backslash outside quotes escapes the next character.
pub fn split_command(line: &str) -> Result<Vec<String>, UnitError> {
    check_text("command", line)?;
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(invalid("command", "unterminated single quote")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err(invalid("command", "unterminated double quote")),
                        },
                        Some(c) => word.push(c),
                        None => return Err(invalid("command", "unterminated double quote")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err(invalid("command", "trailing backslash")),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        return Err(invalid("command", "empty command"));
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> UnitSpec {
        UnitSpec {
            description: "deployer: my-service".into(),
            exec_start: vec![
                "/srv/app/bin/my service".into(),
                "--greeting".into(),
                "100% \"$HOME\"".into(),
            ],
            working_directory: Some("/srv/app".into()),
            user: Some("root".into()),
            group: Some("root".into()),
            environment: [
                ("PORT".to_owned(), "8080".to_owned()),
                ("Q".to_owned(), "a\"b\\c%d$e".to_owned()),
            ]
            .into(),
            environment_files: vec!["/var/lib/deployer-secrets/my-service.env".into()],
            log_file: None,
            hardening: true,
            oneshot: false,
        }
    }

    #[test]
    fn values_are_escaped() {
        let u = spec().render().unwrap();
        assert!(
            u.contains(r#"ExecStart="/srv/app/bin/my service" "--greeting" "100%% \"$$HOME\"""#),
            "{u}"
        );
        assert!(u.contains(r#"Environment="Q=a\"b\\c%%d$e""#), "{u}");
        assert!(u.contains("EnvironmentFile=/var/lib/deployer-secrets/my-service.env\n"));
        assert!(u.contains("User=root\nGroup=root\n"));
    }

    #[test]
    fn injection_is_refused() {
        let mut s = spec();
        s.environment
            .insert("PORT".into(), "8080\nExecStartPre=/bin/evil".into());
        assert!(s.render().unwrap_err().to_string().contains("env.PORT"));
        let mut s = spec();
        s.exec_start.push("x\ny".into());
        assert!(s.render().is_err());
        let mut s = spec();
        s.user = Some("root\nUser=evil".into());
        assert!(s.render().is_err());
        let mut s = spec();
        s.environment_files = vec!["/var/lib/x y.env".into()];
        assert!(s.render().is_err());
        let mut s = spec();
        s.environment.insert("BAD KEY".into(), "x".into());
        assert!(s.render().is_err());
        assert!(check_unit_name("deployer-a.service").is_ok());
        assert!(check_unit_name("deployer-a b.service").is_err());
        assert!(check_unit_name("deployer-a").is_err());
    }

    #[test]
    fn commands_split_like_a_shell_would() {
        assert_eq!(
            split_command("bin/server --port 8080").unwrap(),
            ["bin/server", "--port", "8080"]
        );
        assert_eq!(
            split_command(r#"run 'a b' "c \"d\"" e\ f"#).unwrap(),
            ["run", "a b", "c \"d\"", "e f"]
        );
        assert!(split_command("'open").is_err());
        assert!(split_command("  ").is_err());
        assert!(split_command("a\nb").is_err());
    }
}
