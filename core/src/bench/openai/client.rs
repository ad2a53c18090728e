//! A virtual client of `--protocol openai`: one keep-alive HTTP/1.1 connection, one streamed
//! `POST /v1/chat/completions` at a time, its event stream parsed as it arrives so each content
//! delta is timed when its bytes land.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use tokio::time::Instant;

use crate::bench::client::{CONNECT_BACKOFF, Client, Target, connect};
use crate::bench::openai::chunk::{Chunk, parse_chunk};
use crate::bench::openai::sse::SseParser;
use crate::bench::openai::timing::Timeline;
use crate::bench::tally::{Answer, ErrorKind, Outcome};

/// What every client of a run sends: the target and one ready body per conversation.
#[derive(Debug)]
pub struct ChatTarget {
    pub target: Arc<Target>,
    pub bodies: Vec<Bytes>,
    /// Set once the first failure inside a stream was printed (one line per run, not a flood).
    told: AtomicBool,
}

impl ChatTarget {
    pub fn new(target: Arc<Target>, bodies: Vec<Bytes>) -> ChatTarget {
        ChatTarget {
            target,
            bodies,
            told: AtomicBool::new(false),
        }
    }

    fn tell_once(&self, what: &str) {
        if !self.told.swap(true, Ordering::Relaxed) {
            eprintln!("unimodel bench: first failed stream (others are only counted): {what}");
        }
    }
}

/// One connection's client.
pub struct ChatClient {
    chat: Arc<ChatTarget>,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// Request number; clients interleave (`index`, `index + stride`, ...), so conversations
    /// are used round robin across the step.
    next_seq: u64,
    stride: u64,
}

impl Client for ChatClient {
    fn one(&mut self, start: Instant) -> impl Future<Output = Outcome> + Send {
        self.send_one(start)
    }
}

impl ChatClient {
    pub fn new(chat: Arc<ChatTarget>, index: u64, stride: u64) -> ChatClient {
        ChatClient {
            chat,
            sender: None,
            next_seq: index,
            stride,
        }
    }

    async fn send_one(&mut self, start: Instant) -> Outcome {
        let timeout = self.chat.target.timeout;
        let outcome = match tokio::time::timeout(timeout, self.request(start)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(kind)) => {
                if matches!(kind, ErrorKind::Connect) {
                    tokio::time::sleep(CONNECT_BACKOFF).await;
                }
                Err(kind)
            }
            Err(_elapsed) => {
                // The connection is mid-stream; it cannot carry another request.
                self.sender = None;
                Err(ErrorKind::Timeout)
            }
        };
        let progress = &self.chat.target.progress;
        progress.done.fetch_add(1, Ordering::Relaxed);
        if outcome.is_err() {
            progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// One streamed request, read to the end of its stream.
    async fn request(&mut self, start: Instant) -> Result<Answer, ErrorKind> {
        let chat = Arc::clone(&self.chat);
        let target = &chat.target;
        let seq = self.next_seq;
        self.next_seq += self.stride;
        let body = chat.bodies[(seq % chat.bodies.len().max(1) as u64) as usize].clone();
        let sent = body.len() as u64;
        let make = || {
            let mut req = Request::new(Full::new(body.clone()));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = target.infer_uri.clone();
            let headers = req.headers_mut();
            headers.insert(HOST, target.host.clone());
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
            headers.insert(CONTENT_LENGTH, HeaderValue::from(sent));
            headers.extend(target.headers.iter().cloned());
            req
        };

        let res = loop {
            let (sender, fresh) = self.ready_sender().await?;
            match sender.send_request(make()).await {
                Ok(res) => break res,
                Err(e) => {
                    self.sender = None;
                    // A kept-alive connection the server closed as the request went out
                    // (llama-server closes its connection after each stream, and the close
                    // can land just after `ready`): nothing was answered, so send it once
                    // more on a new connection, as curl does. The reconnect is in the latency.
                    if !fresh && (e.is_incomplete_message() || e.is_canceled()) {
                        continue;
                    }
                    return Err(ErrorKind::Io);
                }
            }
        };
        let status = res.status();
        let mut body = res.into_body();
        if !status.is_success() {
            // Read the error body so the connection can carry the next request.
            let text = match body.collect().await {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(_) => {
                    self.sender = None;
                    String::new()
                }
            };
            chat.tell_once(&format!("HTTP {status}: {}", text.trim()));
            return Err(ErrorKind::Status(status.as_u16()));
        }

        let mut parser = SseParser::new();
        let mut timeline = Timeline::new();
        let mut received = 0u64;
        let mut done = false;
        let mut failed: Option<(ErrorKind, String)> = None;
        while let Some(frame) = body.frame().await {
            let data = match frame.map(|f| f.into_data()) {
                Ok(Ok(data)) => data,
                Ok(Err(_trailers)) => continue,
                Err(_) => {
                    self.sender = None;
                    return Err(ErrorKind::Io);
                }
            };
            // One clock reading per read: deltas that arrived together arrived at once.
            let now = start.elapsed();
            received += data.len() as u64;
            // After a failure or `[DONE]` the rest is read only to free the connection.
            if failed.is_some() || done {
                continue;
            }
            for event in parser.push(&data) {
                match parse_chunk(&event) {
                    Ok(Chunk::Done) => done = true,
                    Ok(Chunk::Delta { content, usage }) => {
                        if content {
                            timeline.content(now);
                        }
                        if let Some(usage) = usage {
                            timeline.usage(usage);
                        }
                    }
                    Ok(Chunk::Error(message)) => {
                        failed = Some((ErrorKind::StreamError, format!("error event: {message}")));
                    }
                    Err(why) => failed = Some((ErrorKind::BadStream, why)),
                }
                if failed.is_some() || done {
                    break;
                }
            }
        }
        let e2e = start.elapsed();
        if let Some((kind, why)) = failed {
            chat.tell_once(&why);
            return Err(kind);
        }
        if !done {
            chat.tell_once("the event stream ended without data: [DONE]");
            return Err(ErrorKind::Truncated);
        }
        Ok(Answer {
            generation: Some(Box::new(timeline.finish(e2e))),
            ..Answer::new(e2e, sent, received)
        })
    }

    /// The connection, re-opened if the previous one closed; true when it was just opened.
    async fn ready_sender(&mut self) -> Result<(&mut SendRequest<Full<Bytes>>, bool), ErrorKind> {
        let alive = match self.sender.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !alive {
            self.sender = Some(
                connect(&self.chat.target)
                    .await
                    .map_err(|_| ErrorKind::Connect)?,
            );
        }
        let sender = self.sender.as_mut().ok_or(ErrorKind::Connect)?;
        Ok((sender, !alive))
    }
}
