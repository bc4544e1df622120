//! HTTP plumbing shared by both listeners: the response body type and JSON responses.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::{header, Response, StatusCode};
use serde_json::{json, Value};

/// Errors a response body can end with (a proxied stream may fail midway).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body: a whole buffer for our own answers, a stream for proxied ones.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body from bytes we already have.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `{"error": message}` with `status`.
pub fn json_error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": message }))
}
