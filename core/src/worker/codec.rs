//! Framing on the control socket: a 4-byte little-endian length, then that many bytes of
//! MessagePack (see `protocol.rs`), with file descriptors carried as `SCM_RIGHTS` on the
//! first byte of a frame.
//!
//! Reads and writes go through `sendmsg`/`recvmsg` (via tokio's `try_io`) because a plain
//! `read` would silently drop descriptors. The sender passes a whole frame to one `sendmsg`
//! with its descriptors, and on a Unix stream socket the kernel delivers descriptors with
//! the first byte of that send and never joins data of a later send into the same read. So
//! descriptors that arrive with a read belong to the last frame that starts in that read;
//! the reader records them against that frame's absolute stream offset.

use bytes::{Buf, Bytes, BytesMut};
use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, sendmsg};
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Largest frame either side accepts. Tensor data never travels in frames (only tiny inline
/// values do), so 16 MiB is far above any legitimate control message and bounds the memory
/// a misbehaving peer can make us allocate.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Most descriptors one frame may carry (one per tensor of an oversized batch). The kernel
/// limit is 253 per message.
pub const MAX_FDS_PER_FRAME: usize = 64;

/// Most descriptors the kernel lets one `sendmsg` carry (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

/// Bytes asked for per `recvmsg`: control frames are small, so one read usually holds several.
const READ_CHUNK: usize = 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")]
    FrameTooLarge { len: usize },
    #[error("{count} descriptors exceed the limit of {MAX_FDS_PER_FRAME} per frame")]
    TooManyFds { count: usize },
    #[error("control socket closed in the middle of a frame ({buffered} bytes buffered)")]
    UnexpectedEof { buffered: usize },
    /// `recvmsg` flagged `MSG_CTRUNC`: descriptors did not fit the control buffer and the
    /// kernel dropped them, so the stream's descriptors can no longer be matched to frames.
    /// (The buffer holds the most one message can carry, so a peer cannot cause this with
    /// descriptors alone; more than `MAX_FDS_PER_FRAME` arrive whole and are `TooManyFds`.)
    #[error("ancillary data was truncated (MSG_CTRUNC); descriptors were lost")]
    FdsTruncated,
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// One received frame: its MessagePack payload and the descriptors that came with it.
#[derive(Debug)]
pub struct Frame {
    pub payload: Bytes,
    pub fds: Vec<OwnedFd>,
}

/// Reading half: owns the receive buffer and descriptors not yet claimed by a frame.
pub struct FrameReader {
    sock: Arc<UnixStream>,
    buf: BytesMut,
    /// Absolute stream offset of `buf[0]`, always a frame boundary.
    base: u64,
    /// Descriptors received, keyed by the absolute offset of the frame they belong to.
    pending_fds: VecDeque<(u64, Vec<OwnedFd>)>,
}

/// Writing half. Cheap to share: each `write_frame` is one logical send.
#[derive(Clone)]
pub struct FrameWriter {
    sock: Arc<UnixStream>,
}

/// Splits a connected stream into a frame reader and writer.
pub fn split(sock: UnixStream) -> (FrameReader, FrameWriter) {
    let sock = Arc::new(sock);
    let reader = FrameReader {
        sock: sock.clone(),
        buf: BytesMut::new(),
        base: 0,
        pending_fds: VecDeque::new(),
    };
    (reader, FrameWriter { sock })
}

/// Prepends the length prefix to a payload.
pub fn frame_bytes(payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(CodecError::FrameTooLarge { len: payload.len() });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Length of the frame at the start of `buf`, if its prefix is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(prefix) as usize)
}

impl FrameReader {
    /// Reads the next frame; `Ok(None)` on a clean end of stream (between frames).
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(Some(frame));
            }
            let read = self.read_more().await?;
            if read == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    buffered => Err(CodecError::UnexpectedEof { buffered }),
                };
            }
        }
    }

    /// Pops a complete frame off the buffer, with its descriptors.
    fn take_frame(&mut self) -> Result<Option<Frame>, CodecError> {
        let Some(len) = frame_len(&self.buf) else {
            return Ok(None);
        };
        if len > MAX_FRAME_BYTES {
            return Err(CodecError::FrameTooLarge { len });
        }
        if self.buf.len() < 4 + len {
            self.buf.reserve(4 + len - self.buf.len());
            return Ok(None);
        }
        let start = self.base;
        self.buf.advance(4);
        let payload = self.buf.split_to(len).freeze();
        self.base += 4 + len as u64;
        // Descriptors recorded for an earlier offset belong to no frame (a peer bug); dropping
        // them closes them.
        while self.pending_fds.front().is_some_and(|(at, _)| *at < start) {
            self.pending_fds.pop_front();
        }
        let fds = match self.pending_fds.front() {
            Some((at, _)) if *at == start => self
                .pending_fds
                .pop_front()
                .map(|(_, f)| f)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok(Some(Frame { payload, fds }))
    }

    /// One `recvmsg` into the buffer; returns the bytes read (0 at end of stream).
    ///
    /// Cancel-safe, and so is `read_frame`: the only await is the readiness wait, and the
    /// buffer grows only between it and the (non-blocking) read, so a read dropped while
    /// waiting leaves the reader as it was. The supervisor polls it in its `select!`.
    async fn read_more(&mut self) -> Result<usize, CodecError> {
        let old_len = self.buf.len();
        let result = loop {
            if let Err(e) = self.sock.readable().await {
                break Err(CodecError::Io(e));
            }
            self.buf.resize(old_len + READ_CHUNK, 0);
            let fd = self.sock.as_raw_fd();
            let target = &mut self.buf[old_len..];
            match self.sock.try_io(Interest::READABLE, || {
                recv_chunk(fd, target).map_err(std::io::Error::from)
            }) {
                Ok(Chunk::Truncated) => break Err(CodecError::FdsTruncated),
                // Closed as they drop; the stream's descriptors cannot be matched to frames any
                // more, so this is as fatal as a truncation.
                Ok(Chunk::Data(_, fds)) if fds.len() > MAX_FDS_PER_FRAME => {
                    break Err(CodecError::TooManyFds { count: fds.len() });
                }
                Ok(Chunk::Data(n, fds)) => break Ok((n, fds)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.buf.truncate(old_len);
                    continue;
                }
                Err(e) => break Err(CodecError::Io(e)),
            }
        };
        match result {
            Ok((n, fds)) => {
                self.buf.truncate(old_len + n);
                if !fds.is_empty() {
                    let at = self.last_frame_start_before(old_len + n);
                    self.pending_fds.push_back((at, fds));
                }
                Ok(n)
            }
            Err(e) => {
                self.buf.truncate(old_len);
                Err(e)
            }
        }
    }

    /// Absolute offset of the last frame that starts before buffer position `end`.
    fn last_frame_start_before(&self, end: usize) -> u64 {
        let mut pos = 0usize;
        loop {
            let next = match frame_len(&self.buf[pos..]) {
                Some(len) => pos.saturating_add(4).saturating_add(len),
                None => return self.base + pos as u64,
            };
            if next >= end {
                return self.base + pos as u64;
            }
            pos = next;
        }
    }
}

/// What one `recvmsg` got.
enum Chunk {
    Data(usize, Vec<OwnedFd>),
    /// The descriptors did not fit the control buffer (`MSG_CTRUNC`); the kernel closed the
    /// rest, and any it did install cannot be found safely.
    Truncated,
}

/// `recvmsg` into `target`, collecting any descriptors (close-on-exec).
fn recv_chunk(fd: RawFd, target: &mut [u8]) -> Result<Chunk, Errno> {
    let mut iov = [IoSliceMut::new(target)];
    // Room for what one sendmsg can carry at most, not just for what a frame may: the excess is
    // then received, counted and closed here rather than truncated by the kernel.
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let msg = recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Ok(Chunk::Truncated);
    }
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in our table; we own them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    Ok(Chunk::Data(msg.bytes, fds))
}

impl FrameWriter {
    /// Writes one frame, attaching `fds` to its first byte.
    pub async fn write_frame(
        &self,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), CodecError> {
        let frame = frame_bytes(payload)?;
        self.write_framed(&frame, fds).await
    }

    /// Writes bytes that are already framed (or the rest of a frame), attaching `fds` to the
    /// first byte, waiting for room in the socket as needed.
    pub async fn write_framed(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), CodecError> {
        if fds.len() > MAX_FDS_PER_FRAME {
            return Err(CodecError::TooManyFds { count: fds.len() });
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        while sent < bytes.len() {
            self.sock.writable().await?;
            let fd = self.sock.as_raw_fd();
            // Descriptors go with the first successful send only.
            let with_fds: &[RawFd] = if sent == 0 { &raw } else { &[] };
            let chunk = &bytes[sent..];
            match self.sock.try_io(Interest::WRITABLE, || {
                send_chunk(fd, chunk, with_fds).map_err(std::io::Error::from)
            }) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(CodecError::Io(e)),
            }
        }
        Ok(())
    }

    /// One non-blocking attempt to send `bytes` (with `fds` on the first byte): how many bytes
    /// went out, 0 when the socket has no room. Lets the sender skip a task hop when the
    /// socket is writable, which it almost always is for control frames.
    pub fn try_send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<usize, CodecError> {
        if fds.len() > MAX_FDS_PER_FRAME {
            return Err(CodecError::TooManyFds { count: fds.len() });
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let fd = self.sock.as_raw_fd();
        match self.sock.try_io(Interest::WRITABLE, || {
            send_chunk(fd, bytes, &raw).map_err(std::io::Error::from)
        }) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(CodecError::Io(e)),
        }
    }
}

impl FrameWriter {
    /// Shuts the socket down both ways: the peer reads end of stream, and so does our reader.
    /// For when a write failed part-way and the stream can no longer be trusted.
    pub fn shutdown(&self) {
        // ENOTCONN: already shut down by the peer; nothing left to do either way.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

fn send_chunk(fd: RawFd, data: &[u8], fds: &[RawFd]) -> Result<usize, Errno> {
    let iov = [IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<UnixAddr>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use tokio::io::AsyncWriteExt;

    fn memfd_with(content: &[u8]) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create(c"codec-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(content).unwrap();
        OwnedFd::from(file)
    }

    fn read_all(fd: OwnedFd) -> Vec<u8> {
        let mut file = std::fs::File::from(fd);
        file.rewind().unwrap();
        let mut out = Vec::new();
        file.read_to_end(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn frames_round_trip_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ra, wa) = split(a);
        let (mut rb, _wb) = split(b);
        for i in 0..100u32 {
            wa.write_frame(&vec![i as u8; i as usize], &[])
                .await
                .unwrap();
        }
        for i in 0..100u32 {
            let f = rb.read_frame().await.unwrap().unwrap();
            assert_eq!(f.payload.as_ref(), vec![i as u8; i as usize].as_slice());
            assert!(f.fds.is_empty());
        }
    }

    #[tokio::test]
    async fn a_read_dropped_while_it_waits_loses_nothing() {
        // The supervisor polls `read_frame` in a `select!`: another branch winning drops it.
        use futures::FutureExt as _;
        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut rb, _wb) = split(b);
        let frame = frame_bytes(b"hello world").unwrap();
        a.write_all(&frame[..6]).await.unwrap();
        for _ in 0..3 {
            assert!(rb.read_frame().now_or_never().is_none());
            tokio::task::yield_now().await;
        }
        a.write_all(&frame[6..]).await.unwrap();
        let f = rb.read_frame().await.unwrap().unwrap();
        assert_eq!(f.payload.as_ref(), b"hello world");
    }

    #[tokio::test]
    async fn split_reads_reassemble_a_frame() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut rb, _wb) = split(b);
        let frame = frame_bytes(b"hello world").unwrap();
        let reader = tokio::spawn(async move { rb.read_frame().await.unwrap().unwrap().payload });
        for byte in frame {
            a.write_all(&[byte]).await.unwrap();
            a.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(reader.await.unwrap().as_ref(), b"hello world");
    }

    #[tokio::test]
    async fn clean_eof_and_eof_mid_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut rb, _wb) = split(b);
        drop(a);
        assert!(rb.read_frame().await.unwrap().is_none());

        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut rb, _wb) = split(b);
        a.write_all(&[10, 0, 0, 0, 1, 2]).await.unwrap();
        drop(a);
        assert!(matches!(
            rb.read_frame().await,
            Err(CodecError::UnexpectedEof { buffered: 6 })
        ));
    }

    #[tokio::test]
    async fn oversize_frames_are_rejected_both_ways() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut rb, wb) = split(b);
        let too_big = (MAX_FRAME_BYTES as u32 + 1).to_le_bytes();
        a.write_all(&too_big).await.unwrap();
        assert!(matches!(
            rb.read_frame().await,
            Err(CodecError::FrameTooLarge { .. })
        ));
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            wb.write_frame(&big, &[]).await,
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn a_frame_of_exactly_the_limit_passes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ra, wa) = split(a);
        let (mut rb, _wb) = split(b);
        let payload = vec![7u8; MAX_FRAME_BYTES];
        let writer = tokio::spawn(async move { wa.write_frame(&payload, &[]).await });
        let f = rb.read_frame().await.unwrap().unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(f.payload.len(), MAX_FRAME_BYTES);
    }

    #[tokio::test]
    async fn fds_round_trip_with_their_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ra, wa) = split(a);
        let (mut rb, _wb) = split(b);
        let one = memfd_with(b"first");
        let two = memfd_with(b"second");
        // Frames before and after the one carrying descriptors must not pick them up.
        wa.write_frame(b"plain", &[]).await.unwrap();
        wa.write_frame(b"with fds", &[one.as_fd_ref(), two.as_fd_ref()])
            .await
            .unwrap();
        wa.write_frame(b"after", &[]).await.unwrap();
        drop((one, two));
        let f1 = rb.read_frame().await.unwrap().unwrap();
        assert!(f1.fds.is_empty());
        let f2 = rb.read_frame().await.unwrap().unwrap();
        assert_eq!(f2.payload.as_ref(), b"with fds");
        let mut fds = f2.fds.into_iter();
        assert_eq!(read_all(fds.next().unwrap()), b"first");
        assert_eq!(read_all(fds.next().unwrap()), b"second");
        let f3 = rb.read_frame().await.unwrap().unwrap();
        assert_eq!(f3.payload.as_ref(), b"after");
        assert!(f3.fds.is_empty());
    }

    #[tokio::test]
    async fn fds_on_consecutive_frames_stay_separate() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_ra, wa) = split(a);
        let (mut rb, _wb) = split(b);
        for i in 0..5u8 {
            let fd = memfd_with(&[i; 3]);
            wa.write_frame(&[i], &[fd.as_fd_ref()]).await.unwrap();
        }
        for i in 0..5u8 {
            let f = rb.read_frame().await.unwrap().unwrap();
            assert_eq!(f.payload.as_ref(), &[i]);
            assert_eq!(f.fds.len(), 1);
            assert_eq!(read_all(f.fds.into_iter().next().unwrap()), vec![i; 3]);
        }
    }

    #[tokio::test]
    async fn more_descriptors_than_the_limit_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut rb, _wb) = split(b);
        let name = c"codec-excess-fds";
        let fds: Vec<OwnedFd> = (0..MAX_FDS_PER_FRAME + 6)
            .map(|_| {
                nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap()
            })
            .collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // Past the writer's own check, as a misbehaving peer would send it.
        let frame = frame_bytes(b"many").unwrap();
        a.writable().await.unwrap();
        let sent = send_chunk(a.as_raw_fd(), &frame, &raw).unwrap();
        assert_eq!(sent, frame.len());
        drop(fds);
        let got = rb.read_frame().await;
        let count = MAX_FDS_PER_FRAME + 6;
        assert!(
            matches!(got, Err(CodecError::TooManyFds { count: c }) if c == count),
            "{got:?}"
        );
        // Every received copy was closed, none leaked into our descriptor table.
        let open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|t| t.to_string_lossy().contains("codec-excess-fds"))
            })
            .count();
        assert_eq!(open, 0);
    }

    #[tokio::test]
    async fn shutdown_ends_the_stream_for_both_sides() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut ra, wa) = split(a);
        let (mut rb, _wb) = split(b);
        wa.shutdown();
        assert!(rb.read_frame().await.unwrap().is_none());
        assert!(ra.read_frame().await.unwrap().is_none());
        assert!(wa.write_frame(b"late", &[]).await.is_err());
    }

    trait AsFdRef {
        fn as_fd_ref(&self) -> BorrowedFd<'_>;
    }
    impl AsFdRef for OwnedFd {
        fn as_fd_ref(&self) -> BorrowedFd<'_> {
            std::os::fd::AsFd::as_fd(self)
        }
    }
}
