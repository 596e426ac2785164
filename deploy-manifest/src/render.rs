//! Human output for the CLI: aligned tables and short reports. Machine output is `--json`.

use std::borrow::Cow;
use std::fmt::Write;

use crate::diff::{Change, Diff};
use crate::repo::VersionInfo;

/// Text someone else wrote (a host report, the store) made safe to print on a terminal:
/// control characters are escaped (ESC as `\x1b`, newline as `\n`, tab as `\t`, C1
/// controls as `\u{9b}`), and so are the bidirectional overrides that reorder what a
/// terminal shows (`\u{202e}`). Everything else is kept as is.
pub fn escape(text: &str) -> Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A log's lines as `status HOST` and `history --logs` print them: `indent| line`, each
/// escaped.
pub fn log_lines(lines: &[String], indent: &str) -> String {
    lines
        .iter()
        .map(|l| format!("{indent}| {}\n", escape(l)))
        .collect()
}

/// Left-aligned columns separated by two spaces; the last column is not padded. Cells are
/// [`escape`]d: a cell never breaks the line or reaches the terminal as a control sequence.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = Table::new(header);
    for row in rows {
        t.push(row.iter().map(String::as_str));
    }
    t.to_string()
}

/// A [`table`] built a row at a time: each row is kept as one compact string of escaped
/// cells (about the size of its text), the column widths as they grow.
#[derive(Debug)]
pub struct Table {
    widths: Vec<usize>,
    /// Escaped cells, each ended by a NUL (which [`escape`] never leaves in a cell).
    lines: Vec<Box<str>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        let mut t = Table {
            widths: vec![0; header.len()],
            lines: Vec::new(),
        };
        t.push(header.iter().copied());
        t
    }

    pub fn push<'a>(&mut self, row: impl IntoIterator<Item = &'a str>) {
        let mut line = String::new();
        for (i, cell) in row.into_iter().enumerate() {
            let cell = escape(cell);
            self.widths[i] = self.widths[i].max(cell.chars().count());
            line.push_str(&cell);
            line.push('\0');
        }
        self.lines.push(line.into_boxed_str());
    }

    /// Rows pushed after the header.
    pub fn rows(&self) -> usize {
        self.lines.len() - 1
    }

    pub fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        for line in &self.lines {
            let cells: Vec<&str> = line.split_terminator('\0').collect();
            let last = cells.len().saturating_sub(1);
            for (i, cell) in cells.iter().enumerate() {
                if i == last {
                    out.write_all(cell.as_bytes())?;
                } else {
                    write!(out, "{cell:<w$}  ", w = self.widths[i])?;
                }
            }
            out.write_all(b"\n")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = Vec::new();
        self.write_to(&mut out).map_err(|_| std::fmt::Error)?;
        f.write_str(&String::from_utf8_lossy(&out))
    }
}

/// `deploy-manifest list`: newest first, `*` on the current version.
pub fn versions(list: &[VersionInfo]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            let marker = if v.current {
                "*"
            } else if v.orphan {
                "!"
            } else {
                " "
            };
            let mut summary = v.summary.clone().unwrap_or_default();
            if v.orphan {
                summary = format!("(never current) {summary}");
            }
            vec![
                format!("{marker} {}", v.version),
                v.created_at.clone().unwrap_or_default(),
                v.created_by.clone().unwrap_or_default(),
                v.services.to_string(),
                summary,
            ]
        })
        .collect();
    table(
        &["  VERSION", "CREATED", "AUTHOR", "SERVICES", "SUMMARY"],
        &rows,
    )
}

/// `deploy-manifest verify`: one row per version, `*` on the current one.
pub fn verified(rows: &[crate::repo::Verified]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let status = match (&r.problem, r.expired) {
                (Some(p), _) => format!("NOT VERIFIED: {p}"),
                (None, true) => format!(
                    "verified, EXPIRED at {}: run `deploy-manifest refresh`",
                    r.expires.as_deref().unwrap_or("?")
                ),
                (None, false) => "verified".to_owned(),
            };
            vec![
                format!("{} {}", if r.current { "*" } else { " " }, r.version),
                r.sequence
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.key.clone().unwrap_or_else(|| "-".into()),
                r.expires.clone().unwrap_or_else(|| "-".into()),
                status,
            ]
        })
        .collect();
    table(&["  VERSION", "SEQ", "KEY", "EXPIRES", "STATUS"], &rows)
}

/// `deploy-manifest diff a b`.
pub fn diff(d: &Diff) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} -> {}",
        d.from.as_deref().unwrap_or("?"),
        d.to.as_deref().unwrap_or("?")
    );
    if d.is_empty() {
        out.push_str("no changes\n");
        return out;
    }
    for name in &d.added {
        let _ = writeln!(out, "+ service {name}");
    }
    for name in &d.removed {
        let _ = writeln!(out, "- service {name}");
    }
    for s in &d.changed {
        let _ = writeln!(out, "~ service {}", s.name);
        for f in &s.fields {
            let _ = writeln!(out, "    {}", field(f));
        }
    }
    for f in &d.infrastructure {
        let _ = writeln!(out, "~ {}", field(f));
    }
    out
}

fn field(f: &crate::diff::FieldChange) -> String {
    let sign = match f.change {
        Change::Added => '+',
        Change::Removed => '-',
        Change::Changed => '~',
    };
    match (&f.old, &f.new, f.change) {
        (Some(o), Some(n), Change::Changed) => format!("{sign} {}: {o} -> {n}", f.field),
        (_, Some(n), Change::Added) => format!("{sign} {}: {n}", f.field),
        (Some(o), _, Change::Removed) => format!("{sign} {}: {o}", f.field),
        _ => format!("{sign} {} (value redacted)", f.field),
    }
}

/// `deploy-manifest rollout status`: per service, where its rollout stands, then a row per
/// wave with each host's outcome (a host with none yet: when its last report was written,
/// from `last_reports`, so a silent host shows as one).
pub fn rollouts(
    statuses: &[crate::rollout::Status],
    last_reports: &std::collections::BTreeMap<String, String>,
    now: std::time::SystemTime,
) -> String {
    use crate::rollout::{HostState, Phase, WaveState};
    let mut out = String::new();
    for s in statuses {
        let p = &s.progress;
        let waves = p.waves.len();
        let state = match &p.phase {
            Phase::Deploying { wave } => format!("wave {} of {waves} deploying", wave + 1),
            Phase::Baking { wave, until } => format!(
                "wave {} of {waves} baking until {until} ({} left)",
                wave + 1,
                p.waves[*wave]
                    .bake_left_seconds
                    .map(
                        |s| humantime::format_duration(std::time::Duration::from_secs(s))
                            .to_string()
                    )
                    .unwrap_or_default()
            ),
            Phase::Done => "done: every wave has its healthy hosts".to_owned(),
            Phase::Aborting { reason, .. } => format!("aborting: {reason}"),
            Phase::Aborted {
                by,
                cause,
                reason,
                at,
            } => format!("aborted by {by} at {at} ({cause}): {reason}"),
        };
        let _ = writeln!(
            out,
            "{}  {}  spec {}  started {}",
            escape(&s.service),
            escape(&s.artifact),
            s.spec_hash.get(..12).unwrap_or(&s.spec_hash),
            s.started_at.as_deref().map_or("-".into(), escape)
        );
        let _ = writeln!(out, "  {}", escape(&state));
        let rows: Vec<Vec<String>> = p
            .waves
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let hosts: Vec<String> = w
                    .hosts
                    .iter()
                    .map(|h| match (h.state, &h.error) {
                        (Some(_), _) if h.forgiven => format!("{} failed (forgiven)", h.host),
                        (Some(HostState::Failed), Some(e)) => format!("{} failed: {e}", h.host),
                        (Some(state), _) => format!("{} {state}", h.host),
                        (None, _) => match last_reports.get(&h.host) {
                            Some(at) => format!(
                                "{} pending (last report {} ago)",
                                h.host,
                                humantime::format_duration(std::time::Duration::from_secs(
                                    crate::status::age(at, now).min(100 * 365 * 86400)
                                ))
                            ),
                            None => format!("{} pending (never reported)", h.host),
                        },
                    })
                    .collect();
                let mut state = w.state.to_string();
                if w.state == WaveState::Deploying
                    && let Some(d) = &w.deadline
                {
                    state = format!("{state} (deadline {d})");
                }
                vec![
                    (i + 1).to_string(),
                    state,
                    format!("{}/{}", w.healthy, w.min_healthy),
                    hosts.join(", "),
                ]
            })
            .collect();
        for line in table(&["WAVE", "STATE", "HEALTHY", "HOSTS"], &rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONG HEADER", "C"],
            &[vec!["xxxx".into(), "y".into(), "z".into()]],
        );
        assert_eq!(t, "A     LONG HEADER  C\nxxxx  y            z\n");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert!(matches!(escape("plain, ünïcode ok"), Cow::Borrowed(_)));
        assert_eq!(
            escape("\u{1b}[31mred\nline2\r\tx\u{7}\u{7f}"),
            "\\x1b[31mred\\nline2\\r\\tx\\x07\\x7f"
        );
        assert_eq!(escape("a\u{9b}31m\u{202e}b"), "a\\u{9b}31m\\u{202e}b");
        let t = table(&["H", "E"], &[vec!["h\u{1b}".into(), "x\ny".into()]]);
        assert_eq!(
            t, "H      E\nh\\x1b  x\\ny\n",
            "widths count the escaped text"
        );
        assert!(!t.contains('\u{1b}'));
    }
}
