//! `Conn`: a connection's byte stream, holding its place under `--max-connections` (freed
//! when the connection is dropped) and its `ConnState`, through which the watchdog
//! (`watch.rs`) closes it: once killed, reads and writes fail, the HTTP or gRPC server drops
//! the connection, and its descriptor is closed.

use super::watch::ConnState;
use crate::net::ConnGuard;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A guarded connection (plain TCP or TLS).
pub struct Conn<IO> {
    io: IO,
    state: Arc<ConnState>,
    _guard: ConnGuard,
}

impl<IO> Conn<IO> {
    pub(super) fn new(io: IO, state: Arc<ConnState>, guard: ConnGuard) -> Conn<IO> {
        Conn {
            io,
            state,
            _guard: guard,
        }
    }

    fn closed_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connection closed: {}", self.state.kill_reason()),
        )
    }
}

impl<IO> Drop for Conn<IO> {
    fn drop(&mut self) {
        self.state.gone();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.killed() {
            return Poll::Ready(Err(this.closed_error()));
        }
        // Registered before polling, so a kill that lands in between still wakes this read.
        this.state.register_reader(cx.waker());
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.bytes_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.state.killed() {
            return Poll::Ready(Err(this.closed_error()));
        }
        Pin::new(&mut this.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.state.killed() {
            return Poll::Ready(Err(this.closed_error()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// tonic reads the peer's address (and TLS details) through `Connected`; a `Conn` answers as
/// the stream it wraps, so `Request::remote_addr` and the auth audit keep working.
impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Conn<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
