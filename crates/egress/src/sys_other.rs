//! The host's own addresses where no interface list is wired up yet (Windows): the address
//! the host would use to reach the internet, found without sending a packet.

use std::io;
use std::net::{IpAddr, UdpSocket};

/// The host's outbound IPv4 and IPv6 addresses (a `connect` on a UDP socket sends nothing).
pub fn interface_addrs() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for (bind, probe) in [("0.0.0.0:0", "192.0.2.1:9"), ("[::]:0", "[2001:db8::1]:9")] {
        if let Ok(s) = UdpSocket::bind(bind) {
            if s.connect(probe).is_ok() {
                if let Ok(a) = s.local_addr() {
                    out.push(a.ip());
                }
            }
        }
    }
    Ok(out)
}
