//! Where a webhook may be sent.
//!
//! An endpoint is an `https://` URL (plain `http://` only when the operator
//! allows it, for tests and closed networks) without credentials in it. Its
//! host, once resolved, must not be a loopback, private, link-local, shared
//! (CGNAT), multicast, unspecified or reserved address — the addresses that
//! reach into the cluster, the node or the cloud's metadata service — unless
//! an allow-list names it. The check runs when a subscription is registered
//! (a clear refusal naming the field) and again on every resolution before
//! connecting, so a name that later resolves inward (DNS rebinding) is
//! refused at delivery too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use url::{Host, Url};

/// The policy a notifier and the subscription API share.
#[derive(Debug, Clone, Default)]
pub struct DestinationPolicy {
    allow_http: bool,
    allowed: Vec<IpNet>,
}

/// Why an endpoint was refused. The text names what is wrong without echoing
/// the URL's query (which may hold a receiver's token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// Not an absolute URL.
    #[error("not an absolute URL")]
    NotAUrl,
    /// A scheme other than https (or http where allowed).
    #[error("the scheme must be https, not {0}")]
    Scheme(String),
    /// `user:password@` in the URL.
    #[error("credentials in the URL are not accepted; authenticate with the signature")]
    Credentials,
    /// A `#fragment`, which HTTP never sends.
    #[error("a fragment is not sent over HTTP; remove it")]
    Fragment,
    /// No host, or a name that does not resolve.
    #[error("the host {0} does not resolve")]
    Unresolvable(String),
    /// An address in a range that reaches inward.
    #[error("{addr} is a {class} address, which webhooks may not reach")]
    Forbidden {
        /// The address refused.
        addr: IpAddr,
        /// Which range it is in.
        class: &'static str,
    },
}

impl DestinationPolicy {
    /// HTTPS only, nothing inward allowed.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Allows plain `http://` endpoints (tests, closed networks).
    pub fn allow_http(mut self, allow: bool) -> Self {
        self.allow_http = allow;
        self
    }

    /// Allows addresses in `nets` even where they would be refused.
    pub fn allow_nets(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.allowed.extend(nets);
        self
    }

    /// Checks an endpoint's text without resolving it: scheme, credentials,
    /// fragment, and the address when the host is an IP literal.
    pub fn check_url(&self, text: &str) -> Result<Url, DestinationError> {
        let url = Url::parse(text).map_err(|_| DestinationError::NotAUrl)?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => return Err(DestinationError::Scheme(other.to_owned())),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(DestinationError::Credentials);
        }
        if url.fragment().is_some() {
            return Err(DestinationError::Fragment);
        }
        match url.host() {
            None => return Err(DestinationError::Unresolvable(String::new())),
            Some(Host::Ipv4(ip)) => self.check_addr(IpAddr::V4(ip))?,
            Some(Host::Ipv6(ip)) => self.check_addr(IpAddr::V6(ip))?,
            Some(Host::Domain(_)) => {}
        }
        Ok(url)
    }

    /// Refuses an address in an inward range unless allow-listed.
    pub fn check_addr(&self, addr: IpAddr) -> Result<(), DestinationError> {
        if self.allowed.iter().any(|net| net.contains(&addr)) {
            return Ok(());
        }
        match inward_class(addr) {
            Some(class) => Err(DestinationError::Forbidden { addr, class }),
            None => Ok(()),
        }
    }

    /// Resolves a checked URL's host and checks every address it resolves to;
    /// one inward address refuses the lot (a name must not straddle).
    pub async fn resolve(&self, url: &Url) -> Result<Vec<SocketAddr>, DestinationError> {
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(443);
        let unresolvable = || DestinationError::Unresolvable(host.to_owned());
        let addrs: Vec<SocketAddr> = match url.host() {
            Some(Host::Ipv4(ip)) => vec![SocketAddr::new(IpAddr::V4(ip), port)],
            Some(Host::Ipv6(ip)) => vec![SocketAddr::new(IpAddr::V6(ip), port)],
            Some(Host::Domain(name)) => {
                tokio::net::lookup_host((name, port)).await.map_err(|_| unresolvable())?.collect()
            }
            None => Vec::new(),
        };
        if addrs.is_empty() {
            return Err(unresolvable());
        }
        for addr in &addrs {
            self.check_addr(addr.ip())?;
        }
        Ok(addrs)
    }
}

/// The inward range `addr` is in, if any.
pub fn inward_class(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        // 169.254.169.254 is the cloud's instance metadata service.
        Some("link-local")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || a >= 240 {
        Some("reserved")
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_class(v4);
    }
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if first & 0xfe00 == 0xfc00 {
        Some("unique local (private)")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64: the embedded IPv4 address decides.
        let [.., hi, lo] = ip.segments();
        v4_class(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &DestinationPolicy, url: &str) -> DestinationError {
        policy.check_url(url).expect_err(url)
    }

    #[test]
    fn https_to_a_public_address_is_accepted_and_everything_inward_is_refused() {
        let policy = DestinationPolicy::strict();
        policy.check_url("https://erp.example.com/hooks/fluxo?token=x").unwrap();
        policy.check_url("https://93.184.216.34:8443/h").unwrap();
        policy.check_url("https://[2606:2800:220:1::1]/h").unwrap();
        for (url, class) in [
            ("https://127.0.0.1/h", "loopback"),
            ("https://127.1.2.3/h", "loopback"),
            ("https://10.0.0.7/h", "private"),
            ("https://172.20.1.1/h", "private"),
            ("https://192.168.1.1/h", "private"),
            ("https://169.254.169.254/latest/meta-data", "link-local"),
            ("https://0.0.0.0/h", "unspecified"),
            ("https://100.64.0.1/h", "shared (carrier-grade NAT)"),
            ("https://224.0.0.1/h", "multicast"),
            ("https://255.255.255.255/h", "reserved"),
            ("https://[::1]/h", "loopback"),
            ("https://[::]/h", "unspecified"),
            ("https://[fd00::1]/h", "unique local (private)"),
            ("https://[fe80::1]/h", "link-local"),
            ("https://[::ffff:10.1.2.3]/h", "private"),
            ("https://[64:ff9b::a9fe:a9fe]/h", "link-local"),
        ] {
            match refused(&policy, url) {
                DestinationError::Forbidden { class: got, .. } => assert_eq!(got, class, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_url_itself_is_checked_before_any_address() {
        let policy = DestinationPolicy::strict();
        assert_eq!(refused(&policy, "http://erp.example.com/h"), DestinationError::Scheme("http".into()));
        assert_eq!(refused(&policy, "ftp://erp.example.com/h"), DestinationError::Scheme("ftp".into()));
        assert_eq!(refused(&policy, "/relative/path"), DestinationError::NotAUrl);
        assert_eq!(refused(&policy, "https://user:pw@erp.example.com/h"), DestinationError::Credentials);
        assert_eq!(refused(&policy, "https://erp.example.com/h#frag"), DestinationError::Fragment);
        let message = refused(&policy, "https://10.0.0.1/h?token=s3cret").to_string();
        assert!(!message.contains("s3cret"), "{message}");
    }

    #[test]
    fn http_and_allow_listed_ranges_open_only_what_they_name() {
        let policy =
            DestinationPolicy::strict().allow_http(true).allow_nets(["127.0.0.0/8".parse().unwrap()]);
        policy.check_url("http://127.0.0.1:9000/h").unwrap();
        policy.check_url("https://127.0.0.1:9000/h").unwrap();
        assert!(matches!(
            refused(&policy, "http://10.0.0.1/h"),
            DestinationError::Forbidden { class: "private", .. }
        ));
        assert!(matches!(
            refused(&policy, "http://[::1]/h"),
            DestinationError::Forbidden { class: "loopback", .. }
        ));
    }

    #[tokio::test]
    async fn a_name_resolving_inward_is_refused_at_resolution() {
        let strict = DestinationPolicy::strict();
        let url = strict.check_url("https://localhost:8443/h").unwrap();
        match strict.resolve(&url).await {
            Err(DestinationError::Forbidden { class: "loopback", .. }) => {}
            other => panic!("localhost: {other:?}"),
        }
        let allowed = DestinationPolicy::strict()
            .allow_nets(["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        let addrs = allowed.resolve(&url).await.unwrap();
        assert!(addrs.iter().all(|a| a.port() == 8443 && a.ip().is_loopback()));
        let unresolvable = strict.check_url("https://name.invalid/h").unwrap();
        assert!(matches!(strict.resolve(&unresolvable).await, Err(DestinationError::Unresolvable(_))));
    }
}
