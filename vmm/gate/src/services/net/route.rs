//! Where a request head goes, by its target: a `CONNECT host:port` opens a
//! tunnel, an absolute `http://` URL is a plain-HTTP request. A path alone
//! (`GET /x`) names nothing on the network; host-side routes the proxy serves
//! itself would match it here, by path, before `net.http` is considered.

use super::head::RequestHead;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `CONNECT host:port`: `net.connect`.
    Connect { host: url::Host<String>, port: u16 },
    /// An absolute `http://` URL: `net.http`.
    Http(url::Url),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("CONNECT needs host:port, not {0:?}")]
    BadAuthority(String),
    #[error("{0:?} is not an http:// URL: {1}")]
    BadUrl(String, String),
    #[error("https://{0}: send CONNECT for https (this proxy does not speak TLS to the guest)")]
    Https(String),
    #[error("credentials in the URL are not allowed")]
    Credentials,
    #[error(
        "{0:?}: this proxy serves no paths of its own; send an absolute http:// URL or CONNECT"
    )]
    Origin(String),
}

pub fn route(head: &RequestHead) -> Result<Route, RouteError> {
    if head.method == "CONNECT" {
        let (host, port) = authority(&head.target)?;
        return Ok(Route::Connect { host, port });
    }
    let t = &head.target;
    if t.starts_with('/') {
        return Err(RouteError::Origin(t.chars().take(200).collect()));
    }
    let mut url = url::Url::parse(t)
        .map_err(|e| RouteError::BadUrl(t.chars().take(200).collect(), e.to_string()))?;
    // A fragment never reaches a server: the policy decides on what does.
    url.set_fragment(None);
    match url.scheme() {
        "http" => {}
        "https" => return Err(RouteError::Https(url.host_str().unwrap_or_default().into())),
        s => {
            return Err(RouteError::BadUrl(
                t.chars().take(200).collect(),
                format!("scheme {s:?}"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(RouteError::BadUrl(
            t.chars().take(200).collect(),
            "no host".into(),
        ));
    }
    // `user:pass@` in a URL is a way to hide the real host from a reader.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(RouteError::Credentials);
    }
    Ok(Route::Http(url))
}

/// `host:port` of a CONNECT, the host normalised as in a URL (so `2130706433`
/// and `0177.0.0.1` are the address they spell, and a name is lowercased).
fn authority(t: &str) -> Result<(url::Host<String>, u16), RouteError> {
    let bad = || RouteError::BadAuthority(t.chars().take(200).collect());
    if t.contains(['/', '@', '?', '#', '\\']) {
        return Err(bad());
    }
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    let host = url::Host::parse(host).map_err(|_| bad())?;
    if let url::Host::Domain(d) = &host {
        if d.is_empty() {
            return Err(bad());
        }
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::net::head::parse_request;

    fn r(line: &str) -> Result<Route, RouteError> {
        route(&parse_request(format!("{line} HTTP/1.1\r\n\r\n").as_bytes()).unwrap())
    }

    #[test]
    fn targets_are_routed() {
        assert_eq!(
            r("CONNECT Example.COM:443").unwrap(),
            Route::Connect {
                host: url::Host::Domain("example.com".into()),
                port: 443
            }
        );
        assert_eq!(
            r("CONNECT 2130706433:80").unwrap(),
            Route::Connect {
                host: url::Host::Ipv4("127.0.0.1".parse().unwrap()),
                port: 80
            }
        );
        assert!(matches!(
            r("CONNECT [::1]:22").unwrap(),
            Route::Connect {
                host: url::Host::Ipv6(_),
                port: 22
            }
        ));
        for bad in [
            "CONNECT a.example",
            "CONNECT a.example:0",
            "CONNECT :80",
            "CONNECT a@b:80",
            "CONNECT a:80/x",
        ] {
            assert!(r(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            r("GET http://a.example/x").unwrap(),
            Route::Http(_)
        ));
        assert!(matches!(r("GET /x"), Err(RouteError::Origin(_))));
        assert!(matches!(
            r("GET https://a.example/"),
            Err(RouteError::Https(_))
        ));
        assert!(matches!(
            r("GET http://u:p@a.example/"),
            Err(RouteError::Credentials)
        ));
        assert!(r("GET ftp://a.example/").is_err());
    }
}
