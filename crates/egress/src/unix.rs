//! Unix-socket listener for the proxy (the VM's forward helper connects here).

use std::io;

use tokio::net::{UnixListener, UnixStream};

use crate::proxy::Accept;

impl Accept for UnixListener {
    type Io = UnixStream;
    async fn accept(&mut self) -> io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}
