//! The core's reader of the worker's control socket: framing (4-byte little-endian length,
//! `MAX_FRAME_BYTES`) and the MessagePack messages a worker may send.
//!
//! The input is written to one end of a real Unix socket pair as a worker would write it,
//! then closed; the core's `FrameReader` reads frames until the end or an error, and each
//! payload is decoded as a `WorkerMessage`. A plugin is untrusted code in the worker
//! process, so nothing it writes may crash the core.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::sync::OnceLock;
use unimodel::worker::codec;
use unimodel::worker::protocol::{self, WorkerMessage};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    // The socket buffer holds far more than libFuzzer's default max_len.
    let _ = theirs.write_all(data);
    drop(theirs);
    runtime().block_on(async move {
        ours.set_nonblocking(true).expect("nonblocking");
        let sock = tokio::net::UnixStream::from_std(ours).expect("register");
        let (mut reader, _writer) = codec::split(sock);
        while let Ok(Some(frame)) = reader.read_frame().await {
            let _ = protocol::decode::<WorkerMessage>(&frame.payload);
        }
    });
});
