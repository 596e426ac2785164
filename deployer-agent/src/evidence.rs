//! Failure evidence: the last lines a failed unit logged, as they leave the host (the
//! report, the history, notifications). Every value of the service's env files is masked
//! first, then the lines are bounded: at most [`LOG_LINES`] lines of at most
//! [`MAX_LINE_BYTES`] each, [`MAX_LOG_BYTES`] in all (the newest kept).
//!
//! Masking is by value: a secret the service prints transformed (encoded, split across
//! lines) is not recognised, so the log is evidence to read, not a place to log secrets.

use std::time::SystemTime;

/// The most lines kept of a failed unit's log.
pub const LOG_LINES: usize = 50;
/// A longer line is cut (and ends with `…`).
pub const MAX_LINE_BYTES: usize = 400;
/// The most bytes kept of one log, all lines together.
pub const MAX_LOG_BYTES: usize = 8 * 1024;
/// What a secret value is replaced with.
pub const MASK: &str = "***";

/// Where a unit's log ended before a deploy touched it: what [`crate::host::Host::unit_log`]
/// reads after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogMark {
    /// The journal's entries since then (system manager).
    pub at: SystemTime,
    /// The unit's log file past this size (user manager).
    pub offset: u64,
}

/// The values an env file sets (systemd's `EnvironmentFile=` syntax: `KEY=VALUE`, quotes,
/// `#`/`;` comments), as written and unquoted, and of a URL value also its password, as
/// written and percent-decoded: what is masked in the service's log.
pub fn secret_values(env_file: &str) -> Vec<String> {
    let mut values = Vec::new();
    for line in env_file.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((_, value)) = line.split_once('=') else {
            continue;
        };
        let raw = value.trim();
        let unquoted = unquote(raw);
        if let Some(password) = url_password(&unquoted) {
            values.push(percent_decode(password));
            values.push(password.to_owned());
        }
        values.push(unquoted);
        values.push(raw.to_owned());
    }
    values.retain(|v| !v.is_empty());
    values.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    values.dedup();
    values
}

fn unquote(v: &str) -> String {
    let quoted = |q: char| v.len() >= 2 && v.starts_with(q) && v.ends_with(q);
    if quoted('\'') {
        v[1..v.len() - 1].to_owned()
    } else if quoted('"') {
        let mut out = String::new();
        let mut chars = v[1..v.len() - 1].chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        out
    } else {
        v.to_owned()
    }
}

/// `scheme://user:PASSWORD@host…` → PASSWORD.
fn url_password(v: &str) -> Option<&str> {
    let (_, rest) = v.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `lines` as they may leave the host: every value of `secrets` masked (longest first),
/// then bounded (see the module). Masking comes before cutting, so no cut leaves a part of
/// a secret behind.
pub fn evidence(lines: impl IntoIterator<Item = String>, secrets: &[String]) -> Vec<String> {
    let mut secrets: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut kept: Vec<String> = lines
        .into_iter()
        .map(|line| {
            let mut line = line;
            for s in &secrets {
                if line.contains(s) {
                    line = line.replace(s, MASK);
                }
            }
            cut(line)
        })
        .collect();
    if kept.len() > LOG_LINES {
        kept.drain(..kept.len() - LOG_LINES);
    }
    let mut total: usize = kept.iter().map(String::len).sum();
    while total > MAX_LOG_BYTES && !kept.is_empty() {
        total -= kept.remove(0).len();
    }
    kept
}

fn cut(mut line: String) -> String {
    if line.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES - '…'.len_utf8();
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

/// The lines of `bytes` (a log's tail), invalid UTF-8 replaced; the newest `LOG_LINES`.
pub fn lines_of(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if lines.len() > LOG_LINES {
        lines.drain(..lines.len() - LOG_LINES);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_values_are_found_quoted_or_not_with_url_passwords() {
        let file = "# comment\n; also\nAPI_TOKEN=tok-123\n  QUOTED=\"a \\\"b\\\" c\"\nSINGLE='x y'\nDATABASE_URL=postgres://app:p%40ss@127.0.0.1:5432/app\nEMPTY=\nnot a line\n";
        let values = secret_values(file);
        for want in [
            "tok-123",
            "a \"b\" c",
            "\"a \\\"b\\\" c\"",
            "x y",
            "postgres://app:p%40ss@127.0.0.1:5432/app",
            "p%40ss",
            "p@ss",
        ] {
            assert!(
                values.contains(&want.to_owned()),
                "{want:?} not in {values:?}"
            );
        }
        assert!(!values.iter().any(|v| v.is_empty() || v.contains("comment")));
        assert!(
            values.windows(2).all(|w| w[0].len() >= w[1].len()),
            "longest first"
        );
    }

    #[test]
    fn secrets_are_masked_before_lines_are_cut_and_bounded() {
        let secrets = secret_values("TOKEN=s3cr3t-value\nDATABASE_URL=postgres://u:pw-xyz@h/db\n");
        let long = format!("{}s3cr3t-value", "x".repeat(MAX_LINE_BYTES - 2));
        let lines = vec![
            "token is s3cr3t-value, twice: s3cr3t-value".to_owned(),
            "connecting to postgres://u:pw-xyz@h/db".to_owned(),
            "password pw-xyz refused".to_owned(),
            long,
        ];
        let out = evidence(lines, &secrets);
        let all = out.join("\n");
        assert!(!all.contains("s3cr3t") && !all.contains("pw-xyz"), "{all}");
        assert_eq!(out[0], "token is ***, twice: ***");
        assert_eq!(out[1], "connecting to ***");
        assert_eq!(out[2], "password *** refused");
        // The secret at the end of a long line was masked, then the line was cut.
        assert!(
            out[3].len() <= MAX_LINE_BYTES && out[3].ends_with('…'),
            "{}",
            out[3]
        );

        let many: Vec<String> = (0..500)
            .map(|i| format!("line {i} {}", "y".repeat(300)))
            .collect();
        let out = evidence(many, &[]);
        assert!(out.len() <= LOG_LINES);
        assert!(out.iter().map(String::len).sum::<usize>() <= MAX_LOG_BYTES);
        assert!(
            out.last().unwrap().starts_with("line 499 "),
            "the newest are kept"
        );
    }

    #[test]
    fn a_log_tail_keeps_the_newest_lines_and_survives_bad_utf8() {
        let mut bytes = Vec::new();
        for i in 0..80 {
            bytes.extend_from_slice(format!("l{i}\n").as_bytes());
        }
        bytes.extend_from_slice(b"bad \xff\xfe end\n");
        let lines = lines_of(&bytes);
        assert_eq!(lines.len(), LOG_LINES);
        assert_eq!(lines.last().unwrap(), "bad \u{fffd}\u{fffd} end");
        assert_eq!(lines[0], "l31");
    }
}
