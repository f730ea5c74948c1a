//! The kernel command-line contract between the host backend and the agent.
//!
//! The host puts `vmcp.*` parameters on the kernel command line; the agent reads them from
//! `/proc/cmdline` (the kernel does not pass dotted parameters to `/init`). Parsing is pure
//! and runs on every platform so that host code and tests can use it too.
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `vmcp.token=<string>` | echoed in the hello so the host knows who connected | empty |
//! | `vmcp.token_fw_cfg=1` | read the token from QEMU's fw_cfg file `opt/vmcp/token` instead (kept off the command line, which every local user on the host can read) | `0` |
//! | `vmcp.channel=virtio-serial:<name>` | the virtio-serial port whose name is `<name>` | `virtio-serial:vmcp.agent` |
//! | `vmcp.channel=vsock:<port>` | connect to the host (CID 2) on vsock `<port>` | |
//! | `vmcp.channel=serial:<dev>` | a tty such as `/dev/hvc0` or `/dev/ttyS1`, set to raw mode | |
//! | `vmcp.rootfs=<dev>` | block device to mount as the root of every process, e.g. `/dev/vda` | none |
//! | `vmcp.rootfs_ro=1` | mount it read-only (`0`: read-write) | `0` |
//! | `vmcp.rootfs_fstype=<type>` | its filesystem type | `ext4` |
//! | `vmcp.image=<dev>` | block device of a read-only image: `/` becomes an overlayfs of it and a writable layer | none |
//! | `vmcp.scratch=<dev>` | ext4 device holding the writable layer (without it: tmpfs) | none |
//! | `vmcp.share=<dev>:<path>:<ro\|rw>` | a host directory copied into an ext4 disk, mounted at `<path>` (read-only, or under a tmpfs writable layer whose changes the host copies back); repeatable | none |
//! | `vmcp.user=<uid>:<gid>` | default user and group of processes | `0:0` |
//! | `vmcp.debug=1` | print boot timings and each request to the console | `0` |
//! | `vmcp.net=<a.b.c.d>/<prefix>` | bring up the first Ethernet interface with this address | none |
//! | `vmcp.gw=<a.b.c.d>` | default route via this gateway (only with `vmcp.net`) | none |
//! | `vmcp.dns=<a.b.c.d>` | `/etc/resolv.conf` names this resolver (only with `vmcp.net`) | none |
//! | `vmcp.proxy=<a.b.c.d>:<port>` | set `HTTP_PROXY`/`HTTPS_PROXY` (and lower-case forms) to `http://<a.b.c.d>:<port>` and `NO_PROXY=localhost,127.0.0.1,::1` for every process | none |
//!
//! Values may be double-quoted (`vmcp.token="a b"`). Unknown `vmcp.*` keys are reported as
//! warnings (printed to the console) but do not stop the boot, so an older agent still boots
//! with a newer host.

use std::fmt;

/// Port name used when `vmcp.channel` is absent.
pub const DEFAULT_PORT_NAME: &str = "vmcp.agent";
/// Host CID a vsock channel connects to.
pub const HOST_CID: u32 = 2;

/// Where the agent finds its channel to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelSpec {
    /// A virtio-serial port with this name (`/sys/class/virtio-ports/*/name`).
    VirtioSerial {
        /// Port name.
        name: String,
    },
    /// An `AF_VSOCK` stream to the host.
    Vsock {
        /// Context id to connect to (the host is 2).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A tty device, switched to raw mode.
    Serial {
        /// Device path.
        path: String,
    },
}

impl fmt::Display for ChannelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelSpec::VirtioSerial { name } => write!(f, "virtio-serial:{name}"),
            ChannelSpec::Vsock { cid, port } if *cid == HOST_CID => write!(f, "vsock:{port}"),
            ChannelSpec::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            ChannelSpec::Serial { path } => write!(f, "serial:{path}"),
        }
    }
}

/// A block device to mount as the processes' root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RootfsSpec {
    /// Device path, e.g. `/dev/vda`.
    pub device: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// A read-only image under a writable layer, mounted as `/` with overlayfs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageSpec {
    /// Device of the image (ext4, mounted read-only).
    pub device: String,
    /// Device of the writable layer (ext4); tmpfs when `None`.
    pub scratch: Option<String>,
}

/// A static IPv4 configuration of the guest's network interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetSpec {
    /// Interface address.
    pub addr: std::net::Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Resolver written to `/etc/resolv.conf`.
    pub dns: Option<std::net::Ipv4Addr>,
}

/// A host directory shared into the guest as an ext4 disk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShareSpec {
    /// Device of the copy (attached read-only by the host).
    pub device: String,
    /// Where it appears in the guest (absolute).
    pub path: String,
    /// Writable through a tmpfs layer whose changes the host copies back.
    pub writable: bool,
}

/// Most shares one VM takes.
pub const MAX_SHARES: usize = 8;

/// Everything the agent takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BootConfig {
    /// Token echoed in the hello.
    pub token: String,
    /// The token is in fw_cfg (`opt/vmcp/token`), not on the command line.
    pub token_fw_cfg: bool,
    /// The channel to the host.
    pub channel: ChannelSpec,
    /// Root filesystem to mount, if any.
    pub rootfs: Option<RootfsSpec>,
    /// Image with a writable layer to mount as `/`, if any.
    pub image: Option<ImageSpec>,
    /// Default uid and gid of processes.
    pub user: Option<(u32, u32)>,
    /// Host directories shared in, in order.
    pub shares: Vec<ShareSpec>,
    /// Verbose console output.
    pub debug: bool,
    /// Static network configuration, if the VM has a network card.
    pub net: Option<NetSpec>,
    /// The host's egress proxy, `addr:port`, exported to every process.
    pub proxy: Option<std::net::SocketAddrV4>,
    /// Problems that did not stop parsing (unknown keys), for the console.
    pub warnings: Vec<String>,
}

/// A kernel command line the agent cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CmdlineError {
    /// `vmcp.channel` has an unknown kind or a bad argument.
    #[error(
        "bad vmcp.channel={0:?}: expected virtio-serial:<name>, vsock:<port> or serial:<device>"
    )]
    Channel(String),
    /// A boolean parameter is neither `0` nor `1`.
    #[error("bad {key}={value:?}: expected 0 or 1")]
    Bool {
        /// Parameter.
        key: String,
        /// Its value.
        value: String,
    },
    /// A parameter that needs a value has an empty one.
    #[error("{0} needs a value")]
    Empty(String),
    /// `vmcp.user` is not `<uid>:<gid>`.
    #[error("bad vmcp.user={0:?}: expected <uid>:<gid>")]
    User(String),
    /// `vmcp.share` is not `<dev>:<path>:<ro|rw>`, or there are too many.
    #[error(
        "bad vmcp.share={0:?}: expected <device>:<absolute path>:<ro|rw>, at most {MAX_SHARES}"
    )]
    Share(String),
    /// `vmcp.rootfs` and `vmcp.image` both given.
    #[error("vmcp.rootfs and vmcp.image exclude each other")]
    RootfsAndImage,
    /// A network parameter is malformed.
    #[error("bad {key}={value:?}: expected {expected}")]
    Net {
        /// Parameter.
        key: String,
        /// Its value.
        value: String,
        /// What it should look like.
        expected: &'static str,
    },
    /// A device path is not absolute.
    #[error("bad {key}={value:?}: expected an absolute device path such as /dev/vda")]
    Path {
        /// Parameter.
        key: String,
        /// Its value.
        value: String,
    },
}

/// Splits a kernel command line into words, honouring double quotes like the kernel does.
pub fn split_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            c => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(cur);
    }
    words
}

fn parse_bool(key: &str, value: &str) -> Result<bool, CmdlineError> {
    match value {
        "1" | "" => Ok(true),
        "0" => Ok(false),
        _ => Err(CmdlineError::Bool {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

/// Parses a `vmcp.channel` value.
pub fn parse_channel(value: &str) -> Result<ChannelSpec, CmdlineError> {
    let bad = || CmdlineError::Channel(value.to_string());
    let (kind, arg) = value.split_once(':').ok_or_else(bad)?;
    match kind {
        "virtio-serial" if !arg.is_empty() => Ok(ChannelSpec::VirtioSerial {
            name: arg.to_string(),
        }),
        "vsock" => {
            let (cid, port) = match arg.split_once(':') {
                Some((cid, port)) => (cid.parse().map_err(|_| bad())?, port),
                None => (HOST_CID, arg),
            };
            let port = port.parse().map_err(|_| bad())?;
            Ok(ChannelSpec::Vsock { cid, port })
        }
        "serial" if arg.starts_with('/') => Ok(ChannelSpec::Serial {
            path: arg.to_string(),
        }),
        _ => Err(bad()),
    }
}

/// Parses the whole kernel command line (the contents of `/proc/cmdline`).
pub fn parse_cmdline(cmdline: &str) -> Result<BootConfig, CmdlineError> {
    let mut cfg = BootConfig {
        token: String::new(),
        token_fw_cfg: false,
        channel: ChannelSpec::VirtioSerial {
            name: DEFAULT_PORT_NAME.to_string(),
        },
        rootfs: None,
        image: None,
        user: None,
        shares: Vec::new(),
        debug: false,
        net: None,
        proxy: None,
        warnings: Vec::new(),
    };
    let mut image_dev = None;
    let mut scratch_dev = None;
    let abs = |key: &str, value: &str| -> Result<String, CmdlineError> {
        if value.starts_with('/') {
            Ok(value.to_string())
        } else {
            Err(CmdlineError::Path {
                key: key.into(),
                value: value.to_string(),
            })
        }
    };
    let mut gateway = None;
    let mut dns = None;
    let mut rootfs_dev = None;
    let mut fstype = "ext4".to_string();
    let mut read_only = false;
    for word in split_words(cmdline) {
        let Some(rest) = word.strip_prefix("vmcp.") else {
            continue;
        };
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        match key {
            "token" => cfg.token = value.to_string(),
            "token_fw_cfg" => cfg.token_fw_cfg = parse_bool("vmcp.token_fw_cfg", value)?,
            "channel" => cfg.channel = parse_channel(value)?,
            "rootfs" => {
                if !value.starts_with('/') {
                    return Err(CmdlineError::Path {
                        key: "vmcp.rootfs".into(),
                        value: value.to_string(),
                    });
                }
                rootfs_dev = Some(value.to_string());
            }
            "rootfs_ro" => read_only = parse_bool("vmcp.rootfs_ro", value)?,
            "rootfs_fstype" => {
                if value.is_empty() {
                    return Err(CmdlineError::Empty("vmcp.rootfs_fstype".into()));
                }
                fstype = value.to_string();
            }
            "image" => image_dev = Some(abs("vmcp.image", value)?),
            "share" => {
                let bad = || CmdlineError::Share(value.to_string());
                let (dev, rest) = value.split_once(':').ok_or_else(bad)?;
                let (path, mode) = rest.rsplit_once(':').ok_or_else(bad)?;
                let writable = match mode {
                    "ro" => false,
                    "rw" => true,
                    _ => return Err(bad()),
                };
                let path_ok =
                    path.starts_with('/') && path.len() > 1 && !path.split('/').any(|c| c == "..");
                if !dev.starts_with('/') || !path_ok || cfg.shares.len() >= MAX_SHARES {
                    return Err(bad());
                }
                cfg.shares.push(ShareSpec {
                    device: dev.to_string(),
                    path: path.to_string(),
                    writable,
                });
            }
            "scratch" => scratch_dev = Some(abs("vmcp.scratch", value)?),
            "user" => {
                let bad = || CmdlineError::User(value.to_string());
                let (u, g) = value.split_once(':').ok_or_else(bad)?;
                cfg.user = Some((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?));
            }
            "debug" => cfg.debug = parse_bool("vmcp.debug", value)?,
            "net" => {
                let bad = || CmdlineError::Net {
                    key: "vmcp.net".into(),
                    value: value.to_string(),
                    expected: "an IPv4 address and prefix such as 10.0.2.15/24",
                };
                let (a, p) = value.split_once('/').ok_or_else(bad)?;
                let addr = a.parse().map_err(|_| bad())?;
                let prefix: u8 = p.parse().map_err(|_| bad())?;
                if prefix == 0 || prefix > 30 {
                    return Err(bad());
                }
                cfg.net = Some(NetSpec {
                    addr,
                    prefix,
                    gateway: None,
                    dns: None,
                });
            }
            "gw" => {
                gateway = Some(value.parse().map_err(|_| CmdlineError::Net {
                    key: "vmcp.gw".into(),
                    value: value.to_string(),
                    expected: "an IPv4 address such as 10.0.2.2",
                })?);
            }
            "dns" => {
                dns = Some(value.parse().map_err(|_| CmdlineError::Net {
                    key: "vmcp.dns".into(),
                    value: value.to_string(),
                    expected: "an IPv4 address such as 10.0.2.3",
                })?);
            }
            "proxy" => {
                cfg.proxy = Some(value.parse().map_err(|_| CmdlineError::Net {
                    key: "vmcp.proxy".into(),
                    value: value.to_string(),
                    expected: "an IPv4 address and port such as 10.0.2.100:3128",
                })?);
            }
            _ => cfg
                .warnings
                .push(format!("unknown kernel parameter vmcp.{key} ignored")),
        }
    }
    if rootfs_dev.is_some() && image_dev.is_some() {
        return Err(CmdlineError::RootfsAndImage);
    }
    if let Some(net) = cfg.net.as_mut() {
        net.gateway = gateway;
        net.dns = dns;
    }
    cfg.rootfs = rootfs_dev.map(|device| RootfsSpec {
        device,
        fstype,
        read_only,
    });
    cfg.image = image_dev.map(|device| ImageSpec {
        device,
        scratch: scratch_dev,
    });
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_nothing_given() {
        let cfg = parse_cmdline("console=ttyS0 quiet panic=-1").unwrap();
        assert_eq!(cfg.token, "");
        assert_eq!(
            cfg.channel,
            ChannelSpec::VirtioSerial {
                name: "vmcp.agent".into()
            }
        );
        assert_eq!(cfg.rootfs, None);
        assert!(!cfg.debug);
        assert!(cfg.warnings.is_empty());
    }

    #[test]
    fn full_contract() {
        let cfg = parse_cmdline(
            "quiet vmcp.token=abc123 vmcp.channel=vsock:1024 vmcp.rootfs=/dev/vda \
             vmcp.rootfs_ro=1 vmcp.rootfs_fstype=ext2 vmcp.debug=1\n",
        )
        .unwrap();
        assert_eq!(cfg.token, "abc123");
        assert!(!cfg.token_fw_cfg);
        let fw = parse_cmdline("quiet vmcp.token_fw_cfg=1").unwrap();
        assert!(fw.token_fw_cfg && fw.warnings.is_empty());
        assert!(parse_cmdline("vmcp.token_fw_cfg=yes").is_err());
        assert_eq!(cfg.channel, ChannelSpec::Vsock { cid: 2, port: 1024 });
        assert_eq!(
            cfg.rootfs,
            Some(RootfsSpec {
                device: "/dev/vda".into(),
                fstype: "ext2".into(),
                read_only: true
            })
        );
        assert!(cfg.debug);
    }

    #[test]
    fn rootfs_defaults_to_ext4_read_write() {
        let cfg = parse_cmdline("vmcp.rootfs=/dev/vdb").unwrap();
        let r = cfg.rootfs.unwrap();
        assert_eq!((r.fstype.as_str(), r.read_only), ("ext4", false));
        // Flags without a device mount nothing.
        assert_eq!(parse_cmdline("vmcp.rootfs_ro=1").unwrap().rootfs, None);
    }

    #[test]
    fn image_scratch_and_user() {
        let cfg =
            parse_cmdline("vmcp.image=/dev/vda vmcp.scratch=/dev/vdb vmcp.user=1000:100").unwrap();
        assert_eq!(
            cfg.image,
            Some(ImageSpec {
                device: "/dev/vda".into(),
                scratch: Some("/dev/vdb".into())
            })
        );
        assert_eq!(cfg.user, Some((1000, 100)));
        assert_eq!(
            parse_cmdline("vmcp.image=/dev/vdc")
                .unwrap()
                .image
                .unwrap()
                .scratch,
            None
        );
        for bad in ["vmcp.user=1000", "vmcp.user=a:b", "vmcp.user=-1:0"] {
            assert!(
                matches!(parse_cmdline(bad), Err(CmdlineError::User(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_cmdline("vmcp.image=vda"),
            Err(CmdlineError::Path { .. })
        ));
        assert!(matches!(
            parse_cmdline("vmcp.image=/dev/vda vmcp.rootfs=/dev/vdb"),
            Err(CmdlineError::RootfsAndImage)
        ));
    }

    #[test]
    fn shares() {
        let cfg =
            parse_cmdline("vmcp.share=/dev/vdc:/work:rw vmcp.share=/dev/vdd:/ref/data:ro").unwrap();
        assert_eq!(
            cfg.shares,
            [
                ShareSpec {
                    device: "/dev/vdc".into(),
                    path: "/work".into(),
                    writable: true
                },
                ShareSpec {
                    device: "/dev/vdd".into(),
                    path: "/ref/data".into(),
                    writable: false
                }
            ]
        );
        for bad in [
            "vmcp.share=/dev/vdc:/work",
            "vmcp.share=/dev/vdc:/work:rx",
            "vmcp.share=vdc:/work:ro",
            "vmcp.share=/dev/vdc:work:ro",
            "vmcp.share=/dev/vdc:/:ro",
            "vmcp.share=/dev/vdc:/a/../b:ro",
        ] {
            assert!(
                matches!(parse_cmdline(bad), Err(CmdlineError::Share(_))),
                "{bad}"
            );
        }
        let many = (0..=MAX_SHARES)
            .map(|i| format!("vmcp.share=/dev/vd{i}:/s{i}:ro"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(matches!(parse_cmdline(&many), Err(CmdlineError::Share(_))));
    }

    #[test]
    fn channels() {
        assert_eq!(
            parse_channel("serial:/dev/hvc0").unwrap(),
            ChannelSpec::Serial {
                path: "/dev/hvc0".into()
            }
        );
        assert_eq!(
            parse_channel("virtio-serial:ch0").unwrap(),
            ChannelSpec::VirtioSerial { name: "ch0".into() }
        );
        assert_eq!(
            parse_channel("vsock:3:99").unwrap(),
            ChannelSpec::Vsock { cid: 3, port: 99 }
        );
        for bad in [
            "",
            "vsock",
            "vsock:x",
            "vsock:-1",
            "serial:hvc0",
            "virtio-serial:",
            "pipe:/x",
        ] {
            let err = parse_channel(bad).unwrap_err();
            assert!(err.to_string().contains("vmcp.channel"), "{err}");
        }
        for spec in [
            "virtio-serial:a.b",
            "vsock:5",
            "vsock:7:5",
            "serial:/dev/ttyS1",
        ] {
            assert_eq!(parse_channel(spec).unwrap().to_string(), spec);
        }
    }

    #[test]
    fn quotes_and_bad_values() {
        let cfg = parse_cmdline(r#"a "vmcp.token=x y" vmcp.token="p q""#).unwrap();
        assert_eq!(cfg.token, "p q");
        assert_eq!(split_words(r#" a  "b c"d "" e"#), ["a", "b cd", "", "e"]);
        assert!(matches!(
            parse_cmdline("vmcp.rootfs_ro=yes"),
            Err(CmdlineError::Bool { .. })
        ));
        assert!(matches!(
            parse_cmdline("vmcp.rootfs=vda"),
            Err(CmdlineError::Path { .. })
        ));
        assert!(matches!(
            parse_cmdline("vmcp.rootfs_fstype="),
            Err(CmdlineError::Empty(_))
        ));
        let cfg = parse_cmdline("vmcp.frobnicate=1 vmcp.debug").unwrap();
        assert!(cfg.debug);
        assert_eq!(cfg.warnings.len(), 1);
        assert!(cfg.warnings[0].contains("vmcp.frobnicate"));
    }

    #[test]
    fn network_parameters() {
        let cfg =
            parse_cmdline("vmcp.net=10.0.2.15/24 vmcp.gw=10.0.2.2 vmcp.proxy=10.0.2.100:3128")
                .unwrap();
        let net = cfg.net.unwrap();
        assert_eq!(net.addr.to_string(), "10.0.2.15");
        assert_eq!(net.prefix, 24);
        assert_eq!(net.gateway.unwrap().to_string(), "10.0.2.2");
        assert_eq!(net.dns, None);
        assert_eq!(cfg.proxy.unwrap().to_string(), "10.0.2.100:3128");
        let nat = parse_cmdline("vmcp.dns=10.0.2.3 vmcp.net=10.0.2.15/24").unwrap();
        assert_eq!(nat.net.unwrap().dns.unwrap().to_string(), "10.0.2.3");
        let plain = parse_cmdline("quiet").unwrap();
        assert_eq!((plain.net, plain.proxy), (None, None));
        for bad in [
            "vmcp.net=10.0.2.15",
            "vmcp.net=10.0.2.15/0",
            "vmcp.net=10.0.2.15/33",
            "vmcp.net=x/24",
            "vmcp.gw=nope",
            "vmcp.dns=10.0.2",
            "vmcp.proxy=10.0.2.100",
            "vmcp.proxy=[::1]:80",
        ] {
            let e = parse_cmdline(bad).unwrap_err().to_string();
            assert!(e.contains(bad.split('=').next().unwrap()), "{e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = parse_cmdline(&s);
        }

        #[test]
        fn token_round_trips(tok in "[A-Za-z0-9_.-]{0,40}") {
            let cfg = parse_cmdline(&format!("quiet vmcp.token={tok} x=y")).unwrap();
            proptest::prop_assert_eq!(cfg.token, tok);
        }
    }
}
