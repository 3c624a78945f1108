//! The HTTP listeners (webhook, metrics) with the limits a listener open to a network
//! needs, which `axum::serve` does not set: a cap on concurrent connections (beyond it,
//! new connections wait in the kernel's backlog until one closes), admission at accept
//! ([`crate::sources`]: the allow-list and the per-source cap, so that one noisy address
//! cannot take the whole cap), a deadline for a request's headers (slow-loris), one for
//! a response the peer stops taking ([`Draining`]), and — in the webhook handler — one for
//! its body. Each request carries its [`Peer`].
//! HTTP/1.1 only (GitHub and reverse proxies speak it); keep-alive is kept, and an idle
//! keep-alive connection is closed by the same header deadline.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::logging::Throttle;
use crate::sources::Admission;

/// The address a request came from (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// From a connection's first byte (or the end of its previous request) to the end of
    /// the request's headers.
    pub header_timeout: Duration,
    /// Once the peer stops taking a response's bytes, how long until it has taken all the
    /// server has to write ([`Draining`]).
    pub write_timeout: Duration,
    /// How long in-flight requests may take once `shutdown` is cancelled.
    pub shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets in-flight requests
/// finish within `limits.shutdown_grace`. A connection `admission` refuses is closed
/// before anything is read from it.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let full = Throttle::new(Duration::from_secs(10));
    let accept_errors = Throttle::new(Duration::from_secs(10));
    loop {
        if slots.available_permits() == 0
            && let Some(suppressed) = full.check()
        {
            tracing::warn!(max_connections = limits.max_connections, addr = ?listener.local_addr().ok(), suppressed, "connection limit reached; new connections wait");
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and the like: wait a little rather than spin.
                    if let Some(suppressed) = accept_errors.check() {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Refused: dropped (closed) at once, its permit with it.
        let Ok(source_slot) = admission.admit(peer.ip()) else { continue };
        let app = app.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                let mut app = app.clone();
                req.extensions_mut().insert(Peer(peer));
                async move { tower_service::Service::call(&mut app, req.map(Body::new)).await }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(Draining::new(stream, limits.write_timeout)), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.shutdown_grace, conn).await;
                }
            }
            drop((permit, source_slot));
        });
    }
    // Wait (bounded) for the connections still open to finish their requests.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(limits.shutdown_grace, slots.acquire_many(all)).await;
}

/// A connection whose peer must take what the server writes: once a write finds the
/// socket full, everything the server has to write must be written (a flush that
/// completes) within `deadline`, or the connection fails (`TimedOut`) and closes.
///
/// hyper's header deadline stops once a request's headers are in, and is not armed again
/// while a response waits to be written: a peer that pipelines requests and never reads
/// the answers (its receive window shut, its kernel still answering TCP's probes) would
/// otherwise hold its connection, and its slot, for good. Progress does not reset the
/// deadline: a peer that reads a byte now and then is as stuck as one that reads none.
/// A peer that reads what it asked for never meets it (a full socket that drains within
/// the deadline).
pub struct Draining<S> {
    io: S,
    deadline: Duration,
    /// Armed at the first write the socket refused since everything was last written.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Draining<S> {
    pub fn new(io: S, deadline: Duration) -> Self {
        Draining { io, deadline, stalled: None }
    }

    /// A write or a flush that must wait: arms the deadline (once), and fails when it passed.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let deadline = self.deadline;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer did not take the response within server.body_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Draining<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Draining<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write(cx, buf) {
            Poll::Pending => self.waiting(cx),
            done => done,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.waiting(cx),
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// hyper flushes once its own buffer is written: all is written, the deadline is off.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.stalled = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => self.waiting(cx),
            failed => failed,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.io).poll_shutdown(cx) {
            Poll::Pending => self.waiting(cx),
            done => done,
        }
    }
}
