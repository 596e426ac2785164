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

/// The values an env file sets, parsed as systemd parses `EnvironmentFile=` (its
/// `parse_env_file` state machine: quotes, escapes, line continuations, values over
/// several lines, `#`/`;` comments), each also line by line; and of a URL value its
/// password, as written and percent-decoded: what is masked in the service's log.
pub fn secret_values(env_file: &str) -> Vec<String> {
    let mut values = Vec::new();
    for value in env_values(env_file) {
        if let Some(password) = url_password(&value) {
            values.push(percent_decode(password));
            values.push(password.to_owned());
        }
        if value.contains('\n') {
            values.extend(value.lines().map(|l| l.trim().to_owned()));
        }
        values.push(value);
    }
    values.retain(|v| !v.is_empty());
    values.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    values.dedup();
    values
}

/// The values of `text`'s assignments, as systemd reads them (`src/basic/env-file.c`).
fn env_values(text: &str) -> Vec<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum S {
        PreKey,
        Key,
        PreValue,
        Value,
        ValueEscape,
        Single,
        Double,
        DoubleEscape,
        Comment,
        CommentEscape,
    }
    let mut values = Vec::new();
    let mut state = S::PreKey;
    let mut value = String::new();
    // Where trailing whitespace of an unquoted part starts (stripped at the end).
    let mut trailing: Option<usize> = None;
    let mut emit = |value: &mut String, trailing: &mut Option<usize>| {
        if let Some(at) = trailing.take() {
            value.truncate(at);
        }
        values.push(std::mem::take(value));
    };
    for c in text.chars() {
        let newline = c == '\n' || c == '\r';
        let blank = c == ' ' || c == '\t' || newline;
        state = match state {
            S::PreKey if c == '#' || c == ';' => S::Comment,
            S::PreKey if blank => S::PreKey,
            S::PreKey => S::Key,
            S::Key if newline => S::PreKey,
            S::Key if c == '=' => S::PreValue,
            S::Key => S::Key,
            S::PreValue | S::Value if newline => {
                emit(&mut value, &mut trailing);
                S::PreKey
            }
            S::PreValue if c == '\'' => S::Single,
            S::PreValue if c == '"' => S::Double,
            S::PreValue | S::Value if c == '\\' => S::ValueEscape,
            S::PreValue if blank => S::PreValue,
            S::PreValue | S::Value => {
                if blank {
                    trailing.get_or_insert(value.len());
                } else {
                    trailing = None;
                }
                value.push(c);
                S::Value
            }
            S::ValueEscape => {
                trailing = None;
                if !newline {
                    value.push(c);
                }
                S::Value
            }
            S::Single if c == '\'' => S::PreValue,
            S::Single => {
                value.push(c);
                S::Single
            }
            S::Double if c == '"' => S::PreValue,
            S::Double if c == '\\' => S::DoubleEscape,
            S::Double => {
                value.push(c);
                S::Double
            }
            S::DoubleEscape => {
                if matches!(c, '"' | '\\' | '`' | '$') {
                    value.push(c);
                } else if c != '\n' {
                    value.push('\\');
                    value.push(c);
                }
                S::Double
            }
            S::Comment if c == '\\' => S::CommentEscape,
            S::Comment if newline => S::PreKey,
            S::Comment | S::CommentEscape => S::Comment,
        };
        if matches!(state, S::Single | S::Double) {
            trailing = None;
        }
    }
    if matches!(
        state,
        S::PreValue | S::Value | S::ValueEscape | S::Single | S::Double | S::DoubleEscape
    ) {
        emit(&mut value, &mut trailing);
    }
    values
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

/// `lines` as they may leave the host: every occurrence of every value of `secrets`
/// masked (overlapping ones as one), then bounded (see the module). Masking comes before
/// cutting, so no cut leaves a part of a secret behind.
pub fn evidence(lines: impl IntoIterator<Item = String>, secrets: &[String]) -> Vec<String> {
    let secrets: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let mut kept: Vec<String> = lines
        .into_iter()
        .map(|line| cut(mask(&line, &secrets)))
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

/// `line` with every byte range that any of `secrets` covers replaced, a run of
/// overlapping or adjacent ranges by one [`MASK`].
fn mask(line: &str, secrets: &[&str]) -> String {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for s in secrets {
        let mut from = 0;
        while let Some(at) = line.get(from..).and_then(|rest| rest.find(s)) {
            let start = from + at;
            ranges.push((start, start + s.len()));
            // Overlapping occurrences too: the next may start inside this one.
            from = start + line[start..].chars().next().map_or(1, char::len_utf8);
        }
    }
    if ranges.is_empty() {
        return line.to_owned();
    }
    ranges.sort_unstable();
    let mut out = String::with_capacity(line.len());
    let mut done = 0;
    let mut i = 0;
    while i < ranges.len() {
        let (start, mut end) = ranges[i];
        while i + 1 < ranges.len() && ranges[i + 1].0 <= end {
            end = end.max(ranges[i + 1].1);
            i += 1;
        }
        out.push_str(&line[done..start.max(done)]);
        out.push_str(MASK);
        done = done.max(end);
        i += 1;
    }
    out.push_str(&line[done..]);
    out
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
    fn env_file_values_are_read_as_systemd_reads_them() {
        let file = concat!(
            "# comment\n; also\n",
            "API_TOKEN=tok-123\n",
            "  QUOTED=\"a \\\"b\\\" c\"\n",
            "SINGLE='x y'\n",
            "DATABASE_URL=postgres://app:p%40ss@127.0.0.1:5432/app\n",
            "EMPTY=\n",
            "not a line\n",
            "KEY=\"-----BEGIN KEY-----\nMIIEsecretbody\n-----END KEY-----\"\n",
            "CONT=tok-abc\\\ndef-123\n",
            "ESC=p\\$ssw0rd\n",
            "BACK=\"s3cr\\et-pw\"\n",
            "JOINED=\"hunter two\"more\n",
            "TRAIL=value-with-space   \n",
        );
        let values = secret_values(file);
        for want in [
            "tok-123",
            "a \"b\" c",
            "x y",
            "postgres://app:p%40ss@127.0.0.1:5432/app",
            "p%40ss",
            "p@ss",
            "MIIEsecretbody",
            "-----BEGIN KEY-----\nMIIEsecretbody\n-----END KEY-----",
            "tok-abcdef-123",
            "p$ssw0rd",
            "s3cr\\et-pw",
            "hunter twomore",
            "value-with-space",
        ] {
            assert!(
                values.contains(&want.to_owned()),
                "{want:?} not in {values:?}"
            );
        }
        assert!(
            !values
                .iter()
                .any(|v| v.is_empty() || v.contains("comment") || v.contains("not a line"))
        );
        assert!(
            values.windows(2).all(|w| w[0].len() >= w[1].len()),
            "longest first"
        );
    }

    #[test]
    fn overlapping_secrets_leave_no_fragment() {
        let secrets = vec!["abcdXYZW".to_owned(), "XYZWefgh".to_owned()];
        assert_eq!(
            mask("> abcdXYZWefgh <", &["abcdXYZW", "XYZWefgh"]),
            "> *** <"
        );
        assert_eq!(evidence(["abcdXYZWefgh".to_owned()], &secrets), ["***"]);
        assert_eq!(mask("aaaa", &["aa"]), "***");
        assert_eq!(mask("é-tok-é", &["tok"]), "é-***-é");
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
