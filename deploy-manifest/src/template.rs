//! Env templates (seed 001): `${host}`, `${port:<name>}`, `${secret:<name>}`. Expansion is
//! a pure function; what the placeholders resolve to is the caller's business (the agent
//! knows hosts, ports and the secrets directory).

/// A placeholder found in a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder<'a> {
    Host,
    Port(&'a str),
    Secret(&'a str),
}

/// Replace every placeholder in `value` with what `lookup` says. Returns the expanded value
/// and whether a secret went into it; an unterminated or unknown placeholder is an error.
pub fn expand(
    value: &str,
    lookup: &mut dyn FnMut(Placeholder<'_>) -> Result<String, String>,
) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    let mut secret = false;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or("unterminated ${")?;
        let token = &after[..end];
        let placeholder = match token.split_once(':') {
            None if token == "host" => Placeholder::Host,
            Some(("port", name)) if !name.is_empty() => Placeholder::Port(name),
            Some(("secret", name)) if !name.is_empty() => {
                secret = true;
                Placeholder::Secret(name)
            }
            _ => return Err(format!("unknown placeholder ${{{token}}}")),
        };
        out.push_str(&lookup(placeholder)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(p: Placeholder<'_>) -> Result<String, String> {
        match p {
            Placeholder::Host => Ok("10.0.0.1".into()),
            Placeholder::Port("http") => Ok("9200".into()),
            Placeholder::Port(n) => Err(format!("unknown port {n:?}")),
            Placeholder::Secret(n) => Ok(format!("<{n}>")),
        }
    }

    #[test]
    fn expands_and_reports_secrets() {
        let e = |v: &str| expand(v, &mut fixed);
        assert_eq!(
            e("http://${host}:${port:http}/x"),
            Ok(("http://10.0.0.1:9200/x".into(), false))
        );
        assert_eq!(e("k=${secret:key}"), Ok(("k=<key>".into(), true)));
        assert_eq!(
            e("no templates $HOME {x}"),
            Ok(("no templates $HOME {x}".into(), false))
        );
        for bad in [
            "${",
            "${host",
            "${nope}",
            "${port:}",
            "${port:grpc}",
            "${secret:}",
        ] {
            assert!(e(bad).is_err(), "{bad}");
        }
    }
}
