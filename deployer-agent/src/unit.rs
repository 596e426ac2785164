//! systemd unit files, generated, never hand-written. Everything that goes into one is
//! checked or escaped here: a value with a newline or control character is refused, `%`
//! and `$` are escaped so systemd never expands them, quotes and backslashes are escaped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// `TimeoutStartSec=`: a one-shot unit still running after this long is killed
    /// (SIGTERM, then SIGKILL after `TimeoutStopSec=`) and its start fails.
    pub start_timeout: Option<Duration>,
}

/// One sandboxing setting: a boolean switched on, or a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Yes,
    Word(&'static str),
}

/// The sandbox of every service on the system manager (they need privileges), written into
/// its unit file and given to its health probes as transient-unit properties. Besides these,
/// `StateDirectory=` names the service unit.
const HARDENING: [(&str, Setting); 9] = [
    ("NoNewPrivileges", Setting::Yes),
    ("PrivateTmp", Setting::Yes),
    ("ProtectSystem", Setting::Word("strict")),
    ("ProtectHome", Setting::Word("read-only")),
    ("ProtectKernelTunables", Setting::Yes),
    ("ProtectKernelModules", Setting::Yes),
    ("ProtectControlGroups", Setting::Yes),
    ("RestrictSUIDSGID", Setting::Yes),
    ("LockPersonality", Setting::Yes),
];

/// How long a transient probe unit may take to stop once its start timed out (SIGTERM, then
/// SIGKILL).
pub const PROBE_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A duration for a `...Sec=` setting: whole seconds when it is, else milliseconds.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
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

/// A variable name and its value, fit for a unit's environment.
fn check_env(key: &str, value: &str) -> Result<(), UnitError> {
    let valid_key = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_key {
        return Err(invalid(&format!("env.{key}"), "not a valid variable name"));
    }
    check_text(&format!("env.{key}"), value)
}

/// `Environment="KEY=value"` with the value escaped.
fn environment_line(key: &str, value: &str) -> Result<String, UnitError> {
    check_env(key, value)?;
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
    /// `User=` and `Group=`, checked.
    fn account(&self) -> Result<Vec<(&'static str, &str)>, UnitError> {
        let mut out = Vec::new();
        for (field, key, value) in [
            ("user", "User", &self.user),
            ("group", "Group", &self.group),
        ] {
            if let Some(v) = value {
                let ok = !v.is_empty()
                    && v.len() <= 32
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
                if !ok {
                    return Err(invalid(field, format!("{v:?} is not a valid account name")));
                }
                out.push((key, v.as_str()));
            }
        }
        Ok(out)
    }

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
        for (key, v) in self.account()? {
            let _ = writeln!(u, "{key}={v}");
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
        if let Some(t) = self.start_timeout {
            let _ = writeln!(u, "TimeoutStartSec={}", seconds(t));
        }
        let _ = writeln!(u, "TimeoutStopSec=30s");
        if self.hardening {
            for (key, setting) in HARDENING {
                let value = match setting {
                    Setting::Yes => "yes",
                    Setting::Word(w) => w,
                };
                let _ = writeln!(u, "{key}={value}");
            }
            let _ = writeln!(u, "StateDirectory=%N");
        }
        let _ = writeln!(u);
        let _ = writeln!(u, "[Install]");
        let _ = writeln!(u, "WantedBy=multi-user.target");
        Ok(u)
    }
}

/// The value of one property of a transient unit, typed as systemd's D-Bus API expects it
/// (systemd.rs turns these into D-Bus values; nothing here talks to D-Bus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Property {
    /// `b`
    Bool(bool),
    /// `s`
    Str(String),
    /// `as`
    Strs(Vec<String>),
    /// `ExecStart` (`a(sasb)`): one command, `argv[0]` is the program; failure not ignored.
    Exec(Vec<String>),
    /// `EnvironmentFiles` (`a(sb)`): files that must exist.
    Files(Vec<String>),
    /// `t`: a time span in microseconds.
    Micros(u64),
}

/// A transient unit started through D-Bus (a health probe): one-shot, killed at `timeout`,
/// collected by systemd once it has finished, whether it passed or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransientSpec {
    /// A unit name of its own, e.g. `deployer-probe-web.1f2e3d4c5b6a7988.service`.
    pub name: String,
    /// What runs (`exec_start`), where, as whom, how sandboxed, with which environment:
    /// as in a unit file. `oneshot`, `start_timeout` and `Restart=` do not apply: a
    /// transient unit is always one-shot and killed at `timeout`.
    pub unit: UnitSpec,
    /// With hardening, `StateDirectory=`: the service unit's name without `.service` (what
    /// `%N` means in its unit file), so the probe sees the service's state directory.
    pub state_directory: Option<String>,
    /// `TimeoutStartUSec=`: still running after this long, it is stopped (SIGTERM, then
    /// SIGKILL after [`PROBE_STOP_TIMEOUT`]) and its start fails with result `timeout`.
    pub timeout: Duration,
}

impl TransientSpec {
    /// The properties for `StartTransientUnit`, checked as strictly as a unit file's lines.
    pub fn properties(&self) -> Result<Vec<(&'static str, Property)>, UnitError> {
        check_unit_name(&self.name)?;
        let u = &self.unit;
        check_text("description", &u.description)?;
        let first = u
            .exec_start
            .first()
            .ok_or_else(|| invalid("exec", "empty command"))?;
        if !first.starts_with('/') && first.contains('/') {
            return Err(invalid(
                "exec",
                format!("{first:?} is neither an absolute path nor a program name"),
            ));
        }
        // systemd expands `$VAR` in a command's words (not `%` specifiers: those are only
        // expanded in unit files); `$$` is a literal `$`.
        let argv = u
            .exec_start
            .iter()
            .map(|w| check_text("exec", w).map(|()| w.replace('$', "$$")))
            .collect::<Result<Vec<_>, _>>()?;
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut p = vec![
            ("Description", Property::Str(u.description.clone())),
            ("Type", Property::Str("oneshot".into())),
            ("ExecStart", Property::Exec(argv)),
        ];
        if let Some(dir) = &u.working_directory {
            p.push((
                "WorkingDirectory",
                Property::Str(path_value("workingDirectory", dir)?),
            ));
        }
        for (key, v) in u.account()? {
            p.push((key, Property::Str(v.to_owned())));
        }
        if !u.environment.is_empty() {
            let mut env = Vec::new();
            for (k, v) in &u.environment {
                check_env(k, v)?;
                env.push(format!("{k}={v}"));
            }
            p.push(("Environment", Property::Strs(env)));
        }
        if !u.environment_files.is_empty() {
            let files = u
                .environment_files
                .iter()
                .map(|f| path_value("envFile", f))
                .collect::<Result<Vec<_>, _>>()?;
            p.push(("EnvironmentFiles", Property::Files(files)));
        }
        if let Some(log) = &u.log_file {
            let log = path_value("log file", log)?;
            p.push(("StandardOutputFileToAppend", Property::Str(log.clone())));
            p.push(("StandardErrorFileToAppend", Property::Str(log)));
        }
        p.push(("TimeoutStartUSec", Property::Micros(micros(self.timeout))));
        p.push((
            "TimeoutStopUSec",
            Property::Micros(micros(PROBE_STOP_TIMEOUT)),
        ));
        if u.hardening {
            for (key, setting) in HARDENING {
                p.push((
                    key,
                    match setting {
                        Setting::Yes => Property::Bool(true),
                        Setting::Word(w) => Property::Str(w.to_owned()),
                    },
                ));
            }
            if let Some(dir) = &self.state_directory {
                check_unit_name(&format!("{dir}.service"))?;
                p.push(("StateDirectory", Property::Strs(vec![dir.clone()])));
            }
        }
        p.push(("CollectMode", Property::Str("inactive-or-failed".into())));
        Ok(p)
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
            start_timeout: None,
        }
    }

    #[test]
    fn a_one_shot_unit_is_killed_at_its_start_timeout() {
        let mut s = spec();
        assert!(!s.render().unwrap().contains("TimeoutStartSec"));
        s.oneshot = true;
        s.start_timeout = Some(Duration::from_secs(15 * 60));
        let u = s.render().unwrap();
        assert!(u.contains("Type=oneshot\n"), "{u}");
        assert!(
            u.contains("TimeoutStartSec=900s\nTimeoutStopSec=30s\n"),
            "{u}"
        );
        s.start_timeout = Some(Duration::from_millis(2500));
        assert!(s.render().unwrap().contains("TimeoutStartSec=2500ms\n"));
    }

    #[test]
    fn hardening_is_unchanged_in_unit_files() {
        let u = spec().render().unwrap();
        assert!(
            u.contains(
                "NoNewPrivileges=yes\nPrivateTmp=yes\nProtectSystem=strict\n\
                 ProtectHome=read-only\nProtectKernelTunables=yes\nProtectKernelModules=yes\n\
                 ProtectControlGroups=yes\nRestrictSUIDSGID=yes\nLockPersonality=yes\n\
                 StateDirectory=%N\n"
            ),
            "{u}"
        );
    }

    fn probe() -> TransientSpec {
        let mut unit = spec();
        unit.exec_start = vec!["/srv/app/bin/check".into(), "$HOME".into()];
        TransientSpec {
            name: "deployer-probe-my-service.0123456789abcdef.service".into(),
            unit,
            state_directory: Some("deployer-my-service".into()),
            timeout: Duration::from_millis(1500),
        }
    }

    #[test]
    fn a_probe_unit_runs_as_the_service_with_its_sandbox_and_a_timeout() {
        let p: BTreeMap<&str, Property> = probe().properties().unwrap().into_iter().collect();
        let s = |v: &str| Property::Str(v.into());
        assert_eq!(p["Type"], s("oneshot"));
        assert_eq!(
            p["ExecStart"],
            Property::Exec(vec!["/srv/app/bin/check".into(), "$$HOME".into()])
        );
        assert_eq!(p["WorkingDirectory"], s("/srv/app"));
        assert_eq!(p["User"], s("root"));
        assert_eq!(p["Group"], s("root"));
        assert_eq!(
            p["Environment"],
            Property::Strs(vec!["PORT=8080".into(), "Q=a\"b\\c%d$e".into()])
        );
        assert_eq!(
            p["EnvironmentFiles"],
            Property::Files(vec!["/var/lib/deployer-secrets/my-service.env".into()])
        );
        assert_eq!(p["TimeoutStartUSec"], Property::Micros(1_500_000));
        assert_eq!(p["TimeoutStopUSec"], Property::Micros(5_000_000));
        assert_eq!(p["CollectMode"], s("inactive-or-failed"));
        // Every directive of the service's unit file, as a property.
        for (key, setting) in HARDENING {
            let want = match setting {
                Setting::Yes => Property::Bool(true),
                Setting::Word(w) => s(w),
            };
            assert_eq!(p[key], want, "{key}");
        }
        assert_eq!(
            p["StateDirectory"],
            Property::Strs(vec!["deployer-my-service".into()])
        );
        assert!(!p.contains_key("Restart"));
    }

    #[test]
    fn a_probe_unit_on_a_user_manager_has_no_account_and_no_sandbox() {
        let mut t = probe();
        t.unit.user = None;
        t.unit.group = None;
        t.unit.hardening = false;
        t.unit.log_file = Some("/var/lib/deployer/logs/my-service.log".into());
        let p: BTreeMap<&str, Property> = t.properties().unwrap().into_iter().collect();
        for key in [
            "User",
            "Group",
            "NoNewPrivileges",
            "ProtectSystem",
            "StateDirectory",
        ] {
            assert!(!p.contains_key(key), "{key}");
        }
        assert_eq!(
            p["StandardOutputFileToAppend"],
            Property::Str("/var/lib/deployer/logs/my-service.log".into())
        );
    }

    #[test]
    fn a_probe_unit_refuses_what_a_unit_file_refuses() {
        let mut t = probe();
        t.unit.exec_start.push("x\ny".into());
        assert!(t.properties().is_err());
        let mut t = probe();
        t.unit.user = Some("root\nUser=evil".into());
        assert!(t.properties().is_err());
        let mut t = probe();
        t.unit.environment.insert("BAD KEY".into(), "x".into());
        assert!(t.properties().is_err());
        let mut t = probe();
        t.name = "deployer-probe-a b.service".into();
        assert!(t.properties().is_err());
        let mut t = probe();
        t.unit.exec_start = vec!["bin/check".into()];
        assert!(t.properties().is_err(), "relative paths are resolved first");
        let mut t = probe();
        t.unit.exec_start = vec!["curl".into()];
        assert!(t.properties().is_ok(), "a program name is searched for");
        let mut t = probe();
        t.state_directory = Some("../etc".into());
        assert!(t.properties().is_err());
        // A zero timeout would mean none at all to systemd.
        let mut t = probe();
        t.timeout = Duration::ZERO;
        let p: BTreeMap<&str, Property> = t.properties().unwrap().into_iter().collect();
        assert_eq!(p["TimeoutStartUSec"], Property::Micros(1));
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
