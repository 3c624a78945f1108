//! The HTTP listeners (webhook, metrics) with the limits a listener open to a network
//! needs, which `axum::serve` does not set: a cap on concurrent connections (beyond it,
//! new connections wait in the kernel's backlog until one closes), admission at accept
//! ([`crate::sources`]: the allow-list and the per-source cap, so that one noisy address
//! cannot take the whole cap), a deadline for a request's headers (slow-loris), and — in
//! the webhook handler — one for its body. Each request carries its [`Peer`].
//! HTTP/1.1 only (GitHub and reverse proxies speak it); keep-alive is kept, and an idle
//! keep-alive connection is closed by the same header deadline.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
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
            let conn = builder.serve_connection(TokioIo::new(stream), service);
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
