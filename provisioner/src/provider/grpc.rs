//! Just enough gRPC for Terraform: unary calls over HTTP/2 and TLS on a
//! Unix socket. A call is a POST to `/<service>/<method>` whose body is one
//! length-prefixed protobuf message; the answer is one such message and
//! the status in the trailers (`grpc-status`, `grpc-message`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// The largest request devmesh accepts (Terraform's own limit is 256 MiB;
/// devmesh's schemas and states are small).
const MAX_REQUEST: usize = 64 * 1024 * 1024;

/// gRPC status codes devmesh answers with.
pub(crate) mod code {
    pub(crate) const OK: u32 = 0;
    pub(crate) const INVALID_ARGUMENT: u32 = 3;
    pub(crate) const UNIMPLEMENTED: u32 = 12;
}

/// A failed call.
#[derive(Debug)]
pub(crate) struct Status {
    pub(crate) code: u32,
    pub(crate) message: String,
}

impl Status {
    pub(crate) fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Answers one call: the method's path and the request message's bytes.
pub(crate) type Handler = Arc<
    dyn Fn(&str, Bytes) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, Status>> + Send>>
        + Send
        + Sync,
>;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Serves calls on `listener` until `shutdown`, each connection through
/// `tls`.
pub(crate) async fn serve(
    listener: UnixListener,
    tls: tokio_rustls::TlsAcceptor,
    handler: Handler,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a Terraform connection failed");
                    continue;
                }
            },
        };
        let (tls, handler, shutdown) = (tls.clone(), handler.clone(), shutdown.clone());
        tokio::spawn(async move {
            let Ok(stream) = tls.accept(stream).await else {
                tracing::warn!("a TLS handshake with Terraform failed");
                return;
            };
            let service = hyper::service::service_fn(move |req| call(handler.clone(), req));
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

async fn call(handler: Handler, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(trailers_only(Status::new(
                code::INVALID_ARGUMENT,
                e.to_string(),
            )));
        }
    };
    let message = match unframe(body) {
        Ok(m) => m,
        Err(status) => return Ok(trailers_only(status)),
    };
    Ok(match handler(&path, message).await {
        Ok(answer) => {
            let mut framed = Vec::with_capacity(answer.len() + 5);
            framed.push(0);
            framed.extend_from_slice(&(answer.len() as u32).to_be_bytes());
            framed.extend_from_slice(&answer);
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", code::OK.into());
            let body = Full::new(Bytes::from(framed))
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed();
            grpc_response(body)
        }
        Err(status) => {
            if status.code != code::UNIMPLEMENTED {
                tracing::warn!(method = %path, code = status.code, message = %status.message, "a Terraform call failed");
            }
            trailers_only(status)
        }
    })
}

/// The one message of a request body (compressed messages are refused:
/// devmesh never offers a `grpc-accept-encoding`).
fn unframe(mut body: Bytes) -> Result<Bytes, Status> {
    if body.len() < 5 {
        return Err(Status::new(code::INVALID_ARGUMENT, "short gRPC frame"));
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if compressed != 0 {
        return Err(Status::new(code::UNIMPLEMENTED, "compressed messages"));
    }
    if body.len() != len {
        return Err(Status::new(code::INVALID_ARGUMENT, "one message per call"));
    }
    Ok(body)
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("content-type", "application/grpc".parse().expect("valid"));
    resp
}

/// A failure: status in the headers, no message.
fn trailers_only(status: Status) -> Response<Body> {
    let mut resp = grpc_response(Full::new(Bytes::new()).boxed());
    resp.headers_mut().insert("grpc-status", status.code.into());
    // grpc-message is percent-encoded; keep it to safe characters.
    let message: String = status
        .message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect::<String>()
        .replace('%', "%25");
    if let Ok(v) = message.parse() {
        resp.headers_mut().insert("grpc-message", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_holds_exactly_one_uncompressed_message() {
        let framed = |flag: u8, len: u32, body: &[u8]| {
            let mut v = vec![flag];
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(body);
            Bytes::from(v)
        };
        assert_eq!(
            unframe(framed(0, 3, b"abc")).unwrap(),
            Bytes::from_static(b"abc")
        );
        assert_eq!(unframe(framed(0, 0, b"")).unwrap(), Bytes::new());
        assert_eq!(
            unframe(framed(1, 3, b"abc")).unwrap_err().code,
            code::UNIMPLEMENTED
        );
        assert_eq!(
            unframe(framed(0, 9, b"abc")).unwrap_err().code,
            code::INVALID_ARGUMENT
        );
        assert_eq!(
            unframe(Bytes::from_static(b"\0\0")).unwrap_err().code,
            code::INVALID_ARGUMENT
        );
    }
}
