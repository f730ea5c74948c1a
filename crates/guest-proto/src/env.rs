//! Conventions both sides apply to a guest process's environment.

use std::net::SocketAddrV4;

/// The variables that point a guest process at the VM's egress proxy at `proxy`:
/// `HTTP_PROXY`, `HTTPS_PROXY` (and their lower-case forms) as `http://proxy`, and
/// `NO_PROXY=localhost,127.0.0.1,::1` (the guest's own loopback never goes through it). The
/// agent exports them to every process when the kernel command line names a proxy
/// (`vmcp.proxy=`); a host whose proxy travels over the agent channel sends them with every
/// exec instead, so that the guest's boot state (and a snapshot of it) holds no network
/// setting.
pub fn proxy_env(proxy: SocketAddrV4) -> Vec<(String, String)> {
    let url = format!("http://{proxy}");
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    vec![
        ("HTTP_PROXY".into(), url.clone()),
        ("HTTPS_PROXY".into(), url.clone()),
        ("http_proxy".into(), url.clone()),
        ("https_proxy".into(), url),
        ("NO_PROXY".into(), no_proxy.clone()),
        ("no_proxy".into(), no_proxy),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn proxy_environment() {
        let env = super::proxy_env("10.0.2.100:3128".parse().unwrap());
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HTTPS_PROXY"), Some("http://10.0.2.100:3128"));
        assert_eq!(get("http_proxy"), Some("http://10.0.2.100:3128"));
        assert_eq!(get("NO_PROXY"), Some("localhost,127.0.0.1,::1"));
        assert_eq!(env.len(), 6);
    }
}
