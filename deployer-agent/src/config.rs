//! The agent's settings: command-line flags, the environment, or a TOML file (`--config`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub store: String,
    pub host: String,
    pub state_dir: PathBuf,
    pub secrets_dir: PathBuf,
    pub unit_dir: PathBuf,
    /// Drive the user's manager on the session bus instead of the system manager.
    pub user: bool,
    pub interval: Duration,
    /// How long a unit without health probes must stay active to count as healthy.
    pub settle: Duration,
    pub proxy: crate::proxy::ProxyConfig,
    /// Ports for zero-downtime generations (inclusive).
    pub port_range: (u16, u16),
    /// How long the old generation keeps serving in-flight requests after the switch.
    pub drain: Duration,
    /// A Prometheus text file to write after every run (node_exporter textfile collector).
    pub metrics_file: Option<PathBuf>,
    /// Public keys whose signatures this host accepts; empty = signatures not checked.
    pub trusted_keys: Vec<deploy_manifest::sign::PublicKey>,
    /// Nix binary-cache keys a fetched closure's narinfos must be signed by; empty = not
    /// checked.
    pub nix_trusted_keys: Vec<deploy_manifest::sign::PublicKey>,
    /// The host's caps on unpacking one archive (each archive gets less, by its size).
    pub unpack_limits: deploy_manifest::archive::UnpackLimits,
    /// The most time one run may spend waiting on the store, all calls together.
    pub store_deadline: Duration,
    /// How many history records of this host the store keeps (older ones are deleted).
    pub history_keep: usize,
    /// Where each event goes besides the history (`--notify-command`, `--notify-url`).
    pub notify: crate::notify::Notify,
    /// This host's mode (`--mode`, e.g. `regtest`): picks a custom infrastructure
    /// service's command variant.
    pub mode: Option<String>,
}

impl AgentConfig {
    /// What every sandboxed unit gets as `InaccessiblePaths=`: the secrets directory and the
    /// host key.
    pub fn hidden_from_services(&self) -> Vec<PathBuf> {
        vec![
            self.secrets_dir.clone(),
            self.state_dir.join(crate::report::HOST_KEY_FILE),
        ]
    }
}

/// `--store-deadline` by default.
pub const DEFAULT_STORE_DEADLINE: Duration = Duration::from_secs(600);

/// `--config FILE`: the same settings, kebab-case keys; flags win over the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub store: Option<String>,
    pub host: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub secrets_dir: Option<PathBuf>,
    pub unit_dir: Option<PathBuf>,
    pub user: Option<bool>,
    pub interval: Option<String>,
    pub settle: Option<String>,
    pub proxy: Option<String>,
    pub caddy_admin: Option<String>,
    pub caddy_server: Option<String>,
    pub caddy_listen: Option<String>,
    pub nginx_config: Option<PathBuf>,
    pub nginx_listen: Option<String>,
    pub nginx_reload: Option<String>,
    pub port_range: Option<String>,
    pub drain: Option<String>,
    pub metrics_file: Option<PathBuf>,
    pub trusted_keys: Option<PathBuf>,
    pub nix_trusted_keys: Option<PathBuf>,
    pub max_unpacked_bytes: Option<ByteSize>,
    pub max_archive_entries: Option<u64>,
    pub store_deadline: Option<String>,
    pub history_keep: Option<usize>,
    pub notify_command: Option<String>,
    pub notify_url: Option<String>,
    pub mode: Option<String>,
}

/// A size in a config file: a number of bytes, or a string such as "16GiB" or "512 MiB".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(s) => parse_bytes(s),
        }
    }
}

/// `1048576`, `512KiB`, `256 MiB`, `16GiB`, `1TiB` (also KB/MB/GB/TB, decimal) → bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number of bytes, e.g. 16GiB or 536870912"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "size {s:?}: unknown unit {other:?}; use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    number
        .checked_mul(factor)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("size {s:?}: must be more than 0 and fit in 64 bits"))
}

impl ConfigFile {
    pub fn load(path: &std::path::Path) -> Result<ConfigFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            format!(
                "{}: {}",
                path.display(),
                e.to_string().lines().collect::<Vec<_>>().join(" ")
            )
        })
    }
}

/// The unit directory by default: the runtime directory, so NixOS's read-only /etc is
/// never touched (`/run/systemd/system`, or `$XDG_RUNTIME_DIR/systemd/user` with --user).
pub fn default_unit_dir(user: bool) -> PathBuf {
    if user {
        let runtime = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", current_uid())));
        runtime.join("systemd/user")
    } else {
        PathBuf::from("/run/systemd/system")
    }
}

/// The agent's user id (read once: it does not change while the process runs).
pub fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UID.get_or_init(|| {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(0)
    })
}

/// `20000-29999` → (20000, 29999).
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("port range {s:?}: expected FIRST-LAST, e.g. 20000-29999"))?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .map_err(|e| format!("port range {s:?}: {e}"))?,
        b.trim()
            .parse()
            .map_err(|e| format!("port range {s:?}: {e}"))?,
    );
    if a == 0 || a > b {
        return Err(format!("port range {s:?}: FIRST must be 1..=LAST"));
    }
    Ok((a, b))
}

/// A host mode as variants name them (`^[a-z0-9][a-z0-9_-]{0,62}$`).
pub fn valid_mode(m: &str) -> bool {
    let b = m.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("16GiB"), Ok(16 << 30));
        assert_eq!(parse_bytes("256 MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
        let file: ConfigFile = toml::from_str(
            "max-unpacked-bytes = \"1GiB\"\nmax-archive-entries = 5000\nstore-deadline = \"2m\"",
        )
        .unwrap();
        assert_eq!(file.max_unpacked_bytes.unwrap().bytes(), Ok(1 << 30));
        let file: ConfigFile = toml::from_str("max-unpacked-bytes = 4096").unwrap();
        assert_eq!(file.max_unpacked_bytes.unwrap().bytes(), Ok(4096));
    }

    #[test]
    fn a_mode_is_a_name() {
        let file: ConfigFile = toml::from_str("mode = \"regtest\"").unwrap();
        assert_eq!(file.mode.as_deref(), Some("regtest"));
        for ok in ["regtest", "main-net", "v2_test"] {
            assert!(valid_mode(ok), "{ok}");
        }
        for bad in ["", "Main", "main net", "-x", "a/b", &"m".repeat(64)] {
            assert!(!valid_mode(bad), "{bad}");
        }
    }
}
