//! The TLS files' checks and the acceptor, with the fixtures in `testdata/` and real sockets.

use super::*;
use crate::telemetry::metrics::Metrics;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Long enough that a good handshake on a loaded machine finishes well within it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/tls/testdata")
        .join(name)
}

fn files(cert: &str, key: &str, client_ca: Option<&str>) -> ServerTlsFiles {
    ServerTlsFiles {
        cert: fixture(cert),
        key: fixture(key),
        client_ca: client_ca.map(fixture),
        handshake_timeout: HANDSHAKE_TIMEOUT,
    }
}

#[test]
fn loads_a_certificate_with_its_key_and_an_optional_client_ca() {
    let tls = files("server.pem", "server.key", None).load().unwrap();
    assert!(!tls.requires_client_cert());
    let tls = files("server.pem", "server.key", Some("ca.pem"))
        .load()
        .unwrap();
    assert!(tls.requires_client_cert());
}

#[test]
fn each_bad_file_is_named_with_its_flag_and_what_is_wrong() {
    let err = |f: ServerTlsFiles| f.load().unwrap_err();
    let e = err(files("nope.pem", "server.key", None));
    assert!(
        matches!(
            e,
            TlsError::Read {
                flag: "--tls-cert-file",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("nope.pem"), "{e}");
    let e = err(files("server.pem", "server.pem", None));
    assert!(
        matches!(
            e,
            TlsError::NoKey {
                flag: "--tls-key-file",
                ..
            }
        ),
        "{e}"
    );
    let e = err(files("server.pem", "other.key", None));
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(e.to_string().contains("does not belong"), "{e}");
    let e = err(files("server.key", "server.key", None));
    assert!(
        matches!(
            e,
            TlsError::NoCertificate {
                flag: "--tls-cert-file",
                ..
            }
        ),
        "{e}"
    );
    let e = err(files("server.pem", "server.key", Some("other.key")));
    assert!(
        matches!(
            e,
            TlsError::NoCertificate {
                flag: "--tls-client-ca-file",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_failed_reload_keeps_the_previous_files_in_use() {
    let dir = std::env::temp_dir().join(format!("unimodel-tls-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::copy(fixture("server.pem"), &cert).unwrap();
    std::fs::copy(fixture("server.key"), &key).unwrap();
    let tls = ServerTlsFiles {
        cert,
        key: key.clone(),
        client_ca: None,
        handshake_timeout: Duration::from_secs(1),
    }
    .load()
    .unwrap();
    let handshake = tls.handshake(ListenerKind::Http, None);
    let before = handshake.configs.borrow().for_kind(ListenerKind::Http);
    std::fs::copy(fixture("other.key"), &key).unwrap();
    assert!(matches!(tls.reload(), Err(TlsError::KeyMismatch { .. })));
    let after = handshake.configs.borrow().for_kind(ListenerKind::Http);
    assert!(std::sync::Arc::ptr_eq(&before, &after));
    std::fs::copy(fixture("server.key"), &key).unwrap();
    tls.reload().unwrap();
    let reloaded = handshake.configs.borrow().for_kind(ListenerKind::Http);
    assert!(!std::sync::Arc::ptr_eq(&before, &reloaded));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_client_side_needs_a_ca_and_both_halves_of_a_client_certificate() {
    let e = client_config(&ClientTlsFiles::default(), &[b"h2"]).unwrap_err();
    assert!(e.to_string().contains("--cacert"), "{e}");
    let half = ClientTlsFiles {
        cacert: Some(fixture("ca.pem")),
        cert: Some(fixture("server.pem")),
        key: None,
    };
    let e = client_config(&half, &[b"h2"]).unwrap_err();
    assert!(e.to_string().contains("--cert and --key"), "{e}");
}

/// A TLS client that trusts the test CA, offering `alpn`.
async fn tls_client(
    addr: std::net::SocketAddr,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let cacert = ClientTlsFiles {
        cacert: Some(fixture("ca.pem")),
        ..Default::default()
    };
    let config = std::sync::Arc::new(client_config(&cacert, &[alpn]).unwrap());
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// `listener` with no connection cap, as `TlsIncoming` takes it.
fn acceptor(listener: TcpListener) -> crate::net::Acceptor {
    use crate::net::{Acceptor, ConnectionLimit};
    Acceptor::new(listener, ConnectionLimit::new(usize::MAX), None, "http")
}

#[tokio::test]
async fn stalled_and_failed_handshakes_hold_up_nobody_and_are_counted() {
    let tls = files("server.pem", "server.key", None).load().unwrap();
    let metrics = Metrics::new();
    let failures = metrics.tls_handshake_failures("http");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = TlsIncoming::start(
        acceptor(listener),
        tls.handshake(ListenerKind::Http, Some(failures.clone())),
    )
    .unwrap();

    // A client that never says hello, and one that speaks plain HTTP.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();

    // Meanwhile a TLS client gets through at once, with the ALPN it asked for.
    let client = tokio::spawn(tls_client(addr, b"h2"));
    let (server_side, _, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, incoming.accept())
        .await
        .expect("a good handshake waited for a stalled one");
    assert_eq!(server_side.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    client.await.unwrap().unwrap();

    // The plain client gets an alert and the end of the connection (FIN, or RST since the
    // server left its request unread), not a hang.
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(ended.is_ok(), "the plain-HTTP connection was left open");

    // The stalled one is closed at the handshake timeout.
    let mut rest = Vec::new();
    tokio::time::timeout(HANDSHAKE_TIMEOUT * 3, stalled.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(failures.timed_out.get(), 1);
    assert_eq!(failures.failed.get(), 1);
}

#[tokio::test]
async fn the_grpc_listener_offers_only_h2() {
    let tls = files("server.pem", "server.key", None).load().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _incoming =
        TlsIncoming::start(acceptor(listener), tls.handshake(ListenerKind::Grpc, None)).unwrap();
    let e = tls_client(addr, b"http/1.1").await.unwrap_err();
    assert!(e.to_string().contains("NoApplicationProtocol"), "{e}");
}

#[tokio::test]
async fn dropping_the_incoming_closes_the_port() {
    let tls = files("server.pem", "server.key", None).load().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming =
        TlsIncoming::start(acceptor(listener), tls.handshake(ListenerKind::Http, None)).unwrap();
    drop(incoming);
    // The accept task notices and drops the socket; connecting then fails. Its end cannot be
    // awaited from here, so poll, with a deadline a loaded machine cannot reach by chance.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut refused = false;
    while std::time::Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "the port still accepts after the incoming was dropped"
    );
}
