//! What the app is configured with beyond the capsules: the preview domain and port (public URLs
//! are `http(s)://<host label>.<preview domain>:<port>/`), TLS, and the preview proxy's bounds.

use std::time::Duration;

use capsules_core::{Error, Result};

/// Longest wait of a preview request for a capsule's port to accept (waking included).
pub const DEFAULT_PREVIEW_HOLD: Duration = Duration::from_secs(30);
/// How often a long preview stream reports its traffic (and so its activity).
pub const DEFAULT_TRAFFIC_FLUSH: Duration = Duration::from_secs(2);

/// The app's settings; [`Default`] is what `capsules_server::app` uses.
///
/// ```
/// use capsules_server::ServerConfig;
/// let cfg = ServerConfig::default().with_preview_domain("preview.example.test")?.with_public_port(8443);
/// assert_eq!(cfg.href("web-1-abcdefgh"), "http://web-1-abcdefgh.preview.example.test:8443/");
/// # Ok::<(), capsules_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ServerConfig {
    preview_domain: String,
    public_port: Option<u16>,
    tls: bool,
    preview_hold: Duration,
    traffic_flush: Duration,
    console_dir: std::path::PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            preview_domain: "localhost".to_owned(),
            public_port: None,
            tls: false,
            preview_hold: DEFAULT_PREVIEW_HOLD,
            traffic_flush: DEFAULT_TRAFFIC_FLUSH,
            console_dir: crate::webconsole::default_dir(),
        }
    }
}

impl ServerConfig {
    /// The domain public URLs live under (default `localhost`): a DNS name of labels of
    /// `a-z 0-9 -`, without a port.
    pub fn with_preview_domain(mut self, domain: &str) -> Result<Self> {
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        let ok_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if d.is_empty() || d.len() > 190 || !d.split('.').all(ok_label) {
            return Err(Error::invalid_input(format!(
                "preview domain {domain:?} is not a DNS name (labels of a-z, 0-9 and -, separated by dots, \
                 no port; e.g. localhost or preview.example.com)"
            )));
        }
        self.preview_domain = d;
        Ok(self)
    }

    /// The port public URLs name (the server's own port). Unset, a URL names the port the API
    /// request that shows it came to.
    pub fn with_public_port(mut self, port: u16) -> Self {
        self.public_port = Some(port);
        self
    }

    /// Served over TLS: URLs are `https://` and the preview cookie is `Secure`.
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// How long a preview request waits for the capsule's port to accept (default 30 s; 1 s to
    /// 10 min), waking a sleeping capsule included.
    pub fn with_preview_hold(mut self, hold: Duration) -> Result<Self> {
        if hold < Duration::from_secs(1) || hold > Duration::from_secs(600) {
            return Err(Error::invalid_input(format!(
                "the preview hold must be 1 s to 600 s, not {hold:?}"
            )));
        }
        self.preview_hold = hold;
        Ok(self)
    }

    /// How often long preview streams report traffic (default 2 s; 10 ms to 60 s).
    pub fn with_traffic_flush(mut self, every: Duration) -> Result<Self> {
        if every < Duration::from_millis(10) || every > Duration::from_secs(60) {
            return Err(Error::invalid_input(format!(
                "the traffic flush interval must be 10 ms to 60 s, not {every:?}"
            )));
        }
        self.traffic_flush = every;
        Ok(self)
    }

    /// Where the built web console is (`index.html` and `assets/`), served under `/console/`
    /// (default [`webconsole::default_dir`](crate::webconsole::default_dir)). A directory without
    /// a built console is not an error: `/console/` then says how to build it.
    pub fn with_console_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.console_dir = dir.into();
        self
    }

    pub fn console_dir(&self) -> &std::path::Path {
        &self.console_dir
    }

    pub fn preview_domain(&self) -> &str {
        &self.preview_domain
    }
    pub fn public_port(&self) -> Option<u16> {
        self.public_port
    }
    pub fn tls(&self) -> bool {
        self.tls
    }
    pub fn preview_hold(&self) -> Duration {
        self.preview_hold
    }
    pub fn traffic_flush(&self) -> Duration {
        self.traffic_flush
    }

    /// The absolute URL of `host_label`: `http(s)://<label>.<domain>:<port>/` (the port of
    /// [`with_public_port`](Self::with_public_port), else that of the API request being answered,
    /// else none: the scheme's default).
    pub fn href(&self, host_label: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let port = self.public_port.or_else(crate::request_port);
        match port {
            Some(p) => format!("{scheme}://{host_label}.{}:{p}/", self.preview_domain),
            None => format!("{scheme}://{host_label}.{}/", self.preview_domain),
        }
    }

    /// The host label of a `Host` header value under the preview domain (`label.domain[:port]`),
    /// or `None` for any other host (the API's). The label is lowercased; it may be empty or hold
    /// dots, which no capsule's label does (the proxy answers 404).
    pub fn host_label(&self, host: &str) -> Option<String> {
        let host = strip_port(host.trim()).trim_end_matches('.').to_ascii_lowercase();
        let label = host.strip_suffix(self.preview_domain.as_str())?.strip_suffix('.')?;
        Some(label.to_owned())
    }
}

/// `host:port` → `host`; `[v6]:port` → `[v6]`.
pub(crate) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The port of a `Host` header value, if it names one.
pub(crate) fn host_port(host: &str) -> Option<u16> {
    let rest = if host.starts_with('[') {
        &host[host.find(']')? + 1..]
    } else {
        host.rfind(':').map_or("", |i| &host[i..])
    };
    rest.strip_prefix(':')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_labels_under_the_domain() {
        let c = ServerConfig::default();
        assert_eq!(
            c.host_label("web-1-abcdefgh.localhost:7878").as_deref(),
            Some("web-1-abcdefgh")
        );
        assert_eq!(
            c.host_label("WEB-1-ABCDEFGH.LocalHost").as_deref(),
            Some("web-1-abcdefgh")
        );
        assert_eq!(c.host_label("a.b.localhost").as_deref(), Some("a.b"));
        assert_eq!(c.host_label("localhost:7878"), None);
        assert_eq!(c.host_label("127.0.0.1:7878"), None);
        assert_eq!(c.host_label("[::1]:7878"), None);
        assert_eq!(c.host_label("notlocalhost:7878"), None);
        let c = c.with_preview_domain("preview.example.com").unwrap();
        assert_eq!(c.host_label("x-1.preview.example.com").as_deref(), Some("x-1"));
        assert_eq!(c.host_label("x-1.example.com"), None);
        assert!(ServerConfig::default().with_preview_domain("bad domain").is_err());
        assert!(ServerConfig::default().with_preview_domain("localhost:80").is_err());
        assert!(ServerConfig::default().with_preview_domain("").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(host_port("a.localhost:7878"), Some(7878));
        assert_eq!(host_port("[::1]:80"), Some(80));
        assert_eq!(host_port("localhost"), None);
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        let c = ServerConfig::default().with_public_port(9).with_tls(true);
        assert_eq!(c.href("l"), "https://l.localhost:9/");
    }
}
