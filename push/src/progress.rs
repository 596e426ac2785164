//! Transfer progress: a bar on a terminal, plain lines otherwise (CI logs, journald).

use std::io::IsTerminal;
use std::time::Instant;

use deploy_manifest::store::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// One transfer being reported.
pub struct Transfer {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    started: Instant,
}

impl Transfer {
    pub fn start(label: &str, total: u64) -> Transfer {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_owned());
            bar
        });
        if bar.is_none() {
            eprintln!("push: {label}: {}", human_bytes(total));
        }
        Transfer {
            bar,
            label: label.to_owned(),
            total,
            started: Instant::now(),
        }
    }

    pub fn finish(self) {
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        let rate = if secs > 0.0 {
            format!(", {}/s", human_bytes((self.total as f64 / secs) as u64))
        } else {
            String::new()
        };
        eprintln!(
            "push: {}: {} in {secs:.2} s{rate}",
            self.label,
            human_bytes(self.total)
        );
    }
}

impl Progress for Transfer {
    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(512 << 20), "512.0 MiB");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
    }
}
