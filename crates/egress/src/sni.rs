//! Reads the server name (SNI) out of the first bytes of a TLS connection. Pure and bounded.
//!
//! After a CONNECT the proxy reads what the client sends first, without forwarding it yet.
//! If it is a TLS handshake record, this module reassembles the ClientHello (it may span
//! several records, at most [`MAX_HELLO`] bytes) and returns the `host_name` of its
//! `server_name` extension. Anything malformed is an error, never a panic or an over-read;
//! the parser is property-tested and fuzzed.

/// Largest ClientHello handshake message accepted (post-quantum key shares make them ~2 KiB;
/// 32 KiB leaves room and bounds what the proxy buffers).
pub const MAX_HELLO: usize = 32 * 1024;
/// Largest TLS record payload (RFC 8446 5.1).
const MAX_RECORD: usize = 16 * 1024;
/// Most bytes the proxy buffers while waiting for a whole ClientHello (records included).
pub const MAX_PEEK: usize = MAX_HELLO + 8 * 1024;

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Not a TLS handshake (some other protocol in the tunnel).
    NotTls,
    /// Need at least this many bytes in total before a decision is possible.
    Incomplete(usize),
    /// A complete ClientHello, with its server name if it has one.
    Hello(Option<String>),
}

/// A TLS start that cannot be a valid ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed TLS ClientHello: {0}")]
pub struct Malformed(pub &'static str);

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<usize, Malformed> {
        Ok(usize::from(self.take(1, what)?[0]))
    }
    fn u16(&mut self, what: &'static str) -> Result<usize, Malformed> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let n = self.u8(what)?;
        self.take(n, what)
    }
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let n = self.u16(what)?;
        self.take(n, what)
    }
}

/// Looks at the bytes a client sent so far.
pub fn peek(buf: &[u8]) -> Result<Peek, Malformed> {
    match buf.first() {
        None => return Ok(Peek::Incomplete(1)),
        Some(0x16) => {}
        Some(_) => return Ok(Peek::NotTls),
    }
    // Reassemble the handshake bytes from consecutive handshake records.
    let mut hs: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    let need = |n: usize| {
        if n > MAX_PEEK {
            Err(Malformed("ClientHello spread over too many records"))
        } else {
            Ok(Peek::Incomplete(n))
        }
    };
    loop {
        if buf.len() < pos + 5 {
            return need(pos + 5);
        }
        let rec = &buf[pos..pos + 5];
        if rec[0] != 0x16 {
            return Err(Malformed(
                "non-handshake record before the ClientHello ended",
            ));
        }
        if rec[1] != 3 {
            return Err(Malformed("unknown record version"));
        }
        let len = usize::from(u16::from_be_bytes([rec[3], rec[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(Malformed("bad record length"));
        }
        if buf.len() < pos + 5 + len {
            return need(pos + 5 + len);
        }
        hs.extend_from_slice(&buf[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Err(Malformed("first handshake message is not a ClientHello"));
            }
            let body = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if body > MAX_HELLO {
                return Err(Malformed("ClientHello too large"));
            }
            if hs.len() >= 4 + body {
                return client_hello(&hs[4..4 + body]).map(Peek::Hello);
            }
        }
    }
}

fn client_hello(body: &[u8]) -> Result<Option<String>, Malformed> {
    let mut r = Reader { buf: body };
    r.take(2, "legacy version")?;
    r.take(32, "random")?;
    let sid = r.vec8("session id")?;
    if sid.len() > 32 {
        return Err(Malformed("session id too long"));
    }
    let suites = r.vec16("cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Malformed("cipher suites"));
    }
    if r.vec8("compression methods")?.is_empty() {
        return Err(Malformed("compression methods"));
    }
    if r.buf.is_empty() {
        // No extensions at all (old clients): no server name.
        return Ok(None);
    }
    let mut exts = Reader {
        buf: r.vec16("extensions")?,
    };
    if !r.buf.is_empty() {
        return Err(Malformed("bytes after the extensions"));
    }
    let mut name = None;
    while !exts.buf.is_empty() {
        let kind = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if kind != 0 {
            continue;
        }
        if name.is_some() {
            return Err(Malformed("two server_name extensions"));
        }
        name = Some(server_name(data)?);
    }
    Ok(name.flatten())
}

fn server_name(data: &[u8]) -> Result<Option<String>, Malformed> {
    let mut r = Reader { buf: data };
    let mut list = Reader {
        buf: r.vec16("server name list")?,
    };
    if !r.buf.is_empty() {
        return Err(Malformed("bytes after the server name list"));
    }
    let mut host = None;
    while !list.buf.is_empty() {
        let kind = list.u8("server name type")?;
        let name = list.vec16("server name")?;
        if kind == 0 {
            if host.is_some() {
                return Err(Malformed("two host names in server_name"));
            }
            if name.is_empty() || !name.is_ascii() {
                return Err(Malformed("server name is not an ASCII host name"));
            }
            host = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    /// A real ClientHello from rustls for `name`.
    fn rustls_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_name_from_a_real_hello() {
        let hello = rustls_hello("api.example.com");
        assert_eq!(
            peek(&hello).unwrap(),
            Peek::Hello(Some("api.example.com".into()))
        );
        // Every prefix asks for more, with a growing need.
        for cut in 0..hello.len() {
            match peek(&hello[..cut]).unwrap() {
                Peek::Incomplete(n) => assert!(n > cut && n <= hello.len(), "{cut} {n}"),
                other => panic!("prefix {cut}: {other:?}"),
            }
        }
        // An IP address target sends no server name.
        assert_eq!(peek(&rustls_hello("192.0.2.1")).unwrap(), Peek::Hello(None));
    }

    #[test]
    fn reassembles_a_hello_split_over_records() {
        let hello = rustls_hello("split.example.com");
        let payload = &hello[5..];
        let mut split = Vec::new();
        for part in payload.chunks(40) {
            split.extend_from_slice(&[0x16, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            peek(&split).unwrap(),
            Peek::Hello(Some("split.example.com".into()))
        );
    }

    #[test]
    fn other_protocols_and_garbage() {
        assert_eq!(peek(b"GET / HTTP/1.1\r\n").unwrap(), Peek::NotTls);
        assert_eq!(peek(b"SSH-2.0-x").unwrap(), Peek::NotTls);
        assert_eq!(peek(b"").unwrap(), Peek::Incomplete(1));
        assert!(peek(&[0x16, 3, 1, 0, 0]).is_err());
        assert!(peek(&[0x16, 3, 1, 0xff, 0xff]).is_err());
        assert!(peek(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]).is_err());
        // A declared hello larger than the bound is refused before it is buffered.
        assert!(peek(&[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn duplicate_server_names_are_refused() {
        let hello = rustls_hello("a.example.com");
        // Rebuild the hello with a second server_name extension appended.
        let body_start = 5 + 4;
        let mut body = hello[body_start..].to_vec();
        let sni = {
            let name = b"b.example.com";
            let mut e = vec![0, 0];
            let list_len = 3 + name.len();
            e.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
            e.extend_from_slice(&(list_len as u16).to_be_bytes());
            e.push(0);
            e.extend_from_slice(&(name.len() as u16).to_be_bytes());
            e.extend_from_slice(name);
            e
        };
        // Find the extensions length: walk the fixed fields.
        let mut p = 2 + 32;
        p += 1 + usize::from(body[p]);
        p += 2 + usize::from(u16::from_be_bytes([body[p], body[p + 1]]));
        p += 1 + usize::from(body[p]);
        let ext_len = usize::from(u16::from_be_bytes([body[p], body[p + 1]])) + sni.len();
        body[p..p + 2].copy_from_slice(&(ext_len as u16).to_be_bytes());
        body.extend_from_slice(&sni);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
        rec.push(1);
        rec.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        rec.extend_from_slice(&body);
        let e = peek(&rec).unwrap_err();
        assert!(e.to_string().contains("two server_name"), "{e}");
    }

    proptest! {
        #[test]
        fn never_panics_and_never_asks_for_less(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Peek::Incomplete(n)) = peek(&data) {
                prop_assert!(n > data.len());
                prop_assert!(n <= MAX_PEEK);
            }
        }

        #[test]
        fn mutated_hellos_never_panic(pos in 0usize..300, byte: u8) {
            let mut hello = rustls_hello("m.example.com");
            let i = pos % hello.len();
            hello[i] = byte;
            let _ = peek(&hello);
        }
    }
}
