//! Notifications: each history [`Event`] of a run, as JSON, to the operator's command
//! (`--notify-command`, the event on its stdin) and webhook (`--notify-url`, an HTTP POST
//! of the same JSON). They are sent after the run has released its lock, from a task of
//! their own: a slow or failing receiver never delays a deploy. A webhook is retried with
//! backoff ([`RETRY_DELAYS`]) on a network error, a timeout, 429 or 5xx; the history in
//! the store keeps every event whatever happens to its notification.
//!
//! An event never holds a secret: errors are the agent's own, log lines were masked on
//! the host ([`crate::evidence`]).

use std::time::Duration;

use deploy_manifest::history::Event;

/// How long the command may run for one event before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one POST may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a one-shot run waits for its notifications before it exits
/// ([`Notify::flush`]); what is not delivered by then is dropped with a warning (the
/// history keeps every event).
pub const FLUSH_LIMIT: Duration = Duration::from_secs(60);
/// The waits between a webhook's attempts: 6 attempts in about 30 s plus their timeouts.
pub const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];

/// Where notifications go.
#[derive(Debug, Clone, Default)]
pub struct Notify {
    /// Run with `sh -c`, the event's JSON on stdin (and `DEPLOYER_EVENT`,
    /// `DEPLOYER_SERVICE`, `DEPLOYER_HOST` in its environment).
    pub command: Option<String>,
    /// http:// or https://; POSTed the event's JSON.
    pub url: Option<String>,
    /// The waits between a webhook's attempts (tests shorten them).
    pub retry_delays: Vec<Duration>,
    /// Notifications still being sent ([`Notify::flush`] waits for them).
    sending: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Notify {
    pub fn new(command: Option<String>, url: Option<String>) -> Result<Notify, String> {
        if let Some(u) = &url {
            // Not repeated back: a webhook URL often carries a token.
            let parsed = reqwest::Url::parse(u).map_err(|e| format!("--notify-url: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(
                    "--notify-url: use an http:// or https:// URL (for anything else, --notify-command)"
                        .into(),
                );
            }
        }
        Ok(Notify {
            command: command.filter(|c| !c.trim().is_empty()),
            url,
            retry_delays: RETRY_DELAYS.to_vec(),
            sending: Default::default(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.command.is_none() && self.url.is_none()
    }

    /// Send `events` from a task of their own: nothing waits for them but
    /// [`Notify::flush`].
    pub fn spawn(&self, events: Vec<Event>) {
        if self.is_empty() || events.is_empty() {
            return;
        }
        let me = self.clone();
        let task = tokio::spawn(async move { me.send_all(&events).await });
        let mut sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        sending.retain(|t| !t.is_finished());
        sending.push(task);
    }

    /// Wait for the notifications still being sent, at most [`FLUSH_LIMIT`] (a one-shot
    /// run does, before it exits, so that the timer's next run is never held back long).
    pub async fn flush(&self) {
        let tasks: Vec<_> =
            std::mem::take(&mut *self.sending.lock().unwrap_or_else(|e| e.into_inner()));
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(FLUSH_LIMIT, all).await.is_err() {
            tracing::warn!(
                limit = ?FLUSH_LIMIT,
                "notifications still not delivered were dropped; the events are in the store's history"
            );
            for a in aborts {
                a.abort();
            }
        }
    }

    /// Every event to every receiver, in order; failures are logged.
    pub async fn send_all(&self, events: &[Event]) {
        let client = self.url.as_ref().and_then(|_| {
            crate::http_client()
                .timeout(REQUEST_TIMEOUT)
                .connect_timeout(REQUEST_TIMEOUT)
                .build()
                .map_err(|e| tracing::warn!(error = %e, "cannot send notifications"))
                .ok()
        });
        for event in events {
            let json = serde_json::to_vec(event).expect("an event serialises");
            let span = tracing::info_span!("notify", service = %event.service, event = %event.kind);
            let _enter = span.enter();
            if let Some(command) = &self.command
                && let Err(e) = run_command(command, event, &json).await
            {
                tracing::warn!(error = %e, "the notify command failed; the event is in the store's history");
            }
            if let (Some(url), Some(client)) = (&self.url, &client)
                && let Err(e) = self.post(client, url, &json).await
            {
                tracing::warn!(error = %e, "the notification was not delivered; the event is in the store's history");
            }
        }
    }

    async fn post(&self, client: &reqwest::Client, url: &str, json: &[u8]) -> Result<(), String> {
        let mut delays = self.retry_delays.iter();
        // A webhook URL often carries a token: messages name its scheme and host only.
        let shown = reqwest::Url::parse(url).map_or_else(
            |_| "the notify URL".to_owned(),
            |u| format!("{}://{}/…", u.scheme(), u.host_str().unwrap_or("")),
        );
        loop {
            let sent = client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json.to_vec())
                .send()
                .await;
            let (retry, why) = match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => {
                    let s = r.status();
                    (
                        s.is_server_error() || s == reqwest::StatusCode::TOO_MANY_REQUESTS,
                        format!("{shown} answered {s}"),
                    )
                }
                Err(e) => (true, format!("POST {shown}: {}", e.without_url())),
            };
            match delays.next() {
                Some(wait) if retry => {
                    tracing::info!(%why, retry_in = ?wait, "notification not delivered yet");
                    tokio::time::sleep(*wait).await;
                }
                _ => return Err(why),
            }
        }
    }
}

/// `sh -c COMMAND` with the event on stdin, killed after [`COMMAND_TIMEOUT`].
async fn run_command(command: &str, event: &Event, json: &[u8]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("DEPLOYER_EVENT", event.kind.name())
        .env("DEPLOYER_SERVICE", &event.service)
        .env("DEPLOYER_HOST", &event.host)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {command:?}: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let run = async {
        // A command that does not read its stdin is not an error.
        let _ = stdin.write_all(json).await;
        drop(stdin);
        child.wait().await
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, run).await {
        Err(_) => Err(format!(
            "{command:?} was still running after {COMMAND_TIMEOUT:?} and was killed"
        )),
        Ok(Err(e)) => Err(format!("{command:?}: {e}")),
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{command:?} {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploy_manifest::history::EventKind;
    use std::io::{Read, Write};

    fn event() -> Event {
        Event {
            error: Some("health".into()),
            ..Event::new(
                "web-1",
                "api",
                EventKind::RolledBack,
                "2026-11-24T10:00:00Z".into(),
            )
        }
    }

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(Notify::new(None, Some("ftp://x/".into())).is_err());
        assert!(Notify::new(None, Some("not a url".into())).is_err());
        assert!(Notify::new(None, Some("https://hooks.example/x".into())).is_ok());
        assert!(Notify::new(Some("  ".into()), None).unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_command_gets_the_event_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let (json, env) = (dir.path().join("json"), dir.path().join("env"));
        let n = Notify::new(
            Some(format!(
                "cat > {}; echo \"$DEPLOYER_EVENT $DEPLOYER_SERVICE $DEPLOYER_HOST\" > {}",
                json.display(),
                env.display()
            )),
            None,
        )
        .unwrap();
        n.send_all(&[event()]).await;
        let back: Event = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(back, event());
        assert_eq!(
            std::fs::read_to_string(&env).unwrap(),
            "rolledBack api web-1\n"
        );
    }

    /// A receiver that answers 503 twice, then 204: the event arrives on the third try.
    #[tokio::test]
    async fn a_webhook_is_retried_until_it_takes_the_event() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            for status in [
                "503 Service Unavailable",
                "503 Service Unavailable",
                "204 No Content",
            ] {
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Headers, then Content-Length bytes of body.
                loop {
                    let n = conn.read(&mut buf).unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            bodies.push(body.to_owned());
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
            }
            bodies
        });
        let mut n = Notify::new(None, Some(format!("http://127.0.0.1:{port}/hook"))).unwrap();
        n.retry_delays = vec![Duration::from_millis(10); 5];
        n.send_all(&[event()]).await;
        let bodies = server.join().unwrap();
        assert_eq!(bodies.len(), 3);
        for b in bodies {
            assert_eq!(serde_json::from_str::<Event>(&b).unwrap(), event());
        }
    }
}
