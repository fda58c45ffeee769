//! Server-streaming RPCs over REST: the exports, answered as CSV downloads.
//!
//! The answer waits for the stream's first message, so an error before any
//! row (a bad filter, a refused merchant, a database that is down) is answered
//! like every other REST error: its HTTP status and a JSON status body. From
//! then on the CSV is streamed as the backend sends it (HTTP/1.1 chunked, or
//! HTTP/2 DATA frames), a few messages at most in memory. An error after the
//! first row *aborts* the body: the connection is cut without the final
//! chunk (HTTP/2: the stream is reset), so no client takes a partial export
//! for a complete file. So does a client that takes nothing for
//! [`STALLED_AFTER`]: its stream is given up, which frees what it held of the
//! gateway's connection to the backend for other calls.

use std::time::Duration;

use axum::{body::Body, response::Response};
use bytes::{Buf, Bytes};
use fluxo_proto::export::Table;
use http::{HeaderValue, header};
use prost_reflect::{DynamicMessage, Value};
use tonic::{
    Code, Status,
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder},
    transport::Channel,
};

use crate::{LOG_TARGET, error::ApiError, routes::Route, transcode::DynamicEncoder};

/// How long a download may wait for its client to take the next chunk.
pub(crate) const STALLED_AFTER: Duration = Duration::from_secs(60);

/// Chunks made ahead of what the client has taken.
const AHEAD: usize = 2;

/// Calls a server-streaming route's RPC and answers its messages as CSV.
pub(crate) async fn download(
    grpc: &mut Grpc<Channel>,
    call: tonic::Request<DynamicMessage>,
    path: http::uri::PathAndQuery,
    route: &Route,
    error: impl Fn(&Status) -> ApiError,
) -> Result<Response, ApiError> {
    let Some(table) = Table::of_response(route.rpc.output().full_name()) else {
        return Err(ApiError::new(Code::Unimplemented, "this streaming method has no REST form"));
    };
    let merchant = match call.get_ref().get_field_by_name("merchant_id").as_deref() {
        Some(Value::String(m)) => m.clone(),
        _ => String::new(),
    };
    let mut stream = Box::pin(grpc.server_streaming(call, path, RawCodec))
        .await
        .map_err(|status| error(&status))?
        .into_inner();
    // Nothing is sent before the first message (or the end) arrives: until
    // then an error is still an ordinary error answer.
    let first = stream.message().await.map_err(|status| error(&status))?;
    let mut head = table.header();
    if let Some(chunk) = first {
        head.extend(csv_rows(table, &chunk).map_err(|status| error(&status))?);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(AHEAD);
    tokio::spawn(async move {
        let mut rows = 0u64;
        loop {
            let piece = match stream.message().await {
                Ok(Some(chunk)) => match csv_rows(table, &chunk) {
                    Ok(bytes) => Piece::Data(bytes),
                    Err(status) => break fail(&status, rows),
                },
                Ok(None) => Piece::Done,
                Err(status) => break fail(&status, rows),
            };
            let done = matches!(piece, Piece::Done);
            match tokio::time::timeout(STALLED_AFTER, tx.send(piece)).await {
                Ok(Ok(())) if done => break,
                Ok(Ok(())) => rows += 1,
                // The client went away: dropping the stream cancels the call.
                Ok(Err(_)) => break,
                Err(_) => {
                    break tracing::warn!(target: LOG_TARGET, chunks = rows, "download stalled: client took nothing; aborted");
                }
            }
        }
    });
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Some(Piece::Data(bytes)) => Some((Ok(bytes), rx)),
            Some(Piece::Done) => None,
            // Ended without its end: abort the body rather than end it.
            None => Some((Err(std::io::Error::other("export aborted")), rx)),
        }
    });
    let body = futures::StreamExt::chain(futures::stream::once(async move { Ok(Bytes::from(head)) }), rest);
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(value) =
        HeaderValue::from_str(&format!("attachment; filename=\"{}\"", table.file_name(&merchant)))
    {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// What the pump hands the body.
enum Piece {
    Data(Bytes),
    /// The stream ended with OK: the body may end.
    Done,
}

fn fail(status: &Status, chunks: u64) {
    tracing::warn!(
        target: LOG_TARGET,
        code = ?status.code(),
        message = status.message(),
        chunks,
        "export failed after its first rows; download aborted"
    );
}

fn csv_rows(table: Table, chunk: &Bytes) -> Result<Bytes, Status> {
    table
        .rows(chunk)
        .map(|(bytes, _)| Bytes::from(bytes))
        .map_err(|e| Status::internal(format!("rendering the export: {e}")))
}

/// Requests as dynamic messages; replies left encoded, for [`Table::rows`].
#[derive(Debug, Clone, Copy)]
struct RawCodec;

/// Hands replies over undecoded.
#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = DynamicMessage;
    type Decode = Bytes;
    type Encoder = DynamicEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
