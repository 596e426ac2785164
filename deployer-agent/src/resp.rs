//! A small Redis client (RESP2 over TCP): connect with a timeout, send a command as an array
//! of bulk strings, read one reply. Every read and write has a timeout, and a reply is
//! bounded (length, element count, nesting), so a server that hangs or floods cannot hold
//! the agent. Enough for the few commands the app layer needs; not a general client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The largest bulk string accepted in a reply.
pub const MAX_BULK: usize = 1024 * 1024;
/// The most elements accepted in one array reply.
pub const MAX_ELEMENTS: usize = 100_000;
const MAX_DEPTH: usize = 8;
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("cannot reach Redis at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to Redis: {0}")]
    Io(#[from] std::io::Error),
    #[error("Redis sent something that is not RESP: {0}")]
    Protocol(String),
    #[error("Redis refused {command}: {message}")]
    Server { command: String, message: String },
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the null array (e.g. an aborted `EXEC`).
    Array(Option<Vec<Reply>>),
}

/// A command as RESP: an array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn protocol(what: impl Into<String>) -> RespError {
    RespError::Protocol(what.into())
}

fn read_line(r: &mut impl BufRead) -> Result<String, RespError> {
    let mut line = Vec::new();
    r.by_ref()
        .take(MAX_LINE as u64 + 2)
        .read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(protocol("the connection closed"));
    }
    if !line.ends_with(b"\r\n") {
        return Err(protocol("a line without CRLF (or too long)"));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| protocol("a line that is not UTF-8"))
}

fn length(s: &str, max: usize) -> Result<Option<usize>, RespError> {
    let n: i64 = s
        .parse()
        .map_err(|_| protocol(format!("bad length {s:?}")))?;
    match n {
        -1 => Ok(None),
        n if n < 0 => Err(protocol(format!("bad length {n}"))),
        n if n as u64 > max as u64 => Err(protocol(format!("a length of {n} is over {max}"))),
        n => Ok(Some(n as usize)),
    }
}

/// Read one reply.
pub fn parse(r: &mut impl BufRead) -> Result<Reply, RespError> {
    parse_at(r, 0)
}

fn parse_at(r: &mut impl BufRead, depth: usize) -> Result<Reply, RespError> {
    if depth > MAX_DEPTH {
        return Err(protocol("replies nested too deep"));
    }
    let line = read_line(r)?;
    let (kind, rest) = line
        .split_at_checked(1)
        .ok_or_else(|| protocol("an empty line"))?;
    match kind {
        "+" => Ok(Reply::Simple(rest.to_owned())),
        "-" => Ok(Reply::Error(rest.to_owned())),
        ":" => rest
            .parse()
            .map(Reply::Int)
            .map_err(|_| protocol(format!("bad integer {rest:?}"))),
        "$" => match length(rest, MAX_BULK)? {
            None => Ok(Reply::Bulk(None)),
            Some(n) => {
                let mut buf = vec![0; n + 2];
                r.read_exact(&mut buf)?;
                if !buf.ends_with(b"\r\n") {
                    return Err(protocol("a bulk string without CRLF"));
                }
                buf.truncate(n);
                Ok(Reply::Bulk(Some(buf)))
            }
        },
        "*" => match length(rest, MAX_ELEMENTS)? {
            None => Ok(Reply::Array(None)),
            Some(n) => {
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(parse_at(r, depth + 1)?);
                }
                Ok(Reply::Array(Some(items)))
            }
        },
        other => Err(protocol(format!("unknown reply type {other:?}"))),
    }
}

/// A connection to one Redis server.
pub struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    /// Connect to `host:port`, each address tried for at most `timeout`; every later read
    /// and write times out after `timeout` too.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Conn, RespError> {
        let addr = format!("{host}:{port}");
        let connect_err = |source| RespError::Connect {
            addr: addr.clone(),
            source,
        };
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for a in (host, port).to_socket_addrs().map_err(connect_err)? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    stream.set_nodelay(true)?;
                    return Ok(Conn {
                        stream: BufReader::new(stream),
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(connect_err(last))
    }

    /// Send one command and read its reply. An error reply is returned as
    /// [`RespError::Server`].
    pub fn call(&mut self, args: &[&str]) -> Result<Reply, RespError> {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.stream.get_mut().write_all(&encode(&bytes))?;
        match parse(&mut self.stream)? {
            Reply::Error(message) => Err(RespError::Server {
                command: args.first().copied().unwrap_or_default().to_owned(),
                message,
            }),
            reply => Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(bytes: &[u8]) -> Result<Reply, RespError> {
        parse(&mut &bytes[..])
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            encode(&[b"HSETNX", b"deployer:db-index", b"app", b"3"]),
            b"*4\r\n$6\r\nHSETNX\r\n$17\r\ndeployer:db-index\r\n$3\r\napp\r\n$1\r\n3\r\n"
        );
        assert_eq!(encode(&[b"x\r\ny"]), b"*1\r\n$4\r\nx\r\ny\r\n");
    }

    #[test]
    fn replies_parse() {
        assert_eq!(p(b"+OK\r\n").unwrap(), Reply::Simple("OK".into()));
        assert_eq!(p(b"-ERR no\r\n").unwrap(), Reply::Error("ERR no".into()));
        assert_eq!(p(b":-12\r\n").unwrap(), Reply::Int(-12));
        assert_eq!(p(b"$-1\r\n").unwrap(), Reply::Bulk(None));
        assert_eq!(p(b"*-1\r\n").unwrap(), Reply::Array(None));
        assert_eq!(
            p(b"$5\r\na\r\nbc\r\n").unwrap(),
            Reply::Bulk(Some(b"a\r\nbc".to_vec()))
        );
        assert_eq!(
            p(b"*3\r\n$3\r\napp\r\n:1\r\n*1\r\n+QUEUED\r\n").unwrap(),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"app".to_vec())),
                Reply::Int(1),
                Reply::Array(Some(vec![Reply::Simple("QUEUED".into())])),
            ]))
        );
        assert_eq!(p(b"*0\r\n").unwrap(), Reply::Array(Some(vec![])));
    }

    #[test]
    fn bad_or_endless_replies_are_refused() {
        for bad in [
            &b""[..],
            b"+OK",
            b"+OK\n",
            b"?x\r\n",
            b":abc\r\n",
            b"$3\r\nab",
            b"$3\r\nabcd\r\n",
            b"$-2\r\n",
            b"$99999999999\r\n",
            b"*100000000\r\n",
            b"*2\r\n:1\r\n",
        ] {
            assert!(p(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "*1\r\n".repeat(20) + ":1\r\n";
        assert!(p(deep.as_bytes()).is_err());
        let long = format!("+{}\r\n", "x".repeat(MAX_LINE + 10));
        assert!(p(long.as_bytes()).is_err());
    }

    #[test]
    fn a_silent_server_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut conn = Conn::connect("127.0.0.1", port, Duration::from_millis(200)).unwrap();
        let _held = listener.accept().unwrap();
        let e = conn.call(&["PING"]).unwrap_err();
        assert!(matches!(e, RespError::Io(_)), "{e}");
    }
}
